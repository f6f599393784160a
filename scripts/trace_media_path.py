"""Print the frames of lightning-monitor's own code between a Lightning hook and each backend's write, for one
gradient histogram and one prediction-grid image, with MultiLogger and with a plain [TensorBoardLogger,
WandbLogger] list (issue 11's measure of the media path).

    python scripts/trace_media_path.py
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback

import torch
from torch.utils.data import DataLoader, TensorDataset

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")

import lightning.pytorch as pl  # noqa: E402
import wandb  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger  # noqa: E402
from torch.utils.tensorboard import SummaryWriter  # noqa: E402

from lightning_monitor import GradientMonitor, MultiLogger, PredictionGridMonitor  # noqa: E402

PACKAGE = os.path.dirname(os.path.abspath(sys.modules["lightning_monitor"].__file__))
TRACES: dict[tuple[str, str], list[str]] = {}


def _record(backend: str, what: str) -> None:
    if (backend, what) in TRACES:
        return
    ours = []
    for frame in traceback.extract_stack()[:-2]:
        if frame.filename.startswith(PACKAGE):
            ours.append(f"{os.path.basename(frame.filename)}:{frame.lineno} {frame.name}")
    if ours:
        TRACES[(backend, what)] = ours


def _patch() -> None:
    raw, image = SummaryWriter.add_histogram_raw, SummaryWriter.add_image

    def add_histogram_raw(self, tag, *args, **kwargs):
        if tag.startswith("grad/hist/"):
            _record("tensorboard", "histogram")
        return raw(self, tag, *args, **kwargs)

    def add_image(self, tag, *args, **kwargs):
        if tag.startswith("predictions/"):
            _record("tensorboard", "image")
        return image(self, tag, *args, **kwargs)

    SummaryWriter.add_histogram_raw, SummaryWriter.add_image = add_histogram_raw, add_image
    log = wandb.sdk.wandb_run.Run.log

    def run_log(self, data, *args, **kwargs):
        if any(k.startswith("grad/hist/") for k in data):
            _record("wandb", "histogram")
        if any(k.startswith("predictions/grid") for k in data):
            _record("wandb", "image")
        return log(self, data, *args, **kwargs)

    wandb.sdk.wandb_run.Run.log = run_log


class _Net(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(1, 4, 3)
        self.head = torch.nn.Linear(4 * 26 * 26, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(torch.relu(self.conv(x)).flatten(1))

    def training_step(self, batch, batch_idx):  # type: ignore[override]
        x, y = batch
        return torch.nn.functional.cross_entropy(self(x), y)

    def validation_step(self, batch, batch_idx):  # type: ignore[override]
        pass

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _loader() -> DataLoader:
    g = torch.Generator().manual_seed(0)
    data = TensorDataset(torch.rand(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g))
    return DataLoader(data, batch_size=16)


def _fit(logger) -> None:
    trainer = pl.Trainer(
        accelerator="cpu", max_epochs=1, limit_train_batches=2, limit_val_batches=1, log_every_n_steps=1, logger=logger,
        callbacks=[GradientMonitor(), PredictionGridMonitor(num_samples=8)], enable_progress_bar=False,
        enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
    )
    trainer.fit(_Net(), _loader(), _loader())


def main() -> None:
    _patch()
    with tempfile.TemporaryDirectory() as tmp:
        for label, make in (
            ("MultiLogger", lambda: MultiLogger(save_dir=tmp, name="multi")),
            ("[TensorBoardLogger, WandbLogger]", lambda: [TensorBoardLogger(tmp, name="tb"),
                                                          WandbLogger(save_dir=tmp, mode="offline")]),
        ):
            TRACES.clear()
            _fit(make())
            print(f"## {label}")
            for (backend, what), frames in sorted(TRACES.items()):
                modules = sorted({f.split(":")[0] for f in frames})
                print(f"{what} -> {backend}: {len(frames)} frames in {len(modules)} modules")
                for frame in frames:
                    print(f"    {frame}")
            print()
    wandb.finish()


if __name__ == "__main__":
    main()
