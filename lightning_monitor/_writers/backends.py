"""One writer per backend (TensorBoard, wandb, scalars-only) and the one guard every write goes through.

A monitor's value takes one path: the dispatch layer prepares it once (a
:class:`~lightning_monitor._writers.media.HistogramData` or :class:`~lightning_monitor._writers.media.Images`) and hands
the same object to each writer through :func:`deliver`. Writers are chosen once per logger:
:class:`~lightning_monitor.MultiLogger` brings its own (the :class:`Backend` contract), a plain ``TensorBoardLogger`` /
``WandbLogger`` gets one of the classes here, and any other Lightning logger gets the scalar-only :class:`Writer`
(:mod:`~lightning_monitor._writers.plain` picks them and guards Lightning's own calls on those loggers).

Failure isolation is the same for all of them. A value a backend rejects (``ValueError``, ``TypeError``,
``KeyError``, ``IndexError``: a bad key, a picture it cannot encode) is skipped with one warning naming the key, and
the backend keeps logging; :data:`MAX_VALUE_ERRORS` such errors in a row, or any other error (service gone, disk
gone), turn that backend off with one warning saying what still logs. Training never stops for either. Each
writer counts the points it did not keep (:attr:`Writer.dropped`: the values rejected, every value of a write
after it was turned off), which HealthMonitor's ``dropped_points`` rule reads.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Optional

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_monitor._core import clock as _clock
from lightning_monitor._core.compat import add_prefix, file_writer, logger_prefix
from lightning_monitor._core.warn import WarnOnce
from lightning_monitor._writers.layout import layout_summary, note_layout_tags, read_layout_tags
from lightning_monitor._writers.media import HistogramData, Images, to_rgb
from lightning_monitor._writers.tb_crc import use_fast_crc

#: value-level errors in a row (no successful write between them) after which a backend is taken as broken
MAX_VALUE_ERRORS = 3
_VALUE_ERRORS = (ValueError, TypeError, KeyError, IndexError)


class Writer:
    """Scalars through ``Logger.log_metrics``; media are skipped with one warning (e.g. ``CSVLogger``).

    Subclasses override the operations their backend supports, and :meth:`start` / :meth:`end` when writes need
    a lazy start or bookkeeping (MultiLogger's run state).
    """

    #: a dashboard the user looks at (named in the warning when another backend stops); ``False`` for an in-memory
    #: consumer of the values such as RunSummary's
    dashboard = True

    def __init__(self, logger: Logger, name: Optional[str] = None) -> None:
        self.logger = logger
        self.name = name or type(logger).__name__
        self.failed = False
        self.value_errors = 0  # value-level errors since the last successful write
        #: points (one value at one step) of rows this backend did not keep: values it rejected, and every value
        #: written to it after it was turned off (counted by :func:`deliver`; HealthMonitor's ``dropped_points``)
        self.dropped = 0
        self.refused: Optional[int] = None  # set by a write that kept some values and refused these many
        self.warn = WarnOnce()

    # -------------------------------------------------------------------- lifecycle hooks for subclasses
    def start(self, step: Optional[int], row: bool) -> bool:
        """Called before each write at ``step`` (``row``: the write adds a point); ``False`` skips the write.

        Errors raised here are not caught by :func:`deliver`: MultiLogger uses it to fail before training when the
        run directory cannot be written.
        """
        return True

    def end(self, step: Optional[int], row: bool) -> None:
        """Called after each successful write, inside the guard."""

    def failure_message(self, err: BaseException, still_logging: Sequence[str]) -> str:
        keeps = f"{' and '.join(still_logging)} keep{'s' if len(still_logging) == 1 else ''} logging"
        return (
            f"{self.name} stopped working ({type(err).__name__}: {err}); lightning-monitor writes nothing more to it"
            f" and training goes on; {keeps if still_logging else 'nothing else is logging'}."
        )

    # -------------------------------------------------------------------- operations
    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        _call(self.logger, "log_metrics", dict(metrics), step=step)

    def hyperparams(self, params: Any, metrics: Optional[Mapping[str, float]] = None) -> None:
        """Hyperparameters (``metrics``: the backend's own hyperparameter metrics, where it has them)."""
        _call(self.logger, "log_hyperparams", params)

    def finish(self, status: str) -> None:
        """The run ended with ``status`` (a writer that owns its backend flushes and closes it; a plain logger's
        writer leaves that to Lightning, which finalizes the logger itself)."""

    def histograms(self, histograms: Mapping[str, HistogramData], step: Optional[int]) -> None:
        self._unsupported("histograms")

    def images(self, images: Images, step: Optional[int]) -> None:
        self._unsupported("images")

    def text(self, key: str, text: str, step: Optional[int]) -> None:
        self._unsupported("text")

    def summary(self, values: Mapping[str, Any], step: Optional[int], card: Optional[tuple[str, str]],
                headline: Collection[str] = ()) -> None:
        """An end-of-run summary (RunSummary): its numbers as scalars at ``step`` (a scalar-only logger, e.g. a CSV
        file, has no other place for them); its text values and its ``card`` (key, Markdown) where the backend
        shows text. ``headline``: the numbers worth a chart (a dashboard writer charts those only)."""
        _call(self.logger, "log_metrics", _numbers(values), step=step)

    def alert(self, title: str, text: str) -> None:
        """An alert worth a notification (HealthMonitor's): only wandb has one (``run.alert``, online); every other
        backend shows the alert in its scalars and text, and ignores this."""

    def _unsupported(self, kind: str) -> None:
        self.warn(  # one warning for every kind of media (histograms, images, text): not one per kind
            "media",
            f"{self.name} cannot show {kind} (or any other media); lightning-monitor logs only scalars to it."
            " Use MultiLogger, TensorBoardLogger or WandbLogger to see them.",
        )


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
        writer = self.summary_writer()
        for index, image in enumerate(images.arrays):
            tag = images.key if len(images.arrays) == 1 else f"{images.key}/{index}"
            writer.add_image(tag, to_rgb(image), global_step=step, dataformats="HWC")

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


class ScalarSink(Writer):
    """An in-memory consumer of the logged scalars, with no logger behind it (RunSummary's :class:`Recorder`,
    HealthMonitor's writer): a subclass says what :meth:`scalars` keeps. Not a dashboard: hyperparameters, media, text
    and summaries are not its business."""

    dashboard = False

    def __init__(self, name: str) -> None:
        super().__init__(None, name)  # type: ignore[arg-type]  # no logger behind it: every operation is its own

    def hyperparams(self, params: Any, metrics: Optional[Mapping[str, float]] = None) -> None:
        pass

    def histograms(self, histograms: Mapping[str, HistogramData], step: Optional[int]) -> None:
        pass

    def images(self, images: Images, step: Optional[int]) -> None:
        pass

    def text(self, key: str, text: str, step: Optional[int]) -> None:
        pass

    def summary(self, values: Mapping[str, Any], step: Optional[int], card: Optional[tuple[str, str]],
                headline: Collection[str] = ()) -> None:
        pass


class Recorder(ScalarSink):
    """RunSummary's consumer of the logged scalars: ``series`` keeps ``key -> [(step, value)]``, in logging order, of
    every key ``keep`` accepts."""

    def __init__(self, keep: Callable[[str], bool], name: str = "RunSummary") -> None:
        super().__init__(name)
        self.keep = keep
        self.series: dict[str, list[tuple[int, float]]] = {}

    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        for key, value in metrics.items():
            if self.keep(key):
                self.series.setdefault(key, []).append((int(step or 0), float(value)))  # plain numbers: no sync


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``values`` (text and flags left out)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _call(logger: Logger, method: str, *args: Any, **kwargs: Any) -> Any:
    """``logger.method(...)`` as its class defines it, past the instance wrapper of :func:`guard_lightning_calls`
    (a write already inside :func:`deliver` never enters the guard a second time)."""
    return getattr(type(logger), method)(logger, *args, **kwargs)


def deliver(
    writer: Writer,
    write: Callable[[], Any],
    step: Optional[int],
    keys: Iterable[str],
    others: Sequence[Writer] = (),
    row: bool = True,
) -> None:
    """Run ``write`` (one operation of ``writer``) inside the failure guard described in the module docstring.

    ``keys`` name what is written (for the warning when the backend rejects it); ``others`` are the writers that
    keep logging if this one stops (for the warning's wording); ``row``: the write adds points (a row of values at
    ``step``), which :attr:`Writer.dropped` counts when the backend does not keep them. The host time spent here is
    added to :func:`seconds_writing`.
    """
    global _seconds_writing
    began = _clock.now()  # the package's one host clock (tests fake it there)
    try:
        # start() runs outside the guard: a run directory that cannot be written fails before training, as documented
        if writer.failed or not writer.start(step, row):
            if row and writer.failed:
                writer.dropped += _points(keys)  # a backend turned off keeps nothing more
            return
        try:
            write()
            writer.end(step, row)
            writer.value_errors = 0
        except Exception as err:  # noqa: BLE001 - a backend never ends the user's run
            writer.value_errors += 1
            refused, writer.refused = writer.refused, None
            if row:
                writer.dropped += _points(keys) if refused is None else refused
            # a value error caused by an OSError (Lightning's TensorBoardLogger wraps a failed write in ValueError)
            # is the disk failing, not the value
            if isinstance(err, _VALUE_ERRORS) and os_error(err) is None and writer.value_errors < MAX_VALUE_ERRORS:
                names = ", ".join(sorted(keys)[:5]) or "a value"
                writer.warn(
                    f"value:{names}",
                    f"{writer.name} rejected {names} at step {step} ({type(err).__name__}: {err}); that value is"
                    " skipped and everything else keeps logging.",
                )
                return
            writer.failed = True
            still = [w.name for w in others if w is not writer and not w.failed and w.dashboard]
            rank_zero_warn(writer.failure_message(err, still))
    finally:
        _seconds_writing += _clock.now() - began


def _points(keys: Iterable[str]) -> int:
    """How many values a write names (``keys``: a mapping of values or a list of keys)."""
    return len(keys) if isinstance(keys, Collection) else sum(1 for _ in keys)


def seconds_writing() -> float:
    """Host seconds this process has spent inside :func:`deliver` (starting and writing to backends): SpeedMonitor
    leaves them out of its timing windows."""
    return _seconds_writing


_seconds_writing = 0.0


def os_error(err: Optional[BaseException]) -> Optional[OSError]:
    """The first ``OSError`` in ``err``'s chain of causes (a disk or a directory failing), else ``None``."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


class Backend(abc.ABC):
    """The contract of an object that brings its own writers to the dispatch layer, instead of getting one made for
    it by :func:`~lightning_monitor._writers.plain.writer_for`: :class:`~lightning_monitor.MultiLogger` (a logger:
    its TensorBoard and wandb writers) and :class:`~lightning_monitor.RunSummary` (a callback: an in-memory consumer
    of the logged scalars). The dispatch layer asks the trainer's loggers and callbacks for it, on global rank 0
    only."""

    @abc.abstractmethod
    def monitor_writers(self) -> Sequence[Writer]:
        """The writers that get every value the monitors log, now (may take the run directory's lock)."""
