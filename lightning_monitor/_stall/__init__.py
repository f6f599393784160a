"""StallMonitor's watchdog: the progress marks its hooks set and the stall they reveal (watch.py), the stack dump a
stalled rank writes (dump.py)."""
