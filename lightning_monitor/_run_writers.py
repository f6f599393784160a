"""MultiLogger's two writers: TensorBoard and wandb for one run directory (lazy start, restart purge, step ledger)."""

from __future__ import annotations

import glob
import os
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, Optional

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lightning_monitor import _run_state
from lightning_monitor._writers import TensorBoardWriter, WandbWriter, _call

if TYPE_CHECKING:
    from lightning_monitor.multi_logger import MultiLogger


class RunTensorBoard(TensorBoardWriter):
    """TensorBoard for a MultiLogger run: the event file is opened (and its header written) at the first write, so
    an unwritable or full disk fails there with a clear error naming the run directory, before training. A job
    restarted from a checkpoint drops its predecessor's points after that checkpoint (a purge marker)."""

    def __init__(self, tb: TensorBoardLogger, multi: "MultiLogger") -> None:
        super().__init__(tb)
        self.multi = multi
        self.started = False  # the SummaryWriter is made and its header written
        self.purge_pending = False
        self.last_step = 0

    def summary_writer(self) -> Any:
        if not self.started:
            self.purge_pending = bool(glob.glob(os.path.join(self.tb.log_dir, "events.out.tfevents.*")))
            try:
                self.tb.experiment.flush()
            except Exception as err:
                raise tb_error(self.tb.log_dir, err) from err
            self.started = True
            _run_state.flush_at_exit(self)
        return self.tb.experiment

    def start(self, step: Optional[int], row: bool) -> bool:
        writer = self.summary_writer()
        if step is None:
            return True
        self.last_step = max(self.last_step, int(step))
        if self.purge_pending:
            self.purge_pending = False
            if self.multi.ledger().is_restart(step):
                # Restarted from a checkpoint: the earlier run logged past `step`. TensorBoard drops its points at
                # steps >= `step` (logged after that checkpoint): the series stays strictly increasing. (Merely
                # continuing, e.g. `test` after `fit`, drops nothing.)
                from tensorboard.compat.proto.event_pb2 import Event, SessionLog

                event = Event(step=step, session_log=SessionLog(status=SessionLog.START))
                try:
                    writer._get_file_writer().add_event(event)
                except OSError:
                    pass  # the write that follows fails the same way, inside the guard
        return True

    def end(self, step: Optional[int], row: bool) -> None:
        if step is not None:
            self.multi.ledger().record_step(step)

    def failure_message(self, err: BaseException, still_logging: Sequence[str]) -> str:
        if os_error(err) is None:
            return super().failure_message(err, still_logging)
        return (
            f"{tb_error(self.tb.log_dir, err)}. TensorBoard logging stops here; training goes on"
            + (f" and {' and '.join(still_logging)} keeps logging." if still_logging else ".")
        )


class RunWandb(WandbWriter):
    """wandb for a MultiLogger run: the run starts at the first write that carries a step (hyperparameters logged
    before wait for it), so that a restarted job knows which ``_step`` to continue from; each row is noted in the
    step ledger."""

    def __init__(self, multi: "MultiLogger") -> None:
        super().__init__(multi._tb)  # type: ignore[arg-type]  # the WandbLogger replaces it when the run starts
        self.multi = multi
        self.wb: Optional[WandbLogger] = None
        self.pending: list[Any] = []  # hyperparameters logged before the run could start

    def wandb_logger(self) -> WandbLogger:
        assert self.wb is not None
        return self.wb

    def start(self, step: Optional[int], row: bool) -> bool:
        if self.wb is None and (row or step is not None):
            self.wb = self.multi._start_wandb(first_step=step)
            if self.wb is None:  # even an offline run failed; _wandb_run warned
                self.failed = True
                return False
            self.logger = self.wb
        return True

    def log_row(self, row: dict[str, Any], step: Optional[int]) -> None:
        """``run.log`` with the run's next ``_step`` given explicitly (see ``MultiLogger._start_wandb``), the
        prefix and the ``trainer/global_step`` axis added as ``WandbLogger.log_metrics`` adds them."""
        from lightning.fabric.utilities.logger import _add_prefix

        wb = self.wandb_logger()
        row = dict(_add_prefix(row, wb._prefix, wb.LOGGER_JOIN_CHAR))
        if step is not None:
            row["trainer/global_step"] = step
        wb.experiment.log(row, step=_run_state.live_runs[self.multi.run_id].next_step)

    def hyperparams(self, params: Any) -> None:
        if self.wb is None:
            self.pending.append(params)
            return
        super().hyperparams(params)

    def end(self, step: Optional[int], row: bool) -> None:
        if self.wb is None:
            return  # hyperparameters queued before the run started
        pending, self.pending = self.pending, []
        for params in pending:  # config is not a history row: replaying it after the first row changes nothing
            _call(self.wandb_logger(), "log_hyperparams", params)
        if row:  # every WandbLogger call we make is one `run.log`, i.e. one history row
            live = _run_state.live_runs[self.multi.run_id]
            live.ledger.record(live.next_step, step)
            live.next_step += 1

    def failure_message(self, err: BaseException, still_logging: Sequence[str]) -> str:
        where = getattr(self.wb.experiment, "dir", None) if self.wb is not None else None
        return (
            f"wandb stopped working ({type(err).__name__}: {err});"
            f" {' and '.join(still_logging) + ' keeps logging' if still_logging else 'nothing more is logged'}."
            + (f" What wandb had received is in {os.path.dirname(where)}." if where else "")
        )

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["wb"] = None  # a live run does not pickle; the copy resumes it by id when it first logs
        state["logger"] = self.multi._tb
        return state


def os_error(err: Optional[BaseException]) -> Optional[OSError]:
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


def tb_error(log_dir: str, err: BaseException) -> OSError:
    cause = os_error(err) or err
    detail = getattr(cause, "strerror", None) or str(cause)
    errno = getattr(cause, "errno", None)
    message = f"TensorBoard cannot write to {log_dir}: {detail}"
    return OSError(errno, message) if errno else OSError(message)
