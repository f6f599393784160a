"""MultiLogger: Lightning's TensorBoardLogger and WandbLogger as one logger, one run, one step axis."""

from __future__ import annotations

import os
from argparse import Namespace
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Optional, Union

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only
from typing_extensions import override

from lightning_monitor._core.compat import convert_params
from lightning_monitor._core.keys import document_keys
from lightning_monitor._run import wandb_start as _wandb_run
from lightning_monitor._run.guard import RunGuard
from lightning_monitor._run.options import (
    check_keys,
    check_writable,
    is_eval_metric,
    options,
    public_params,
    scalar,
    tensorboard_keys,
)
from lightning_monitor._run.run import Run
from lightning_monitor._run.writers import RunTensorBoard, RunWandb
from lightning_monitor._writers.backends import Backend, Writer, around_model_write, deliver
from lightning_monitor._writers.media import HistogramData, make_histogram, prepare_images
from lightning_monitor._writers.plain import check_not_tensorboardx

#: seconds between TensorBoard flushes; TensorBoard's own default (120 s) is too slow to watch a run live.
DEFAULT_FLUSH_SECS = 2


@document_keys
class MultiLogger(Logger, Backend):
    r"""One Lightning logger that writes to TensorBoard and Weights & Biases at once.

    It composes Lightning's own :class:`~lightning.pytorch.loggers.TensorBoardLogger` and
    :class:`~lightning.pytorch.loggers.WandbLogger` and adds what they lack in common: histograms, images and
    text. Both backends describe one run: TensorBoard writes to ``save_dir/name/version``; the wandb run is stored
    inside that directory, is called ``name/version`` and has an id derived from the run directory, so starting
    again with the same ``version`` (resuming from a checkpoint, ``test`` after ``fit``) continues the same
    TensorBoard run and the same wandb run. Every value lands at the step it is given (``trainer.global_step``) on
    both sides; wandb plots it against ``trainer/global_step``.

    Each new segment of the wandb run (a later ``fit``/``test``, a restarted job) continues wandb's own ``_step``
    after every row the run holds, so syncing the offline folders in the order they were written appends them
    (generally available wandb only). After a restart from a checkpoint, the steps the dead job had already logged
    past the checkpoint are logged again: TensorBoard drops the old points (a purge marker), wandb keeps both, so
    on the ``trainer/global_step`` axis the line steps back to the checkpoint's step and runs on from there.
    ``wandb_rewind=True`` instead cuts the wandb run back to the checkpoint (wandb's rewind, a preview feature).
    A fit that starts the run over from scratch (a notebook cell run again with the same ``version``) is told once,
    with what TensorBoard will show and the way out (``version=None``).

    Hyperparameters go to TensorBoard's HParams tab and wandb's config without ``_``-prefixed keys; at the end of
    every segment (``fit``, a later ``test``, in this process or a later one) the validation and test metrics of
    every segment so far, and RunSummary's headline numbers, become the HParams metric columns. wandb never blocks
    training: without an API key or network, or with ``WANDB_MODE=offline``, it runs offline, says so once with
    the ``wandb sync`` command that uploads every segment of the run, and never prompts. wandb's own terminal
    lines (banners, history and summary blocks, per-folder sync hints) are off; ``wandb={"settings": {"silent":
    False}}`` (or ``WANDB_SILENT`` / ``WANDB_QUIET`` set) keeps wandb's choice. A backend that rejects a value
    loses that value (one warning); a backend that breaks is turned off (one warning) while the other keeps every
    step. The monitors write through its writers.

    Logged keys (only when a run ends badly):

    {logged_keys}

    Args:
        save_dir: root directory of all runs.
        name: experiment name: ``save_dir/name`` holds its versions; also the default wandb project.
        version: run version; ``None`` takes the next free ``version_N``. Pass the version of an earlier run
            (e.g. when resuming from its checkpoint) to continue that run.
        prefix: put before every metric key (``prefix-key``), as Lightning's loggers do.
        tensorboard: ``True``, ``False`` or a dict of options for ``TensorBoardLogger`` / ``SummaryWriter``
            (e.g. ``{"flush_secs": 10, "log_graph": True}``).
        wandb: ``True``, ``False`` or a dict of options for ``WandbLogger`` / ``wandb.init`` (e.g.
            ``{"project": "x", "entity": "y", "mode": "offline", "tags": [...]}``).
        wandb_rewind: on a restart from a checkpoint, rewind the wandb run to the checkpoint's step
            (``resume_from="<id>?_step=k"``). A wandb preview feature: it needs W&B's consent for your account and
            is not available on self-managed servers.

    Raises:
        ValueError: an unknown option or a bad value.
        WandbOnlineError: ``wandb={"require_online": True}`` without an API key or a server that answers.
        NotADirectoryError, PermissionError: a ``save_dir`` that cannot be created or written.

    Example::

        trainer = Trainer(logger=MultiLogger(save_dir="runs", name="mnist"), callbacks=[GradientMonitor()])
    """

    LOGGED_KEYS: dict[str, str] = {
        "run/status": "text written to TensorBoard when the run ends with a status other than success",
    }

    def __init__(
        self,
        save_dir: Union[str, os.PathLike] = "runs",
        name: str = "lightning_logs",
        *,
        version: Optional[Union[int, str]] = None,
        prefix: str = "",
        tensorboard: Union[bool, dict[str, Any]] = True,
        wandb: Union[bool, dict[str, Any]] = True,
        wandb_rewind: bool = False,
    ) -> None:
        super().__init__()
        if not name or not isinstance(name, str):
            raise ValueError(f"`name` must be a non-empty string, got {name!r}")
        save_dir = os.fspath(save_dir)
        check_writable(save_dir)
        tb_options = options("tensorboard", tensorboard)
        if tb_options is not None:
            check_not_tensorboardx("MultiLogger(tensorboard=...)")
            check_keys("tensorboard", tb_options, tensorboard_keys())
        wandb_options = options("wandb", wandb)
        if tb_options is None and wandb_options is None:
            raise ValueError(
                "MultiLogger with tensorboard=False and wandb=False logs nowhere: turn one on, or pass"
                " `logger=False` to the Trainer"
            )
        if wandb_options is not None:
            check_keys("wandb", wandb_options, _wandb_run.option_keys())
            _wandb_run.check_options(wandb_options)  # require_online: an error now, before any step
            wandb_options.setdefault("prefix", prefix)
        tb_kwargs: dict[str, Any] = {"default_hp_metric": False, "flush_secs": DEFAULT_FLUSH_SECS, "prefix": prefix}
        tb_kwargs.update(tb_options or {})
        # Built even when TensorBoard is off: it owns the run directory and the version numbering.
        self._tb = TensorBoardLogger(save_dir, name=name, version=version, **tb_kwargs)
        self._run = Run(self._tb, wandb_options, bool(wandb_rewind))
        self._guard = RunGuard(self._run)  # run directory lock and disk watch, keys logged twice at one step
        self._tb_writer = RunTensorBoard(self._run, self._guard, tb_options is not None,
                                         bool(tb_kwargs["default_hp_metric"]))
        self._wandb_writer = RunWandb(self._run, self._guard, wandb_options is not None)
        self._guard.attach([self._tb_writer, self._wandb_writer])
        self._writers: list[Writer] = [w for w in (self._tb_writer, self._wandb_writer) if w.on]

    # ------------------------------------------------------------------ identity
    @property
    @override
    def name(self) -> str:
        return self._tb.name

    @property
    @override
    def version(self) -> Union[int, str]:
        return self._tb.version

    @property
    @override
    def save_dir(self) -> str:
        return self._tb.save_dir

    @property
    @override
    def root_dir(self) -> str:
        return self._tb.root_dir

    @property
    @override
    def log_dir(self) -> str:
        """The run directory ``save_dir/name/version``: event files, the wandb run and checkpoints live here."""
        return self._tb.log_dir

    @property
    def run_id(self) -> str:
        """The wandb run id: ``name-version-<hash of the absolute run directory>``; stable across restarts."""
        return self._run.run_id

    @property
    def tensorboard(self) -> Optional[TensorBoardLogger]:
        """Lightning's TensorBoardLogger behind this logger, or ``None`` when TensorBoard is off."""
        return self._tb if self._tb_writer.on else None

    @property
    def wandb(self) -> Optional[Any]:
        """Lightning's WandbLogger behind this logger once its run has started (MultiLogger starts it when Lightning
        logs the hyperparameters, before the first batch), else ``None``; :meth:`start_wandb` starts it."""
        writer = self._wandb_writer
        return writer.wb if writer.on and not writer.failed else None

    @rank_zero_only
    def start_wandb(self) -> Optional[Any]:
        """Start the wandb run now if it has not started (global rank 0 only; it takes the run directory's lock)
        and return its WandbLogger; ``None`` when wandb is off or could not start."""
        return self._wandb_writer.started_logger()

    @override
    def monitor_writers(self) -> list[Writer]:
        """The writers lightning-monitor's dispatch layer hands the monitors' values to: TensorBoard's and wandb's,
        those on. Only rank 0 asks (its first ask takes the run directory's lock)."""
        self._guard.claim()
        return self._writers

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The TensorBoard ``SummaryWriter`` (or the wandb run when TensorBoard is off). Lightning's contract: made
        on first use, as TensorBoardLogger's is (the event file is the run directory's first file: its lock is
        taken then)."""
        if self._tb_writer.on:
            return self._tb_writer.summary_writer()
        wandb_logger = self._wandb_writer.started_logger()
        return wandb_logger.experiment if wandb_logger is not None else None

    # ------------------------------------------------------------------ logging
    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        scalars = {key: scalar(key, value) for key, value in metrics.items()}
        self._tb_writer.note_eval_metrics({k: v for k, v in scalars.items() if is_eval_metric(k)})
        self._guard.model_scalars(scalars, step)

        def model_write() -> None:
            self._guard.from_model = True
            try:
                self._deliver(lambda w: partial(w.scalars, scalars, step), step, scalars)
            finally:
                self._guard.from_model = False

        around_model_write(step, model_write)  # the monitors' deferred scalars around it (backends.defer)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Union[dict[str, Any], Namespace], *args: Any, **kwargs: Any) -> None:
        """Hyperparameters to TensorBoard's HParams tab and wandb's config. Private keys (``_instantiator`` and
        other ``_``-prefixed entries LightningCLI adds) are left out. The run's validation and test metrics become
        the HParams metric columns when the run ends (``finalize``), so runs can be compared on them."""
        public: dict[str, Any] = public_params(convert_params(params))
        metrics = args[0] if args else kwargs.get("metrics")
        if not self._run.wandb_rewind:
            # Lightning logs hyperparameters before the first batch: start the wandb run now, so that its start-up
            # (seconds) and its banner never land inside a timing window or a progress-bar line. (A rewinding run
            # waits for its first step, which says where to rewind to.)
            self._wandb_writer.started_logger()
        self._deliver(lambda w: partial(w.hyperparams, public, metrics), None, ["hyperparameters"], row=False)

    @rank_zero_only
    def log_histogram(
        self,
        key: str,
        values: Any,
        edges: Optional[Sequence[float]] = None,
        step: Optional[int] = None,
        bins: int = 64,
        stats: Optional[dict[str, float]] = None,
    ) -> None:
        """Log a histogram of raw ``values`` (binned here into ``bins``) or of ``counts`` with their ``edges``.

        Both backends get the same counts: TensorBoard through ``add_histogram_raw``, wandb through
        ``wandb.Histogram(np_histogram=(counts, edges))``. ``stats`` may carry exact
        ``min/max/num/sum/sum_squares`` when the counts were computed from a sample.
        """
        self._log_histograms({key: make_histogram(values, edges, bins, key, stats)}, step)

    @rank_zero_only
    def log_histograms(self, histograms: Mapping[str, Any], step: Optional[int] = None, bins: int = 64) -> None:
        """Several histograms at one step, in one wandb row (not one per key). Each value is raw values (binned
        here into ``bins``) or a ``(counts, edges)`` pair."""
        prepared = {
            key: make_histogram(value[0], value[1], key=key) if isinstance(value, tuple) and len(value) == 2
            else make_histogram(value, None, bins, key)
            for key, value in histograms.items()
        }
        self._log_histograms(prepared, step)

    @rank_zero_only
    def log_image(
        self,
        key: str,
        images: Any,
        step: Optional[int] = None,
        caption: Optional[Union[str, Sequence[str]]] = None,
    ) -> None:
        """Log one image or a list of images (tensor or array, CHW/HWC/HW, any common dtype and range).

        Images are converted to uint8 once (:func:`lightning_monitor._writers.media.to_uint8_hwc`) so both dashboards
        show the same picture; ``caption`` shows in wandb (TensorBoard has no captions).
        """
        prepared = prepare_images(key, images, caption)
        self._deliver(lambda w: partial(w.images, prepared, step), step, [key])

    @rank_zero_only
    def log_text(self, key: str, text: str, step: Optional[int] = None) -> None:
        """Log a piece of text (TensorBoard's text tab, a one-cell table in wandb)."""
        self._deliver(lambda w: partial(w.text, key, text, step), step, [key])

    @override
    @rank_zero_only
    def log_graph(self, model: torch.nn.Module, input_array: Optional[torch.Tensor] = None) -> None:
        self._guard.claim()
        if self._tb_writer.on:
            graph = partial(self._tb.log_graph, model, input_array)  # type: ignore[arg-type]
            deliver(self._tb_writer, graph, None, ["graph"], row=False)

    # ------------------------------------------------------------------ lifecycle
    @override
    @rank_zero_only
    def save(self) -> None:
        self._guard.claim()
        if self._tb_writer.started and not self._tb_writer.failed:
            deliver(self._tb_writer, self._tb.save, None, ["save"], self._writers, row=False)

    @override
    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        writer = self._wandb_writer
        if writer.on and writer.wb is not None:
            deliver(writer, partial(writer.wb.after_save_checkpoint, checkpoint_callback), None, ["checkpoint"],
                    self._writers, row=False)

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush and close both backends; the wandb run is finished (failed unless ``status`` is success).

        Never raises because a backend could not finish (wandb's service crashing while it finishes, a disk failing
        at the last flush): one backend failing does not stop the other from being flushed, and one warning says
        what failed and where each backend's files are (the ``wandb sync`` command for wandb's local copy), so
        ``fit`` returns and never masks a training exception. The run directory's lock is released. A write after
        ``finalize`` (``test`` after ``fit`` makes one) deliberately reopens the same run: a new TensorBoard event
        file in the run directory, a new segment of the same wandb run, the lock taken again.
        """
        failures: list[tuple[str, BaseException]] = []
        for writer in self._writers:
            try:
                writer.finish(status)
            except Exception as err:  # noqa: BLE001 - the other backend must still be flushed; fit must return
                failures.append((writer.name, err))
        self._guard.release()
        if failures:
            self._guard.finish_failed(status, failures)

    # ------------------------------------------------------------------ internals
    def _deliver(
        self, write: Callable[[Writer], Callable[[], Any]], step: Optional[int], keys: Any, row: bool = True
    ) -> None:
        self._guard.claim()
        for writer in self._writers:
            deliver(writer, write(writer), step, keys, self._writers, row=row)

    def _log_histograms(self, histograms: Mapping[str, HistogramData], step: Optional[int]) -> None:
        self._deliver(lambda w: partial(w.histograms, histograms, step), step, histograms)

