"""``lightning-monitor compare``: runs' headline numbers side by side, each with its ratio to the first run, and the
regressions past given limits (for CI).

A run's numbers come from its ``summary.json`` (RunSummary); a run without one gets what can be computed from its
TensorBoard event files, with RunSummary's own computation and default verdict thresholds. A number a run does not
have (another machine, an older library, a monitor that did not run) is shown as missing, and never counted as a
regression.
"""

from __future__ import annotations

import glob
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional

from lightning_monitor._summary import numbers as _numbers
from lightning_monitor._summary import verdicts as _verdicts

MISSING = "-"


@dataclass(frozen=True)
class Number:
    """One compared number: its ``name`` (the ``--fail-on`` name), what the table calls it, its unit, whether a
    larger value is worse (time, memory, cost) or better (samples/s, MFU)."""

    name: str
    label: str
    unit: str
    larger_is_worse: bool


#: the compared numbers, in the table's order
NUMBERS = (
    Number("samples_per_sec", "samples/s (p50)", "samples/s", False),
    Number("step_time", "step time p50", "s", True),
    Number("step_time_p95", "step time p95", "s", True),
    Number("data_wait", "data wait share", "fraction", True),
    Number("peak_memory", "peak device memory", "GiB", True),
    Number("host_memory", "peak host memory (RSS)", "GiB", True),
    Number("mfu", "MFU (p50)", "fraction", False),
    Number("grad_nonfinite_steps", "steps with NaN/Inf gradients", "steps", True),
    Number("alerts", "health alerts", "alerts", True),
    Number("monitor_cost", "monitoring cost", "fraction", True),
    Number("wall_time", "wall time", "s", True),
)
BY_NAME = {n.name: n for n in NUMBERS}


@dataclass
class Run:
    """One run's numbers (``name`` -> value, missing ones absent), verdict names, and where they were read."""

    path: str
    source: str  # "summary.json" or "tensorboard"
    numbers: dict[str, float]
    verdicts: Optional[list[str]]


def headline(values: Mapping[str, Any]) -> dict[str, float]:
    """The compared numbers from summary values (``summary/...``)."""
    pick = {"samples_per_sec": "summary/samples_per_sec_p50", "step_time": "summary/step_sec_p50",
            "step_time_p95": "summary/step_sec_p95", "data_wait": "summary/data_wait_share_mean",
            "host_memory": "summary/host_rss_gib_max", "mfu": "summary/mfu_p50",
            "grad_nonfinite_steps": "summary/grad_nonfinite_steps", "alerts": "summary/alerts",
            "monitor_cost": "summary/overhead_share_mean", "wall_time": "summary/wall_sec"}
    out = {name: float(values[key]) for name, key in pick.items() if _is_number(values.get(key))}
    peaks = [float(values[f"summary/cuda_{phase}_peak_allocated_gib_max"]) for phase in _numbers.PHASES
             if _is_number(values.get(f"summary/cuda_{phase}_peak_allocated_gib_max"))]
    if peaks:
        out["peak_memory"] = max(peaks)
    return out


def _is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def load(path: str, filename: str = "summary.json") -> Run:
    """A run directory's numbers: from ``filename`` when there, else from its TensorBoard event files.

    Raises:
        FileNotFoundError: neither is there.
        ValueError: a summary file that is not RunSummary's JSON.
    """
    file = os.path.join(path, filename)
    if os.path.isfile(file):
        with open(file, encoding="utf-8") as f:
            document = json.load(f)
        if not isinstance(document, dict):
            raise ValueError(f"{file}: not a RunSummary summary (a JSON object of summary/... entries)")
        values = {k: e.get("value") if isinstance(e, dict) else e for k, e in document.items()
                  if k.startswith("summary/")}
        verdicts: Optional[list[str]] = None
        if isinstance(document.get("verdicts"), list):
            verdicts = [str(v.get("name")) for v in document["verdicts"] if isinstance(v, dict)]
        elif isinstance(names := values.get("summary/verdicts"), str):
            verdicts = [v for v in names.split(", ") if v]
        return Run(path, filename, headline(values), verdicts)
    series = tensorboard_series(path)
    steps = max((s for points in series.values() for s, _ in points), default=0)
    values = _numbers.compute(series, status="unknown", wall_sec=None, steps=steps)
    return Run(path, "tensorboard", headline(values), [v.name for v in _verdicts.judge(values, series, {})])


def tensorboard_series(path: str) -> dict[str, list[tuple[int, float]]]:
    """The scalars RunSummary reads, from the TensorBoard event files in ``path`` (``(step, value)`` in step order,
    the last value written at a step kept).

    Raises:
        FileNotFoundError: no event file in ``path``.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    if not glob.glob(os.path.join(path, "events.out.tfevents.*")):
        raise FileNotFoundError(f"{path}: no summary.json and no TensorBoard event file (events.out.tfevents.*)")
    acc = EventAccumulator(path, size_guidance={"scalars": 0})
    acc.Reload()
    out = {}
    for tag in acc.Tags()["scalars"]:
        if _numbers.records(tag):
            points = {int(e.step): float(e.value) for e in acc.Scalars(tag)}
            out[tag] = sorted(points.items())
    return out


def parse_limits(text: str) -> dict[str, float]:
    """``step_time=5%,peak_memory=10%`` -> ``{"step_time": 0.05, "peak_memory": 0.1}`` (a bare number is a percent).

    Raises:
        ValueError: a name that is no compared number, or a limit that is not a number >= 0.
    """
    out = {}
    for part in (p.strip() for p in text.split(",") if p.strip()):
        match = re.fullmatch(r"([a-z_0-9]+)\s*=\s*([0-9]*\.?[0-9]+)\s*%?", part)
        if not match:
            raise ValueError(f"--fail-on: expected NAME=PERCENT% such as step_time=5%, got {part!r}")
        name, limit = match.group(1), float(match.group(2)) / 100
        if name not in BY_NAME:
            raise ValueError(f"--fail-on: no number named {name!r}; the numbers are {', '.join(BY_NAME)}")
        out[name] = limit
    return out


def ratio(base: Optional[float], value: Optional[float]) -> Optional[float]:
    if base is None or value is None:
        return None
    if base == 0:
        return 1.0 if value == 0 else None
    return value / base


def regressions(runs: Sequence[Run], limits: Mapping[str, float]) -> list[str]:
    """One line for every number of every later run that moved the worse way past its limit, relative to the first
    run (a count that was 0 and is not regresses whatever the limit)."""
    base, out = runs[0], []
    for name, limit in limits.items():
        number = BY_NAME[name]
        first = base.numbers.get(name)
        for run in runs[1:]:
            value = run.numbers.get(name)
            if first is None or value is None:
                continue
            change = (value - first) / abs(first) if first else (math.inf if value != first else 0.0)
            worse = change if number.larger_is_worse else -change
            if worse > limit:
                amount = "from 0" if math.isinf(worse) else f"{worse:+.1%}".replace("+", "")
                direction = "up" if value > first else "down"
                out.append(f"{name} regressed in {run.path}: {_format(number, first)} -> {_format(number, value)}"
                           f" ({direction} {amount}, limit {limit:.0%})")
    return out


def unchecked(runs: Sequence[Run], limits: Mapping[str, float]) -> list[str]:
    """The limited numbers some run lacks (not checked there)."""
    return [f"{name}: missing in {run.path}, not checked" for name in limits for run in runs
            if name not in run.numbers]


def _format(number: Number, value: Optional[float]) -> str:
    if value is None:
        return MISSING
    if number.unit == "fraction":
        return f"{value:.1%}"
    if number.unit == "s":
        return f"{value * 1e3:.1f} ms" if value < 1 else f"{value:.2f} s"
    if number.unit == "GiB":
        return f"{value:.3f} GiB"
    if number.unit in ("steps", "alerts"):
        return f"{int(value)}"
    return f"{value:,.1f}"


def table(runs: Sequence[Run]) -> list[list[str]]:
    """The rows: a header, a row per number (the first run's value, then each later run's with its ratio), the
    verdicts and where the numbers were read."""
    rows = [["", *[run.path for run in runs]]]
    base = runs[0]
    for number in NUMBERS:
        cells = [number.label]
        for i, run in enumerate(runs):
            value = run.numbers.get(number.name)
            cell = _format(number, value)
            r = ratio(base.numbers.get(number.name), value)
            if i and value is not None:
                cell += f" ({r:.2f}x)" if r is not None else " (-)"
            cells.append(cell)
        rows.append(cells)
    rows.append(["verdicts", *[", ".join(run.verdicts) if run.verdicts else MISSING for run in runs]])
    rows.append(["read from", *[run.source for run in runs]])
    return rows


def render(runs: Sequence[Run], fmt: str, limits: Mapping[str, float], failed: Sequence[str]) -> str:
    """The comparison as ``text``, ``markdown`` or ``json``."""
    if fmt == "json":
        document = {
            "runs": [{"path": run.path, "source": run.source, "numbers": run.numbers, "verdicts": run.verdicts}
                     for run in runs],
            "numbers": [{"name": n.name, "label": n.label, "unit": n.unit, "larger_is_worse": n.larger_is_worse,
                         "values": [run.numbers.get(n.name) for run in runs],
                         "ratios": [ratio(runs[0].numbers.get(n.name), run.numbers.get(n.name)) for run in runs]}
                        for n in NUMBERS],
            "limits": dict(limits), "regressions": list(failed),
        }
        return json.dumps(document, indent=2)
    rows = table(runs)
    if fmt == "markdown":
        lines = ["| " + " | ".join(rows[0]) + " |", "|" + "---|" * len(rows[0])]
        lines += ["| " + " | ".join(row) + " |" for row in rows[1:]]
        return "\n".join(lines)
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths, strict=True)).rstrip() for row in rows)
