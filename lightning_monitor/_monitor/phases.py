"""The phases of a fit as StallMonitor names them; a phase's index here is its code in ``health/stall_phase``, which
RunSummary reads back into words."""

STALL_PHASES = ("start-up", "waiting for data", "forward/backward", "optimizer step", "validation", "checkpoint save")
