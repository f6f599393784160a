"""Scalars per second through the logging path: MultiLogger vs Lightning's ``logger=[TensorBoardLogger, WandbLogger]``.

Both sides get the same calls: ``log_metrics({k0: v, ..., k{K-1}: v}, step)`` with Python floats (what Lightning's
logger connector hands a logger), ``--calls`` times per round, both backends written (TensorBoard event file +
wandb offline run). For the list, each logger's ``log_metrics`` is called in turn, as the Trainer does. Fresh loggers
every round; the run start (wandb init, first write) is done before the clock starts and reported separately.
Rounds are interleaved (the order alternates); medians with [min-max].

Run::

    python benchmarks/logging_throughput.py [--rounds 5 --calls 2000 --keys 10]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import wandb  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger  # noqa: E402

from lightning_monitor import MultiLogger  # noqa: E402


def make(config: str, root: str) -> tuple[Callable[[dict, int], None], Callable[[], None]]:
    """``(log_metrics, finish)`` of one configuration."""
    if config == "MultiLogger":
        logger = MultiLogger(save_dir=root, name="ours")
        return logger.log_metrics, lambda: logger.finalize("success")
    loggers: list[Any] = [TensorBoardLogger(root, name="tb"), WandbLogger(save_dir=root, offline=True, project="bench")]

    def log_metrics(metrics: dict, step: int) -> None:
        for logger in loggers:
            logger.log_metrics(metrics, step)

    def finish() -> None:
        for logger in loggers:
            logger.finalize("success")

    return log_metrics, finish


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--calls", type=int, default=2000, help="log_metrics calls per round")
    parser.add_argument("--keys", type=int, default=10, help="scalars per call")
    args = parser.parse_args()
    _common.pin(1)
    configs = ["MultiLogger", "[TensorBoardLogger, WandbLogger]"]
    rate: dict[str, list[float]] = {c: [] for c in configs}
    start: dict[str, list[float]] = {c: [] for c in configs}
    finish_sec: dict[str, list[float]] = {c: [] for c in configs}
    keys = [f"bench/metric_{i}" for i in range(args.keys)]
    for _, config in _common.interleaved(configs, args.rounds):
        with tempfile.TemporaryDirectory() as root:
            t0 = time.perf_counter()
            log_metrics, finish = make(config, root)
            log_metrics({k: 0.0 for k in keys}, 0)  # starts both backends (wandb run, event file)
            t1 = time.perf_counter()
            for step in range(1, args.calls + 1):
                log_metrics({k: step * 0.001 + i for i, k in enumerate(keys)}, step)
            t2 = time.perf_counter()
            finish()
            if wandb.run is not None:
                wandb.finish()
            t3 = time.perf_counter()
        start[config].append(t1 - t0)
        rate[config].append(args.calls * args.keys / (t2 - t1))
        finish_sec[config].append(t3 - t2)
    base = configs[1]
    rows = []
    for config in configs:
        ratio = _common.Spread([r / b for r, b in zip(rate[config], rate[base], strict=True)])
        rows.append([config, _common.Spread(rate[config]).fmt(1e-3, 1), ratio.fmt(digits=2),
                     _common.Spread([args.keys / r * 1e6 for r in rate[config]]).fmt(digits=0),
                     f"{_common.Spread(start[config]).median:.2f}", f"{_common.Spread(finish_sec[config]).median:.2f}"])
    print(f"## Logging path throughput\n\n{_common.machine()}\n")
    print(f"{args.calls} calls x {args.keys} scalars per round, {args.rounds} rounds, TensorBoard + wandb offline.\n")
    print(_common.markdown_table(["logger", "k scalars / s", "x Lightning's list", "us / call", "start s",
                                  "finish s"], rows))


if __name__ == "__main__":
    main()
