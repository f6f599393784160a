"""Monitor: the base of every monitor callback (its cadence, its run-scoped warnings, its ``setup`` checks, the
host time spent in its hooks)."""

from __future__ import annotations

import fnmatch
import functools
import re
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar, Optional, TypeVar, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_monitor._core import clock as _clock
from lightning_monitor._core import options as _options
from lightning_monitor._core.warn import WarnOnce
from lightning_monitor._monitor import cadence as _cadence
from lightning_monitor._monitor import dispatch as _dispatch
from lightning_monitor._monitor import dist as _dist
from lightning_monitor._monitor.budget import Budget, Part, turned_off_by_environment
from lightning_monitor._writers import backends as _backends
from lightning_monitor._writers.media import HistogramData

#: strategies that hide parameters in flat shards, behind their own wrapper (FSDP1, DeepSpeed ZeRO)
_FLAT_SHARDS = (FSDPStrategy, DeepSpeedStrategy)
_F = TypeVar("_F", bound=Callable[..., Any])


def _is_hook(name: str) -> bool:
    """Whether ``name`` is a Lightning callback hook the trainer calls (``setup``, ``teardown``, ``on_*``)."""
    return name in ("setup", "teardown") or (name.startswith("on_") and callable(getattr(Callback, name, None)))


def _timed_hook(hook: _F) -> _F:
    """``hook`` adding its host time to ``self._hook_seconds`` and SpeedMonitor's table (:meth:`Monitor.charge_seconds`
    written out: every hook of every monitor passes here): two clock reads a call. A hook that calls the hook it
    overrides (``super()``) is timed once, by the outermost call. Before the hook, the last batch end's scalars are
    written if Lightning wrote nothing since (:func:`lightning_monitor._writers.backends.defer`).

    ``on_train_batch_end``: the first monitor's holds the scalars every monitor logs there, the last one's writes them
    (one write per backend, :func:`~lightning_monitor._monitor.dispatch.hold_scalars`), after its own timing: the
    write's time is charged to the monitors that logged, by :meth:`Monitor.charge_seconds`. A hook that raises
    writes what is held first."""
    batch_end = hook.__name__ == "on_train_batch_end"

    @functools.wraps(hook)
    def timed(self: "Monitor", *args: Any, **kwargs: Any) -> Any:
        if self._in_hook:
            return hook(self, *args, **kwargs)
        if _backends._pending is not None:  # the last batch end's scalars, when Lightning wrote nothing since
            _backends.write_pending()
        role = self._batch_end_role if batch_end else 0
        if role & _HOLDS:
            _dispatch.hold_scalars()
        self._in_hook = True
        began = _clock.now()
        try:
            return hook(self, *args, **kwargs)
        except BaseException:
            if batch_end:
                _dispatch.release_scalars()  # what the monitors before this one logged is not lost
            raise
        finally:
            spent = _clock.now() - began
            self._in_hook = False
            self._hook_seconds += spent
            sink = self._cost_sink
            if sink is not None:
                sink[self._cost_column] += spent
                sink[-1] += spent
            if role & _RELEASES:
                _dispatch.release_scalars(later=True)

    timed._monitor_timed = True  # type: ignore[attr-defined]
    return timed  # type: ignore[return-value]


# roles in a training batch's end (Monitor._batch_end_role): the first monitor holds the scalars, the last writes them
_HOLDS, _RELEASES = 1, 2


def _time_hooks(cls: type) -> None:
    for name, value in list(vars(cls).items()):
        if _is_hook(name) and callable(value) and not getattr(value, "_monitor_timed", False):
            setattr(cls, name, _timed_hook(value))


class Monitor(Callback):
    """Base of the monitors: when to log and at which step, warn-once per run, the trainer checks of ``setup``.

    The step rule is Lightning's own ``self.log`` rule (:mod:`lightning_monitor._monitor.cadence`): the batch's step is
    read at ``on_train_batch_start``, and :meth:`_batch_logging_step` says at the batch's end whether it made a logging
    step. A subclass that overrides ``setup``, ``teardown`` or ``on_train_start`` calls ``super()``; one that overrides
    ``on_train_batch_start`` calls ``super()`` or, cheaper, :meth:`_begin_batch` first.
    """

    #: Every key the monitor logs, ``key -> meaning``: the one source of its docstring table, the README table and
    #: the contract test (:func:`lightning_monitor._core.keys.document_keys`).
    LOGGED_KEYS: ClassVar[dict[str, str]] = {}
    #: Why the monitor cannot run under a strategy that keeps parameters in flat shards behind its own wrapper
    #: (``FSDPStrategy``, DeepSpeed), said after the strategy's name; empty when it can. DTensor sharding
    #: (``ModelParallelStrategy`` with FSDP2 or tensor parallel) is for each monitor to handle.
    FLAT_SHARDS_UNSUPPORTED: ClassVar[str] = ""

    def __init__(self, every_n_steps: Optional[int], exclude_keys: Optional[Sequence[str]] = None,
                 cost_budget: Optional[float] = None) -> None:
        super().__init__()
        _options.check_int("every_n_steps", every_n_steps, low=1, none_ok=True)
        #: share of training time all monitors together may spend before this one spaces out its expensive parts
        #: (:mod:`lightning_monitor._monitor.budget`); ``None``: no budget
        self.cost_budget = _options.check_number("cost_budget", cost_budget, above=0.0, high=1.0, none_ok=True)
        if isinstance(exclude_keys, str) or not all(isinstance(p, str) for p in exclude_keys or ()):
            raise ValueError(f"`exclude_keys` must be a list of key patterns (globs), got {exclude_keys!r}")
        self.every_n_steps = every_n_steps
        self.exclude_keys = list(exclude_keys or ())
        self._warn = WarnOnce()  # self._warn(tag, message): once per run (cleared in setup)
        self._batch_step: Optional[int] = None  # self.log's step of this fit's last training batch (_cadence)
        self._candidate: Optional[int] = None  # the logging step that batch would complete (_batch_logging_step)
        self._manual = False  # that batch's module uses manual optimization
        self._works_here = True  # set at a fit's first training batch (_dist.works_on_model_here)
        self._hook_seconds = 0.0  # host seconds spent in this monitor's hooks (every hook, timed by the base class)
        self._in_hook = False
        #: where SpeedMonitor adds up every monitor's hook seconds as they are spent (:meth:`sink_costs_into`)
        self._cost_sink: Optional[list[float]] = None
        self._cost_column = 0
        self._batch_end_role = 0  # _HOLDS / _RELEASES: set at the start of a fit (on_train_start)
        self._parts: list[Part] = []  # the expensive optional parts the budget spaces out (_part)
        self._budget: Optional[Budget] = None  # made at the start of a fit, started after its first batch
        self._batches = 0
        #: what every monitor of the trainer reads at a training batch's start, read once by the first of them
        #: (:class:`_BatchStart`; set at the start of a fit)
        self._batch_start: Optional[_BatchStart] = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _time_hooks(cls)  # every hook of every monitor is timed: SpeedMonitor logs the share (time/monitor_share)

    @classmethod
    def cost_name(cls) -> str:
        """The name this monitor's own cost is reported under (SpeedMonitor's ``time/monitor_share/{monitor}``):
        the library class it is, less ``Monitor``, in snake_case (``gradient``, ``prediction_grid``; a user's
        subclass of ``GradientMonitor`` counts as ``gradient``, a user's own subclass of this base as ``other``)."""
        base = next(c for c in cls.__mro__ if c.__module__.startswith("lightning_monitor") or c is Monitor)
        name = re.sub(r"(?<!^)(?=[A-Z])", "_", base.__name__.removesuffix("Monitor")).lower()
        return name or "other"

    def hook_seconds(self) -> float:
        """Host seconds spent so far in this monitor's hooks (every hook, timed by this base class); reading it
        changes nothing."""
        return self._hook_seconds

    def charge_seconds(self, seconds: float) -> None:
        """Count ``seconds`` of host time as this monitor's (its hooks' time; a shared write's part of it)."""
        self._hook_seconds += seconds
        sink = self._cost_sink
        if sink is not None:  # SpeedMonitor's table of every monitor's hook seconds (one column per class)
            sink[self._cost_column] += seconds
            sink[-1] += seconds

    def sink_costs_into(self, table: Optional[list[float]], column: int = 0) -> None:
        """Add this monitor's hook seconds, as they are spent, to ``table[column]`` and to the total ``table[-1]``
        (``None``: nowhere): SpeedMonitor reads every monitor's cost at each batch from one list."""
        self._cost_sink, self._cost_column = table, column

    def is_off(self) -> bool:
        """Whether this monitor turned itself off for the rest of the run (it then logs nothing, and no key is
        logged for it, its ``time/monitor_share/{monitor}`` included); reading it changes nothing."""
        return False

    def _needs_logger(self) -> bool:
        """Whether the monitor has nothing to do without a logger (``setup`` then raises)."""
        return True

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        name = type(self).__name__
        if not trainer.loggers and self._needs_logger():
            raise MisconfigurationException(
                f"{name} needs a logger, but the Trainer has no logger: pass e.g. Trainer(logger=MultiLogger())"
            )
        if self.FLAT_SHARDS_UNSUPPORTED and isinstance(trainer.strategy, _FLAT_SHARDS):
            strategy = type(trainer.strategy).__name__
            raise MisconfigurationException(
                f"{name} cannot run under {strategy}: {strategy} {self.FLAT_SHARDS_UNSUPPORTED}; use"
                " ModelParallelStrategy with FSDP2 (`fully_shard` in `configure_model`), DDP or a single device"
            )
        self._warn.clear()
        self._batch_step = None
        if trainer.loggers and trainer.is_global_zero:
            # the writers' guard in place before the first batch: Lightning's own writes to a plain logger pass
            # through it (isolation, and their time counted by _writers.seconds_writing) from the start
            _dispatch.writers(trainer)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        if trainer.is_global_zero:
            _dispatch.release(trainer)  # the plain loggers' own methods back, unwrapped (the next stage rewraps)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        """Nothing of its own: its timing wrapper writes the last batch end's scalars if they still wait for
        Lightning's write of the step (Lightning finalizes the loggers right after this hook)."""

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._batch_step = self._candidate = None  # no training batch of this fit yet
        self._batches = 0
        monitors = [c for c in trainer.callbacks if isinstance(c, Monitor)]  # type: ignore[attr-defined]
        if monitors and monitors[0] is self:  # the first monitor's start runs first: one record for all of them
            shared = _BatchStart()
            for monitor in monitors:
                monitor._batch_start = shared
        enders = [c for c in monitors if type(c).on_train_batch_end is not Callback.on_train_batch_end]
        self._batch_end_role = ((_HOLDS if enders and enders[0] is self else 0)
                                | (_RELEASES if enders and enders[-1] is self else 0))
        self._budget = None
        if self.cost_budget is not None and not turned_off_by_environment():
            self._budget = Budget(self.cost_budget, monitors)
        for part in self._parts:  # no refusal of an earlier fit's budget holds in this one (Part.wait_until)
            part.reset()

    def _begin_batch(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int) -> None:
        """The base's start of a training batch, untimed: ``on_train_batch_start`` of a monitor that does not override
        it (timed there), and what a subclass's own start calls first, inside its own timing (not through ``super()``:
        one timed call less at every batch).

        The first monitor whose start runs reads the trainer for all of them (:class:`_BatchStart`); a batch's
        candidate logging step is decided here, so that its end reads nothing of the trainer when it cannot log. The
        hot path of every batch: a Python call run cold after the training step costs about 1 us."""
        self._batches = batches = self._batches + 1
        shared = self._batch_start
        if shared is not None and shared.batches == batches:  # the first monitor read it for this batch
            step, manual, candidate = shared.step, shared.manual, shared.candidate
        else:
            step, manual, candidate = _cadence.batch_start(trainer, pl_module)
            if shared is not None:
                shared.batches, shared.step, shared.manual, shared.candidate = batches, step, manual, candidate
        self._batch_step, self._manual = step, manual
        # the step this batch logs at if it completes it (found at its end: _batch_logging_step); None for a batch
        # that cannot, so that its end reads nothing of the trainer
        n = self.every_n_steps
        self._candidate = candidate if n is None else step if _cadence.is_logging_step(step, n) else None
        if batches <= 2:
            self._first_batches(trainer, batches)

    on_train_batch_start = _begin_batch  # timed by _time_hooks (the name, not _begin_batch)

    def _first_batches(self, trainer: "pl.Trainer", batches: int) -> None:
        if batches == 1:  # this rank's part in work on the model: fixed for a fit, read by every batch after
            self._works_here = _dist.works_on_model_here(trainer)
        elif self._budget is not None:
            # the budget counts from the end of the first batch: the start-up (FLOP counting, lazy imports, first
            # writes) is a one-off, not a share of training; nor does a part's run in it tell what the part costs
            # (its first call's one-offs: 3 ms for a NaN/Inf check that costs 0.05 ms after), so it measures anew
            self._budget.start()
            for part in self._parts:
                part.reset()

    # ------------------------------------------------------------------------------------------ cost budget
    def _part(self, what: str, fraction: float) -> Part:
        """An expensive optional part of this monitor, spaced out by the cost budget (``what`` names it in the one
        warning; ``fraction``: the slice of the budget it may use at most)."""
        part = Part(what, fraction)
        self._parts.append(part)
        return part

    def _affordable(self, part: Part) -> bool:
        """Whether ``part`` may run now under the cost budget (always, without one); when it may not, say so once."""
        budget = self._budget
        # a refused part waits until part.wait_until (Budget.allows): until then one clock read says no
        if budget is None or (_clock.now() >= part.wait_until and budget.allows(part)):
            return True
        part.skipped += 1
        if self._warn.said("budget"):
            return False
        name = type(self).__name__
        parts = " and ".join(p.what for p in self._parts)
        self._warn("budget", (  # once per monitor and run: its first part spaced out, and what else may be
            f"{name}: {part.what} cost about {(part.cost or 0.0) * 1e3:.2f} ms each; to keep the monitors under"
            f" {budget.share * 100:g} % of training time (cost_budget={budget.share}), {parts} run less often when they"
            f" cost too much. Pass `cost_budget=None` to {name} to run them every time."
        ))
        return False

    @contextmanager
    def _spending(self, part: Part) -> Iterator[None]:
        """Time one run of ``part`` (what the budget expects it to cost next time)."""
        began = _clock.now()
        try:
            yield
        finally:
            part.record(_clock.now() - began)

    # ------------------------------------------------------------------------------------------ logging
    def _keeps(self, key: str) -> bool:
        """Whether ``key`` is logged: not matched by any ``exclude_keys`` pattern."""
        return not any(fnmatch.fnmatchcase(key, pattern) for pattern in self.exclude_keys)

    def _log_scalars(self, trainer: "pl.Trainer", metrics: Mapping[str, float], step: int) -> None:
        kept = {k: v for k, v in metrics.items() if self._keeps(k)} if self.exclude_keys else metrics
        _dispatch.log_scalars(trainer, kept, step, payer=self)

    def _log_histograms(self, trainer: "pl.Trainer", histograms: Mapping[str, HistogramData], step: int) -> None:
        _dispatch.log_histograms(trainer, {k: v for k, v in histograms.items() if self._keeps(k)}, step)

    def _log_image(
        self, trainer: "pl.Trainer", key: str, image: Any, step: int, caption: Optional[Union[str, Sequence[str]]]
    ) -> None:
        if self._keeps(key):
            _dispatch.log_image(trainer, key, image, step, caption=caption)

    # ------------------------------------------------------------------------------------------ cadence
    def _batch_logging_step(self, trainer: "pl.Trainer") -> Optional[int]:
        """At a training batch's end: the step to log at if the batch made a logging step, else ``None``.

        Under automatic optimization a batch makes at most one optimizer step, so only a batch that starts at a
        logging step can make one: it did when the trainer's step moved past it (a micro-batch under gradient
        accumulation did not). Under manual optimization ``self.log`` counts batches (the batch's own step, several
        ``optimizer.step()`` calls or none). Decided at the batch's start: a batch that cannot log reads nothing of
        the trainer at its end."""
        candidate = self._candidate
        if candidate is None:
            return None
        return candidate if self._manual or candidate < trainer.global_step else None

    def _validation_step(self, trainer: "pl.Trainer") -> int:
        """The step of values measured in a validation run (the step Lightning's own ``self.log`` gives them)."""
        return _cadence.validation_step(trainer, self._batch_step)


class _BatchStart:
    """What every monitor of a trainer reads at a training batch's start (the step ``self.log`` gives the batch, manual
    optimization or not, the trainer's ``log_every_n_steps``), read once per batch by the first monitor whose start
    runs and reused by the others: they run one after another, the first monitor's first (Lightning calls callbacks
    in order). ``batches``: which of the fit's batches it was read for (each monitor counts its own); a monitor that
    finds another count reads the trainer itself. ``candidate``: the batch's step when it is a logging step of
    ``log_every_n_steps`` (else ``None``), for every monitor without its own ``every_n_steps``."""

    __slots__ = ("batches", "step", "manual", "candidate")

    def __init__(self) -> None:
        self.batches, self.step, self.manual = 0, 0, False
        self.candidate: Optional[int] = None


_time_hooks(Monitor)  # the base's own hooks (a subclass that does not override one still runs it)
