"""``lightning-monitor replay``: HealthMonitor's rules over a finished run's TensorBoard files, to tune thresholds
without training again. The same :class:`~lightning_monitor._health.engine.Engine` is fed the same numbers, step
by step, so it prints the alerts the live run raised, word for word (for the rules the live run had)."""

from __future__ import annotations

import glob
import os
from collections.abc import Mapping
from typing import Any

from lightning_monitor._health.engine import Alert, Engine
from lightning_monitor._health.rules import build_rules
from lightning_monitor._health.tap import Pending

#: HealthMonitor's options that say what the rules are (a rules file may set them)
RULE_OPTIONS = ("rules", "defaults", "disable", "actions", "loss_key", "spike_z", "spike_window", "data_wait_share",
                "data_wait_windows", "oom_share", "leak_gib", "leak_window", "throughput_drop", "throughput_windows",
                "straggler_ratio", "straggler_windows")
#: HealthMonitor's options about the live run only (accepted in a rules file, and ignored)
LIVE_OPTIONS = ("every_n_steps", "filename", "print_alerts", "exclude_keys")


def load_options(path: str) -> dict[str, Any]:
    """HealthMonitor's rule options from a YAML file: a list of rules, HealthMonitor's options as a mapping, or a
    LightningCLI ``class_path`` / ``init_args`` block of a HealthMonitor.

    Raises:
        ValueError: a file that is none of these, or names an option HealthMonitor does not have.
    """
    import yaml

    with open(path, encoding="utf-8") as f:
        document = yaml.safe_load(f)
    if isinstance(document, list):
        return {"rules": document}
    if isinstance(document, Mapping) and "init_args" in document:
        document = document["init_args"] or {}
    if not isinstance(document, Mapping):
        raise ValueError(f"{path}: expected a list of rules or a mapping of HealthMonitor's options, got"
                         f" {type(document).__name__}")
    unknown = sorted(set(document) - set(RULE_OPTIONS) - set(LIVE_OPTIONS))
    if unknown:
        raise ValueError(f"{path}: HealthMonitor has no option {unknown}; the rule options are {list(RULE_OPTIONS)}")
    return {k: v for k, v in document.items() if k in RULE_OPTIONS}


def logged_steps(run_dir: str) -> list[tuple[int, dict[str, float]]]:
    """Every scalar TensorBoard holds for the run in ``run_dir`` (every event file, restarts' purges applied), as
    the values of each step in step order, HealthMonitor's and RunSummary's own keys left out.

    Raises:
        FileNotFoundError: no TensorBoard event file in ``run_dir``.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not glob.glob(os.path.join(run_dir, "events.out.tfevents.*")):
        raise FileNotFoundError(f"no TensorBoard event file (events.out.tfevents.*) in {run_dir}")
    acc = EventAccumulator(run_dir, size_guidance={"scalars": 0})
    acc.Reload()
    pending = Pending()
    for tag in acc.Tags()["scalars"]:
        for event in acc.Scalars(tag):  # in the order written: a second value at a step replaces the first
            pending.add({tag: event.value}, event.step)
    return pending.drain()


def replay(run_dir: str, options: Mapping[str, Any]) -> list[Alert]:
    """The alerts HealthMonitor with ``options`` (its rule options) raises over the run in ``run_dir``."""
    engine = Engine(build_rules(**options))
    return [alert for step, values in logged_steps(run_dir) for alert in engine.evaluate(step, values).alerts]
