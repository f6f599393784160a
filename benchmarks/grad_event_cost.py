"""Cost of one logged gradient event, as a ratio to one training step of the same model (CPU, one torch thread).

An "event" is what a monitor does at a logging step for every parameter's gradient. Compared side by side,
interleaved round-robin in the same process (:func:`_common.interleaved`), medians over ``--reps``:

* ``ours exact``   GradientMonitor: total + grouped norms, NaN/Inf counts, a 64-bin histogram of every gradient
                   binned over all elements; written to TensorBoard AND wandb (offline).
* ``ours sampled`` the same with the default ``max_hist_elements=16384`` (exact min/max/sum/sum_squares).
* ``ours norms only``  norms and NaN/Inf counts only (``histograms=False``).
* ``ours ... no cap``  the same with ``max_histograms=None`` (default: at most 64 histograms per event).
* ``ours non-logging step``  what the monitor does at every other optimizer step (float32 NaN/Inf flags).
  Every ``ours`` row is a whole batch of hooks: measure at the optimizer step, log at the batch end.
* ``... @REV``     the same monitor with ``_grad_stats`` as of git revision ``REV`` (``--old REV``): old vs new in
                   one run.
* ``norms f32 (old)`` / ``norms (new)``  the per-step norm pass alone: ``torch._foreach_norm(dtype=float32)`` (the
                   old accumulation) vs :func:`squared_norms` (within 1e-6 of float64 at any size).
* ``summarize ...``  the device part of an event alone (stats + bin counts of every gradient, no host work).
* ``tb add_histogram``  ``SummaryWriter.add_histogram(name, grad, step)`` with default bins for every gradient
                   (what a hand-written histogram callback does).
* ``wandb.watch``  wandb's own per-tensor statistics, ``TorchHistory.log_tensor_stats`` (what
                   ``wandb.watch(log="gradients")`` runs from each gradient hook), then one commit; wandb only.

Models: a 25M-parameter MLP 1024-4096-4096-1024 (6 tensors), an ``nn.TransformerEncoder`` (6 layers, d_model 256,
8 heads, embedding + head, 16 sequences of 128 tokens; 75 tensors), 200 x Linear(256, 256) (400 tensors) and
5000 x Linear(16, 16) (10,000 tensors: our rows only).
Below each table: torch dispatcher ops per event (``_common.count_ops``: compute ops / views), for the whole
monitor event and for ``summarize`` alone, and the whole event's compute ops on the CUDA path (``_grad_norms.FUSED``:
the norms of the tensors without a histogram by one fused ``_foreach_norm``, as on a GPU, instead of the CPU's
per-tensor float32 rows).

Run::

    python benchmarks/grad_event_cost.py --reps 7 --old 2f4e3dd
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
import types
from collections.abc import Callable
from typing import Optional

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from _common import REPO_ROOT, Spread, TokenEncoder, count_ops, interleaved, machine, markdown_table, pin
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger  # noqa: E402
from torch import nn  # noqa: E402

import lightning_monitor._grad.event as gm  # noqa: E402
from lightning_monitor import (
    GradientMonitor,  # noqa: E402
    _grad_norms,  # noqa: E402
)
from lightning_monitor._grad.stats import squared_norms, summarize  # noqa: E402


class Wrapped(pl.LightningModule):
    def __init__(self, net: nn.Module, batch: Callable[[], tuple[torch.Tensor, torch.Tensor]],
                 loss: Callable[[torch.Tensor, torch.Tensor], torch.Tensor]) -> None:
        super().__init__()
        self.net = net
        self.batch, self.loss_fn = batch, loss


def mlp(batch: int) -> Wrapped:
    net = nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024))
    x, y = torch.randn(batch, 1024), torch.randn(batch, 1024)
    return Wrapped(net, lambda: (x, y), lambda out, t: nn.functional.mse_loss(out, t))


def many_linears(batch: int, layers: int = 200, width: int = 256) -> Wrapped:
    net = nn.Sequential(*[nn.Linear(width, width) for _ in range(layers)])
    x, y = torch.randn(batch, width), torch.randn(batch, width)
    return Wrapped(net, lambda: (x, y), lambda out, t: nn.functional.mse_loss(out, t))


def transformer(batch: int, seq: int = 128, vocab: int = 1000) -> Wrapped:
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, vocab, (batch, seq + 1), generator=g)
    return Wrapped(TokenEncoder(vocab, dropout=0.0), lambda: (tokens[:, :-1], tokens[:, 1:]),
                   lambda out, t: nn.functional.cross_entropy(out.reshape(-1, out.shape[-1]), t.reshape(-1)))


def load_old(rev: str) -> types.ModuleType:
    """``lightning_monitor/_grad/stats.py`` as of git revision ``rev``, as a module of its own."""
    src = subprocess.run(["git", "show", f"{rev}:lightning_monitor/_grad/stats.py"], cwd=REPO_ROOT, check=True,
                         capture_output=True, text=True).stdout
    module = types.ModuleType(f"_grad_stats_{rev}")
    exec(compile(src, f"{rev}:lightning_monitor/_grad/stats.py", "exec"), module.__dict__)
    return module


def with_stats(module: types.ModuleType, fn: Callable[[], None]) -> Callable[[], None]:
    """``fn`` with GradientMonitor's logging step (``_grad_event``) using ``module``'s summarize / squared_norms /
    summarize_finite."""
    names = [n for n in ("summarize", "squared_norms", "summarize_finite") if hasattr(gm, n) and hasattr(module, n)]

    def run() -> None:
        saved = {n: getattr(gm, n) for n in names}
        for n in names:
            setattr(gm, n, getattr(module, n))
        try:
            fn()
        finally:
            for n, f in saved.items():
                setattr(gm, n, f)

    return run


def event(monitor: GradientMonitor, trainer: pl.Trainer, module: Wrapped, opt: torch.optim.Optimizer,
          stats: Optional[types.ModuleType], flush: Callable[[], None] = lambda: None) -> Callable[[], None]:
    """One training batch's worth of the monitor's hooks: it measures at the optimizer step, logs at batch end.
    ``flush`` waits for the TensorBoard writer's thread, so that the work it does for this event (serializing,
    checksumming, writing: it holds the GIL) is counted here and not in whatever runs next."""

    def call() -> None:
        monitor.on_train_batch_start(trainer, module, None, 0)
        monitor.on_before_optimizer_step(trainer, module, opt)
        monitor.on_train_batch_end(trainer, module, None, None, 0)
        flush()

    return call if stats is None else with_stats(stats, call)


def bench_model(name: str, module: Wrapped, reps: int, root: str, old: Optional[types.ModuleType],
                rev: str, few: bool = False) -> tuple[dict[str, float], dict[str, tuple[int, int]]]:
    """``few``: our rows only (the 10,000-tensor model, where add_histogram / wandb.watch take seconds)."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(module.parameters(), lr=1e-4)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        x, y = module.batch()
        module.loss_fn(module.net(x), y).backward()
        opt.step()

    train_step()  # grads now exist for the event configurations below
    tb_logger = TensorBoardLogger(os.path.join(root, name), name="ours")
    wb_logger = WandbLogger(save_dir=os.path.join(root, name), offline=True, project="bench", name=name)
    trainer = pl.Trainer(accelerator="cpu", logger=[tb_logger, wb_logger], enable_progress_bar=False,
                         enable_model_summary=False, enable_checkpointing=False)
    run = wb_logger.experiment  # starts the offline run: wandb.run is set for wandb.watch's code path too
    tb_flush = tb_logger.experiment.flush

    kinds = {"exact": dict(max_hist_elements=None), "sampled": {}, "norms only": dict(histograms=False),
             "exact no cap": dict(max_hist_elements=None, max_histograms=None),
             "sampled no cap": dict(max_histograms=None)}
    configs: dict[str, Callable[[], None]] = {}
    monitors: dict[str, GradientMonitor] = {}
    for kind, kwargs in kinds.items():
        for label, stats in [("", None), (f" @{rev}", old)]:
            if label and (stats is None or kind == "norms only"):
                continue
            monitor = GradientMonitor(every_n_steps=1, **kwargs)  # type: ignore[arg-type]
            monitor.setup(trainer, module, "fit")
            configs[f"ours {kind}{label}"] = event(monitor, trainer, module, opt, stats, tb_flush)
            monitors[f"ours {kind}{label}"] = monitor
    quiet = GradientMonitor(every_n_steps=10**9)  # a non-logging step: NaN/Inf flags only
    quiet.setup(trainer, module, "fit")
    configs["ours non-logging step"] = event(quiet, trainer, module, opt, None, tb_flush)
    if few:
        configs = {k: v for k, v in configs.items() if k.startswith("ours")}

    from torch.utils.tensorboard import SummaryWriter
    from wandb.integration.torch.wandb_torch import TorchHistory

    writer = SummaryWriter(os.path.join(root, name, "add_histogram"))
    history = TorchHistory()
    named = [(n, p) for n, p in module.named_parameters()]
    grads = [p.grad for _, p in named]

    def tb_add_histogram() -> None:
        for n, p in named:
            writer.add_histogram(f"grad/{n}", p.grad, 0)
        writer.flush()  # its writer thread's work counts here, as ours does

    def wandb_watch() -> None:
        for n, p in named:
            history.log_tensor_stats(p.grad, f"gradients/{n}")
        run.log({})  # commit the row, as the user's next wandb.log would

    configs["norms f32 (old)"] = lambda: torch.stack(torch._foreach_norm(grads, 2, dtype=torch.float32)).double()
    configs["norms (new)"] = lambda: squared_norms(grads)
    sq_all = squared_norms(grads)
    configs["summarize exact"] = lambda: summarize(grads, sq_all, 64, None, "minmax")
    configs["summarize sampled"] = lambda: summarize(grads, sq_all, 64, 16384, "minmax")
    if old is not None:
        configs[f"summarize sampled @{rev}"] = lambda: old.summarize(grads, list(sq_all), 64, 16384, "minmax")
    if not few:
        configs["tb add_histogram"] = tb_add_histogram
        configs["wandb.watch stats"] = wandb_watch
    times: dict[str, list[float]] = {k: [] for k in ["train step", *configs]}
    for fn in configs.values():  # warm-up: lazy imports, first writes, layouts planned
        fn()
    for _, key in interleaved(["train step", *configs], reps):
        fn = train_step if key == "train step" else configs[key]
        start = time.perf_counter()
        fn()
        times[key].append(time.perf_counter() - start)
    writer.close()

    ops = {key: count_ops(configs[key]) for key in configs if key.startswith("ours") and "@" not in key}
    _grad_norms.FUSED = True  # the norm pass CUDA takes (one fused _foreach_norm), run here on the CPU
    try:
        fused_ops = {key: count_ops(configs[key])[0] for key in ops}
    finally:
        _grad_norms.FUSED = None
    if not few:
        ops["summarize exact"] = count_ops(configs["summarize exact"])
        ops["summarize sampled"] = count_ops(configs["summarize sampled"])
        ops["squared_norms"] = count_ops(lambda: squared_norms(grads))

    step = Spread(times["train step"])
    ratios = {key: Spread(times[key]).median / step.median for key in configs}
    n_params = sum(p.numel() for p in module.parameters())
    print(f"\n#### {name}: {n_params / 1e6:.1f}M parameters in {len(named)} tensors, train step "
          f"{step.fmt(1e3)} ms ({reps} interleaved rounds)\n")
    rows = [["train step", step.fmt(1e3), "1.000"]]
    rows += [[key, Spread(times[key]).fmt(1e3, 2), f"{ratios[key]:.3f}"] for key in configs]
    print(markdown_table(["configuration", "ms / event", "x train step"], rows))
    print(f"\nlogging event, ms: sampled {Spread(times['ours sampled']).median * 1e3:.1f}, sampled no cap "
          f"{Spread(times['ours sampled no cap']).median * 1e3:.1f}; norms new / old = "
          f"{ratios['norms (new)'] / ratios['norms f32 (old)']:.2f}")
    if not few:
        tb, wb = ratios["tb add_histogram"], ratios["wandb.watch stats"]
        print(f"ours exact / tb add_histogram = {ratios['ours exact'] / tb:.3f} (no cap "
              f"{ratios['ours exact no cap'] / tb:.3f}), ours sampled / tb add_histogram = "
              f"{ratios['ours sampled'] / tb:.3f}, ours sampled / wandb.watch = {ratios['ours sampled'] / wb:.3f}")
    for kind in ("exact", "sampled"):
        if f"ours {kind} @{rev}" in ratios:
            print(f"ours {kind}: new / @{rev} = {ratios[f'ours {kind}'] / ratios[f'ours {kind} @{rev}']:.3f}")
    print("\ndispatcher ops per event (compute / views): " + ", ".join(f"{k} {c}/{v}" for k, (c, v) in ops.items()))
    print("the same on the CUDA path (compute ops; norms by one fused _foreach_norm): "
          + ", ".join(f"{k} {c}" for k, c in fused_ops.items()))
    wb_logger.finalize("success")
    import wandb

    wandb.finish()
    return ratios, {k: v for k, v in ops.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=7)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--old", default=None, help="git revision whose _grad_stats is timed alongside (old vs new)")
    parser.add_argument("--only", default="mlp,transformer,linear,many",
                        help="comma-separated: mlp, transformer, linear, many (10,000 tensors)")
    args = parser.parse_args()
    pin(args.threads)
    old = load_old(args.old) if args.old else None
    print(machine())
    models = {"mlp": ("mlp_25m", lambda: mlp(args.batch)),
              "transformer": ("transformer_6x256", lambda: transformer(16)),
              "linear": ("linear_200x256", lambda: many_linears(args.batch)),
              "many": ("linear_5000x16", lambda: many_linears(args.batch, layers=5000, width=16))}
    with tempfile.TemporaryDirectory() as root:
        for key in args.only.split(","):
            name, make = models[key]
            bench_model(name, make(), args.reps, root, old, args.old or "", few=key == "many")


if __name__ == "__main__":
    main()
