"""MNIST with lightning-monitor, from the command line (LightningCLI).

Run from the repository root::

    python examples/mnist/main.py fit --config configs/smoke.yaml     # offline, committed digits, < 1 minute
    python examples/mnist/main.py fit --config configs/mnist.yaml     # full MNIST (downloads it), 14 epochs
    python examples/mnist/main.py fit --config configs/mnist.yaml --print_config   # every option

``fit`` tests the trained model on the test set afterwards (``--test_after_fit false`` turns that off). The model
and the data module are fixed (``--model.*`` and ``--data.*`` set their arguments); the logger and the callbacks
come from the YAML file (``class_path`` / ``init_args``).
"""

from __future__ import annotations

import os
import sys

# Run by path (`python examples/mnist/main.py`), this file's directory is already on sys.path; make sure of it in
# every other way of starting it too (e.g. DDP re-launching this script from another directory).
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from datamodule import MNISTDataModule, MNISTDataNotFoundError  # noqa: E402
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI  # noqa: E402
from model import LitNet  # noqa: E402

from lightning_monitor.cli import SaveConfigCallback  # noqa: E402


class MNISTCLI(LightningCLI):
    """LightningCLI for :class:`LitNet` on :class:`MNISTDataModule` that also tests after ``fit``."""

    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument("--test_after_fit", type=bool, default=True, help="Test the final model after fit.")

    def after_fit(self) -> None:
        if self.config[self.subcommand].get("test_after_fit", True):
            self.trainer.test(self.model, datamodule=self.datamodule, verbose=True)


def main(args: list[str] | None = None) -> None:
    try:
        MNISTCLI(
            LitNet,
            MNISTDataModule,
            save_config_callback=SaveConfigCallback,
            args=args,
        )
    except MNISTDataNotFoundError as err:
        sys.exit(f"error: {err}")


if __name__ == "__main__":
    main()
