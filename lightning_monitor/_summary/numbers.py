"""The end-of-run summary: its numbers, computed from the series the monitors logged, and its three renderings."""

from __future__ import annotations

import importlib
import io
import sys
from collections.abc import Mapping, Sequence
from typing import Any, Optional

import numpy as np

from lightning_monitor._monitor.phases import STALL_PHASES
from lightning_monitor._summary import verdicts as _verdicts

#: phases whose device allocator peak MemoryMonitor logs as ``memory/cuda/{phase}_peak_allocated_gib``
PHASES = ("train", "validation", "test")
_PEAKS = tuple(f"memory/cuda/{phase}_peak_allocated_gib" for phase in PHASES) + ("memory/host/rss_gib",)

#: every logged key the summary reads (with the cross-rank ``_max`` / ``_max_rank`` of the memory peaks)
SOURCE_KEYS = frozenset(
    {
        "throughput/samples_per_sec", "time/step_sec", "time/data_wait_share", "throughput/mfu",
        "grad/nonfinite_steps", "grad/norm_total", "predictions/accuracy", "time/monitor_share",
        *_PEAKS, *(f"{key}_max" for key in _PEAKS), *(f"{key}_max_rank" for key in _PEAKS),
        *_verdicts.SOURCE_KEYS,
    }
)
#: families of logged keys the summary reads (the module groups' gradient norms, each monitor's own cost)
SOURCE_PREFIXES = ("grad/norm/", "time/monitor_share/", "health/")

Series = Mapping[str, Sequence[tuple[int, float]]]

#: The summary numbers worth a TensorBoard scalar (one point at the last step) and so an HParams metric column
#: (the tab reads a column's values from scalar events), each with its reason; every other number is in the text
#: card, ``summary.json`` and wandb's run summary, where a chart of one dot would add nothing.
HEADLINE: dict[str, str] = {
    "summary/wall_sec": "what the run cost in time: the first thing to compare runs on",
    "summary/samples_per_sec_p50": "how fast it trained (the typical window), comparable across step counts",
    "summary/overhead_share_mean": "what watching it cost: the monitors' share of training time",
    "summary/accuracy_last": "where it got to on the fixed samples the grid shows",
}


def records(key: str) -> bool:
    """Whether the summary reads the logged ``key``."""
    return key in SOURCE_KEYS or key.startswith(SOURCE_PREFIXES)


def compute(series: Series, *, status: str, wall_sec: Optional[float], steps: int) -> dict[str, Any]:
    """The summary values (``summary/...`` -> number or text) from the logged ``series`` (key -> ``(step, value)``
    in the order logged). A value appears only when the series it is computed from was logged."""
    out: dict[str, Any] = {"summary/status": status}
    if wall_sec is not None:
        out["summary/wall_sec"] = wall_sec
    out["summary/steps"] = steps

    def values(key: str) -> list[float]:
        return [float(v) for _, v in series.get(key, ())]

    def put(name: str, key: str, *quantiles: int) -> None:
        got = values(key)
        for q in quantiles:
            if got:
                out[f"summary/{name}_p{q}"] = float(np.percentile(got, q))

    put("samples_per_sec", "throughput/samples_per_sec", 50, 10)
    put("step_sec", "time/step_sec", 50, 95)
    if wait := values("time/data_wait_share"):
        out["summary/data_wait_share_mean"] = float(np.mean(wait))
    put("mfu", "throughput/mfu", 50)
    for key in _PEAKS:
        peak = _peak(series, key)
        if peak is not None:
            name = key.removeprefix("memory/").replace("/", "_")
            out[f"summary/{name}_max"], out[f"summary/{name}_max_rank"] = peak
    if "grad/nonfinite_steps" in series or "grad/norm_total" in series:
        # GradientMonitor always checks, and logs the count only from the first logging step that saw a NaN/Inf
        out["summary/grad_nonfinite_steps"] = int(sum(values("grad/nonfinite_steps")))
    if norms := series.get("grad/norm_total"):
        step, value = max(norms, key=lambda sv: sv[1])  # the first step of the largest
        out["summary/grad_norm_max"], out["summary/grad_norm_max_step"] = float(value), int(step)
        groups = {k.removeprefix("grad/norm/"): dict(s)[step] for k, s in series.items()
                  if k.startswith("grad/norm/") and step in dict(s)}
        if groups:
            out["summary/grad_norm_max_group"] = max(groups, key=lambda g: groups[g])
    if accuracy := values("predictions/accuracy"):
        out["summary/accuracy_first"], out["summary/accuracy_last"] = accuracy[0], accuracy[-1]
    out.update(_alerts(series))
    out.update(_stalls(series))
    if overhead := values("time/monitor_share"):
        out["summary/overhead_share_mean"] = float(np.mean(overhead))
        for key in sorted(k for k in series if k.startswith("time/monitor_share/")):
            out[f"summary/overhead_share_mean/{key.removeprefix('time/monitor_share/')}"] = float(np.mean(values(key)))
    return out


def _alerts(series: Series) -> dict[str, Any]:
    """HealthMonitor's alerts: the count, and per rule its episodes (the times ``health/{rule}`` went to 1) with the
    steps of the first and the last."""
    out: dict[str, Any] = {}
    if points := series.get("health/alerts"):
        out["summary/alerts"] = int(points[-1][1])
    for key in sorted(k for k in series if k.startswith("health/") and k != "health/alerts"):
        points = series[key]
        starts = [step for i, (step, v) in enumerate(points) if v >= 0.5 and (i == 0 or points[i - 1][1] < 0.5)]
        if starts:
            rule = key.removeprefix("health/")
            out[f"summary/alert_count/{rule}"] = len(starts)
            out[f"summary/alert_first_step/{rule}"], out[f"summary/alert_last_step/{rule}"] = starts[0], starts[-1]
    return out


def _stalls(series: Series) -> dict[str, Any]:
    """StallMonitor's stalls (global rank 0's view): how many, and the longest with its step and phase."""
    points = series.get("health/stall_sec")
    if not points:
        return {}
    step, seconds = max(points, key=lambda sv: sv[1])
    code = int(dict(series.get("health/stall_phase", ())).get(step, -1))
    return {"summary/stalls": len(points), "summary/stall_longest_sec": float(seconds),
            "summary/stall_longest_step": int(step),
            "summary/stall_longest_phase": STALL_PHASES[code] if 0 <= code < len(STALL_PHASES) else "?"}


def _peak(series: Series, key: str) -> Optional[tuple[float, int]]:
    """The largest value of ``key`` over the run and the global rank that held it: from the cross-rank
    ``key_max`` / ``key_max_rank`` when logged (world size > 1), else from ``key`` itself (rank 0)."""
    if series.get(f"{key}_max"):
        step, value = max(series[f"{key}_max"], key=lambda sv: sv[1])
        rank = dict(series.get(f"{key}_max_rank", ())).get(step, 0.0)
        return float(value), int(rank)
    if series.get(key):
        return float(max(v for _, v in series[key])), 0
    return None


def unit(key: str) -> Optional[str]:
    """The unit of a summary value, read off its name (DESIGN.md: units in the name); ``None`` for text."""
    if key in ("summary/status", "summary/grad_norm_max_group", "summary/stall_longest_phase", "summary/verdicts") \
            or key.startswith("summary/verdict/"):
        return None
    if key == "summary/stalls":
        return "stalls"
    if key == "summary/alerts" or key.startswith("summary/alert_count/"):
        return "alerts"
    if key.startswith(("summary/alert_first_step/", "summary/alert_last_step/")):
        return "step"
    for suffix, name in (("_per_sec_p50", "samples/s"), ("_per_sec_p10", "samples/s"), ("_rank", "global rank"),
                         ("_gib_max", "GiB"), ("_sec", "s"), ("_sec_p50", "s"), ("_sec_p95", "s"),
                         ("_step", "step"), ("steps", "steps"), ("grad_norm_max", "L2 norm")):
        if key.endswith(suffix):
            return name
    return "fraction"  # shares, MFU and accuracy, 0..1


# ------------------------------------------------------------------------------------------------ rendering


def rows(values: Mapping[str, Any]) -> list[tuple[str, str]]:
    """``(what, value)`` lines of the table, only those whose values are present."""
    v = values
    out: list[tuple[str, str]] = []
    wall = f"{_duration(v['summary/wall_sec'])}, " if "summary/wall_sec" in v else ""
    out.append(("wall time, steps", f"{wall}{v['summary/steps']} steps"))
    if "summary/samples_per_sec_p50" in v:
        out.append(("samples/s", f"p50 {v['summary/samples_per_sec_p50']:,.1f}, "
                                 f"p10 {v['summary/samples_per_sec_p10']:,.1f}"))
    if "summary/step_sec_p50" in v:
        out.append(("step time", f"p50 {_duration(v['summary/step_sec_p50'])}, "
                                 f"p95 {_duration(v['summary/step_sec_p95'])}"))
    if "summary/data_wait_share_mean" in v:
        out.append(("waiting for data", f"{v['summary/data_wait_share_mean']:.1%} of training time"))
    if "summary/mfu_p50" in v:
        out.append(("MFU", f"p50 {v['summary/mfu_p50'] * 100:.3g}%"))
    for phase in PHASES:
        key = f"summary/cuda_{phase}_peak_allocated_gib_max"
        if key in v:
            out.append((f"peak memory, {phase}", f"{v[key]:.3f} GiB allocated on the device, rank {v[key + '_rank']}"))
    if "summary/host_rss_gib_max" in v:
        out.append(("peak memory, host", f"{v['summary/host_rss_gib_max']:.3f} GiB resident (RSS), "
                                         f"rank {v['summary/host_rss_gib_max_rank']}"))
    if "summary/grad_nonfinite_steps" in v or "summary/grad_norm_max" in v:
        parts = []
        if "summary/grad_nonfinite_steps" in v:
            parts.append(f"{v['summary/grad_nonfinite_steps']} steps with NaN/Inf")
        if "summary/grad_norm_max" in v:
            group = f" ({v['summary/grad_norm_max_group']})" if "summary/grad_norm_max_group" in v else ""
            parts.append(f"largest norm {v['summary/grad_norm_max']:.4g} at step {v['summary/grad_norm_max_step']}"
                         f"{group}")
        out.append(("gradients", ", ".join(parts)))
    if "summary/accuracy_first" in v:
        out.append(("accuracy, fixed samples", f"first {v['summary/accuracy_first']:.1%}, "
                                               f"last {v['summary/accuracy_last']:.1%}"))
    if "summary/alerts" in v:
        counts = {k.rsplit("/", 1)[1]: n for k, n in v.items() if k.startswith("summary/alert_count/")}
        parts = [f"{rule} {n}x ({_steps(v[f'summary/alert_first_step/{rule}'], v[f'summary/alert_last_step/{rule}'])})"
                 for rule, n in counts.items()]
        out.append(("health alerts", f"{v['summary/alerts']}" + (f": {', '.join(parts)}" if parts else "")))
    if "summary/stalls" in v:
        out.append(("stalls", f"{v['summary/stalls']}, the longest {_duration(v['summary/stall_longest_sec'])} at step"
                              f" {v['summary/stall_longest_step']} in {v['summary/stall_longest_phase']} (rank 0's"
                              " view; every rank's stacks in stalls/)"))
    if "summary/overhead_share_mean" in v:
        parts = [f"{k.rsplit('/', 1)[1].removesuffix('_monitor').replace('_', ' ')} {x:.1%}" for k, x in v.items()
                 if k.startswith("summary/overhead_share_mean/")]
        out.append(("monitoring cost", f"{v['summary/overhead_share_mean']:.1%} of training time"
                                       + (f" ({', '.join(parts)})" if parts else "")))
    if "summary/verdicts" in v:  # one row, a line per verdict
        lines = [v.get(f"summary/verdict/{name}", name) for name in v["summary/verdicts"].split(", ") if name]
        out.append(("verdicts", "\n".join(lines)))
    return out


def title(values: Mapping[str, Any]) -> str:
    return f"Run summary ({values['summary/status']})"


def plain(values: Mapping[str, Any], footer: str = "") -> str:
    """The table as plain text."""
    lines = rows(values)
    width = max(len(what) for what, _ in lines)
    pad = "\n" + " " * (width + 4)  # a value of several lines goes on below itself
    body = [f"  {what.ljust(width)}  {text.replace(chr(10), pad)}" for what, text in lines]
    return "\n".join([title(values), *body] + ([f"  {footer}"] if footer else []))


def markdown(values: Mapping[str, Any]) -> str:
    """The table as Markdown (TensorBoard's text card)."""
    lines = [f"**{title(values)}**", "", "| | |", "|---|---|"]
    lines += [f"| {what} | {text.replace(chr(10), '<br>')} |" for what, text in rows(values)]
    return "\n".join(lines)


def rich_text(values: Mapping[str, Any], footer: str = "") -> str:
    """The table drawn by ``rich`` (colour only on a terminal)."""
    # imported by name: rich is optional (and has no type stubs here)
    Console, Table = importlib.import_module("rich.console").Console, importlib.import_module("rich.table").Table
    table = Table(title=title(values), title_justify="left", caption=footer or None, caption_justify="left",
                  show_header=False)
    table.add_column(style="bold")
    table.add_column()
    for what, text in rows(values):
        table.add_row(what, text)
    buffer = io.StringIO()
    Console(file=buffer, force_terminal=sys.stdout.isatty(), width=120).print(table)
    return "\n".join(line.rstrip() for line in buffer.getvalue().splitlines())


def _steps(first: int, last: int) -> str:
    return f"step {first}" if first == last else f"steps {first}..{last}"


def _duration(seconds: float) -> str:
    if seconds < 1:
        return f"{seconds * 1e3:.1f} ms"
    if seconds < 60:
        return f"{seconds:.1f} s"
    minutes, sec = divmod(round(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours} h {minutes:02d} min" if hours else f"{minutes} min {sec:02d} s"
