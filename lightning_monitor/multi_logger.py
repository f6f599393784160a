"""MultiLogger: Lightning's TensorBoardLogger and WandbLogger as one logger, one run, one step axis."""

from __future__ import annotations

import atexit
import glob
import hashlib
import importlib.util
import os
import re
import weakref
from argparse import Namespace
from typing import Any, Callable, Mapping, Optional, Sequence, Union

import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_monitor import _run_state, _wandb_run
from lightning_monitor._validate import check_keys, check_writable, options, scalar, tensorboard_keys
from lightning_monitor._backends import log_histograms_to, log_images_to, log_text_to
from lightning_monitor._media import HistogramData, make_histogram, prepare_images

#: seconds between TensorBoard flushes; TensorBoard's own default (120 s) is too slow to watch a run live.
DEFAULT_FLUSH_SECS = 2


class MultiLogger(Logger):
    r"""One Lightning logger that writes to TensorBoard and Weights & Biases at once.

    It composes Lightning's own :class:`~lightning.pytorch.loggers.TensorBoardLogger` and
    :class:`~lightning.pytorch.loggers.WandbLogger` and adds what they lack in common: histograms, images and
    text. Both backends describe one run: TensorBoard writes to ``save_dir/name/version``; the wandb run is stored
    inside that directory, is called ``name/version`` and has an id derived from the run directory, so starting
    again with the same ``version`` (resuming from a checkpoint) appends to the same TensorBoard run and resumes the
    same wandb run. Every value lands at the step it is given (``trainer.global_step``) on both sides; wandb plots
    it against ``trainer/global_step``.

    wandb never blocks training: without an API key or network, or with ``WANDB_MODE=offline``, it runs offline,
    says so once with the ``wandb sync`` command to upload later, and never prompts. See the README's "Failure
    behaviour" for what happens when a backend breaks mid-run.

    Logged keys (only when a run ends badly):

    ==============  ===============================================================================
    key             meaning
    ==============  ===============================================================================
    run/status      text written to TensorBoard when the run ends with a status other than success
    ==============  ===============================================================================

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

    Raises:
        ValueError: an unknown option or a bad value.
        NotADirectoryError, PermissionError: a ``save_dir`` that cannot be created or written.
        ModuleNotFoundError: wandb asked for but not installed.

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
        version: Optional[Union[int, str]] = None,
        prefix: str = "",
        tensorboard: Union[bool, dict[str, Any]] = True,
        wandb: Union[bool, dict[str, Any]] = True,
    ) -> None:
        super().__init__()
        if not name or not isinstance(name, str):
            raise ValueError(f"`name` must be a non-empty string, got {name!r}")
        save_dir = os.fspath(save_dir)
        check_writable(save_dir)
        tb_options = options("tensorboard", tensorboard)
        if tb_options is not None:
            check_keys("tensorboard", tb_options, tensorboard_keys())
        self._wandb_options = options("wandb", wandb)
        if tb_options is None and self._wandb_options is None:
            raise ValueError(
                "MultiLogger with tensorboard=False and wandb=False logs nowhere: turn one on, or pass"
                " `logger=False` to the Trainer"
            )
        if self._wandb_options is not None:
            if importlib.util.find_spec("wandb") is None:
                raise ModuleNotFoundError("MultiLogger(wandb=...) needs wandb: `pip install wandb`, or pass wandb=False")
            check_keys("wandb", self._wandb_options, _wandb_run.option_keys())
            self._wandb_options.setdefault("prefix", prefix)
        tb_kwargs = {"default_hp_metric": False, "flush_secs": DEFAULT_FLUSH_SECS, "prefix": prefix, **(tb_options or {})}
        # Built even when TensorBoard is off: it owns the run directory and the version numbering.
        self._tb = TensorBoardLogger(save_dir, name=name, version=version, **tb_kwargs)
        self._tb_hp_metric = bool(tb_kwargs["default_hp_metric"])
        self._tb_on = tb_options is not None
        self._tb_started = False  # has the SummaryWriter been made and its first write succeeded?
        self._tb_purge_pending = False
        self._wandb: Optional[Any] = None  # WandbLogger, made on first use on rank 0
        self._wandb_failed = False
        self._wandb_pending: list[Callable[[Any], Any]] = []  # hyperparameters logged before the run started
        self._last_step = 0
        self._step_ledger: Optional[_run_state.StepLedger] = None  # made on rank 0 at the first write

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
        digest = hashlib.sha1(os.path.abspath(self.log_dir).encode()).hexdigest()[:8]
        return _slug(f"{self.name}-{self._version_name()}-{digest}")

    @property
    def tensorboard(self) -> Optional[TensorBoardLogger]:
        """Lightning's TensorBoardLogger behind this logger, or ``None`` when TensorBoard is off."""
        return self._tb if self._tb_on else None

    @property
    def wandb(self) -> Optional[Any]:
        """Lightning's WandbLogger behind this logger (its run starts on first use), or ``None`` when off."""
        if self._wandb_options is None or self._wandb_failed:
            return None
        if self._wandb is None and rank_zero_only.rank == 0:
            self._wandb = self._start_wandb(first_step=None)
        return self._wandb

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The TensorBoard ``SummaryWriter`` (or the wandb run when TensorBoard is off)."""
        if self._tb_on:
            return self._tb_writer()
        return self.wandb.experiment if self.wandb is not None else None

    # ------------------------------------------------------------------ logging
    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        scalars = {key: scalar(key, value) for key, value in metrics.items()}
        self._to_tensorboard(step, lambda tb: tb.log_metrics(scalars, step))
        self._to_wandb(lambda wb: wb.log_metrics(scalars, step), step)

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Union[dict[str, Any], Namespace], *args: Any, **kwargs: Any) -> None:
        def to_tensorboard(tb: TensorBoardLogger) -> None:
            tb.log_hyperparams(params, *args, **kwargs)
            if not self._tb_hp_metric and not (args or kwargs.get("metrics")):
                self._tb_hparams_table(params)

        self._to_tensorboard(None, to_tensorboard)
        self._to_wandb(lambda wb: wb.log_hyperparams(params), row=False)

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
        hist = values if isinstance(values, HistogramData) else make_histogram(values, edges, bins, key, stats)
        self.log_histograms({key: hist}, step=step)

    @rank_zero_only
    def log_histograms(self, histograms: Mapping[str, HistogramData], step: Optional[int] = None) -> None:
        """Several ready histograms at one step: one wandb row for all of them (not one per key)."""
        self._to_tensorboard(step, lambda tb: log_histograms_to(tb, histograms, step))
        self._to_wandb(lambda wb: log_histograms_to(wb, histograms, step), step)

    @rank_zero_only
    def log_image(
        self,
        key: str,
        images: Any,
        step: Optional[int] = None,
        caption: Optional[Union[str, Sequence[str]]] = None,
    ) -> None:
        """Log one image or a list of images (tensor or array, CHW/HWC/HW, any common dtype and range).

        Images are converted to uint8 once (:func:`lightning_monitor._media.to_uint8_hwc`) so both dashboards
        show the same picture; ``caption`` shows in wandb (TensorBoard has no captions).
        """
        arrays, captions = prepare_images(key, images, caption)
        self._to_tensorboard(step, lambda tb: log_images_to(tb, key, arrays, step, captions))
        self._to_wandb(lambda wb: log_images_to(wb, key, arrays, step, captions), step)

    @rank_zero_only
    def log_text(self, key: str, text: str, step: Optional[int] = None) -> None:
        """Log a piece of text (TensorBoard's text tab, a one-cell table in wandb)."""
        self._to_tensorboard(step, lambda tb: log_text_to(tb, key, text, step))
        self._to_wandb(lambda wb: log_text_to(wb, key, text, step), step)

    @override
    @rank_zero_only
    def log_graph(self, model: torch.nn.Module, input_array: Optional[torch.Tensor] = None) -> None:
        self._to_tensorboard(None, lambda tb: tb.log_graph(model, input_array))

    # ------------------------------------------------------------------ lifecycle
    @override
    @rank_zero_only
    def save(self) -> None:
        if self._tb_started:
            self._to_tensorboard(None, lambda tb: tb.save())

    @override
    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        self._to_wandb(lambda wb: wb.after_save_checkpoint(checkpoint_callback), row=False)

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush and close both backends; the wandb run is finished (failed unless ``status`` is success).

        One backend failing does not stop the other from being flushed. After a successful run the first error
        is raised; after a failed or interrupted run it is only warned about, so it never masks the training
        exception.
        """
        errors: list[BaseException] = []
        if self._tb_started and self._tb_on:
            try:
                if status != "success":
                    self._tb_writer().add_text("run/status", status, global_step=self._last_step)
                self._tb.finalize(status)
            except Exception as err:  # noqa: BLE001 - the other backend must still be flushed
                errors.append(err)
        if self._wandb is None and self._wandb_pending and not self._wandb_failed:
            self._to_wandb(lambda wb: None, row=False, start=True)  # hyperparameters and no step: still a run
        if self._wandb is not None and not self._wandb_failed:
            wandb_logger, self._wandb = self._wandb, None  # a later fit/test resumes the run with the same id
            _live_runs.pop(self.run_id, None)
            try:
                wandb_logger.finalize(status)
                _wandb_run.finish(wandb_logger.experiment, exit_code=0 if status == "success" else 1)
            except Exception as err:  # noqa: BLE001
                errors.append(err)
        for err in errors:
            if status == "success" and err is errors[0]:
                raise err
            rank_zero_warn(f"MultiLogger.finalize({status!r}): {type(err).__name__}: {err}")

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_wandb"] = None  # a live run does not pickle; the copy resumes it by id when it first logs
        return state

    # ------------------------------------------------------------------ internals
    def _version_name(self) -> str:
        return self.version if isinstance(self.version, str) else f"version_{self.version}"

    def _tb_writer(self) -> Any:
        if not self._tb_started:
            self._tb_purge_pending = bool(glob.glob(os.path.join(self.log_dir, "events.out.tfevents.*")))
            # Make the writer and write the event file's header now, so an unwritable or full disk fails here,
            # before training, with a clear message instead of at some later step.
            try:
                self._tb.experiment.flush()
            except Exception as err:
                raise _tb_error(self.log_dir, err) from err
            self._tb_started = True
            _flush_at_exit(self)
        return self._tb.experiment

    def _to_tensorboard(self, step: Optional[int], call: Callable[[TensorBoardLogger], Any]) -> None:
        if not self._tb_on:
            return
        writer = self._tb_writer()
        if step is not None:
            self._last_step = max(self._last_step, int(step))
        try:
            if self._tb_purge_pending and step is not None:
                self._tb_purge_pending = False
                if self._ledger().is_restart(step):
                    # Restarted from a checkpoint: the earlier run logged past `step`. TensorBoard drops its points
                    # at steps >= `step` (logged after that checkpoint): the series stays strictly increasing.
                    # (Merely continuing, e.g. `test` after `fit`, nothing is dropped.)
                    from tensorboard.compat.proto.event_pb2 import Event, SessionLog

                    event = Event(step=step, session_log=SessionLog(status=SessionLog.START))
                    writer._get_file_writer().add_event(event)
            call(self._tb)
            if step is not None:
                self._ledger().record_step(step)
        except Exception as err:
            if _os_error(err) is None:
                raise  # a bad value or a bug: the caller should see it as it is
            self._tb_on = False
            rank_zero_warn(
                f"{_tb_error(self.log_dir, err)}. TensorBoard logging stops here; training goes on"
                + (" and wandb keeps logging." if self._wandb_options is not None and not self._wandb_failed else ".")
            )

    def _ledger(self) -> "_run_state.StepLedger":
        if self._step_ledger is None:
            self._step_ledger = _run_state.StepLedger(self.log_dir)
        return self._step_ledger

    def _tb_hparams_table(self, params: Union[dict[str, Any], Namespace]) -> None:
        """TensorBoard's HParams tab without Lightning's placeholder ``hp_metric = -1`` scalar."""
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
        from torch.utils.tensorboard.summary import hparams

        flat = self._tb._sanitize_params(_flatten_dict(_convert_params(params)))
        writer = self._tb_writer()._get_file_writer()
        for summary in hparams(flat, {}):
            writer.add_summary(summary)

    def _to_wandb(
        self, call: Callable[[Any], Any], step: Optional[int] = None, row: bool = True, start: bool = False
    ) -> None:
        """Run ``call`` on the WandbLogger; ``row``: the call adds one history row (at trainer ``step``).

        The run starts at the first call that carries a step (hyperparameters wait for it), so that a job resumed
        from a checkpoint knows where to rewind the run to (:class:`~lightning_monitor._run_state.StepLedger`).
        """
        if self._wandb_options is None or self._wandb_failed or rank_zero_only.rank != 0:
            return
        if self._wandb is None:
            if not row and not start:
                self._wandb_pending.append(call)
                return
            self._wandb = self._start_wandb(first_step=step)
            if self._wandb is None:
                return
        wandb_logger, live = self._wandb, _live_runs[self.run_id]
        pending, self._wandb_pending = self._wandb_pending, []
        try:
            for earlier in pending:  # hyperparameters logged before the run could start
                earlier(wandb_logger)
            call(wandb_logger)
        except Exception as err:  # noqa: BLE001 - wandb must never stop training
            self._wandb_failed = True
            where = getattr(wandb_logger.experiment, "dir", None)
            rank_zero_warn(
                f"wandb stopped working ({type(err).__name__}: {err}); TensorBoard keeps logging"
                f"{'' if self._tb_on else ' (but TensorBoard is off: nothing more is logged)'}."
                + (f" What wandb had received is in {os.path.dirname(where)}." if where else "")
            )
            return
        if row:  # every WandbLogger call we make is one `run.log`, i.e. one history row
            live.ledger.record(live.next_step, step)
            live.next_step += 1

    def _start_wandb(self, first_step: Optional[int]) -> Optional[Any]:
        from lightning.pytorch.loggers import WandbLogger

        options = dict(self._wandb_options or {})
        mode, reason = _wandb_run.decide_mode(options)
        logger_kwargs = {key: options.pop(key) for key in _wandb_run.LOGGER_ONLY_KEYS if key in options}
        init: dict[str, Any] = {
            "name": f"{self.name}/{self._version_name()}",
            "project": os.environ.get("WANDB_PROJECT", self.name),
            "id": self.run_id,
            "dir": os.path.abspath(self.log_dir),  # wandb's service keeps the first run's cwd
            "resume": "allow",
            "reinit": "create_new",  # a second fit in this process gets its own run
            **options,
        }
        os.makedirs(self.log_dir, exist_ok=True)
        live = _live_runs.get(self.run_id)
        if live is None or getattr(live.run, "_is_finished", False):  # an unpickled copy of us shares the run
            ledger = self._ledger()
            rewind = None
            if not {"resume", "resume_from", "fork_from", "id"} & set(options):
                rewind = ledger.rewind_point(first_step)
            if rewind is not None:  # continuing this run: cut it back to just before the step we resume from
                del init["id"], init["resume"]
                init["resume_from"] = f"{self.run_id}?_step={rewind}"
            run = _wandb_run.start(init, mode, reason)
            if run is None:
                self._wandb_failed = True
                return None
            if rewind is not None:
                ledger.record_rewind(rewind)
            next_step = rewind + 1 if rewind is not None else int(getattr(run, "step", 0) or 0)
            live = _live_runs[self.run_id] = _LiveRun(run, ledger, next_step)
        return WandbLogger(experiment=live.run, **logger_kwargs)


# ---------------------------------------------------------------------- helpers
_open_loggers: "weakref.WeakSet[MultiLogger]" = weakref.WeakSet()
_flush_registered = False
class _LiveRun:
    """A wandb run this process has open, with the ``_step`` its next history row will get."""

    def __init__(self, run: Any, ledger: "_run_state.StepLedger", next_step: int) -> None:
        self.run, self.ledger, self.next_step = run, ledger, next_step


_live_runs: dict[str, _LiveRun] = {}  # run id -> the wandb run this process has open for it


def _flush_at_exit(logger: MultiLogger) -> None:
    """At a normal interpreter exit without ``finalize``, flush what TensorBoard still holds in memory (its writer
    thread is a daemon and would drop it). wandb finishes its own runs at exit."""
    global _flush_registered
    if not _flush_registered:
        atexit.register(_flush_open_loggers)
        _flush_registered = True
    _open_loggers.add(logger)


def _flush_open_loggers() -> None:
    for logger in list(_open_loggers):
        if logger._tb_on and logger._tb._experiment is not None:
            try:
                logger._tb._experiment.flush()
            except Exception:  # noqa: BLE001 - nothing left to tell at exit
                pass


def _os_error(err: BaseException) -> Optional[OSError]:
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def _tb_error(log_dir: str, err: BaseException) -> OSError:
    cause = _os_error(err) or err
    detail = getattr(cause, "strerror", None) or str(cause)
    errno = getattr(cause, "errno", None)
    message = f"TensorBoard cannot write to {log_dir}: {detail}"
    return OSError(errno, message) if errno else OSError(message)


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:120]
