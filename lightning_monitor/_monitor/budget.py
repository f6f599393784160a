"""The monitors' cost budget: their own measured host time kept under a share of training time.

Every hook of every monitor is timed (:meth:`~lightning_monitor._monitor.base.Monitor.hook_seconds`). From the end of
the first training batch of a fit (the one-off start-up: FLOP counting, lazy imports, first writes, is left out) the
budget compares the time all monitors of the trainer spent with ``share`` of the wall time that passed. The cheap
parts (the scalars of a logging step, the bookkeeping of a quiet step) always run and always count. The expensive
optional parts (:class:`Part`: gradient histograms, the per-step NaN/Inf watch between logging steps, the prediction
grid) run when what they are expected to cost still fits: under the whole budget, and within their own slice of it,
so that a frequent small part cannot starve a rare large one. A part's first run is always allowed (it tells what it
costs). So on a fast model the expensive parts are spaced out (every few logging steps) instead of the run paying for
them at every one; on a slow model nothing changes. Nothing here syncs with the device or talks to other ranks: each
rank decides from its own clock (the parts gated here run no collective).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Optional, Protocol

from lightning_monitor._core import clock as _clock

#: the default ``cost_budget``: the monitors' share of training time
DEFAULT_SHARE = 0.03
#: an environment variable that turns the budget off for every monitor of the process when set to ``off`` (for a run,
#: or a test suite, that must see every histogram and grid whatever they cost)
ENV_OFF = "LIGHTNING_MONITOR_COST_BUDGET"


def turned_off_by_environment() -> bool:
    """Whether :data:`ENV_OFF` is ``off`` (read when a fit starts)."""
    return os.environ.get(ENV_OFF, "").strip().lower() == "off"


#: the share of the budget the expensive parts are planned to fill at most: the budget is a ceiling, not a level to
#: fill, and the rest is the margin for what the plan cannot know (what always runs varies from window to window, a
#: part may cost more than it is expected to, a first run costs what it costs)
PLANNED = 0.9
#: weight of the newest measurement in a part's expected cost (an exponential moving average)
_NEWEST = 0.3


class Timed(Protocol):
    def hook_seconds(self) -> float: ...


class Part:
    """One expensive optional part of a monitor: what it is called in the warning, the slice of the budget it may use,
    what it is expected to cost (seconds, ``None`` until it ran once), and how often it ran and was left out."""

    def __init__(self, what: str, fraction: float) -> None:
        self.what = what
        self.fraction = fraction
        self.cost: Optional[float] = None
        self.spent = 0.0  # seconds this part spent since the budget started
        self.ran = 0
        self.skipped = 0
        #: clock time before which the part's own slice cannot hold its next run (:meth:`Budget.allows`): a part
        #: left out is checked again by one comparison, not by summing every monitor's seconds
        self.wait_until = 0.0

    def reset(self) -> None:
        """Measure the part anew (the budget starts: what it cost before is a one-off, :meth:`Budget.start`)."""
        self.spent, self.cost, self.wait_until = 0.0, None, 0.0

    def record(self, seconds: float) -> None:
        """The part ran and took ``seconds``."""
        self.cost = seconds if self.cost is None else (1 - _NEWEST) * self.cost + _NEWEST * seconds
        self.spent += seconds
        self.ran += 1


class Budget:
    """``share`` of the training wall time since :meth:`start` for every monitor in ``monitors`` together; the
    expensive parts are planned to fill ``planned`` of it (:data:`PLANNED`)."""

    def __init__(self, share: float, monitors: Sequence[Timed], planned: float = PLANNED) -> None:
        self.share = share
        self._fill = share * planned  # what the parts plan to: a share of the time since start
        self.monitors = list(monitors)
        self.began: Optional[float] = None  # clock time the budget started (after the first training batch)
        self.spent_before = 0.0

    def start(self) -> None:
        self.began = _clock.now()
        self.spent_before = self._spent_total()

    def _spent_total(self) -> float:
        return sum(monitor.hook_seconds() for monitor in self.monitors)

    def spent(self) -> float:
        """Seconds the monitors spent since the budget started."""
        return self._spent_total() - self.spent_before

    def allowed(self) -> float:
        """Seconds the monitors may have spent by now (the ceiling; the parts plan to :data:`PLANNED` of it)."""
        return 0.0 if self.began is None else self.share * (_clock.now() - self.began)

    def allows(self, part: Part) -> bool:
        """Whether ``part`` may run now (its first run always may; before the budget started, everything may)."""
        began = self.began
        if began is None or part.cost is None:
            return True
        now = _clock.now()
        if now < part.wait_until:
            return False
        fill = self._fill
        allowed = fill * (now - began)
        need = part.spent + part.cost
        if need > part.fraction * allowed:  # the part's own slice first: no sum over monitors
            # the slice holds it from began + need / (fraction * fill) on (its spent and cost change only when it
            # runs); a hair earlier, so that rounding never refuses a run the comparison above would allow
            part.wait_until = began + need / (part.fraction * fill) * (1.0 - 1e-9)
            return False
        total = self.spent() + part.cost
        if total > allowed:  # the whole budget holds it no earlier than this (what the monitors spent only grows)
            part.wait_until = began + total / fill * (1.0 - 1e-9)
            return False
        return True
