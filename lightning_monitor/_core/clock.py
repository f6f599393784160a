"""The host clock of every timing in the package (seconds), and the one place where tests replace it.

Every timing reads it as ``_clock.now()``, through this module (never ``from ... import now``), so that a clock set
here reaches all of them at once: the monitors' hook time (``Monitor``, for ``time/monitor_share``), SpeedMonitor's
windows, the time spent writing to loggers (``_writers.deliver``) and RunSummary's wall time. This module imports
nothing from the package.
"""

from __future__ import annotations

import time
from collections.abc import Callable

#: the clock, ``time.perf_counter`` unless a test set another (:func:`set_clock`)
now: Callable[[], float] = time.perf_counter
#: the wall clock of the timestamps a person reads (seconds since the epoch: ``alerts.jsonl``'s ``time``)
wall: Callable[[], float] = time.time


def set_clock(clock: Callable[[], float]) -> None:
    """Every timing of the package reads ``clock`` from now on (until :func:`reset`)."""
    global now
    now = clock


def reset() -> None:
    """Back to the real clock, ``time.perf_counter``."""
    set_clock(time.perf_counter)

