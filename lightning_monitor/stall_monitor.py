"""StallMonitor: a watchdog thread on every rank that says where a run stopped making progress."""

from __future__ import annotations

import os
import sys
import threading
from collections.abc import Sequence
from typing import Any, ClassVar, Optional

import lightning.pytorch as pl
from typing_extensions import override

from lightning_monitor._core import clock as _clock
from lightning_monitor._core import options as _options
from lightning_monitor._core.keys import document_keys
from lightning_monitor._health import report as _report
from lightning_monitor._health.engine import Alert
from lightning_monitor._monitor import dispatch as _dispatch
from lightning_monitor._monitor.base import Monitor
from lightning_monitor._monitor.phases import STALL_PHASES
from lightning_monitor._stall import dump as _dump
from lightning_monitor._stall.watch import Stall, Watch
from lightning_monitor.run_summary import run_dir

#: the watchdog thread's wake-up interval (seconds): it looks at most once a second
_WAKE_SEC = 1.0


@document_keys
class StallMonitor(Monitor):
    """A watchdog on every rank: when training makes no progress for longer than a timeout, every rank that sees it
    writes every thread's Python stack to ``stalls/rank{R}-step{S}.txt`` and global rank 0 raises an alert.

    The hooks set progress marks (training batch start and end, before the optimizer step, validation batches,
    checkpoint saving) and the phase they enter: ``waiting for data`` (between a batch's end and the next one's
    start), ``forward/backward``, ``optimizer step``, ``validation``, ``checkpoint save`` (``start-up`` before the
    first batch). A daemon thread looks at the last mark at most once a second. A hook only stores a tuple: no
    device work, no sync, no collective, in the hooks or in the thread.

    A stall is no progress for longer than ``timeout`` when given, else ``step_factor`` x the 95th percentile of the
    recent step times (batch end to batch end), never below ``min_timeout``. Until the fit's first training step has
    ended (``torch.compile``, the first batches of the workers, the sanity check) the limit is at least
    ``first_step_timeout``; in validation and while a checkpoint is saved, at least ``slow_phase_timeout``.

    On a stall, every rank that sees it writes a dump: a header (rank, pid, step, phase, seconds since the last
    progress, the limit, the DataLoader worker pids: ``multiprocessing.active_children()``) and every thread's stack
    (``sys._current_frames()``), the training thread's (the one that runs the hooks) first. Global rank 0 writes
    into ``stalls/`` of the run directory (the first logger's ``log_dir``); another rank into the same path when
    that directory exists on its node (one node, or a shared file system), else into ``stalls/`` of the first
    logger's ``save_dir`` on its node. Global rank 0, from the watchdog thread at once (the training thread may be
    blocked for good), prints one terminal line naming the phase and the training thread's top frame, and appends
    one line to ``alerts.jsonl`` (rule ``stalled``, the same file and fields as HealthMonitor's alerts). The keys
    and the text card go through the loggers from the training thread, when progress resumes: ``health/stalled``
    1 at the stalled step, then 0 at the next batch. A run that never resumes has its alert in the file, the
    terminal and the dumps only.

    It never ends the run by default. When progress resumes, rank 0 prints one line with the stall's length.
    ``action="exit"`` ends the process with ``os._exit(exit_code)`` right after the dump (and, on rank 0, the
    alert): for schedulers that requeue a job on a non-zero exit code.

    Logged keys (global rank 0, only in a fit that stalled; also HealthMonitor's text card ``health/alert_text``,
    the stall in words, at its step):

    {logged_keys}

    Args:
        timeout: seconds without progress that make a stall; ``None`` derives it from the run (``step_factor`` x
            the 95th percentile of recent step times, at least ``min_timeout``).
        min_timeout: the floor of the derived timeout (seconds).
        step_factor: how many times the 95th percentile of recent step times the derived timeout is.
        first_step_timeout: the allowance (seconds) until the fit's first training step has ended.
        slow_phase_timeout: the allowance (seconds) of validation and checkpoint saving.
        action: ``warn`` (the dumps and the alert only) or ``exit`` (then ``os._exit(exit_code)``).
        exit_code: the process's exit code with ``action="exit"`` (non-zero; 75 is ``EX_TEMPFAIL``).
        dirname: the folder of the dumps, in the run directory.
        filename: the JSON-lines file of alerts in the run directory (HealthMonitor's); ``None`` writes none.
        print_alerts: print the stall and its end as terminal lines on global rank 0.
        exclude_keys: glob patterns of keys left out of every backend (e.g. ``["health/stall_*"]``).

    Raises:
        TypeError, ValueError: an option that is wrong on its face, naming it.
        MisconfigurationException: in ``setup`` when the trainer has no logger.

    Example::

        trainer = Trainer(logger=MultiLogger(), callbacks=[StallMonitor(min_timeout=300)])
    """

    LOGGED_KEYS: ClassVar[dict[str, str]] = {
        "health/stalled": "1 at the step a stall happened in (logged when progress resumed), 0 from the next batch",
        "health/stall_sec": "seconds the stall lasted on global rank 0, at its step",
        "health/stall_phase": "the phase of the stall, at its step: 0 start-up, 1 waiting for data,"
        " 2 forward/backward, 3 optimizer step, 4 validation, 5 checkpoint save",
    }

    def __init__(
        self,
        timeout: Optional[float] = None,
        *,
        min_timeout: float = 120.0,
        step_factor: float = 10.0,
        first_step_timeout: float = 600.0,
        slow_phase_timeout: float = 600.0,
        action: str = "warn",
        exit_code: int = 75,
        dirname: str = "stalls",
        filename: Optional[str] = "alerts.jsonl",
        print_alerts: bool = True,
        exclude_keys: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(None, exclude_keys)
        self.timeout = _options.check_number("timeout", timeout, above=0.0, none_ok=True)
        self.min_timeout = _options.check_number("min_timeout", min_timeout, above=0.0)
        self.step_factor = _options.check_number("step_factor", step_factor, above=0.0)
        self.first_step_timeout = _options.check_number("first_step_timeout", first_step_timeout, above=0.0)
        self.slow_phase_timeout = _options.check_number("slow_phase_timeout", slow_phase_timeout, above=0.0)
        self.action = _options.check_choice("action", action, ("warn", "exit"))
        self.exit_code = _options.check_int("exit_code", exit_code, low=1, high=255)
        for name, value, none_ok in (("dirname", dirname, False), ("filename", filename, True)):
            if (value is None and not none_ok) or (value is not None and (
                    not isinstance(value, str) or not value or os.sep in value or value in (".", ".."))):
                raise ValueError(f"`{name}` must be a plain file or folder name, got {value!r}")
        self.dirname, self.filename = dirname, filename
        self.print_alerts = _options.check_bool("print_alerts", print_alerts)
        #: the stalls of the last fit as global rank 0 saw them: ``(step, phase, seconds)``, seconds ``None`` while
        #: the stall lasts
        self.stalls: list[tuple[int, str, Optional[float]]] = []
        self._watch = self._new_watch()
        self._thread: Optional[threading.Thread] = None
        self._stop = threading.Event()
        self._trainer: Optional["pl.Trainer"] = None
        self._training_thread = 0
        self._clear_after: Optional[int] = None  # the stalled step whose health/stalled goes back to 0 next

    def _new_watch(self) -> Watch:
        return Watch(timeout=self.timeout, min_timeout=self.min_timeout, step_factor=self.step_factor,
                     first_step_timeout=self.first_step_timeout, slow_phase_timeout=self.slow_phase_timeout)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state.update(_thread=None, _stop=None, _trainer=None)  # a thread and an event are this process's
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._stop = threading.Event()

    # ------------------------------------------------------------------------------------------ the thread
    def _start(self, trainer: "pl.Trainer") -> None:
        self._finish()
        self._watch = self._new_watch()
        self._watch.start(_clock.now())
        self.stalls, self._clear_after = [], None
        self._trainer = trainer
        self._training_thread = threading.get_ident()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="lightning-monitor-stall-watchdog", daemon=True)
        self._thread.start()

    def _finish(self) -> None:
        thread, self._thread = self._thread, None
        if thread is not None:
            self._stop.set()
            thread.join(timeout=5.0)
        self._trainer = None

    def _run(self) -> None:
        """The watchdog: wakes once a second, judges the last mark (host arithmetic only), reports a new stall."""
        while not self._stop.wait(_WAKE_SEC):
            stall = self._watch.check(_clock.now())
            if stall is None:
                continue
            try:
                self._on_stall(stall)
            except Exception as err:  # the watchdog must not die of a report it could not make
                print(f"lightning-monitor: StallMonitor could not report a stall ({err!r})", file=sys.stderr,
                      flush=True)
            if self.action == "exit":
                sys.stdout.flush()
                sys.stderr.flush()
                os._exit(self.exit_code)

    def _on_stall(self, stall: Stall) -> None:
        """On the watchdog thread: the dump (every rank), the terminal line and ``alerts.jsonl`` (global rank 0)."""
        trainer = self._trainer
        if trainer is None:
            return
        rank = trainer.global_rank
        folder = self._dump_folder(trainer)
        body = _dump.text(stall, rank=rank, training_thread=self._training_thread, now_wall=_clock.wall())
        path, error = _dump.write(folder, rank, stall.mark.step, body)
        if error is not None:
            print(f"lightning-monitor: StallMonitor could not write its stack dump into {folder} ({error});"
                  f" here it is:\n{body}", file=sys.stderr, flush=True)
        if not trainer.is_global_zero:
            return
        mark = stall.mark
        self.stalls.append((mark.step, mark.phase, None))
        where = f"; stacks in {path}" if path else ""
        alert = Alert(
            mark.step, "stalled", "health/stalled", round(stall.seconds, 1), round(stall.limit, 1),
            f"no progress for {stall.seconds:.0f} s (limit {stall.limit:.0f} s) in {mark.phase}; the training"
            f" thread is at {_dump.top_frame(self._training_thread)}{where}", self.action)
        if self.print_alerts:
            _dispatch.say(trainer, alert.line())
        if self.filename is not None:
            jsonl = os.path.join(run_dir(trainer), self.filename)
            error = _report.append_jsonl(jsonl, [alert])
            if error is not None:
                print(f"lightning-monitor: StallMonitor could not write {jsonl} ({error})", file=sys.stderr,
                      flush=True)

    def _dump_folder(self, trainer: "pl.Trainer") -> str:
        """Global rank 0: the run directory's ``stalls/``. Another rank: the same path when the run directory exists
        on its node (one node, a shared file system), else ``stalls/`` in the first logger's ``save_dir`` there."""
        found = run_dir(trainer)
        if not trainer.is_global_zero and not os.path.isdir(found):
            found = next((str(logger.save_dir) for logger in trainer.loggers if logger.save_dir),
                         str(trainer.default_root_dir))
        return os.path.join(found, self.dirname)

    # ------------------------------------------------------------------------------------------ progress marks
    def _progress(self, trainer: "pl.Trainer", phase: str) -> None:
        """A progress mark (one tuple stored); when the watchdog had seen a stall, it ends here."""
        now = _clock.now()
        ended = self._watch.progress(now, phase, trainer.global_step)
        if ended is not None:
            self._resumed(trainer, ended, now)

    def _resumed(self, trainer: "pl.Trainer", stall: Stall, now: float) -> None:
        """Progress after a stall (training thread): the line, and on global rank 0 the keys at the stalled step."""
        if not trainer.is_global_zero:
            return
        mark = stall.mark
        seconds = now - mark.at
        self.stalls = [s for s in self.stalls if s[0] != mark.step or s[2] is not None] + [
            (mark.step, mark.phase, seconds)]
        if self.print_alerts:
            _dispatch.say(trainer, f"lightning-monitor: progress resumed at step {trainer.global_step} after a stall"
                                 f" of {seconds:.1f} s in {mark.phase} (step {mark.step})")
        self._log_scalars(trainer, {"health/stalled": 1.0, "health/stall_sec": seconds,
                                    "health/stall_phase": float(STALL_PHASES.index(mark.phase))}, mark.step)
        text = f"**stalled** at step {mark.step}: no progress for {seconds:.1f} s in {mark.phase}"
        if self._keeps("health/alert_text"):
            _dispatch.log_text(trainer, "health/alert_text", text, mark.step)
        _dispatch.log_alert(trainer, "lightning-monitor: stalled", text.replace("**", ""))
        self._clear_after = mark.step

    def _clear(self, trainer: "pl.Trainer") -> None:
        """``health/stalled`` back to 0 at the first batch after the stalled step (global rank 0)."""
        stalled = self._clear_after
        if stalled is not None and trainer.global_step > stalled and trainer.is_global_zero:
            self._clear_after = None
            self._log_scalars(trainer, {"health/stalled": 0.0}, trainer.global_step)

    # ------------------------------------------------------------------------------------------ hooks
    @override
    def on_fit_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._start(trainer)

    @override
    def on_sanity_check_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._progress(trainer, "validation")

    @override
    def on_sanity_check_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._progress(trainer, "start-up")

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._begin_batch(trainer, pl_module, batch, batch_idx)
        self._progress(trainer, "forward/backward")
        if self._clear_after is not None:
            self._clear(trainer)

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: Any
    ) -> None:
        self._progress(trainer, "optimizer step")

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        now = _clock.now()
        ended = self._watch.step_ended(now, trainer.global_step)
        if ended is not None:
            self._resumed(trainer, ended, now)

    @override
    def on_validation_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._progress(trainer, "validation")

    @override
    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        self._progress(trainer, "validation")

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._progress(trainer, "validation")

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._watch.skip_step()  # the step that ran validation is no measure of the steps
        self._progress(trainer, "waiting for data" if not trainer.sanity_checking else "start-up")

    @override
    def on_save_checkpoint(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", checkpoint: dict[str, Any]
    ) -> None:
        self._progress(trainer, "checkpoint save")

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._progress(trainer, "waiting for data")
        if self._clear_after is not None:
            self._clear(trainer)  # a stall in the last batches: health/stalled back to 0 at the last step
        self._finish()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._finish()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._finish()
        super().teardown(trainer, pl_module, stage)
