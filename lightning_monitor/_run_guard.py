"""Run-level guards of a MultiLogger: the run directory's lock and disk watch, a directory fault told once, and a
key that both a monitor and the model log at one step."""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any, Optional

from lightning.pytorch.utilities import rank_zero_warn

from lightning_monitor import _disk, _run_lock

if TYPE_CHECKING:
    from lightning_monitor.multi_logger import MultiLogger


class RunGuard:
    """What a MultiLogger checks around its writes on rank 0 (the only rank that writes)."""

    def __init__(self, multi: "MultiLogger") -> None:
        self.multi = multi
        self.lock_pid: Optional[int] = None  # the process holding the run directory's lock through this logger
        self.disk: Optional[_disk.DiskWatch] = None
        self.fault_told = False
        self.monitor_keys: dict[str, Optional[int]] = {}  # key -> last step a monitor wrote it at
        self.from_model = False  # inside MultiLogger.log_metrics (Lightning's self.log path)
        self.clashes: set[str] = set()

    def claim(self) -> None:
        """Hold the run directory's lock (:mod:`~lightning_monitor._run_lock`) from the first write until
        :meth:`release`, and look at its free space (a clock read; a ``statvfs`` every ``CHECK_EVERY_SEC``)."""
        if self.lock_pid != os.getpid():
            _run_lock.claim(self.multi.log_dir, self.multi)
            self.lock_pid = os.getpid()
            self.disk = self.disk or _disk.DiskWatch(self.multi.log_dir)
        self.disk.check()  # type: ignore[union-attr]

    def release(self) -> None:
        if self.lock_pid == os.getpid():
            _run_lock.release(self.multi.log_dir, self.multi)  # the next write (``test`` after ``fit``) retakes it
            self.lock_pid = None

    def run_dir_fault(self, err: BaseException) -> Optional[str]:
        """The warning when ``err`` means the run directory was deleted or its disk is full (every backend keeping
        its files there is turned off: :func:`~lightning_monitor._disk.run_dir_fault`); ``None`` otherwise."""
        message = _disk.run_dir_fault(self.multi, err)
        self.fault_told = self.fault_told or message is not None
        return message

    def ledger_fault(self, err: OSError) -> None:
        """The step ledger could not be written (it is written at every step, before TensorBoard's writer thread
        notices): warn once if the run directory is gone or full."""
        told = self.fault_told
        message = self.run_dir_fault(err)
        if message and not told:
            rank_zero_warn(message)

    def scalars_written(self, metrics: Mapping[str, Any], step: Optional[int]) -> None:
        """A writer wrote ``metrics``: note a monitor's keys (a dict write each)."""
        if not self.from_model:
            for key in metrics:
                self.monitor_keys[key] = step

    def model_scalars(self, metrics: Mapping[str, Any], step: Optional[int]) -> None:
        """Lightning's ``self.log`` values, flushed after the monitors' at the same step: one warning per key that a
        monitor already wrote at this step (each backend would show two values there)."""
        for key in metrics:
            if key in self.monitor_keys and self.monitor_keys[key] == step and key not in self.clashes:
                self.clashes.add(key)
                rank_zero_warn(
                    f"{key!r} is logged both by a lightning-monitor callback and by the model (self.log) at step"
                    f" {step}: each backend gets two values per step. Rename the model's key, or leave the monitor's"
                    " out with its `exclude_keys` option."
                )
