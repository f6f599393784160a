"""MultiLogger's run: its identity (Run), its two writers, the step ledger, the guard, the run directory's lock and
disk watch, starting and finishing wandb, and MultiLogger's option checks."""
