"""Helpers the benchmark scripts share: pinning, the machine line, interleaved rounds, step timing, tables.

Every script calls :func:`pin` first (one torch thread, wandb offline and silent, Lightning's info chatter off),
runs its configurations round-robin in one process (:func:`interleaved`: the order rotates every round so no
configuration always runs first or last), and prints medians with their spread through :func:`markdown_table`.
"""

from __future__ import annotations

import logging
import os
import platform
import statistics
import sys
import time
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, TypeVar

T = TypeVar("T")

# Before wandb / lightning are imported anywhere: no account, no prompt, no network, no banners.
os.environ["WANDB_MODE"] = "offline"
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("WANDB_CONSOLE", "off")
os.environ.pop("WANDB_API_KEY", None)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if REPO_ROOT not in sys.path:  # `python benchmarks/x.py` puts benchmarks/ first, not the repo root
    sys.path.insert(0, REPO_ROOT)

import torch  # noqa: E402
from torch import nn  # noqa: E402


class TokenEncoder(nn.Module):
    """The benchmarks' transformer: token embedding, a 6-layer ``nn.TransformerEncoder`` (feed-forward 4 x d_model)
    and a vocabulary head; 75 parameter tensors (5.3M parameters at d_model 256)."""

    def __init__(self, vocab: int = 1000, d_model: int = 256, heads: int = 8, dropout: float = 0.1) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, d_model)
        layer = nn.TransformerEncoderLayer(d_model, heads, 4 * d_model, dropout=dropout, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, 6, enable_nested_tensor=False)
        self.head = nn.Linear(d_model, vocab)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.head(self.encoder(self.embed(tokens)))


def pin(threads: int = 1) -> None:
    """One torch thread (intra- and inter-op), warnings and Lightning's info logs off."""
    torch.set_num_threads(threads)
    try:
        torch.set_num_interop_threads(1)
    except RuntimeError:  # already set once in this process
        pass
    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.pytorch", "lightning.fabric", "wandb"):
        logging.getLogger(name).setLevel(logging.ERROR)


def count_ops(fn: Any) -> tuple[int, int]:
    """``(compute, views)``: torch dispatcher ops ``fn()`` runs, split into ops that run a kernel and views/metadata.

    Counted by a ``TorchDispatchMode`` (every aten op that reaches the dispatcher from Python-level calls; ops that
    an op calls internally are not counted). On a GPU each compute op is at least one kernel launch.
    """
    from torch.utils._python_dispatch import TorchDispatchMode

    class _Count(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.compute = 0
            self.views = 0

        def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
            if func.is_view or func._schema.name in ("aten::detach", "aten::expand", "aten::lift_fresh"):
                self.views += 1
            else:
                self.compute += 1
            return func(*args, **(kwargs or {}))

    with _Count() as mode:
        fn()
    return mode.compute, mode.views


def load_average() -> str:
    one, five, fifteen = os.getloadavg()
    return f"{one:.2f} / {five:.2f} / {fifteen:.2f}"


def machine() -> str:
    """One line naming the machine and the versions: put it above every table."""
    import lightning
    import wandb

    cpu = platform.processor() or "cpu"
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    cuda = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "no GPU"
    return (f"{cpu}, {os.cpu_count()} cores, {cuda}; Python {platform.python_version()}, torch {torch.__version__}, "
            f"lightning {lightning.__version__}, wandb {wandb.__version__}; torch threads {torch.get_num_threads()}; "
            f"load average (1/5/15 min) {load_average()}")


def interleaved(configs: Sequence[T], rounds: int) -> Iterator[tuple[int, T]]:
    """``(round, config)`` for every round, the order rotated by one each round."""
    items = list(configs)
    for r in range(rounds):
        k = r % len(items) if items else 0
        for item in items[k:] + items[:k]:
            yield r, item


@dataclass
class Spread:
    """Median and spread of a list of samples."""

    values: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.values)

    @property
    def lo(self) -> float:
        return min(self.values)

    @property
    def hi(self) -> float:
        return max(self.values)

    def iqr(self) -> tuple[float, float]:
        if len(self.values) < 4:
            return self.lo, self.hi
        q = statistics.quantiles(self.values, n=4, method="inclusive")
        return q[0], q[2]

    def fmt(self, scale: float = 1.0, digits: int = 1) -> str:
        """``median [min-max]`` (or the IQR from 4 samples on), scaled."""
        lo, hi = self.iqr()
        return f"{self.median * scale:.{digits}f} [{lo * scale:.{digits}f}-{hi * scale:.{digits}f}]"


def markdown_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in row] for row in rows]
    widths = [max(len(row[i]) for row in cells) for i in range(len(headers))]
    lines = ["| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def children_cpu_sec() -> float:
    """CPU seconds (user + system) of this process's live child processes (the wandb service, for one)."""
    try:
        import psutil

        total = 0.0
        for child in psutil.Process().children(recursive=True):
            try:
                t = child.cpu_times()
                total += t.user + t.system
            except psutil.Error:
                pass
        return total
    except ImportError:
        return 0.0


@dataclass
class Stamp:
    wall: float
    cpu: float  # this process, all threads
    child_cpu: float  # live child processes (wandb service)


def stamp() -> Stamp:
    return Stamp(time.perf_counter(), time.process_time(), children_cpu_sec())


def make_step_timer(**kwargs: Any) -> Any:
    """A Lightning callback that stamps the start of every training batch (see :class:`StepTimes`)."""
    import lightning.pytorch as pl

    class StepTimer(pl.Callback):
        """Stamps ``on_train_batch_start`` of every batch and ``on_train_end``.

        Put it FIRST in ``callbacks``: the interval between two batch starts then holds everything the batch costs
        (data fetch, forward, backward, optimizer step, every other callback and logger call of that batch).
        """

        def __init__(self, cpu_at: Sequence[int] = ()) -> None:
            self.starts: list[float] = []
            self.cpu: dict[int, Stamp] = {}
            self.cpu_at = set(cpu_at)
            self.end: float = 0.0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            n = len(self.starts)
            if n in self.cpu_at:  # CPU stamps only where asked: reading child processes is not free
                self.cpu[n] = stamp()
                self.starts.append(self.cpu[n].wall)
            else:
                self.starts.append(time.perf_counter())

        def on_train_end(self, trainer: Any, pl_module: Any) -> None:
            self.end = time.perf_counter()

    return StepTimer(**kwargs)


@dataclass
class StepTimes:
    """Per-step wall intervals of one fit, and the window used for the steady-state figures."""

    intervals: list[float]  # seconds, interval i = batch i start -> batch i+1 start
    first: int  # first step of the window
    last: int  # one past the last step of the window
    window_wall: float = 0.0
    window_cpu: float = 0.0
    window_child_cpu: float = 0.0
    startup: float = 0.0  # trainer.fit() call -> start of the first window step
    extra: dict[str, float] = field(default_factory=dict)

    @property
    def steps(self) -> int:
        return self.last - self.first

    @property
    def mean_step(self) -> float:
        return self.window_wall / self.steps


def step_times(timer: Any, fit_start: float, first: int, last: int) -> StepTimes:
    s = timer.starts
    intervals = [b - a for a, b in zip(s, s[1:], strict=False)]
    out = StepTimes(intervals=intervals, first=first, last=last)
    out.window_wall = s[last] - s[first]
    if first in timer.cpu and last in timer.cpu:
        out.window_cpu = timer.cpu[last].cpu - timer.cpu[first].cpu
        out.window_child_cpu = timer.cpu[last].child_cpu - timer.cpu[first].child_cpu
    out.startup = s[first] - fit_start
    return out
