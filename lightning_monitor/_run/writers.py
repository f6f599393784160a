"""MultiLogger's two writers: TensorBoard and wandb for one run directory (lazy start, restart purge, step ledger)."""

from __future__ import annotations

import glob
import os
from collections.abc import Collection, Mapping, Sequence
from typing import Any, Optional

from lightning.pytorch.loggers import WandbLogger

from lightning_monitor._core.compat import (
    add_prefix,
    file_writer,
    flatten_dict,
    logger_prefix,
    run_is_finished,
    sanitize_params,
)
from lightning_monitor._run import hparams as _hparams
from lightning_monitor._run import state as _run_state
from lightning_monitor._run import wandb_start as _wandb_run
from lightning_monitor._run.guard import RunGuard
from lightning_monitor._run.run import Run
from lightning_monitor._writers.backends import _call, _numbers, deliver, os_error
from lightning_monitor._writers.dashboards import TensorBoardWriter, WandbWriter


class RunTensorBoard(TensorBoardWriter):
    """TensorBoard for a MultiLogger run: the event file is opened (and its header written) at the first write, so
    an unwritable or full disk fails there with a clear error naming the run directory, before training. A job
    restarted from a checkpoint drops its predecessor's points after that checkpoint (a purge marker).

    ``on``: TensorBoard is one of the run's backends (the writer exists either way: its logger owns the run
    directory); ``hp_metric``: Lightning's placeholder ``hp_metric`` scalar is wanted (``default_hp_metric``)."""

    def __init__(self, run: Run, guard: RunGuard, on: bool, hp_metric: bool) -> None:
        super().__init__(run.tb)
        self.run, self.guard, self.on, self.hp_metric = run, guard, on, hp_metric
        self.started = False  # the SummaryWriter is made and its header written
        self.purge_pending = False  # the next step written is the first of a segment in a run holding earlier ones
        self.started_over: Optional[tuple[int, int, bool]] = None  # (first step, run's last, purged): see start()
        self.segments = 0  # segments this writer has finished (a re-run told once per segment)
        self.last_step = 0
        self.hparams: Optional[dict[str, Any]] = None  # flattened, for the HParams tab
        self.eval_metrics: dict[str, float] = {}  # last value of each validation/test metric: HParams columns

    def summary_writer(self) -> Any:
        if not self.started:
            self.guard.claim()  # the event file is the first file of the run directory: its lock first
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
        if self.started_over is not None and step > self.started_over[0]:
            self.tell_started_over()
        if self.purge_pending:
            self.purge_pending = False
            ledger = self.run.ledger()
            last = ledger.started_over(int(step))
            if last is not None:  # told when a later step shows a fit (test or validate log one step only)
                self.started_over = (int(step), last, ledger.is_restart(step))
            if ledger.is_restart(step):
                # Restarted from a checkpoint: the earlier run logged past `step`. TensorBoard drops its points at
                # steps >= `step` (logged after that checkpoint): the series stays strictly increasing. (Merely
                # continuing, e.g. `test` after `fit`, drops nothing.)
                from tensorboard.compat.proto.event_pb2 import Event, SessionLog

                event = Event(step=step, session_log=SessionLog(status=SessionLog.START))
                try:
                    file_writer(writer).add_event(event)
                except OSError:
                    pass  # the write that follows fails the same way, inside the guard
        return True

    def tell_started_over(self) -> None:
        """A fit started the run over from scratch below the steps an earlier fit logged (a notebook cell run again
        with the same ``version``): say once what TensorBoard will show, and how to keep the fits apart. From a
        step above 0 the purge marker written for a restart (:meth:`start`) hides the earlier fit's points from
        there on; from step 0 there is none (a fresh trainer's ``test`` logs there too), and both fits' points
        share the steps."""
        assert self.started_over is not None
        first, last, purged = self.started_over
        self.started_over = None
        if purged:
            shown = f"TensorBoard will hide the earlier fit's points from step {first} on (wandb keeps both)"
        else:
            shown = (f"TensorBoard will show both fits' points at the same steps, on one line that runs back to step"
                     f" {first} (wandb too)")
        self.warn(
            f"started-over:{self.segments}",
            f"This fit starts again at step {first} in {self.tb.log_dir}, which already holds steps up to {last} from"
            f" an earlier fit: {shown}. To keep the fits apart, log each to its own version:"
            " `MultiLogger(version=None)` takes the next free one, or pass another `version=`.",
        )

    def end(self, step: Optional[int], row: bool) -> None:
        if step is not None:
            self.run.ledger().record_step(step)

    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        self.guard.scalars_written(metrics, step)  # a monitor's keys, to tell a model's self.log of one
        super().scalars(metrics, step)

    def hyperparams(self, params: Any, metrics: Optional[Mapping[str, float]] = None) -> None:
        """Through ``TensorBoardLogger.log_hyperparams``, and the HParams session (without Lightning's placeholder
        ``hp_metric``) unless ``metrics`` are given or the placeholder is wanted."""
        self.tb.log_hyperparams(params, dict(metrics) if metrics else None)
        if not self.hp_metric and not metrics:
            self.hparams_session(params)

    def finish(self, status: str) -> None:
        """The run's end: its status as text when it is not a success, the HParams session's end and its metric
        columns, the event file flushed and closed."""
        if not self.started or not self.on or self.failed:
            return
        if status != "success":
            self.summary_writer().add_text("run/status", status, global_step=self.last_step)
        if not self.hp_metric:
            self.hparams_session(None, status)
        self.segments += 1
        self.purge_pending, self.started_over = True, None  # a later write (test, another fit) starts a segment
        self.tb.finalize(status)

    def keeps_after_loss(self) -> Optional[bool]:
        return False if self.on else None

    def local_files(self) -> Optional[str]:
        """The run directory, where the event files are, once this writer wrote there."""
        return os.path.abspath(self.tb.log_dir) if self.on and self.started else None

    def lose_run_dir(self) -> None:
        self.failed = True

    def summary(self, values: Mapping[str, Any], step: Optional[int], card: Optional[tuple[str, str]],
                headline: Collection[str] = ()) -> None:
        """As :meth:`TensorBoardWriter.summary` (the card, the ``headline`` numbers as scalars), and the headline
        numbers become HParams metric columns too (the tab reads their values from scalar events). The other numbers
        are in the card, ``summary.json`` and wandb's run summary: a chart of one dot each would say nothing more."""
        super().summary(values, step, card, headline)
        self.eval_metrics.update({k: v for k, v in _numbers(values).items() if k in headline})  # written at finalize

    def note_eval_metrics(self, metrics: Mapping[str, float]) -> None:
        """Validation and test metrics of the model (``self.log``): the HParams metric columns written at the end."""
        self.eval_metrics.update(metrics)

    def hparams_session(self, params: Optional[Mapping[str, Any]], status: Optional[str] = None) -> None:
        """TensorBoard's HParams tab without Lightning's placeholder ``hp_metric = -1`` scalar.

        At the start only the session's hyperparameters are written (into the segment's event file); at the end
        of each segment (``status`` given) the experiment summary naming the metric columns (the validation and
        test metrics logged and the summary's headline numbers: their scalar series hold the values) and the
        session's end go to the run's own HParams file (:mod:`~lightning_monitor._run.hparams`), replaced with the
        columns of every segment so far: TensorBoard keeps the first experiment summary it reads in a run, so one
        written per segment hid a later ``test``'s columns.
        """
        from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2
        from torch.utils.tensorboard.summary import hparams

        if params is not None:
            self.hparams = sanitize_params(self.tb, flatten_dict(params))
        if self.hparams is None:
            return
        metrics = add_prefix(self.eval_metrics, logger_prefix(self.tb), self.tb.LOGGER_JOIN_CHAR)
        experiment, session_start, session_end = hparams(self.hparams, metrics)
        writer = file_writer(self.summary_writer())
        if status is None:
            writer.add_summary(session_start)
            return
        for value in session_end.value:  # torch writes SUCCESS whatever happened
            data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
            data.session_end_info.status = api_pb2.STATUS_SUCCESS if status == "success" else api_pb2.STATUS_FAILURE
            value.metadata.plugin_data.content = data.SerializeToString()
        writer.flush()  # the segment's scalars (the columns' values) before the file that names them
        _hparams.write(self.tb.log_dir, experiment, session_end, self.last_step)

    def failure_message(self, err: BaseException, still_logging: Sequence[str]) -> str:
        told = self.guard.run_dir_fault(err)  # run directory deleted or its disk full: what each backend keeps
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
    step ledger. ``on``: wandb is one of the run's backends."""

    def __init__(self, run: Run, guard: RunGuard, on: bool) -> None:
        super().__init__(run.tb)  # type: ignore[arg-type]  # the WandbLogger replaces it when the run starts
        self.run, self.guard, self.on = run, guard, on
        self.wb: Optional[WandbLogger] = None
        self.pending: list[Any] = []  # hyperparameters logged before the run could start
        self.closed_copy: Optional[str] = None  # the local folder of the run last finished (wandb sync takes it)

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
        wb = self.wandb_logger()
        row = add_prefix(row, logger_prefix(wb), wb.LOGGER_JOIN_CHAR)
        if step is not None:
            row["trainer/global_step"] = step
        wb.experiment.log(row, step=_run_state.live_runs[self.run.run_id].next_step)

    def hyperparams(self, params: Any, metrics: Optional[Mapping[str, float]] = None) -> None:
        if self.wb is None:
            self.pending.append(params)
            return
        super().hyperparams(params)

    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        self.guard.scalars_written(metrics, step)  # a monitor's keys, to tell a model's self.log of one
        super().scalars(metrics, step)

    def started_logger(self) -> Optional[WandbLogger]:
        """The WandbLogger of the run, started now (global rank 0) if it has not been: ``None`` when wandb is off
        or failed."""
        if not self.on or self.failed:
            return None
        if self.wb is None and _is_rank_zero():
            self.guard.claim()
            self.start(None, row=True)
        return self.wb

    def finish(self, status: str) -> None:
        """The run's end: a run that only had hyperparameters (nothing logged at a step) is still started, then the
        wandb run is finished (failed unless ``status`` is success)."""
        if not self.on or self.failed:
            return
        if self.wb is None and self.pending:
            self.start(None, row=True)  # hyperparameters and no step: still a run
            if self.wb is not None:
                deliver(self, lambda: None, None, ["hyperparameters"], row=False)  # replays them
        if self.wb is not None and not self.failed:
            self._close(0 if status == "success" else 1, status)

    def _close(self, exit_code: int, status: Optional[str]) -> None:
        """Finish the run (bounded: :func:`~lightning_monitor._run.wandb_start.finish`); a later fit/test resumes it
        with the same id. ``status``: Lightning's finalize of the WandbLogger first (its checkpoint upload); the run
        is finished even when that fails. Raises what failed first, after both were tried."""
        assert self.wb is not None
        wandb_logger, self.wb = self.wb, None
        _run_state.live_runs.pop(self.run.run_id, None)
        run = wandb_logger.experiment
        self.closed_copy = _wandb_run.local_copy(run)
        errors: list[Exception] = []
        if status is not None:
            try:
                wandb_logger.finalize(status)
            except Exception as err:  # noqa: BLE001 - the run must still be finished
                errors.append(err)
        try:
            _wandb_run.finish(run, exit_code=exit_code)
        except Exception as err:  # noqa: BLE001 - raised below, after Lightning's part
            errors.append(err)
        if errors:
            raise errors[0]

    def local_files(self) -> Optional[str]:
        """The local folder of the wandb run this writer finished last (``wandb sync`` uploads it), if it exists."""
        return self.closed_copy

    def keeps_after_loss(self) -> Optional[bool]:
        if not self.on or self.failed:
            return None
        live = _run_state.live_runs.get(self.run.run_id)
        return bool(live and _wandb_run.is_online(live.run))

    def lose_run_dir(self) -> None:
        if self.keeps_after_loss() is not False:
            return  # online (the server keeps what wandb sends), or off
        self.failed = True
        if self.wb is not None:  # finished now (bounded), so a later wandb.init in this process finds no active run
            try:
                self._close(1, None)
            except Exception:  # noqa: BLE001 - its files are lost either way; training goes on
                pass

    def end(self, step: Optional[int], row: bool) -> None:
        if self.wb is None:
            return  # hyperparameters queued before the run started
        pending, self.pending = self.pending, []
        for params in pending:  # config is not a history row: replaying it after the first row changes nothing
            _call(self.wandb_logger(), "log_hyperparams", params)
        if row:  # every WandbLogger call we make is one `run.log`, i.e. one history row
            live = _run_state.live_runs[self.run.run_id]
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
        run = self.run
        options = dict(run.wandb_options or {})
        mode, reason = _wandb_run.decide_mode(options)
        logger_kwargs = {key: options.pop(key) for key in _wandb_run.LOGGER_ONLY_KEYS if key in options}
        init: dict[str, Any] = {
            "name": run.display_name,
            "project": os.environ.get("WANDB_PROJECT", run.name),
            "id": run.run_id,
            "dir": os.path.abspath(run.log_dir),  # wandb's service keeps the first run's cwd
            "resume": "allow",
            "reinit": "create_new",  # a second fit in this process gets its own run
            **options,
        }
        os.makedirs(run.log_dir, exist_ok=True)
        live = _run_state.live_runs.get(run.run_id)
        if live is None or run_is_finished(live.run):  # an unpickled copy of us shares the run
            ledger = run.ledger()
            rewind = None
            if run.wandb_rewind and not {"resume", "resume_from", "fork_from", "id"} & set(options):
                rewind = ledger.rewind_point(first_step)
            if rewind is not None:  # opt-in (a wandb preview feature): cut the run back to before `first_step`
                del init["id"], init["resume"]
                init["resume_from"] = f"{run.run_id}?_step={rewind}"
            wandb_run = _wandb_run.start(init, mode, reason)
            if wandb_run is None:
                return None
            if rewind is not None:
                ledger.record_rewind(rewind)
            # By default a new segment of the run (test after fit, a restart, a later job) continues wandb's own
            # `_step` after every row the run already holds, so `wandb sync` of the segments in order appends them
            # and overwrites nothing (rows carry their `_step` explicitly: an offline run cannot know it).
            next_step = rewind + 1 if rewind is not None else max(ledger.next_wandb_step(), int(wandb_run.step or 0))
            live = _run_state.live_runs[run.run_id] = _run_state.LiveRun(wandb_run, ledger, next_step)
        return WandbLogger(experiment=live.run, **logger_kwargs)

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["wb"] = None  # a live run does not pickle; the copy resumes it by id when it first logs
        state["logger"] = self.run.tb
        return state


def _is_rank_zero() -> bool:
    from lightning.pytorch.utilities import rank_zero_only

    return rank_zero_only.rank == 0  # type: ignore[attr-defined]


def tb_error(log_dir: str, err: BaseException) -> OSError:
    cause = os_error(err) or err
    detail = getattr(cause, "strerror", None) or str(cause)
    errno = getattr(cause, "errno", None)
    message = f"TensorBoard cannot write to {log_dir}: {detail}"
    return OSError(errno, message) if errno else OSError(message)
