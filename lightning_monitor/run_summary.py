"""RunSummary: what a fit cost and whether it was healthy, in a few numbers at its end (terminal, run directory,
TensorBoard, wandb)."""

from __future__ import annotations

import atexit
import json
import multiprocessing
import os
import sys
from collections.abc import Mapping
from typing import Any, Optional

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import MisconfigurationException, SIGTERMException
from lightning_utilities.core.imports import RequirementCache
from typing_extensions import override

from lightning_monitor._core import clock as _clock
from lightning_monitor._core import options as _options
from lightning_monitor._core.keys import document_keys
from lightning_monitor._monitor import dispatch as _dispatch
from lightning_monitor._summary import numbers as _summary
from lightning_monitor._summary import verdicts as _verdicts
from lightning_monitor._writers.backends import Backend, Recorder, Writer

_RICH_AVAILABLE = RequirementCache("rich")


@document_keys
class RunSummary(Callback, Backend):
    """One compact table at the end of ``fit``: speed, memory peaks, gradient health, accuracy, monitoring cost.

    At the end of ``fit``, and also when it ends with Ctrl-C (``interrupted``) or an exception (``failed``), global
    rank 0 writes the values, with units, to ``summary.json`` in the run directory (``logger.log_dir``), to
    wandb's run summary (so the runs table can show and sort by them) and to TensorBoard (the whole table as a
    text card; as scalars at the last step only the headline numbers, ``summary/wall_sec``,
    ``summary/samples_per_sec_p50``, ``summary/overhead_share_mean`` and ``summary/accuracy_last``, which
    :class:`~lightning_monitor.MultiLogger` makes HParams metric columns so runs can be compared). Other loggers
    get the numbers through ``log_metrics``.

    It prints the table once, last: after a successful ``fit`` it holds the table and prints it when the next stage
    of the trainer ends (after Lightning's ``test`` results table), before the next ``fit`` starts, or when the
    program exits, whichever comes first (:meth:`print_now` prints it at once). In a notebook or an interactive
    session, in a spawned worker (``ddp_spawn``), and when ``fit`` ended badly it prints at once. Drawn with
    ``rich`` when it is installed, plain text otherwise.

    Everything is computed from what the monitors already logged on rank 0 (their scalars are kept per trainer,
    a few numbers per logging step): no work between logging steps, no sync and no collective, also under DDP,
    where MemoryMonitor's logged cross-rank maxima give the peaks and the rank that held them. Percentiles are over
    logging windows (one value of ``throughput/samples_per_sec`` or ``time/step_sec`` per logging step), not over
    single steps. A row appears only when the monitor it comes from ran and logged; its keys are left out.

    Logged keys (every one in ``summary.json``, wandb's run summary and the text card; the *headline* ones also as
    TensorBoard scalars and HParams metric columns):

    {logged_keys}

    Args:
        print_table: print the table on global rank 0 (the file and the backends get the values either way).
        use_rich: draw the table with ``rich``; ``None``: when ``rich`` is installed.
        filename: name of the JSON file written into the run directory; ``None`` writes none.
        data_wait_share: ``INPUT-BOUND`` when the mean data-wait share of training time is above it.
        straggler_ratio: ``STRAGGLER`` when the median slowest-over-fastest rank time before the gradient all-reduce
            is above it (DDP).
        oom_share: ``NEAR-OOM`` when the device's peak reserved memory reaches this share of its total (or the
            allocator had to retry an allocation).
        creep_mib_per_1k_steps: ``MEMORY-CREEP`` when host memory (RSS) rises faster than this, in MiB per 1,000
            steps (a robust slope over the logging steps), and by ``creep_min_mib`` or more over the run.
        creep_min_mib: the least rise of host memory over the run, in MiB, that ``MEMORY-CREEP`` needs.
        monitor_share: ``MONITOR-COST-HIGH`` when the monitors' mean share of training time is above it.
        low_mfu: ``LOW-MFU`` when the median MFU is below it (only when SpeedMonitor knows the device's peak).

    The verdicts (``docs/verdicts.md``) are in the table's ``verdicts`` row, ``summary.json`` (a ``verdicts`` list
    of objects: ``name``, ``evidence``, ``numbers``, ``advice``), the text card and wandb's run summary.

    Raises:
        TypeError: a ``print_table`` or ``use_rich`` that is not ``True`` or ``False`` (``use_rich``: or ``None``),
            a threshold that is not a number.
        ValueError: a threshold out of its range.
        ValueError: a ``filename`` that is not a plain file name.
        ModuleNotFoundError: ``use_rich=True`` without ``rich`` installed.

    Example::

        trainer = Trainer(logger=MultiLogger(), callbacks=[SpeedMonitor(), MemoryMonitor(), RunSummary()])
    """

    LOGGED_KEYS: dict[str, str] = {
        "summary/status": "text: how fit ended, ``success``, ``interrupted`` (Ctrl-C, SIGTERM) or ``failed``",
        "summary/wall_sec": "wall time of ``fit`` on global rank 0, from ``setup`` to its end (headline)",
        "summary/steps": "optimizer steps taken (``trainer.global_step`` at the end)",
        "summary/samples_per_sec_p50": "median of ``throughput/samples_per_sec`` over the logging windows"
        " (headline)",
        "summary/samples_per_sec_p10": "10th percentile of ``throughput/samples_per_sec`` (the slow windows)",
        "summary/step_sec_p50": "median of ``time/step_sec`` over the logging windows",
        "summary/step_sec_p95": "95th percentile of ``time/step_sec`` (the slow windows)",
        "summary/data_wait_share_mean": "mean of ``time/data_wait_share`` over the logging windows",
        "summary/mfu_p50": "median of ``throughput/mfu`` (when SpeedMonitor knows the peak)",
        "summary/cuda_{phase}_peak_allocated_gib_max": "largest ``memory/cuda/{phase}_peak_allocated_gib`` of the"
        " run (``train``, ``validation``, ``test``) over every rank",
        "summary/cuda_{phase}_peak_allocated_gib_max_rank": "the global rank that held it",
        "summary/host_rss_gib_max": "largest ``memory/host/rss_gib`` logged over the run and every rank",
        "summary/host_rss_gib_max_rank": "the global rank that held it",
        "summary/grad_nonfinite_steps": "optimizer steps with NaN/Inf gradients up to the last logging step"
        " (sum of ``grad/nonfinite_steps``; 0 when GradientMonitor ran and never logged it)",
        "summary/grad_norm_max": "largest ``grad/norm_total`` logged",
        "summary/grad_norm_max_step": "the step it was logged at",
        "summary/grad_norm_max_group": "text: the module group with the largest ``grad/norm/{group}`` at that step",
        "summary/accuracy_first": "first ``predictions/accuracy`` on the fixed samples",
        "summary/accuracy_last": "last ``predictions/accuracy`` on the fixed samples (headline)",
        "summary/overhead_share_mean": "mean of ``time/monitor_share`` over the logging windows: the monitors'"
        " own share of training time (headline)",
        "summary/overhead_share_mean/{name}": "the part of it spent in one monitor (``time/monitor_share/{name}``)",
        "summary/alerts": "alerts HealthMonitor raised in the fit (its last ``health/alerts``)",
        "summary/alert_count/{rule}": "alerts of one HealthMonitor rule (the times ``health/{rule}`` went to 1)",
        "summary/alert_first_step/{rule}": "the step of that rule's first alert",
        "summary/alert_last_step/{rule}": "the step of that rule's last alert",
        "summary/stalls": "stalls StallMonitor saw end in the fit (global rank 0: its ``health/stall_sec`` points)",
        "summary/stall_longest_sec": "seconds the longest stall lasted (global rank 0's view)",
        "summary/stall_longest_step": "the step it happened at",
        "summary/stall_longest_phase": "text: its phase (``waiting for data``, ``forward/backward``, ...)",
        "summary/verdicts": "text: the verdicts' names (``INPUT-BOUND``, ..., ``HEALTHY``; docs/verdicts.md)",
        "summary/verdict/{name}": "text: one verdict, its evidence and the next thing to try",
        "summary/table": "text: the table (a TensorBoard text card)",
    }
    #: the TensorBoard text card holding the whole table
    CARD_KEY = "summary/table"

    def __init__(self, print_table: bool = True, *, use_rich: Optional[bool] = None,
                 filename: Optional[str] = "summary.json", data_wait_share: float = 0.3,
                 straggler_ratio: float = 1.5, oom_share: float = 0.9, creep_mib_per_1k_steps: float = 50.0,
                 creep_min_mib: float = 128.0, monitor_share: float = 0.1, low_mfu: float = 0.2) -> None:
        super().__init__()
        _options.check_bool("print_table", print_table)
        _options.check_bool("use_rich", use_rich, none_ok=True)
        if filename is not None and (not isinstance(filename, str) or not filename or os.sep in filename
                                     or filename in (".", "..")):
            raise ValueError(f"`filename` must be a file name such as 'summary.json' (or None), got {filename!r}")
        if use_rich and not _RICH_AVAILABLE:
            raise ModuleNotFoundError(f"RunSummary(use_rich=True) needs rich: pip install rich ({_RICH_AVAILABLE})")
        checked = _verdicts.check_thresholds(
            data_wait_share=data_wait_share, straggler_ratio=straggler_ratio, oom_share=oom_share,
            creep_mib_per_1k_steps=creep_mib_per_1k_steps, creep_min_mib=creep_min_mib, monitor_share=monitor_share,
            low_mfu=low_mfu)
        self.data_wait_share, self.straggler_ratio, self.oom_share = (checked[k] for k in (
            "data_wait_share", "straggler_ratio", "oom_share"))
        self.creep_mib_per_1k_steps, self.creep_min_mib = checked["creep_mib_per_1k_steps"], checked["creep_min_mib"]
        self.monitor_share, self.low_mfu = checked["monitor_share"], checked["low_mfu"]
        self.print_table = print_table
        self.use_rich = use_rich
        self.filename = filename
        #: the values of the last summary (``summary/...`` -> number or text); empty until a fit ends
        self.summary: dict[str, Any] = {}
        #: the verdicts of the last summary (docs/verdicts.md); empty until a fit ends
        self.verdicts: list[_verdicts.Verdict] = []
        self._began: Optional[float] = None
        self._open = False  # a fit is running and has no summary yet
        self._recorder: Optional[Recorder] = None  # the monitors' scalars of this fit (rank 0): a writer like any
        self._held: Optional[str] = None  # the table of the last fit, printed after what follows it (see class doc)
        self._held_for: Any = None  # the terminal stream it was made for (printed at exit only if still stdout)

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if not trainer.loggers:
            raise MisconfigurationException(
                "RunSummary needs a logger, but the Trainer has no logger: pass e.g. Trainer(logger=MultiLogger())"
            )
        if stage != "fit":
            return
        self.print_now()  # the previous fit's table, before this fit's output
        self._began, self._open = _clock.now(), True
        self._recorder = Recorder(_summary.records)

    @property
    def thresholds(self) -> dict[str, float]:
        """The verdicts' thresholds (the options of the same names)."""
        return {name: getattr(self, name) for name in _verdicts.DEFAULTS}

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_held"] = state["_held_for"] = None  # a copy (ddp_spawn, a checkpoint) has no table to print
        return state

    @override
    def monitor_writers(self) -> list[Writer]:
        """The dispatch layer hands the monitors' scalars to this in-memory writer while a fit runs."""
        return [self._recorder] if self._recorder is not None else []

    @override
    def on_fit_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # before the loggers' finalize: MultiLogger then registers the values as HParams metrics
        self._finish(trainer, "success", bar_open=False)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if stage != "fit":
            # a stage after fit (test, validate, predict) ended: its results table is above. A progress bar whose live
            # display ends in its own teardown, after this one (rich's: the last "Testing 1/1" frame is drawn when
            # it stops), ends it now, so that the table is the last thing printed (a second stop does nothing)
            bar = trainer.progress_bar_callback
            callbacks = list(trainer.callbacks)  # type: ignore[attr-defined]
            later = callbacks[callbacks.index(self) + 1:] if self in callbacks else []
            if bar is not None and any(c is bar for c in later):
                bar.teardown(trainer, pl_module, stage)
            self.print_now()

    def print_now(self) -> None:
        """Print the table held since the end of the last ``fit`` now, if it has not been printed yet."""
        text, self._held, self._held_for = self._held, None, None
        if self in _held_tables:
            _held_tables.remove(self)
        if text is not None:
            print(text, flush=True)

    def print_at_exit(self) -> None:
        """The held table at interpreter exit: printed if the stream it was made for is still the program's stdout
        (under pytest's capture it is gone, and nobody would read it), else dropped."""
        if self._held_for is not sys.stdout:
            self._held = None
        try:
            self.print_now()
        except (OSError, ValueError):  # stdout closed: nobody reads it any more
            pass

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        interrupted = isinstance(exception, (KeyboardInterrupt, SIGTERMException))
        self._finish(trainer, "interrupted" if interrupted else "failed", bar_open=True)

    def _finish(self, trainer: "pl.Trainer", status: str, bar_open: bool) -> None:
        if not self._open:
            return
        self._open = False
        recorder, self._recorder = self._recorder, None
        series = recorder.series if recorder is not None else {}  # empty on ranks other than 0, which write nothing
        if not trainer.is_global_zero:
            return
        try:
            self._report(trainer, status, series, bar_open)
        except Exception as err:  # noqa: BLE001 - a summary never ends a run, nor hides the error that ended it
            rank_zero_warn(f"RunSummary could not make the summary ({type(err).__name__}: {err}); training is not"
                           " affected.")

    def _report(self, trainer: "pl.Trainer", status: str, series: _summary.Series, bar_open: bool) -> None:
        wall = None if self._began is None else _clock.now() - self._began
        values = self.summary = _summary.compute(series, status=status, wall_sec=wall, steps=trainer.global_step)
        self.verdicts = _verdicts.judge(values, series, self.thresholds)
        values.update(_verdicts.summary_values(self.verdicts))
        path = self._write_json(trainer, values)
        _dispatch.log_summary(trainer, values, trainer.global_step, (self.CARD_KEY, _summary.markdown(values)),
                              headline=_summary.HEADLINE)
        if self.print_table:
            footer = f"written to {path}" if path else ""
            rich = _RICH_AVAILABLE if self.use_rich is None else self.use_rich
            text = _summary.rich_text(values, footer) if rich else _summary.plain(values, footer)
            bar = trainer.progress_bar_callback
            if bar_open and bar is not None and getattr(bar, "is_enabled", True):
                text = "\n" + text  # a bar interrupted mid-line: start below it
            self.print_now()
            self._held, self._held_for = text, _terminal_stream()
            if status == "success" and not _prints_at_once():
                _hold(self)  # printed after what follows (a test's results table), or at exit
            else:
                self.print_now()

    def _write_json(self, trainer: "pl.Trainer", values: Mapping[str, Any]) -> Optional[str]:
        if self.filename is None:
            return None
        path = os.path.join(run_dir(trainer), self.filename)
        document: dict[str, Any] = {key: {"value": value, "unit": _summary.unit(key)} for key, value in values.items()}
        document["verdicts"] = [verdict.as_dict() for verdict in self.verdicts]
        try:
            os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
            with open(path, "w", encoding="utf-8") as f:
                json.dump(document, f, indent=2)
                f.write("\n")
        except OSError as err:
            rank_zero_warn(f"RunSummary could not write {path} ({err}); the summary still goes to the loggers.")
            return None
        return path


def run_dir(trainer: "pl.Trainer") -> str:
    """Where the summary file goes: the first logger's run directory (``log_dir``: MultiLogger, TensorBoard, CSV),
    else a logger's ``save_dir`` (wandb), else ``trainer.default_root_dir``. (Not ``trainer.log_dir``, which
    broadcasts under DDP, a collective that rank 0 alone must not run.)"""
    for attribute in ("log_dir", "save_dir"):
        for logger in trainer.loggers:
            found = getattr(logger, attribute, None)
            if found:
                return str(found)
    return str(trainer.default_root_dir)


# ------------------------------------------------------------------------------------------------ the held table

_held_tables: list[RunSummary] = []  # tables still to print at exit, in the order their fits ended
_exit_hook = False  # our atexit function is registered


def _hold(summary: RunSummary) -> None:
    global _exit_hook
    _held_tables.append(summary)
    if not _exit_hook:
        _exit_hook = True
        atexit.register(_print_held_at_exit)


def _terminal_stream() -> Any:
    """``sys.stdout``, or the stream behind it while a ``rich`` live display (Lightning's progress bar) redirects
    it (rich's ``FileProxy.rich_proxied_file``, public)."""
    return getattr(sys.stdout, "rich_proxied_file", sys.stdout)


def _print_held_at_exit() -> None:
    """At interpreter exit: the tables nothing printed yet (a ``fit`` with no later stage), each only if the stream
    it was made for is still the program's stdout (under pytest's capture it is gone: nobody would read it)."""
    for summary in list(_held_tables):
        summary.print_at_exit()


def _prints_at_once() -> bool:
    """Whether a table is printed at the end of ``fit`` rather than held: an interactive session or a notebook
    (no reliable exit; the cell's output is where it belongs), or a spawned worker process (``ddp_spawn``), which
    exits without running ``atexit`` functions."""
    if hasattr(sys, "ps1") or sys.flags.interactive:
        return True
    ipython = sys.modules.get("IPython")
    if ipython is not None and getattr(ipython, "get_ipython", lambda: None)() is not None:
        return True
    return multiprocessing.parent_process() is not None
