"""The run's TensorBoard layout (the Custom Scalars tab): related series on one chart, from the scalar tags written.

TensorBoard's ``custom_scalars`` plugin reads one layout per run: the last ``custom_scalars__config__`` record of the
run (its ``layout`` route reads that tag with ``downsample=1``, which keeps the last point), and merges the runs'
layouts by category title. So the layout is rewritten, as one more event of the run at the current step, whenever
a scalar tag appears that it does not name yet; it names only tags that were written (every chart has data), each
as an exact pattern (the plugin's multiline charts take regular expressions).

What goes together:

- a model's metric and its phases, ``train/X``, ``val/X``, ``test/X``, ``X``, ``train_X``, ``val_X``, ``test_X``:
  one chart (category ``metrics``);
- a cross-rank aggregate ``K_min`` / ``K_mean`` / ``K_max``: one band chart (the plugin's margin chart: the mean
  with the min-max band), its ``K_max_rank`` on a chart of its own;
- the groups of a gradient family (``grad/norm/*``, ``param/norm/*``, ``param/update_ratio/*``, ...): one chart
  each, beside the family's total;
- throughput (training and validation) beside the data-wait share, the step time and the monitors' share;
- memory: host memory together, CUDA memory now and its window peaks together, each phase's peak together.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable, Sequence
from typing import Any

#: the file in the run directory that lists, one a line, the scalar tags the layout names: the plugin shows a run's
#: last layout record, so a later process writing to the run (``test`` after a ``fit`` job, a restart) starts from
#: every tag the run already holds, not only from its own
TAGS_FILE = "layout-tags.txt"
#: the tag the plugin reads a run's layout from (``tensorboard.plugins.custom_scalar.metadata.CONFIG_SUMMARY_TAG``)
LAYOUT_TAG = "custom_scalars__config__"
#: areas of the monitors' keys (``docs/DESIGN.md``: Logged keys); any other tag is the model's own metric
AREAS = ("grad/", "param/", "optim/", "act/", "memory/", "throughput/", "time/", "predictions/", "run/", "summary/")
_PHASES = re.compile(r"^(train|val|validation|test)[/_](.+)$")
_BAND = ("_min", "_mean", "_max")
#: Lightning's own bookkeeping scalars: no chart of theirs in the layout
_SKIP = {"epoch", "hp_metric"}
#: one value per run (RunSummary's ``summary/*``: its text card, summary.json and the HParams tab show them)
_ONE_POINT = ("summary/",)
#: families whose groups share one chart: (title, prefix of the group keys, the family's total)
_FAMILIES = (
    ("gradient norm per group", "grad/norm/", "grad/norm_total"),
    ("gradient norm per parameter", "grad/norm_param/", None),
    ("gradient norm per optimizer", "grad/optimizer_norm/", None),
    ("NaN/Inf per parameter", "grad/nonfinite/", None),
    ("NaN/Inf per optimizer", "grad/optimizer_nonfinite_count/", None),
    ("weight norm per group", "param/norm/", "param/norm_total"),
    ("update/weight ratio per group", "param/update_ratio/", "param/update_ratio_total"),
    ("monitors' share of the time", "time/monitor_share/", "time/monitor_share"),
    ("Adam first moment norm per group", "optim/exp_avg_norm/", None),
    ("Adam sqrt second moment norm per group", "optim/exp_avg_sq_sqrt_norm/", None),
    ("effective step median per group", "optim/step_median/", None),
    ("effective step p99 per group", "optim/step_p99/", None),
    ("collapsed second moment share per group", "optim/small_v_share/", None),
    ("update/gradient cosine per group", "optim/update_cos/", None),
    ("activation RMS per module", "act/rms/", None),
    ("activation mean per module", "act/mean/", None),
    ("activation max |x| per module", "act/max_abs/", None),
    ("dead unit share per module", "act/dead_share/", None),
)
#: charts of named keys, in order: (category, title, keys)
_NAMED = (
    ("gradients", "NaN/Inf gradients (elements now, steps since the last log)",
     ("grad/nonfinite_count", "grad/nonfinite_steps")),
    ("speed", "samples per second (training, validation)",
     ("throughput/samples_per_sec", "throughput/val_samples_per_sec", "throughput/device/samples_per_sec")),
    ("speed", "data wait share", ("time/data_wait_share",)),
    ("speed", "step time", ("time/step_sec",)),
    ("speed", "batches per second", ("throughput/batches_per_sec",)),
    ("speed", "items per second", ("throughput/items_per_sec",)),
    ("speed", "FLOPs per second", ("throughput/flops_per_sec",)),
    ("speed", "MFU", ("throughput/mfu",)),
    ("speed", "time remaining", ("time/remaining_sec",)),
    ("speed", "straggler ratio", ("time/straggler_ratio",)),
    ("memory", "host memory (GiB)", ("memory/host/rss_gib", "memory/host/workers_uss_gib",
                                     "memory/host/available_gib")),
    ("memory", "CUDA memory now and window peaks (GiB)", ("memory/cuda/allocated_gib", "memory/cuda/reserved_gib",
                                                          "memory/cuda/peak_allocated_gib",
                                                          "memory/cuda/peak_reserved_gib")),
    ("memory", "CUDA peak allocated per phase (GiB)", ("memory/cuda/train_peak_allocated_gib",
                                                       "memory/cuda/validation_peak_allocated_gib",
                                                       "memory/cuda/test_peak_allocated_gib")),
    ("memory", "CUDA peak reserved per phase (GiB)", ("memory/cuda/train_peak_reserved_gib",
                                                      "memory/cuda/validation_peak_reserved_gib",
                                                      "memory/cuda/test_peak_reserved_gib")),
    ("memory", "CUDA peak share of the device", ("memory/cuda/peak_allocated_share",
                                                 "memory/cuda/peak_reserved_share")),
)
_CATEGORIES = ("metrics", "gradients", "activations", "speed", "memory", "predictions", "run")


def _category(key: str) -> str:
    if key.startswith(("grad/", "param/", "optim/")):
        return "gradients"
    if key.startswith("act/"):
        return "activations"
    if key.startswith(("throughput/", "time/")):
        return "speed"
    if key.startswith("memory/"):
        return "memory"
    if key.startswith("predictions/"):
        return "predictions"
    if key.startswith(AREAS):
        return "run"
    return "metrics"


def charts(tags: Iterable[str], lead: str = "") -> list[tuple[str, str, str, tuple[str, ...]]]:
    """The layout's charts for the scalar ``tags`` written to a run, as ``(category, title, kind, tags)`` with
    ``kind`` ``"lines"`` (tags on one chart) or ``"band"`` (mean, min, max). ``lead`` is the logger's prefix and
    join character (``"pre-"``), which every tag carries; the rules read the key after it."""
    keys = sorted(t[len(lead):] for t in set(tags) if t.startswith(lead))
    keys = [k for k in keys if k not in _SKIP and not k.startswith(_ONE_POINT)]
    left = set(keys)
    out: list[tuple[str, str, str, tuple[str, ...]]] = []

    def add(category: str, title: str, kind: str, members: Sequence[str]) -> None:
        members = [k for k in members if k in left] if kind == "lines" else list(members)
        if members:
            out.append((category, title, kind, tuple(lead + k for k in members)))
            left.difference_update(members)

    # cross-rank aggregates first: K_min, K_mean, K_max is one band; K_max_rank its own line
    for key in keys:
        if key.endswith("_mean"):
            stem = key.removesuffix("_mean")
            band = [stem + s for s in _BAND]
            if all(k in left for k in band):
                add(_category(stem), f"{stem} over ranks (mean, min-max band)", "band",
                    (stem + "_mean", stem + "_min", stem + "_max"))
                add(_category(stem), f"{stem}: rank of the max", "lines", (stem + "_max_rank",))
    for category, title, members in _NAMED:
        add(category, title, "lines", members)
    for title, prefix, total in _FAMILIES:
        add(_category(prefix), title, "lines", ([total] if total else []) + [k for k in keys if k.startswith(prefix)])
    # the model's own metrics: a metric with its phases on one chart
    metrics: dict[str, list[str]] = {}
    for key in keys:
        if key in left and not key.startswith(AREAS):
            match = _PHASES.match(key)
            metrics.setdefault(match.group(2) if match else key, []).append(key)
    for base in sorted(metrics):
        add("metrics", base, "lines", sorted(metrics[base], key=lambda k: (_phase_order(k, base), k)))
    for key in keys:  # everything else: a chart of its own, in its area's category
        add(_category(key), key, "lines", (key,))
    order = {c: i for i, c in enumerate(_CATEGORIES)}
    return sorted(out, key=lambda chart: order[chart[0]])  # stable: each category keeps the order above


def _phase_order(key: str, base: str) -> int:
    for i, phase in enumerate(("train", "val", "validation", "test")):
        if key in (f"{phase}/{base}", f"{phase}_{base}"):
            return i + 1
    return 0


def layout_summary(tags: Iterable[str], lead: str = "") -> Any:
    """The ``Summary`` proto of the layout of :func:`charts`, made by torch's ``custom_scalars`` (what
    ``SummaryWriter.add_custom_scalars`` writes, which always writes it at step 0), for one event at the current
    step."""
    from torch.utils.tensorboard.summary import custom_scalars

    layout: dict[str, dict[str, list[Any]]] = {}
    for category, title, kind, members in charts(tags, lead):
        if kind == "band":
            layout.setdefault(category, {})[title] = ["Margin", list(members)]
        else:  # the plugin reads a multiline chart's tags as regular expressions
            layout.setdefault(category, {})[title] = ["Multiline", [f"^{re.escape(m)}$" for m in members]]
    return custom_scalars(layout)


def read_layout_tags(log_dir: str) -> set[str]:
    """The scalar tags earlier processes named in this run's layout (:data:`TAGS_FILE`; none when it is missing)."""
    try:
        with open(os.path.join(log_dir, TAGS_FILE), encoding="utf-8") as f:
            return {line.rstrip("\n") for line in f if line.strip()}
    except OSError:
        return set()


def note_layout_tags(log_dir: str, tags: Iterable[str]) -> None:
    """Add ``tags`` to :data:`TAGS_FILE` (never makes the directory; a failure costs the next process these
    charts, never this write)."""
    if not os.path.isdir(log_dir):
        return
    try:
        with open(os.path.join(log_dir, TAGS_FILE), "a", encoding="utf-8") as f:
            f.writelines(f"{tag}\n" for tag in sorted(tags))
    except OSError:
        pass
