"""Where HealthMonitor gets its values: every number any logger of the trainer receives, already on the host.

Two doors, one store (:class:`Pending`):

- :class:`Tap`, a Lightning ``Logger`` HealthMonitor adds to ``trainer.loggers`` for the fit (last, so
  ``trainer.logger`` and the checkpoint directory are the user's): Lightning hands it the same host numbers it hands
  every other logger (the user's ``self.log`` values, ``LearningRateMonitor``'s, converted by Lightning at its
  logging steps), on every rank;
- its :class:`TapWriter`, which the dispatch layer hands the monitors' scalars like any other writer (rank 0).

Nothing here reads a tensor: a value that is not a plain number is left out, so the store can never cost a sync.
"""

from __future__ import annotations

import numbers
from collections.abc import Callable, Mapping
from functools import partial
from typing import Any, Optional

from lightning.pytorch.loggers import Logger
from typing_extensions import override

from lightning_monitor._writers.backends import Backend, ScalarSink, Writer, around_model_write

#: families of keys that are not training signals: HealthMonitor's own and RunSummary's end-of-run numbers
_NOT_SIGNALS = ("health/", "summary/")


class Pending:
    """Values logged since the last evaluation: ``step -> {key: number}`` (a key logged twice at a step keeps the
    last value)."""

    def __init__(self) -> None:
        self.steps: dict[int, dict[str, float]] = {}

    def add(self, metrics: Mapping[str, Any], step: Optional[int]) -> None:
        if step is None:
            return
        row = None
        for key, value in metrics.items():
            if isinstance(value, numbers.Real) and not isinstance(value, bool) and not key.startswith(_NOT_SIGNALS):
                if row is None:
                    row = self.steps.setdefault(int(step), {})
                row[key] = float(value)  # a plain number: no sync

    def drain(self) -> list[tuple[int, dict[str, float]]]:
        """Every pending step's values, in step order; the store is empty afterwards."""
        out, self.steps = sorted(self.steps.items()), {}
        return out


class TapWriter(ScalarSink):
    """The monitors' scalars into :class:`Pending` (the dispatch layer's writer for :class:`Tap`)."""

    def __init__(self, pending: Pending) -> None:
        super().__init__("HealthMonitor")
        self.pending = pending

    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        self.pending.add(metrics, step)


class Tap(Logger, Backend):
    """An in-memory Lightning logger: what Lightning logs goes into ``pending`` (every rank), and the dispatch
    layer's values through :class:`TapWriter` (rank 0). ``first``: the trainer's first logger, whose version it
    reports so that the progress bar's ``v_num`` stays what it was; ``on_log``: called after each ``log_metrics``
    (HealthMonitor judges a logging step there, once Lightning has handed every logger its values)."""

    def __init__(self, pending: Pending, first: Optional[Logger] = None,
                 on_log: Optional[Callable[[], None]] = None) -> None:
        super().__init__()
        self.pending = pending
        self.writer = TapWriter(pending)
        self._first = first
        self.on_log = on_log

    @property
    @override
    def name(self) -> str:
        return "health"

    @property
    @override
    def version(self) -> Any:
        return self._first.version if self._first is not None else ""

    @override
    def log_metrics(self, metrics: Mapping[str, float], step: Optional[int] = None) -> None:
        # the monitors' deferred scalars of this step reach the store too, before HealthMonitor judges it
        around_model_write(step, partial(self.pending.add, metrics, step))
        if self.on_log is not None:
            self.on_log()

    @override
    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    @override
    def monitor_writers(self) -> list[Writer]:
        return [self.writer]
