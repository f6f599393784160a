"""The progress marks StallMonitor's hooks set and the judgement its watchdog thread makes of them.

Everything here is plain host arithmetic on a few floats: the hooks replace one tuple (an atomic assignment under
the GIL, read by the watchdog thread as it is), the thread calls :meth:`Watch.check` at most once a second. No
device work, no sync, no collective.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass
from typing import NamedTuple, Optional

from lightning_monitor._monitor.phases import STALL_PHASES

#: recent step times the derived timeout is computed from
_RECENT = 200
#: phases that get the slow-phase allowance
_SLOW_PHASES = ("validation", "checkpoint save")


class Mark(NamedTuple):
    """The last progress: when (``_clock.now()``), the phase the training thread entered, the step, and whether the
    fit's first training step has not ended yet."""

    at: float
    phase: str
    step: int
    first: bool


@dataclass
class Stall:
    """A stall seen by the watchdog: the mark no progress came after, how long ago, and the limit it passed."""

    mark: Mark
    seconds: float
    limit: float


class Watch:
    """The marks of one fit and the limits they are judged by (see StallMonitor's ``Args``)."""

    def __init__(self, *, timeout: Optional[float], min_timeout: float, step_factor: float,
                 first_step_timeout: float, slow_phase_timeout: float) -> None:
        self.timeout, self.min_timeout, self.step_factor = timeout, min_timeout, step_factor
        self.first_step_timeout, self.slow_phase_timeout = first_step_timeout, slow_phase_timeout
        self.mark = Mark(0.0, "start-up", 0, True)
        self.step_seconds: deque[float] = deque(maxlen=_RECENT)
        #: the stall under way, set by the watchdog thread, cleared by the training thread when progress resumes
        self.stall: Optional[Stall] = None
        self._step_began: Optional[float] = None

    def start(self, now: float) -> None:
        self.mark = Mark(now, "start-up", 0, True)
        self.step_seconds.clear()
        self.stall = None
        self._step_began = None

    def progress(self, now: float, phase: str, step: int) -> Optional[Stall]:
        """A progress mark from the training thread; the stall it ends, if the watchdog had seen one."""
        assert phase in STALL_PHASES, phase
        self.mark = Mark(now, phase, step, self.mark.first)
        ended, self.stall = self.stall, None
        return ended

    def step_ended(self, now: float, step: int) -> Optional[Stall]:
        """A training batch ended: its time (since the previous one ended, data wait included) joins the recent ones."""
        if self._step_began is not None:
            self.step_seconds.append(now - self._step_began)
        self._step_began = now
        ended = self.progress(now, "waiting for data", step)
        self.mark = self.mark._replace(first=False)
        return ended

    def skip_step(self) -> None:
        """The next step time is not one (a validation run or a checkpoint save lies in it)."""
        self._step_began = None

    def base_limit(self) -> Optional[float]:
        """The timeout of an ordinary step: the absolute ``timeout``, else ``step_factor`` x the 95th percentile of
        the recent step times, never below ``min_timeout``; ``None`` before any step time is known."""
        if self.timeout is not None:
            return self.timeout
        recent = sorted(self.step_seconds)  # a copy: the training thread may append meanwhile
        if not recent:
            return None
        p95 = recent[min(len(recent) - 1, int(0.95 * len(recent)))]
        return max(self.min_timeout, self.step_factor * p95)

    def limit(self, mark: Mark) -> float:
        """How long ``mark`` may stand before it is a stall: the first step (``torch.compile``, the first batches of
        workers, lazy set-up) gets ``first_step_timeout``, validation and checkpoint saving ``slow_phase_timeout``,
        each at least the ordinary timeout."""
        base = self.base_limit()
        if mark.first or base is None:
            return max(base or 0.0, self.first_step_timeout)
        if mark.phase in _SLOW_PHASES:
            return max(base, self.slow_phase_timeout)
        return base

    def check(self, now: float) -> Optional[Stall]:
        """The watchdog's look: a new stall (once per mark), or ``None``."""
        mark = self.mark
        if self.stall is not None and self.stall.mark is mark:
            return None  # already told
        limit = self.limit(mark)
        if now - mark.at <= limit:
            return None
        stall = Stall(mark, now - mark.at, limit)
        self.stall = stall
        return stall
