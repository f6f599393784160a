"""One command for every GPU check: the `gpu`-marked tests and the GPU benchmark rows, in one markdown report.

    python benchmarks/gpu_check.py                      # writes gpu_report.md (or $OUT/gpu_report.md), ~5 min
    python benchmarks/gpu_check.py --quick              # smoke check of the script itself (numbers meaningless)
    python benchmarks/gpu_check.py --device cpu --quick # the same on a machine without CUDA

What it runs, in this order (each part bounded, the whole well under 8 minutes on one GPU):

1. ``pytest -m gpu`` (every GPU-only test: CUDA memory peaks against ``max_memory_allocated``, no host sync between
   logging steps under ``torch.cuda.set_sync_debug_mode("error")``, MFU of a matmul-heavy model against the dense
   peak, the prediction grid on the module's device, ...), with pass/fail per test.
2. **Host syncs on the GPU**: the whole suite (all four monitors + MultiLogger) trains a small conv net with
   ``torch.cuda.set_sync_debug_mode("warn")`` armed only between logging steps; every sync the CUDA runtime
   reports there is counted (the target is 0), and the sync-forcing calls per logging step are counted per
   monitor with :class:`lightning_monitor.testing.HostSyncCounter`.
3. **End to end**: median step time of bare training vs the whole suite at log every 10 and every 50 steps
   (interleaved rounds in this process, CUDA-synchronised step stamps), for the MNIST example's net and a
   6-layer transformer encoder (d_model 512).
4. **Gradient event cost**: one GradientMonitor logging event as a multiple of one training step, with sampled
   (default) and exact histograms, for a 25M MLP, 200 x Linear(256, 256) and the transformer: the extra time of a
   fit that logs at every step over a bare fit, per step.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
import warnings
import xml.etree.ElementTree as ElementTree
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import _common  # noqa: E402  (sets WANDB_MODE=offline before wandb is imported)
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch import nn  # noqa: E402
from torch.nn import functional as F  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from examples.mnist.model import LitNet  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# ------------------------------------------------------------------------------------------------ models and data
class MLP(pl.LightningModule):
    def __init__(self, widths: tuple[int, ...] = (1024, 4096, 4096, 1024)) -> None:
        super().__init__()
        layers: list[nn.Module] = []
        for a, b in zip(widths, widths[1:], strict=False):
            layers += [nn.Linear(a, b), nn.ReLU()]
        self.net = nn.Sequential(*layers[:-1])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.mse_loss(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-3, momentum=0.9)


class Linears(MLP):
    def __init__(self) -> None:
        super().__init__((256,) * 201)


class Encoder(pl.LightningModule):
    def __init__(self, d_model: int = 512, vocab: int = 1000) -> None:
        super().__init__()
        self.net = _common.TokenEncoder(vocab, d_model)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        tokens, targets = batch
        logits = self.net(tokens)
        return F.cross_entropy(logits.flatten(0, 1), targets.flatten())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=1e-4)


def _data(kind: str, n: int, batch: int) -> DataLoader:
    g = torch.Generator().manual_seed(0)
    if kind == "mnist":
        data = TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))
    elif kind == "transformer":
        tokens = torch.randint(0, 1000, (n, 128), generator=g)
        data = TensorDataset(tokens, tokens.roll(-1, dims=1))
    elif kind == "linears":
        data = TensorDataset(torch.randn(n, 256, generator=g), torch.randn(n, 256, generator=g))
    else:
        data = TensorDataset(torch.randn(n, 1024, generator=g), torch.randn(n, 1024, generator=g))
    return DataLoader(data, batch_size=batch, shuffle=False)


MODELS: dict[str, tuple[Callable[[], pl.LightningModule], str, int]] = {
    "mnist": (LitNet, "mnist", 64),
    "mlp25m": (MLP, "mlp", 64),
    "linears400": (Linears, "linears", 64),
    "transformer": (Encoder, "transformer", 16),
}


# ------------------------------------------------------------------------------------------------ timing
class _CudaStamp(pl.Callback):
    """Stamps every batch start after a device synchronize (the benchmark's own sync, outside the library)."""

    def __init__(self) -> None:
        self.starts: list[float] = []

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        self.starts.append(time.perf_counter())


def _suite(every: int, grad_only: bool = False, exact: bool = False) -> list[pl.Callback]:
    from lightning_monitor import GradientMonitor, MemoryMonitor, PredictionGridMonitor, SpeedMonitor

    grad = GradientMonitor(every_n_steps=every, max_hist_elements=None if exact else 16384)
    if grad_only:
        return [grad]
    return [grad, MemoryMonitor(every_n_steps=every), SpeedMonitor(every_n_steps=every), PredictionGridMonitor()]


def _fit_steps(model_name: str, callbacks: list[pl.Callback], steps: int, device: str, tmp: str,
               logger: bool = True) -> list[float]:
    from lightning_monitor import MultiLogger

    make, kind, batch = MODELS[model_name]
    torch.manual_seed(0)
    stamp = _CudaStamp()
    trainer = pl.Trainer(
        accelerator="gpu" if device == "cuda" else "cpu", devices=1, max_steps=steps, logger=(
            MultiLogger(save_dir=tmp, name=model_name) if logger else False),
        callbacks=[stamp, *callbacks], enable_progress_bar=False, enable_model_summary=False,
        enable_checkpointing=False, num_sanity_val_steps=0, limit_val_batches=0, log_every_n_steps=10,
    )
    trainer.fit(make(), _data(kind, steps * batch, batch))
    starts = stamp.starts
    return [b - a for a, b in zip(starts, starts[1:], strict=False)]


def _median(values: list[float]) -> float:
    values = sorted(values)
    return values[len(values) // 2] if values else float("nan")


# ------------------------------------------------------------------------------------------------ parts
def run_gpu_tests(quick: bool) -> tuple[str, bool]:
    with tempfile.TemporaryDirectory() as tmp:
        junit = os.path.join(tmp, "gpu.xml")
        cmd = [sys.executable, "-m", "pytest", "-m", "gpu", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}",
               "--timeout", "240"]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=420)
        rows = []
        if os.path.exists(junit):
            for case in ElementTree.parse(junit).getroot().iter("testcase"):
                status = "passed"
                for tag in ("failure", "error", "skipped"):
                    node = case.find(tag)
                    if node is not None:
                        message = (node.get("message") or "").splitlines()
                        status = f"{tag}: {message[0][:120] if message else ''}"
                seconds = f"{float(case.get('time', 0)):.1f}"
                rows.append([f"{case.get('classname')}::{case.get('name')}", status, seconds])
    tail = proc.stdout.strip().splitlines()[-1] if proc.stdout.strip() else proc.stderr[-300:]
    text = _common.markdown_table(["test", "result", "seconds"], rows) + f"\n\npytest: `{tail}`\n"
    return text, proc.returncode == 0


def run_sync_check(device: str, steps: int, tmp: str) -> str:
    """Syncs the CUDA runtime reports between logging steps (armed with set_sync_debug_mode), and sync-forcing calls
    per monitor at logging steps (HostSyncCounter)."""
    from lightning_monitor.testing import CALLBACK_FILES, HostSyncCounter, SyncsPerStep

    every = 5

    class ArmBetweenLoggingSteps(pl.Callback):
        def __init__(self) -> None:
            self.reported = 0

        def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
            if device == "cuda" and (trainer.global_step + 1) % every != 0 and trainer.global_step > 1:
                torch.cuda.set_sync_debug_mode("warn")

        def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
            if device == "cuda":
                torch.cuda.set_sync_debug_mode("default")

    counter = HostSyncCounter(owners=CALLBACK_FILES)
    per_step = SyncsPerStep(counter)
    arm = ArmBetweenLoggingSteps()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        with counter:
            _fit_steps("mnist", [per_step, arm, *_suite(every)], steps, device, tmp)
    runtime = sum("synchronizing" in str(w.message).lower() for w in caught)
    logging = {s: calls for s, calls in per_step.per_step.items() if (s + 1) % every == 0}
    quiet = {s: calls for s, calls in per_step.per_step.items() if (s + 1) % every != 0 and s > 1}
    owners: dict[str, list[int]] = {}
    for calls in logging.values():
        counts: dict[str, int] = {}
        for *_, owner in calls:
            counts[owner] = counts.get(owner, 0) + 1
        for owner, n in counts.items():
            owners.setdefault(owner, []).append(n)
    rows = [[owner, f"{_median([float(n) for n in ns]):.0f}"] for owner, ns in sorted(owners.items())]
    return (
        f"- syncs reported by the CUDA runtime between logging steps ({len(quiet)} steps armed): **{runtime}**\n"
        f"- sync-forcing calls from the library on non-logging steps: "
        f"**{sum(len(c) for c in quiet.values())}**\n\n"
        + _common.markdown_table(["monitor", "sync-forcing calls per logging step (median)"], rows) + "\n"
    )


def run_end_to_end(device: str, rounds: int, steps: int, tmp: str) -> str:
    rows = []
    for model in ("mnist", "transformer"):
        configs: list[tuple[str, Callable[[], list[pl.Callback]], bool]] = [
            ("bare", lambda: [], False), ("suite, every 50", lambda: _suite(50), True),
            ("suite, every 10", lambda: _suite(10), True),
        ]
        times: dict[str, list[float]] = {name: [] for name, _, _ in configs}
        for _, (name, make, logger) in _common.interleaved(configs, rounds):
            intervals = _fit_steps(model, make(), steps, device, tmp, logger=logger)
            times[name].append(_median(intervals[len(intervals) // 3:]))  # steady state: skip warm-up
        bare = _median(times["bare"])
        for name, _, _ in configs:
            rows.append([model, name, f"{_median(times[name]) * 1e3:.2f}", f"{_median(times[name]) / bare:.3f}"])
    return _common.markdown_table(["model", "configuration", "median step ms", "x bare"], rows) + "\n"


def run_event_cost(device: str, rounds: int, steps: int, tmp: str) -> str:
    rows = []
    for model in ("mlp25m", "linears400", "transformer"):
        configs: list[tuple[str, Callable[[], list[pl.Callback]]]] = [
            ("bare", lambda: []),
            ("sampled", lambda: _suite(1, grad_only=True)),
            ("exact", lambda: _suite(1, grad_only=True, exact=True)),
        ]
        times: dict[str, list[float]] = {name: [] for name, _ in configs}
        for _, (name, make) in _common.interleaved(configs, rounds):
            intervals = _fit_steps(model, make(), steps, device, tmp)
            times[name].append(_median(intervals[len(intervals) // 3:]))
        bare = _median(times["bare"])
        for name in ("sampled", "exact"):
            extra = _median(times[name]) - bare
            rows.append([model, name, f"{bare * 1e3:.2f}", f"{extra * 1e3:.2f}", f"{extra / bare:.3f}"])
    return _common.markdown_table(["model", "histograms", "step ms", "event ms", "event x step"], rows) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--quick", action="store_true", help="1 round of few steps: a smoke check")
    parser.add_argument("--skip-tests", action="store_true")
    parser.add_argument("--out", default=os.path.join(os.environ.get("OUT", "."), "gpu_report.md"))
    args = parser.parse_args()
    _common.pin(4 if args.device == "cuda" else 1)
    rounds, steps = (1, 12) if args.quick else (3, 40)
    started = time.perf_counter()
    parts = [f"# GPU check\n\n{_common.machine()}; load average {_common.load_average()}\n",
             f"Command: `python benchmarks/gpu_check.py{' --quick' if args.quick else ''}`\n"]
    ok = True
    if not args.skip_tests:
        text, ok = run_gpu_tests(args.quick)
        parts.append(f"## GPU tests\n\n{text}")
    with tempfile.TemporaryDirectory() as tmp:
        parts.append(f"## Host syncs\n\n{run_sync_check(args.device, max(steps, 20), tmp)}")
        parts.append(f"## End to end (x bare training, same run)\n\n{run_end_to_end(args.device, rounds, steps, tmp)}")
        parts.append(f"## One gradient logging event (x one training step)\n\n"
                     f"{run_event_cost(args.device, rounds, steps, tmp)}")
    parts.append(f"\nTotal time: {time.perf_counter() - started:.0f} s\n")
    report = "\n".join(parts)
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
        f.write(report)
    print(report)
    sys.exit(0 if ok else 1)


if __name__ == "__main__":
    main()
