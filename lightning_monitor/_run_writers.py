"""MultiLogger's two writers: TensorBoard and wandb for one run directory (lazy start, restart purge, step ledger)."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any, Optional

from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

from lightning_monitor import _run_state, _wandb_run
from lightning_monitor._writers import TensorBoardWriter, WandbWriter, _call, _numbers, os_error

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
        self.hparams: Optional[dict[str, Any]] = None  # flattened, for the HParams tab
        self.eval_metrics: dict[str, float] = {}  # last value of each validation/test metric: HParams columns

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

    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        self.multi._guard.scalars_written(metrics, step)  # a monitor's keys, to tell a model's self.log of one
        super().scalars(metrics, step)

    def summary(self, values: Mapping[str, Any], step: Optional[int], card: Optional[tuple[str, str]]) -> None:
        super().summary(values, step, card)
        self.eval_metrics.update(_numbers(values))  # HParams metric columns too, written at finalize

    def hparams_session(self, params: Optional[Mapping[str, Any]], status: Optional[str] = None) -> None:
        """TensorBoard's HParams tab without Lightning's placeholder ``hp_metric = -1`` scalar.

        At the start only the session's hyperparameters are written; at the end (``status`` given) the experiment
        summary naming the metric columns (the validation and test metrics logged: their scalar series hold the
        values) and the session's end. TensorBoard keeps the first summary of a tag, so the experiment summary is
        written once, when its metric list is known.
        """
        from lightning.fabric.utilities.logger import _add_prefix, _flatten_dict
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams

        if params is not None:
            self.hparams = self.tb._sanitize_params(_flatten_dict(dict(params)))
        if self.hparams is None:
            return
        metrics = _add_prefix(dict(self.eval_metrics), self.tb._prefix, self.tb.LOGGER_JOIN_CHAR)
        experiment, session_start, session_end = hparams(self.hparams, metrics)
        writer = self.summary_writer()._get_file_writer()
        if status is None:
            writer.add_summary(session_start)
            return
        for value in session_end.value:  # torch writes SUCCESS whatever happened
            data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
            data.session_end_info.status = api_pb2.STATUS_SUCCESS if status == "success" else api_pb2.STATUS_FAILURE
            value.metadata.plugin_data.content = data.SerializeToString()
        writer.add_summary(experiment)
        writer.add_summary(session_end)

    def failure_message(self, err: BaseException, still_logging: Sequence[str]) -> str:
        told = self.multi.run_dir_fault(err)  # run directory deleted or its disk full: what each backend keeps
        if told is not None:
            return told
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
            self.wb = self._start_run(first_step=step)
            if self.wb is None:  # even an offline run failed; _wandb_run warned
                self.failed = True
                return False
            self.logger = self.wb
        return True

    def log_row(self, row: dict[str, Any], step: Optional[int]) -> None:
        """``run.log`` with the run's next ``_step`` given explicitly (see :meth:`_start_run`), the
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

    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        self.multi._guard.scalars_written(metrics, step)  # a monitor's keys, to tell a model's self.log of one
        super().scalars(metrics, step)

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

    def _start_run(self, first_step: Optional[int]) -> Optional[WandbLogger]:
        multi = self.multi
        options = dict(multi._wandb_options or {})
        mode, reason = _wandb_run.decide_mode(options)
        logger_kwargs = {key: options.pop(key) for key in _wandb_run.LOGGER_ONLY_KEYS if key in options}
        init: dict[str, Any] = {
            "name": f"{multi.name}/{multi.version_name()}",
            "project": os.environ.get("WANDB_PROJECT", multi.name),
            "id": multi.run_id,
            "dir": os.path.abspath(multi.log_dir),  # wandb's service keeps the first run's cwd
            "resume": "allow",
            "reinit": "create_new",  # a second fit in this process gets its own run
            **options,
        }
        os.makedirs(multi.log_dir, exist_ok=True)
        live = _run_state.live_runs.get(multi.run_id)
        if live is None or getattr(live.run, "_is_finished", False):  # an unpickled copy of us shares the run
            ledger = multi.ledger()
            rewind = None
            if multi._wandb_rewind and not {"resume", "resume_from", "fork_from", "id"} & set(options):
                rewind = ledger.rewind_point(first_step)
            if rewind is not None:  # opt-in (a wandb preview feature): cut the run back to before `first_step`
                del init["id"], init["resume"]
                init["resume_from"] = f"{multi.run_id}?_step={rewind}"
            run = _wandb_run.start(init, mode, reason)
            if run is None:
                return None
            if rewind is not None:
                ledger.record_rewind(rewind)
            # By default a new segment of the run (test after fit, a restart, a later job) continues wandb's own
            # `_step` after every row the run already holds, so `wandb sync` of the segments in order appends them
            # and overwrites nothing (rows carry their `_step` explicitly: an offline run cannot know it).
            next_step = rewind + 1 if rewind is not None else max(ledger.next_wandb_step(), int(run.step or 0))
            live = _run_state.live_runs[multi.run_id] = _run_state.LiveRun(run, ledger, next_step)
        return WandbLogger(experiment=live.run, **logger_kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["wb"] = None  # a live run does not pickle; the copy resumes it by id when it first logs
        state["logger"] = self.multi._tb
        return state


def tb_error(log_dir: str, err: BaseException) -> OSError:
    cause = os_error(err) or err
    detail = getattr(cause, "strerror", None) or str(cause)
    errno = getattr(cause, "errno", None)
    message = f"TensorBoard cannot write to {log_dir}: {detail}"
    return OSError(errno, message) if errno else OSError(message)
