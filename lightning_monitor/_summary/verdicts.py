"""RunSummary's verdicts: what the end-of-run numbers say to fix, each with its evidence and the next thing to try.

Each verdict is judged from the summary values (:func:`~lightning_monitor._summary.numbers.compute`) and, where a
trend matters (host memory creeping up, the straggling rank), from the logged series themselves. Nothing here is
measured again: a verdict only reads what the monitors already logged, so a monitor that did not run gives no
verdict (and no ``HEALTHY`` claim about what nobody watched: the evidence of ``HEALTHY`` names what was judged, and
a fit whose monitors logged nothing a verdict reads gets no verdict at all). The thresholds are RunSummary's options
(:data:`DEFAULTS`, documented in ``docs/verdicts.md``).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from lightning_monitor._core import options as _options

#: every threshold and its default (RunSummary's options of the same names)
DEFAULTS: dict[str, float] = {
    "data_wait_share": 0.3,
    "straggler_ratio": 1.5,
    "oom_share": 0.9,
    "creep_mib_per_1k_steps": 50.0,
    "creep_min_mib": 128.0,
    "monitor_share": 0.1,
    "low_mfu": 0.2,
}
#: every verdict name, in the order they are listed
NAMES = ("INPUT-BOUND", "STRAGGLER", "NEAR-OOM", "MEMORY-CREEP", "GRADIENTS-UNHEALTHY", "MONITOR-COST-HIGH", "LOW-MFU",
         "HEALTHY")
#: HealthMonitor's rules whose alerts make the gradients (or the loss they come from) unhealthy
GRADIENT_RULES = ("nonfinite_loss", "nonfinite_grad", "loss_spike", "grad_spike")
#: logged keys the verdicts read beyond the summary's own (RunSummary records them)
SOURCE_KEYS = frozenset({"time/straggler_ratio", "time/pre_sync_sec_max_rank", "memory/cuda/peak_reserved_share",
                         "memory/cuda/peak_reserved_share_max", "memory/cuda/alloc_retries",
                         "memory/cuda/alloc_retries_max"})

_MEMORY_KEYS = ("memory/host/rss_gib", "memory/host/rss_gib_max", *(k for k in sorted(SOURCE_KEYS) if "/cuda/" in k))

Series = Mapping[str, Sequence[tuple[int, float]]]


@dataclass(frozen=True)
class Verdict:
    """One verdict: its ``name``, the ``evidence`` in words, the ``numbers`` it rests on, the ``advice``."""

    name: str
    evidence: str
    advice: str
    numbers: dict[str, float] = field(default_factory=dict)

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def line(self) -> str:
        return f"{self.name}: {self.evidence}" + (f"; try {self.advice}" if self.advice else "")


def check_thresholds(**given: Any) -> dict[str, float]:
    """The thresholds, each checked (:mod:`~lightning_monitor._core.options`): shares in (0, 1], the ratio > 1,
    the creep numbers > 0.

    Raises:
        TypeError: a threshold that is not a number.
        ValueError: one out of its range.
    """
    out = {}
    for name, value in given.items():
        if name in ("data_wait_share", "oom_share", "monitor_share", "low_mfu"):
            out[name] = _options.check_number(name, value, above=0.0, high=1.0)
        elif name == "straggler_ratio":
            out[name] = _options.check_number(name, value, above=1.0)
        else:
            out[name] = _options.check_number(name, value, above=0.0)
    return out


def judge(values: Mapping[str, Any], series: Series, thresholds: Mapping[str, float]) -> list[Verdict]:
    """The verdicts of a run from its summary ``values`` and logged ``series``; ``[HEALTHY]`` when none applies, and
    none at all when nothing a verdict reads was logged (a fit without monitors)."""
    t = {**DEFAULTS, **thresholds}
    v = values
    out: list[Verdict] = []
    if (wait := v.get("summary/data_wait_share_mean")) is not None and wait > t["data_wait_share"]:
        out.append(Verdict(
            "INPUT-BOUND", f"waiting for data {wait:.1%} of training time (threshold {t['data_wait_share']:.0%})",
            "more DataLoader workers (num_workers), pin_memory=True, a larger prefetch_factor, or lighter"
            " per-item work in the Dataset", {"data_wait_share_mean": wait}))
    if (ratios := [r for _, r in series.get("time/straggler_ratio", ())]):
        ratio = float(np.median(ratios))
        if ratio > t["straggler_ratio"]:
            ranks = Counter(int(r) for _, r in series.get("time/pre_sync_sec_max_rank", ()))
            rank = ranks.most_common(1)[0][0] if ranks else -1
            out.append(Verdict(
                "STRAGGLER", f"rank {rank} is the slowest before the gradient all-reduce, {ratio:.2f}x the fastest"
                f" (median over the logging windows; threshold {t['straggler_ratio']:g}x)",
                f"look at rank {rank}'s host: its data loading, CPU contention, a slower node or device",
                {"straggler_ratio_p50": ratio, "rank": float(rank)}))
    if (oom := _near_oom(series, t["oom_share"])) is not None:
        out.append(oom)
    if (creep := _creep(series, t["creep_mib_per_1k_steps"], t["creep_min_mib"])) is not None:
        out.append(creep)
    if (grads := _gradients(v)) is not None:
        out.append(grads)
    if (cost := v.get("summary/overhead_share_mean")) is not None and cost > t["monitor_share"]:
        out.append(Verdict(
            "MONITOR-COST-HIGH", f"the monitors took {cost:.1%} of training time (threshold {t['monitor_share']:.0%})",
            "a smaller cost_budget on GradientMonitor and PredictionGridMonitor, or a larger log_every_n_steps",
            {"overhead_share_mean": cost}))
    if (mfu := v.get("summary/mfu_p50")) is not None and mfu < t["low_mfu"]:
        out.append(Verdict(
            "LOW-MFU", f"model FLOPs utilisation {mfu:.1%} (median; threshold {t['low_mfu']:.0%})",
            "a larger batch, mixed precision (precision='bf16-mixed'), torch.compile, or fewer small kernels",
            {"mfu_p50": mfu}))
    judged = [what for what, present in (
        ("data wait", "summary/data_wait_share_mean" in v), ("stragglers", bool(series.get("time/straggler_ratio"))),
        ("memory", "summary/host_rss_gib_max" in v or any(series.get(k) for k in _MEMORY_KEYS)),
        ("gradients", "summary/grad_nonfinite_steps" in v or "summary/alerts" in v),
        ("monitoring cost", "summary/overhead_share_mean" in v), ("MFU", "summary/mfu_p50" in v)) if present]
    if not out and judged:  # nothing judged (no monitor logged what a verdict reads): no verdict, not HEALTHY
        out.append(Verdict("HEALTHY", f"no verdict applies (judged: {', '.join(judged)})", ""))
    return out


def _near_oom(series: Series, share: float) -> Verdict | None:
    peaks = [p for key in ("memory/cuda/peak_reserved_share_max", "memory/cuda/peak_reserved_share")
             for _, p in series.get(key, ())]
    retries = max((sum(r for _, r in series.get(key, ())) for key in ("memory/cuda/alloc_retries_max",
                                                                         "memory/cuda/alloc_retries")), default=0.0)
    peak = max(peaks, default=0.0)
    if peak < share and retries <= 0:
        return None
    parts = [f"peak reserved {peak:.1%} of device memory"] if peaks else []
    parts += [f"{int(retries)} allocation retries (the cache freed to satisfy an allocation)"] if retries > 0 else []
    return Verdict("NEAR-OOM", ", ".join(parts) + f" (threshold {share:.0%})",
                   "a smaller batch with accumulate_grad_batches, mixed precision, activation checkpointing, or"
                   " PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True against fragmentation",
                   {"peak_reserved_share_max": peak, "alloc_retries": float(retries)})


def creep_slope(points: Sequence[tuple[int, float]]) -> float | None:
    """Theil-Sen slope of ``(step, value)`` points: the median of the pairwise slopes (a jump at the start, the
    first allocations, moves it little); at most 200 points, evenly picked. ``None`` under 3 points."""
    pts = sorted({int(s): float(x) for s, x in points}.items())
    if len(pts) < 3:
        return None
    if len(pts) > 200:
        pts = [pts[int(i)] for i in np.linspace(0, len(pts) - 1, 200)]
    steps, values = np.array([s for s, _ in pts], float), np.array([x for _, x in pts], float)
    i, j = np.triu_indices(len(pts), k=1)
    return float(np.median((values[j] - values[i]) / (steps[j] - steps[i])))


def _creep(series: Series, per_1k: float, minimum: float) -> Verdict | None:
    points = series.get("memory/host/rss_gib_max") or series.get("memory/host/rss_gib") or ()
    slope = creep_slope(points)
    if slope is None:
        return None
    steps = [s for s, _ in points]
    mib_per_1k = slope * 1024 * 1000
    rise = slope * 1024 * (max(steps) - min(steps))
    if mib_per_1k < per_1k or rise < minimum:
        return None
    return Verdict(
        "MEMORY-CREEP", f"host memory (RSS) rises {mib_per_1k:,.0f} MiB per 1,000 steps, {rise:,.0f} MiB over the"
        f" run (robust slope over {len(points)} logging steps; thresholds {per_1k:g} MiB per 1,000 steps and"
        f" {minimum:g} MiB)",
        "look for tensors kept across steps (a list of losses or outputs not .detach()ed or .item()ed, a growing"
        " cache in a callback), and for DataLoader workers holding Python objects (copy-on-write growth)",
        {"rss_mib_per_1k_steps": mib_per_1k, "rss_rise_mib": rise})


def _gradients(v: Mapping[str, Any]) -> Verdict | None:
    nonfinite = int(v.get("summary/grad_nonfinite_steps", 0) or 0)
    alerts = {rule: int(v[f"summary/alert_count/{rule}"]) for rule in GRADIENT_RULES
              if f"summary/alert_count/{rule}" in v}
    if not nonfinite and not alerts:
        return None
    parts = [f"{nonfinite} steps with NaN/Inf gradients"] if nonfinite else []
    parts += [f"{rule.replace('_', ' ')} alerts {n}x" for rule, n in alerts.items()]
    return Verdict("GRADIENTS-UNHEALTHY", ", ".join(parts),
                   "a lower learning rate or a warm-up, gradient clipping (gradient_clip_val), bf16 instead of fp16,"
                   " and the first bad step's inputs (grad/nonfinite/* names the parameters)",
                   {"grad_nonfinite_steps": float(nonfinite), **{f"alerts/{r}": float(n) for r, n in alerts.items()}})


def summary_values(verdicts: Sequence[Verdict]) -> dict[str, str]:
    """The verdicts as summary values (text): ``summary/verdicts`` (the names) and ``summary/verdict/{NAME}``; none
    without verdicts."""
    if not verdicts:
        return {}
    out = {"summary/verdicts": ", ".join(v.name for v in verdicts)}
    out.update({f"summary/verdict/{v.name}": v.line() for v in verdicts})
    return out
