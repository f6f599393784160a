"""Cost of one logged gradient event, as a ratio to one training step of the same model (CPU, one torch thread).

An "event" is what a monitor does at a logging step for every parameter's gradient. Compared side by side,
interleaved round-robin in the same process, medians over ``--reps``:

* ``ours exact``   GradientMonitor: total + grouped norms, NaN/Inf counts, a 64-bin histogram of every gradient
                   binned over all elements; written to TensorBoard AND wandb (offline).
* ``ours sampled`` the same with the default ``max_hist_elements=16384`` (exact min/max/sum/sum_squares).
* ``ours norms``   norms and NaN/Inf counts only (``histograms=False``).
* ``tb add_histogram``  ``SummaryWriter.add_histogram(name, grad, step)`` with default bins for every gradient
                   (what a hand-written histogram callback does).
* ``wandb.watch``  wandb's own per-tensor statistics, ``TorchHistory.log_tensor_stats`` (what
                   ``wandb.watch(log="gradients")`` runs from each gradient hook: clone, isfinite checks, min/max
                   ``.item()``, ``histc`` with 64 bins, ``wandb.Histogram``), then one commit; wandb only.

Models: a 25M-parameter MLP 1024-4096-4096-1024 and 200 x Linear(256, 256) (many small tensors).

Run::

    python benchmarks/grad_event_cost.py --reps 5
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile
import time
import warnings
from typing import Callable

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger  # noqa: E402
from torch import nn  # noqa: E402

from lightning_monitor import GradientMonitor  # noqa: E402


class Wrapped(pl.LightningModule):
    def __init__(self, net: nn.Module) -> None:
        super().__init__()
        self.net = net


def mlp() -> nn.Module:
    return nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096), nn.ReLU(), nn.Linear(4096, 1024))


def many_linears() -> nn.Module:
    return nn.Sequential(*[nn.Linear(256, 256) for _ in range(200)])


def bench_model(name: str, net: nn.Module, width: int, batch: int, reps: int, root: str) -> list[tuple[str, float, float]]:
    torch.manual_seed(0)
    module = Wrapped(net)
    opt = torch.optim.SGD(module.parameters(), lr=1e-4)
    x, y = torch.randn(batch, width), torch.randn(batch, net[-1].out_features)

    def train_step() -> None:
        opt.zero_grad(set_to_none=True)
        nn.functional.mse_loss(module.net(x), y).backward()
        opt.step()

    train_step()  # grads now exist for the event configurations below
    tb_logger = TensorBoardLogger(os.path.join(root, name), name="ours")
    wb_logger = WandbLogger(save_dir=os.path.join(root, name), offline=True, project="bench", name=name)
    trainer = pl.Trainer(
        accelerator="cpu", logger=[tb_logger, wb_logger], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False,
    )
    run = wb_logger.experiment  # starts the offline run: wandb.run is set for wandb.watch's code path too

    monitors = {
        "ours exact": GradientMonitor(every_n_steps=1, max_hist_elements=None),
        "ours sampled": GradientMonitor(every_n_steps=1),
        "ours norms only": GradientMonitor(every_n_steps=1, histograms=False),
    }
    for monitor in monitors.values():
        monitor.setup(trainer, module, "fit")

    from torch.utils.tensorboard import SummaryWriter
    from wandb.integration.torch.wandb_torch import TorchHistory

    writer = SummaryWriter(os.path.join(root, name, "add_histogram"))
    history = TorchHistory()
    named = [(n, p) for n, p in module.named_parameters()]

    def ours(monitor: GradientMonitor) -> Callable[[], None]:
        return lambda: monitor.on_before_optimizer_step(trainer, module, opt)

    def tb_add_histogram() -> None:
        for n, p in named:
            writer.add_histogram(f"grad/{n}", p.grad, 0)

    def wandb_watch() -> None:
        for n, p in named:
            history.log_tensor_stats(p.grad, f"gradients/{n}")
        run.log({})  # commit the row, as the user's next wandb.log would

    configs: dict[str, Callable[[], None]] = {k: ours(m) for k, m in monitors.items()}
    configs["tb add_histogram"] = tb_add_histogram
    configs["wandb.watch stats"] = wandb_watch
    times: dict[str, list[float]] = {k: [] for k in ["train step", *configs]}
    for fn in configs.values():  # warm-up: lazy imports, first writes
        fn()
    for rep in range(reps):
        order = list(configs)
        order = order[rep % len(order) :] + order[: rep % len(order)]  # rotate so no config always runs first
        for key in ["train step", *order]:
            fn = train_step if key == "train step" else configs[key]
            start = time.perf_counter()
            fn()
            times[key].append(time.perf_counter() - start)
    writer.close()
    step = statistics.median(times["train step"])
    n_params = sum(p.numel() for p in module.parameters())
    print(f"\n{name}: {n_params / 1e6:.1f}M parameters in {len(named)} tensors, batch {batch}, "
          f"train step {step * 1e3:.1f} ms (median of {reps})")
    print(f"{'configuration':<22}{'ms / event':>12}{'x train step':>14}")
    rows = []
    for key in configs:
        med = statistics.median(times[key])
        rows.append((key, med, med / step))
        print(f"{key:<22}{med * 1e3:>12.1f}{med / step:>14.3f}")
    ours_sampled = statistics.median(times["ours sampled"])
    print(f"ours sampled / wandb.watch stats = {ours_sampled / statistics.median(times['wandb.watch stats']):.3f}"
          f"   ours sampled / tb add_histogram = {ours_sampled / statistics.median(times['tb add_histogram']):.3f}")
    wb_logger.finalize("success")
    import wandb

    wandb.finish()
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.set_num_interop_threads(1)
    warnings.filterwarnings("ignore")
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s)")
    with tempfile.TemporaryDirectory() as root:
        bench_model("mlp_25m", mlp(), 1024, args.batch, args.reps, root)
        bench_model("linear_200x256", many_linears(), 256, args.batch, args.reps, root)


if __name__ == "__main__":
    main()
