"""SpeedMonitor's window sums and FLOP counting."""
