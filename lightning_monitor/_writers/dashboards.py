"""The dashboards' writers: TensorBoard through Lightning's ``TensorBoardLogger`` (one event per write, the run's
Custom Scalars layout kept up to date) and Weights & Biases through its ``WandbLogger`` (one history row per write).
Both go through :func:`~lightning_monitor._writers.backends.deliver` like every writer."""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping
from typing import Any, Optional

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lightning_monitor._core.compat import add_prefix, file_writer, logger_prefix
from lightning_monitor._writers.backends import Writer, _call
from lightning_monitor._writers.layout import layout_summary, note_layout_tags, read_layout_tags
from lightning_monitor._writers.media import HistogramData, Images, encode_png, to_rgb
from lightning_monitor._writers.tb_crc import use_fast_crc


class TensorBoardWriter(Writer):
    """TensorBoard through Lightning's ``TensorBoardLogger`` and its ``SummaryWriter``."""

    def __init__(self, logger: TensorBoardLogger, name: str = "TensorBoard") -> None:
        super().__init__(logger, name)
        self.tb = logger
        self.layout_tags: set[str] = set()  # the scalar tags the run's layout names (lightning_monitor._writers.layout)
        self.layout_seeded = False  # layout_tags holds the tags earlier processes wrote to this run directory
        # the last scalar write's keys, and its event (values set in place when the same keys come again)
        self._event_keys: tuple[str, ...] = ()
        self._event: Any = None
        self._event_values: list[Any] = []
        use_fast_crc()

    def summary_writer(self) -> Any:
        return self.tb.experiment

    def _prefixed(self, values: Mapping[str, Any]) -> Mapping[str, Any]:
        """``values`` under the logger's ``prefix``, as its ``log_metrics`` puts them."""
        return add_prefix(values, logger_prefix(self.tb), self.tb.LOGGER_JOIN_CHAR)

    def note_logger_keys(self, keys: Iterable[str], step: Optional[int]) -> None:
        """Scalar ``keys`` the logger's own ``log_metrics`` just wrote (it adds its prefix): see
        :meth:`note_scalar_tags`."""
        self.note_scalar_tags(self._prefixed(dict.fromkeys(keys)), step)

    def note_scalar_tags(self, tags: Iterable[str], step: Optional[int]) -> None:
        """Scalar ``tags`` (prefixed) just written at ``step``: when one is new, the run's layout (the Custom Scalars
        tab) is written again, naming every scalar tag written so far; otherwise nothing (a set comparison)."""
        if not self.layout_seeded:  # a later process on the run (test after a fit, a restart) keeps their charts
            self.layout_seeded = True
            self.layout_tags |= read_layout_tags(self.tb.log_dir)
        fresh = set(tags) - self.layout_tags
        if not fresh:
            return
        self.layout_tags |= fresh
        note_layout_tags(self.tb.log_dir, fresh)
        lead = f"{logger_prefix(self.tb)}{self.tb.LOGGER_JOIN_CHAR}" if logger_prefix(self.tb) else ""
        # at the write's step: the plugin shows a run's last layout record, and steps only grow within a run
        file_writer(self.summary_writer()).add_summary(layout_summary(self.layout_tags, lead), step or 0)

    def _one_event(self, values: list[Any], step: Optional[int]) -> None:
        """``values`` (``Summary.Value`` protos) as ONE event at ``step``.

        ``SummaryWriter.add_scalar`` / ``add_histogram_raw`` write one event per key, each a put on the event
        writer's bounded queue (10 entries) that waits for its thread under the GIL: ~0.1 ms per key, 26 ms for the
        ~270 keys of one gradient event of a 400-tensor model. One event holding every value (TensorBoard reads
        each value of an event as its own point) is one put.
        """
        from tensorboard.compat.proto.summary_pb2 import Summary

        if values:
            file_writer(self.summary_writer()).add_summary(Summary(value=values), step)

    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        if type(self.tb).log_metrics is not TensorBoardLogger.log_metrics:
            return super().scalars(metrics, step)  # a subclass's own log_metrics keeps its say
        if self._reuse_event(metrics):  # the keys of the last write again (a logging step of the same monitors)
            file_writer(self.summary_writer()).add_event(self._event, step)
            return
        from tensorboard.compat.proto.summary_pb2 import Summary

        values, rejected = [], []
        for key, value in self._prefixed(metrics).items():
            try:
                values.append(Summary.Value(tag=key, simple_value=float(value)))
            except (TypeError, ValueError):
                rejected.append(key)
        self._one_event(values, step)  # the numbers are written even when another value is not one
        self.note_scalar_tags([v.tag for v in values], step)
        if not rejected:  # the next write of the same keys fills this event's values in place
            from tensorboard.compat.proto.event_pb2 import Event

            self._event_keys, self._event = tuple(metrics), Event(summary=Summary(value=values))
            self._event_values = list(self._event.summary.value)
        if rejected:
            self.refused = len(rejected)  # the other values of the write were kept
            raise ValueError(f"not a number: {', '.join(rejected[:5])}")

    def _reuse_event(self, metrics: Mapping[str, float]) -> bool:
        """Set the values of the last write's event in place when ``metrics`` has its keys, in its order (building
        40 ``Summary.Value`` protos and copying them into an event costs ~80 us a write; setting them ~5 us); False
        when the keys differ or a value is not a number (the full path then writes, and names what it rejects)."""
        if self._event is None or tuple(metrics) != self._event_keys:
            return False
        try:
            for proto, value in zip(self._event_values, metrics.values(), strict=True):
                proto.simple_value = float(value)
        except (TypeError, ValueError):
            return False
        return True

    def histograms(self, histograms: Mapping[str, HistogramData], step: Optional[int]) -> None:
        from torch.utils.tensorboard.summary import histogram_raw

        values = []
        for key, hist in self._prefixed(histograms).items():
            # TensorBoard wants right bucket edges; the left edge of the first bucket is ``min``.
            values += histogram_raw(
                key,
                min=hist.min,
                max=hist.max,
                num=hist.num,
                sum=hist.sum,
                sum_squares=hist.sum_squares,
                bucket_limits=hist.edges[1:].tolist(),
                bucket_counts=hist.counts.tolist(),
            ).value
        self._one_event(values, step)

    def images(self, images: Images, step: Optional[int]) -> None:
        """One event with a PNG image value per picture (what ``SummaryWriter.add_image`` writes for uint8 HWC, the
        same pixels), encoded at zlib level 1: a 546 x 338 prediction grid in ~5 ms where ``add_image``'s float
        round trip and level-6 encoding take ~13 ms, for a file ~6 % larger."""
        from tensorboard.compat.proto.summary_pb2 import Summary

        values = []
        for index, image in enumerate(images.arrays):
            tag = images.key if len(images.arrays) == 1 else f"{images.key}/{index}"
            rgb = to_rgb(image)
            height, width, channels = rgb.shape
            png = Summary.Image(height=height, width=width, colorspace=channels, encoded_image_string=encode_png(rgb))
            values.append(Summary.Value(tag=tag, image=png))
        self._one_event(values, step)

    def text(self, key: str, text: str, step: Optional[int]) -> None:
        self.summary_writer().add_text(key, text, global_step=step)

    def summary(self, values: Mapping[str, Any], step: Optional[int], card: Optional[tuple[str, str]],
                headline: Collection[str] = ()) -> None:
        """The whole summary as the text ``card``; as scalars (one point each, at ``step``) only its ``headline``
        numbers: a chart of one dot says nothing the card does not (and the HParams tab reads its metric values from
        scalars: MultiLogger registers the headline ones as columns)."""
        # scalars through TensorBoardLogger.log_metrics (its prefix applies)
        super().summary({k: v for k, v in values.items() if k in headline}, step, card, headline)
        if card is not None:
            self.text(card[0], card[1], step)


class WandbWriter(Writer):
    """Weights & Biases through Lightning's ``WandbLogger``: every call is one history row (one ``run.log``)."""

    def __init__(self, logger: WandbLogger, name: str = "wandb") -> None:
        super().__init__(logger, name)

    def wandb_logger(self) -> WandbLogger:
        return self.logger  # type: ignore[return-value]

    def log_row(self, row: dict[str, Any], step: Optional[int]) -> None:
        """One history row (one ``run.log``) at trainer ``step``; every operation below ends here."""
        _call(self.wandb_logger(), "log_metrics", row, step=step)

    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        self.log_row(dict(metrics), step)

    def hyperparams(self, params: Any, metrics: Optional[Mapping[str, float]] = None) -> None:
        _call(self.wandb_logger(), "log_hyperparams", params)

    def histograms(self, histograms: Mapping[str, HistogramData], step: Optional[int]) -> None:
        import wandb

        rows = {k: wandb.Histogram(np_histogram=(h.counts, h.edges)) for k, h in histograms.items()}
        self.log_row(rows, step)  # one row for all of them, not one per key

    def images(self, images: Images, step: Optional[int]) -> None:
        import wandb

        items = [
            wandb.Image(array[:, :, 0] if array.shape[2] == 1 else array,
                        caption=None if images.captions is None else images.captions[i])
            for i, array in enumerate(images.arrays)
        ]
        self.log_row({images.key: items if len(items) > 1 else items[0]}, step)

    def text(self, key: str, text: str, step: Optional[int]) -> None:
        import wandb

        self.log_row({key: wandb.Table(columns=["text"], data=[[text]])}, step)

    def summary(self, values: Mapping[str, Any], step: Optional[int], card: Optional[tuple[str, str]],
                headline: Collection[str] = ()) -> None:
        """Into the run summary (every number and text; the runs table shows and sorts by them), not a history
        row."""
        wb = self.wandb_logger()
        wb.experiment.summary.update(add_prefix(values, logger_prefix(wb), wb.LOGGER_JOIN_CHAR))

    def alert(self, title: str, text: str) -> None:
        """``run.alert`` (an e-mail or Slack message from wandb) when the run is online; an offline run has no
        server to send it, and keeps the alert in its history rows (what ``wandb sync`` uploads)."""
        run = self.wandb_logger().experiment
        if not run.offline:
            run.alert(title=title, text=text)
