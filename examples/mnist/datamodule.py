"""MNISTDataModule: torchvision's MNIST with a fixed validation split, and a clear error when the data is missing."""

from __future__ import annotations

import os
import socket
from typing import Optional, Union

import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset, random_split
from torchvision import transforms
from torchvision.datasets import MNIST
from typing_extensions import override

#: mean and standard deviation of the MNIST training pixels (pytorch/examples' normalisation)
MNIST_MEAN, MNIST_STD = 0.1307, 0.3081
_DOWNLOAD_TIMEOUT_SEC = 30.0


class MNISTDataNotFoundError(FileNotFoundError):
    """MNIST is not under ``data_dir`` and could not (or was not allowed to) be downloaded."""


class MNISTDataModule(pl.LightningDataModule):
    """MNIST digits through torchvision's ``MNIST`` class, normalised like pytorch/examples.

    The training file is split into a training and a validation part with a fixed seed; the test file is the
    test set. Any subset in torchvision's layout works (``data_dir/MNIST/raw/*-ubyte``), e.g. the 640 + 256 digits
    committed under ``tests/data``.

    Args:
        data_dir: directory that holds (or will hold) ``MNIST/raw``.
        batch_size: training batch size (64 as in pytorch/examples).
        test_batch_size: validation and test batch size (1000 as in pytorch/examples).
        num_workers: DataLoader worker processes.
        download: fetch MNIST from the internet when it is not under ``data_dir``.
        val_split: size of the validation split taken from the training file: a number of images (int) or a
            fraction of it (float in (0, 1)).
        seed: seed of the training/validation split.

    Raises:
        MNISTDataNotFoundError: the data is missing and ``download`` is off or the download failed.
    """

    def __init__(
        self,
        data_dir: str = "data",
        batch_size: int = 64,
        test_batch_size: int = 1000,
        num_workers: int = 1,
        download: bool = True,
        val_split: Union[int, float] = 0.1,
        seed: int = 42,
    ) -> None:
        super().__init__()
        for name, value in (("batch_size", batch_size), ("test_batch_size", test_batch_size)):
            if value < 1:
                raise ValueError(f"`{name}` must be >= 1, got {value}")
        if num_workers < 0:
            raise ValueError(f"`num_workers` must be >= 0, got {num_workers}")
        if isinstance(val_split, float) and not 0 < val_split < 1:
            raise ValueError(f"`val_split` as a fraction must be in (0, 1), got {val_split}")
        if isinstance(val_split, int) and val_split < 1:
            raise ValueError(f"`val_split` as a number of images must be >= 1, got {val_split}")
        self.save_hyperparameters()
        self.data_dir = data_dir
        self.batch_size = batch_size
        self.test_batch_size = test_batch_size
        self.num_workers = num_workers
        self.download = download
        self.val_split = val_split
        self.seed = seed
        self.transform = transforms.Compose([transforms.ToTensor(), transforms.Normalize((MNIST_MEAN,), (MNIST_STD,))])
        self.train_set: Optional[Dataset] = None
        self.val_set: Optional[Dataset] = None
        self.test_set: Optional[Dataset] = None

    @override
    def prepare_data(self) -> None:
        # Runs on one process per node before setup: the only place that may download.
        for train in (True, False):
            self._mnist(train, download=self.download)

    @override
    def setup(self, stage: str) -> None:
        if stage in ("fit", "validate") and self.train_set is None:
            full = self._mnist(train=True, download=False)
            n_val = self.val_split if isinstance(self.val_split, int) else round(len(full) * self.val_split)
            if not 0 < n_val < len(full):
                raise ValueError(
                    f"`val_split`={self.val_split} leaves no training or no validation images: the training file"
                    f" under {self.data_dir!r} has {len(full)} images"
                )
            generator = torch.Generator().manual_seed(self.seed)
            self.train_set, self.val_set = random_split(full, [len(full) - n_val, n_val], generator=generator)
        if stage in ("test", "predict") and self.test_set is None:
            self.test_set = self._mnist(train=False, download=False)

    @override
    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, self.batch_size, shuffle=True)

    @override
    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, self.test_batch_size, shuffle=False)

    @override
    def test_dataloader(self) -> DataLoader:
        if self.test_set is None:
            self.setup("test")
        return self._loader(self.test_set, self.test_batch_size, shuffle=False)

    @override
    def predict_dataloader(self) -> DataLoader:
        return self.test_dataloader()

    def _loader(self, dataset: Optional[Dataset], batch_size: int, shuffle: bool) -> DataLoader:
        if dataset is None:
            raise RuntimeError("MNISTDataModule.setup() has not run for this stage")
        return DataLoader(
            dataset,
            batch_size=batch_size,
            shuffle=shuffle,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            pin_memory=torch.cuda.is_available(),
        )

    def _mnist(self, train: bool, download: bool) -> MNIST:
        raw = os.path.join(self.data_dir, "MNIST", "raw")
        try:
            if not download:
                return MNIST(self.data_dir, train=train, transform=self.transform, download=False)
            # torchvision's urllib calls have no timeout of their own: bound them so a black-holed network fails
            # instead of hanging.
            previous = socket.getdefaulttimeout()
            socket.setdefaulttimeout(_DOWNLOAD_TIMEOUT_SEC)
            try:
                return MNIST(self.data_dir, train=train, transform=self.transform, download=True)
            finally:
                socket.setdefaulttimeout(previous)
        except RuntimeError as err:
            prefix = "train" if train else "t10k"
            names = (f"{prefix}-images-idx3-ubyte", f"{prefix}-labels-idx1-ubyte")
            if all(os.path.isfile(os.path.join(raw, name)) for name in names):
                raise  # the files are there: a different problem, not missing data
            if download:
                what = f"MNIST is not under {raw!r} and downloading it failed (no internet?)"
            else:
                what = f"MNIST is not under {raw!r} and `download` is off"
            raise MNISTDataNotFoundError(
                f"{what}.\n"
                "  - Offline, run the example on the digits committed in this repository:\n"
                "      python examples/mnist/main.py fit --config configs/smoke.yaml\n"
                "  - Or point `--data.data_dir` at a directory holding MNIST/raw/*-ubyte (torchvision's layout)"
                " and pass `--data.download false`"
                + (".\n" if download else ",\n  - or pass `--data.download true` on a machine with internet.\n")
                + f"  ({type(err).__name__}: {_summary(err)})"
            ) from err


def _summary(err: BaseException) -> str:
    """The first and the last line of a (possibly long, multi-mirror) error message."""
    lines = [line.strip() for line in str(err).splitlines() if line.strip()]
    return " ... ".join(dict.fromkeys(lines[:1] + lines[-1:])) or type(err).__name__
