"""End-to-end step-time overhead of the lightning-monitor suite and of its peers, on CPU with one torch thread.

Every configuration trains a fresh, seeded model on synthetic data for ``warmup + steps`` optimizer steps; the
configurations run in interleaved rounds in this one process (the order rotates every round). The timed window is
``steps`` training steps after ``max(warmup, n)`` steps, measured by a callback (first in the list) that stamps
every ``on_train_batch_start``: it holds everything a batch costs, including every callback's and logger's work,
and leaves out the one-off start (logger/wandb init, SpeedMonitor's first-batch FLOP count, the first logging
event's lazy imports and first writes), reported separately in the last three columns.
``steps`` is a multiple of the logging interval, so every window holds exactly ``steps / n`` logging events.

Configurations:

* ``baseline``     Lightning's ``TensorBoardLogger`` only.
* ``ours``         ``MultiLogger`` (TensorBoard + wandb offline) + ``GradientMonitor()`` (norms + histograms)
                   + ``MemoryMonitor()`` + ``SpeedMonitor()`` + ``PredictionGridMonitor()``, all with defaults
                   (the grid is drawn after each validation, so it costs nothing inside the timed training steps).
* ``ours+grid``    the same with ``PredictionGridMonitor(every_n_steps=n)``: a grid of 32 predictions drawn at
                   every logging step as well (MNIST only; the MLP has no images).
* ``lightning``    ``[TensorBoardLogger, WandbLogger(offline)]`` + ``DeviceStatsMonitor`` + ``ThroughputMonitor``
                   + ``LearningRateMonitor``.
* ``add_histogram`` ``TensorBoardLogger`` + a hand-written callback calling ``add_histogram`` on every gradient at
                   every logging step (what most people write).
* ``wandb.watch``  ``[TensorBoardLogger, WandbLogger(offline)]`` + ``WandbLogger.watch(model, log="all",
                   log_freq=n)`` (gradient and parameter histograms to wandb only).
* ``ours+health``  (``--configs ours,ours+health``) ``ours`` + ``HealthMonitor()`` with its default rules: what
                   judging the run at each logging step adds to the whole suite.
* ``ours+stall``   (``--configs ours,ours+stall``) ``ours`` + ``StallMonitor()``: what its progress marks (and its
                   watchdog thread, waking once a second) add to the whole suite.
* ``monitors``     (``--self-cost``) the baseline's ``TensorBoardLogger`` + the four monitors with defaults: the
                   end-to-end difference to ``baseline`` is the monitors' cost and nothing else.
* ``all``          (``--only small10`` / ``small50``) the baseline's ``TensorBoardLogger`` + every monitor with its
                   defaults (the cost budget on: ``cost_budget=0.03``; the grid after each validation), on a small
                   fast model (``small``: a 784-128-10 MLP on MNIST-shaped inputs, about 2-3 ms a step here) that
                   validates every 100 steps (one batch of 256), the baseline too.
* ``all, no budget`` the same with ``cost_budget=None`` on GradientMonitor and PredictionGridMonitor: every
                   histogram, every per-step NaN/Inf check, every grid.
* ``4 empty callbacks`` (``--only small10`` / ``small50``) the baseline with four ``Callback()`` that override
                   nothing: what Lightning's own dispatch of every hook to four more callbacks costs, which no
                   monitor can time (it happens outside their hooks).

``--self-cost`` runs ``baseline``, ``monitors``, ``ours`` and ``ours+grid`` and adds a table that sets the library's own
measurement of its cost beside the measured one: the end-to-end share ``(T - T_baseline) / T`` of each round,
the same in process CPU time (less sensitive to other load on the machine: on CPU with one torch thread the
monitors' work is CPU time of this process), the monitors' hook seconds over the same timed window (what
``time/monitor_share`` adds up), and the median of the ``time/monitor_share`` values SpeedMonitor logged in that
window. ``ours+grid`` costs enough (a prediction grid at every logging step) to stand above the noise.

Run::

    python benchmarks/overhead.py              # default: MNIST LitNet at n=50 and n=10, 25M MLP and a transformer
                                               # at n=10
    python benchmarks/overhead.py --quick      # smoke check (numbers meaningless)
    python benchmarks/overhead.py --self-cost --only mnist10   # time/monitor_share against the measured overhead
    python benchmarks/overhead.py --only small10 --only small50 --rounds 4   # the cost budget on a 2 ms-a-step model
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import tempfile
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402  (sets WANDB_MODE=offline before wandb is imported)
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from examples.mnist.model import LitNet  # noqa: E402

CONFIGS = ["baseline", "ours", "ours+grid", "lightning", "add_histogram", "wandb.watch"]
#: extra configurations, run only when named with --configs: one monitor alone on the baseline's logger
SINGLE = ["grad", "memory", "speed", "monitors", "ours+health", "ours+stall"]
#: the small model's configurations (--only small10): the cost budget on and off
BUDGET = ["baseline", "4 empty callbacks", "all", "all, no budget"]
#: time/monitor_share values SpeedMonitor logged in the current fit: (step, value)
LOGGED_SHARES: list[tuple[int, float]] = []
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
TRANSFORMER_BATCH = 16


class MLP(pl.LightningModule):
    """The 25M-parameter MLP 1024-4096-4096-1024 with SGD + momentum and an MSE loss."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(),
                                 nn.Linear(4096, 1024))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.mse_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class Transformer(pl.LightningModule):
    """A 6-layer ``nn.TransformerEncoder`` (d_model 256, 4 heads, feed-forward 1024) over 64-token sequences, with a
    token embedding and an output head: 75 parameter tensors, 5.3M parameters, AdamW."""

    def __init__(self, vocab: int = 1000, d_model: int = 256) -> None:
        super().__init__()
        self.net = _common.TokenEncoder(vocab, d_model, heads=4)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.net(tokens)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        loss = F.cross_entropy(self(tokens).flatten(0, 1), targets.flatten())
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


class Small(pl.LightningModule):
    """A small fast classifier: Flatten, Linear(784, 128), ReLU, Linear(128, 10) on 1x28x28 inputs (101,770
    parameters, 4 tensors), SGD: about 2 ms a step at batch 64 on one CPU thread here."""

    def __init__(self) -> None:
        super().__init__()
        self.net = nn.Sequential(nn.Flatten(), nn.Linear(784, 128), nn.ReLU(), nn.Linear(128, 10))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.cross_entropy(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


class Data(pl.LightningDataModule):
    """Synthetic batches shaped like the model's input; enough training batches that no epoch ends in the run."""

    def __init__(self, model: str, batches: int, batch_size: int) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(1)
        n = batches * batch_size
        if model in ("mnist", "small"):
            x = (torch.rand(n, 1, 28, 28, generator=g) - MNIST_MEAN) / MNIST_STD
            y = torch.randint(0, 10, (n,), generator=g)
        elif model == "transformer":
            x = torch.randint(0, 1000, (n, 64), generator=g)
            y = x.roll(-1, dims=1)
        else:
            x, y = torch.randn(n, 1024, generator=g), torch.randn(n, 1024, generator=g)
        self.train_set = TensorDataset(x, y)
        self.val_set = TensorDataset(x[:256], y[:256])
        self.batch_size = batch_size

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.batch_size, shuffle=False)

    def val_dataloader(self) -> DataLoader:
        return DataLoader(self.val_set, batch_size=256)


class GradHistogramCallback(pl.Callback):
    """The hand-written callback: ``add_histogram`` on every gradient at every logging step."""

    def on_after_backward(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        step = trainer.global_step
        if (step + 1) % trainer.log_every_n_steps == 0:
            writer = trainer.logger.experiment
            for name, param in pl_module.named_parameters():
                if param.grad is not None:
                    writer.add_histogram(f"grad/{name}", param.grad, step)


def build(config: str, model_name: str, n: int, root: str) -> tuple[Any, list[pl.Callback], Callable[[Any], None]]:
    """``(logger(s), callbacks, before_fit(model))`` of one configuration."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    def tb() -> TensorBoardLogger:
        return TensorBoardLogger(root, name="tb", default_hp_metric=False)

    def nothing(model: Any) -> None:
        return None

    if config == "baseline":
        return tb(), [], nothing
    if config == "4 empty callbacks":
        return tb(), [pl.Callback() for _ in range(4)], nothing
    if config in ("ours", "ours+grid", "ours+health", "ours+stall"):
        from lightning_monitor import (
            GradientMonitor,
            HealthMonitor,
            MemoryMonitor,
            MultiLogger,
            PredictionGridMonitor,
            SpeedMonitor,
            StallMonitor,
        )

        callbacks: list[pl.Callback] = [GradientMonitor(), MemoryMonitor(), SpeedMonitor()]
        if model_name == "mnist":
            grid_every = n if config == "ours+grid" else None
            callbacks.append(PredictionGridMonitor(every_n_steps=grid_every, mean=[MNIST_MEAN], std=[MNIST_STD]))
        if config == "ours+health":  # the whole suite with HealthMonitor's default rules
            callbacks.append(HealthMonitor())
        if config == "ours+stall":  # the whole suite with StallMonitor's watchdog
            callbacks.append(StallMonitor())
        return MultiLogger(save_dir=root, name="ours"), callbacks, nothing
    if config in ("all", "all, no budget"):
        from lightning_monitor import GradientMonitor, MemoryMonitor, PredictionGridMonitor, SpeedMonitor

        budget = None if config == "all, no budget" else 0.03
        callbacks = [GradientMonitor(cost_budget=budget), MemoryMonitor(), SpeedMonitor(),
                     PredictionGridMonitor(mean=[MNIST_MEAN], std=[MNIST_STD], cost_budget=budget)]
        return tb(), callbacks, nothing
    if config == "monitors":
        from lightning_monitor import GradientMonitor, MemoryMonitor, PredictionGridMonitor, SpeedMonitor

        callbacks = [GradientMonitor(), MemoryMonitor(), SpeedMonitor()]
        if model_name == "mnist":
            callbacks.append(PredictionGridMonitor(mean=[MNIST_MEAN], std=[MNIST_STD]))
        return tb(), callbacks, nothing
    if config in SINGLE:
        from lightning_monitor import GradientMonitor, MemoryMonitor, SpeedMonitor

        monitor = {"grad": GradientMonitor, "memory": MemoryMonitor, "speed": SpeedMonitor}[config]()
        return tb(), [monitor], nothing
    if config == "lightning":
        from lightning.pytorch.callbacks import DeviceStatsMonitor, LearningRateMonitor, ThroughputMonitor

        callbacks = [DeviceStatsMonitor(), ThroughputMonitor(batch_size_fn=lambda b: b[0].size(0)),
                     LearningRateMonitor()]
        return [tb(), WandbLogger(save_dir=root, offline=True, project="bench")], callbacks, nothing
    if config == "add_histogram":
        return tb(), [GradHistogramCallback()], nothing
    if config == "wandb.watch":
        wb = WandbLogger(save_dir=root, offline=True, project="bench")
        return [tb(), wb], [], lambda model: wb.watch(model, log="all", log_freq=n)
    raise ValueError(config)


class HookSeconds(pl.Callback):
    """Second in ``callbacks``: at the batch starts ``at``, the seconds spent so far in every monitor's hooks."""

    def __init__(self, at: tuple[int, int]) -> None:
        self.at, self.batches, self.seen = at, 0, {}

    def on_train_batch_start(self, trainer: pl.Trainer, *args: Any) -> None:
        from lightning_monitor._monitor.base import Monitor

        if self.batches in self.at:
            self.seen[self.batches] = sum(c.hook_seconds() for c in trainer.callbacks if isinstance(c, Monitor))
        self.batches += 1


def _record_shares() -> None:
    """Keep every ``time/monitor_share`` SpeedMonitor computes (with its step) in :data:`LOGGED_SHARES`."""
    from lightning_monitor import speed_monitor
    from lightning_monitor._speed import window as _speed_window

    metrics = _speed_window.metrics

    def recorded(*args: Any, **kwargs: Any) -> dict[str, float]:
        out = metrics(*args, **kwargs)
        if "time/monitor_share" in out:
            LOGGED_SHARES.append((recorded.step, out["time/monitor_share"]))  # type: ignore[attr-defined]
        return out

    log_window = speed_monitor.SpeedMonitor._log_window

    def log_window_at(self: Any, trainer: Any, step: int) -> None:
        recorded.step = step  # type: ignore[attr-defined]
        log_window(self, trainer, step)

    recorded.step = -1  # type: ignore[attr-defined]
    _speed_window.metrics = recorded  # type: ignore[assignment]
    speed_monitor.SpeedMonitor._log_window = log_window_at  # type: ignore[method-assign]


def run_one(config: str, model_name: str, n: int, warmup: int, steps: int, batch_size: int) -> _common.StepTimes:
    import wandb

    torch.manual_seed(0)
    model = {"mnist": LitNet, "mlp": MLP, "transformer": Transformer, "small": Small}[model_name]()
    first, last = warmup, warmup + steps
    data = Data(model_name, batches=last + 4, batch_size=batch_size)
    timer = _common.make_step_timer(cpu_at=(first, last))
    hooks = HookSeconds((first, last))
    LOGGED_SHARES.clear()
    with tempfile.TemporaryDirectory() as root:
        t0 = time.perf_counter()
        logger, callbacks, before_fit = build(config, model_name, n, root)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=last + 1, log_every_n_steps=n, logger=logger,
            callbacks=[timer, hooks, *callbacks], enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=root,
            **({"val_check_interval": 100, "limit_val_batches": 1} if model_name == "small" else {}),
        )
        before_fit(model)
        trainer.fit(model, datamodule=data)
        if wandb.run is not None:
            wandb.finish()
    out = _common.step_times(timer, t0, first, last)
    out.extra["setup"] = timer.starts[0] - t0
    out.extra["first_batch"] = out.intervals[0]
    logging_steps = {i for i in range(first, last) if (i + 1) % n == 0}
    quiet = sorted(out.intervals[i] for i in range(first, last) if i not in logging_steps)
    out.extra["quiet_step"] = quiet[len(quiet) // 2]
    # one-off cost of the first logging event (lazy imports, first writes): the window starts after it
    out.extra["first_event"] = out.intervals[n - 1] - out.extra["quiet_step"] if n - 1 < first else float("nan")
    out.extra["hook_share"] = (hooks.seen.get(last, 0.0) - hooks.seen.get(first, 0.0)) / out.window_wall
    in_window = [v for step, v in LOGGED_SHARES if first <= step < last]
    out.extra["logged_share"] = sorted(in_window)[len(in_window) // 2] if in_window else float("nan")
    # RunSummary's summary/overhead_share_mean: a window that holds a prediction grid counts with its whole cost
    out.extra["logged_share_mean"] = sum(in_window) / len(in_window) if in_window else float("nan")
    del trainer, model, data
    gc.collect()
    return out


def report(title: str, n: int, results: dict[str, list[_common.StepTimes]]) -> str:
    base = results["baseline"]
    rows = []
    for config, runs in results.items():
        events = runs[0].steps // n
        ratio = _common.Spread([r.window_wall / b.window_wall for r, b in zip(runs, base, strict=True)])
        cpu_ratio = _common.Spread([(r.window_cpu + r.window_child_cpu) / (b.window_cpu + b.window_child_cpu)
                                    for r, b in zip(runs, base, strict=True)])
        pairs = list(zip(runs, base, strict=True))
        extra_event = _common.Spread([(r.window_wall - b.window_wall) / events for r, b in pairs])
        extra_quiet = _common.Spread([r.extra["quiet_step"] - b.extra["quiet_step"] for r, b in pairs])
        rows.append([
            config,
            _common.Spread([r.mean_step for r in runs]).fmt(1e3),
            ratio.fmt(digits=3),
            cpu_ratio.fmt(digits=3),
            extra_event.fmt(1e3),
            extra_quiet.fmt(1e3, 2),
            _common.Spread([r.window_cpu / r.steps for r in runs]).fmt(1e3),
            _common.Spread([r.window_child_cpu / r.steps for r in runs]).fmt(1e3, 2),
            f"{_common.Spread([r.extra['setup'] for r in runs]).median:.2f}",
            f"{_common.Spread([r.extra['first_batch'] for r in runs]).median * 1e3:.0f}",
            f"{_common.Spread([r.extra['first_event'] for r in runs]).median * 1e3:.0f}",
        ])
    runs0 = base[0]
    head = (f"\n### {title}, logging every {n} steps ({runs0.steps} timed steps = {runs0.steps // n} logging events "
            f"after {runs0.first} warm-up steps; {len(base)} rounds)\n")
    return head + _common.markdown_table(
        ["config", "ms / step", "x baseline", "x baseline CPU", "extra ms / logging event", "extra ms / quiet step",
         "CPU ms / step", "child CPU ms / step", "setup s", "first batch ms", "first event ms"], rows)


def report_self_cost(results: dict[str, list[_common.StepTimes]]) -> str:
    """The monitors' own measurement of their cost beside the measured end-to-end overhead, per configuration."""
    base = results["baseline"]
    rows = []
    for config in ("monitors", "ours", "ours+grid", "all", "all, no budget"):
        if config not in results:
            continue
        runs = results[config]
        measured = _common.Spread([(r.window_wall - b.window_wall) / r.window_wall
                                   for r, b in zip(runs, base, strict=True)])
        cpu = _common.Spread([(r.window_cpu - b.window_cpu) / r.window_cpu for r, b in zip(runs, base, strict=True)])
        rows.append([config, measured.fmt(100, 2), cpu.fmt(100, 2),
                     _common.Spread([r.extra["hook_share"] for r in runs]).fmt(100, 2),
                     _common.Spread([r.extra["logged_share"] for r in runs]).fmt(100, 2),
                     _common.Spread([r.extra["logged_share_mean"] for r in runs]).fmt(100, 2)])
    return "\n" + _common.markdown_table(
        ["config", "measured: (T - T_baseline) / T, wall %", "the same in process CPU time %",
         "hook time % of the same window", "logged time/monitor_share %, median",
         "logged time/monitor_share %, mean (RunSummary's)"], rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=4, help="interleaved rounds (default 4)")
    parser.add_argument("--steps", type=int, default=100, help="timed MNIST steps per fit (multiple of 50)")
    parser.add_argument("--mlp-steps", type=int, default=30, help="timed 25M-MLP steps per fit (multiple of 10)")
    parser.add_argument("--warmup", type=int, default=0,
                        help="untimed steps before the window (at least n: the first logging event is one-off)")
    parser.add_argument("--transformer-steps", type=int, default=20,
                        help="timed transformer steps per fit (multiple of 10)")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--small-steps", type=int, default=300, help="timed small-model steps per fit (multiple of 10)")
    parser.add_argument("--only", choices=["mnist50", "mnist10", "mlp10", "transformer10", "small10", "small50"],
                        action="append",
                        help="run only these comparisons (repeatable)")
    parser.add_argument("--configs", default="",
                        help=f"comma-separated subset of {CONFIGS + SINGLE} (baseline always runs); default: {CONFIGS}")
    parser.add_argument("--quick", action="store_true", help="1 round, short windows: a smoke check")
    parser.add_argument("--self-cost", action="store_true",
                        help="baseline, monitors, ours, ours+grid: time/monitor_share against the measured overhead")
    args = parser.parse_args()
    if args.self_cost:
        args.configs = "baseline,monitors,ours,ours+grid"
    _record_shares()
    if args.quick:
        args.rounds, args.steps, args.mlp_steps, args.transformer_steps, args.small_steps = 1, 50, 10, 10, 50
    _common.pin(1)
    suites = [("mnist", 50, args.steps, f"MNIST LitNet (1.2M parameters), batch {args.batch_size}", "mnist50"),
              ("mnist", 10, args.steps, f"MNIST LitNet (1.2M parameters), batch {args.batch_size}", "mnist10"),
              ("mlp", 10, args.mlp_steps, f"MLP 1024-4096-4096-1024 (25M parameters), batch {args.batch_size}",
               "mlp10"),
              ("transformer", 10, args.transformer_steps,
               "Transformer encoder, 6 layers, d_model 256 (5.3M parameters, 75 tensors), batch"
               f" {TRANSFORMER_BATCH} x 64 tokens", "transformer10"),
              ("small", 10, args.small_steps, f"Small MLP 784-128-10 (0.1M parameters), batch {args.batch_size}",
               "small10"),
              ("small", 50, args.small_steps, f"Small MLP 784-128-10 (0.1M parameters), batch {args.batch_size}",
               "small50")]
    suites = [s for s in suites if (s[4] in args.only if args.only else not s[4].startswith("small"))]
    print(f"## End-to-end step time\n\n{_common.machine()}\n")
    t_start = time.perf_counter()
    for model_name, n, steps, title, _ in suites:
        if steps % n:
            raise SystemExit(f"--steps must be a multiple of {n}, got {steps}")
        wanted = (["baseline", *[c for c in args.configs.split(",") if c and c != "baseline"]] if args.configs
                  else BUDGET if model_name == "small" else CONFIGS)
        unknown = sorted(set(wanted) - set(CONFIGS + SINGLE + BUDGET))
        if unknown:
            raise SystemExit(f"unknown --configs {unknown}; choose from {CONFIGS + SINGLE}")
        configs = [c for c in wanted if model_name == "mnist" or c != "ours+grid"]
        results: dict[str, list[_common.StepTimes]] = {c: [] for c in configs}
        for _, config in _common.interleaved(configs, args.rounds):
            batch = TRANSFORMER_BATCH if model_name == "transformer" else args.batch_size
            results[config].append(run_one(config, model_name, n, max(args.warmup, n), steps, batch))
        print(report(title, n, results))
        if args.self_cost or model_name == "small":
            print(report_self_cost(results))
        print(f"\nload average after: {_common.load_average()}", flush=True)
    print(f"\ntotal {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
