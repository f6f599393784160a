"""Run: one MultiLogger run's identity (directory, version, wandb id and name), its step ledger and wandb options.

The guard and the two run writers are given the run (and the guard), never the MultiLogger, so nothing below the
public logger reaches back into it.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Callable
from typing import Any, Optional, Union

from lightning.pytorch.loggers import TensorBoardLogger

from lightning_monitor._run.options import slug
from lightning_monitor._run.state import StepLedger


class Run:
    """What identifies one run and what it keeps beside its files.

    ``tb`` is Lightning's TensorBoardLogger: it owns the run directory and the version numbering (built even when
    TensorBoard is off). ``wandb_options`` are the options for ``WandbLogger`` / ``wandb.init`` (``None``: wandb
    off); ``wandb_rewind`` is MultiLogger's opt-in to wandb's rewind on a restart.
    """

    def __init__(self, tb: TensorBoardLogger, wandb_options: Optional[dict[str, Any]], wandb_rewind: bool) -> None:
        self.tb = tb
        self.wandb_options = wandb_options
        self.wandb_rewind = wandb_rewind
        self._ledger: Optional[StepLedger] = None  # made on rank 0 at the first write
        #: told when the ledger cannot be written (the guard: run directory deleted or its disk full)
        self.on_ledger_fault: Optional[Callable[[OSError], None]] = None

    @property
    def name(self) -> str:
        return self.tb.name

    @property
    def version(self) -> Union[int, str]:
        return self.tb.version

    @property
    def log_dir(self) -> str:
        """The run directory ``save_dir/name/version``."""
        return self.tb.log_dir

    @property
    def version_name(self) -> str:
        """``version_N``, or the version string given."""
        return self.version if isinstance(self.version, str) else f"version_{self.version}"

    @property
    def display_name(self) -> str:
        """The wandb run's name: ``name/version_N``."""
        return f"{self.name}/{self.version_name}"

    @property
    def run_id(self) -> str:
        """The wandb run id: ``name-version-<hash of the absolute run directory>``; stable across restarts."""
        digest = hashlib.sha1(os.path.abspath(self.log_dir).encode()).hexdigest()[:8]
        return slug(f"{self.name}-{self.version_name}-{digest}")

    def ledger(self) -> StepLedger:
        """What was logged at which step in this run (made at first use, on rank 0: the only rank that writes)."""
        if self._ledger is None:
            self._ledger = StepLedger(self.log_dir, on_fault=self.on_ledger_fault)
        return self._ledger
