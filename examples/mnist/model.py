"""LitNet: pytorch/examples' MNIST ``Net`` as a LightningModule (same layers, optimiser and schedule)."""

from __future__ import annotations

from typing import Any

import lightning.pytorch as pl
import torch
from torch import nn
from torch.nn import functional as F
from typing_extensions import override


class LitNet(pl.LightningModule):
    """The convolutional net of pytorch/examples ``mnist/main.py``, trained the same way.

    Two 3x3 convolutions (32 and 64 channels), 2x2 max-pooling, dropout 0.25, a 9216->128 linear layer, dropout
    0.5 and a 128->10 linear layer returning log-probabilities; ``nll_loss``; Adadelta (lr 1.0) with the learning
    rate multiplied by ``gamma`` (0.7) after every epoch. On full MNIST, 14 epochs reach about 99% test accuracy.

    ==============  ============================================================
    key             meaning
    ==============  ============================================================
    ``train/loss``  mean negative log-likelihood of the training batch
    ``train/acc``   share of the training batch classified correctly
    ``val/loss``    mean negative log-likelihood over the validation split
    ``val/acc``     share of the validation split classified correctly
    ``test/loss``   mean negative log-likelihood over the test set
    ``test/acc``    share of the test set classified correctly
    ==============  ============================================================

    Args:
        lr: Adadelta learning rate.
        gamma: factor applied to the learning rate after every epoch (``StepLR(step_size=1)``).

    Example::

        trainer.fit(LitNet(), datamodule=MNISTDataModule(data_dir="data"))
    """

    LOGGED_KEYS: dict[str, str] = {
        "train/loss": "mean negative log-likelihood of the training batch",
        "train/acc": "share of the training batch classified correctly",
        "val/loss": "mean negative log-likelihood over the validation split",
        "val/acc": "share of the validation split classified correctly",
        "test/loss": "mean negative log-likelihood over the test set",
        "test/acc": "share of the test set classified correctly",
    }

    def __init__(self, lr: float = 1.0, gamma: float = 0.7) -> None:
        super().__init__()
        if lr <= 0:
            raise ValueError(f"`lr` must be > 0, got {lr}")
        if not 0 < gamma <= 1:
            raise ValueError(f"`gamma` must be in (0, 1], got {gamma}")
        self.save_hyperparameters()
        self.conv1 = nn.Conv2d(1, 32, 3, 1)
        self.conv2 = nn.Conv2d(32, 64, 3, 1)
        self.dropout1 = nn.Dropout(0.25)
        self.dropout2 = nn.Dropout(0.5)
        self.fc1 = nn.Linear(9216, 128)
        self.fc2 = nn.Linear(128, 10)
        self.example_input_array = torch.zeros(1, 1, 28, 28)

    @override
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.conv1(x))
        x = F.relu(self.conv2(x))
        x = F.max_pool2d(x, 2)
        x = self.dropout1(x)
        x = torch.flatten(x, 1)
        x = F.relu(self.fc1(x))
        x = self.dropout2(x)
        x = self.fc2(x)
        return F.log_softmax(x, dim=1)

    def _step(self, batch: Any, stage: str) -> torch.Tensor:
        x, y = batch
        log_probs = self(x)
        loss = F.nll_loss(log_probs, y)
        acc = (log_probs.argmax(dim=1) == y).float().mean()
        on_step = stage == "train"
        # Epoch values are means weighted by batch size, averaged over ranks under DDP (sync only at epoch end).
        self.log(f"{stage}/loss", loss, on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=len(y), sync_dist=not on_step)
        self.log(f"{stage}/acc", acc, on_step=on_step, on_epoch=not on_step, prog_bar=True,
                 batch_size=len(y), sync_dist=not on_step)
        return loss

    @override
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self._step(batch, "train")

    @override
    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "val")

    @override
    def test_step(self, batch: Any, batch_idx: int) -> None:
        self._step(batch, "test")

    @override
    def configure_optimizers(self) -> Any:
        optimizer = torch.optim.Adadelta(self.parameters(), lr=self.hparams.lr)
        scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=1, gamma=self.hparams.gamma)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "epoch"}}
