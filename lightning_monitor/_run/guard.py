"""Run-level guards of a MultiLogger: the run directory's lock and disk watch, a directory fault told once, a backend
that could not finish told once with where every backend's files are, and a key that both a monitor and the model
log at one step."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from typing import Any, Optional, Protocol

from lightning.pytorch.utilities import rank_zero_warn

from lightning_monitor._core.warn import WarnOnce
from lightning_monitor._run import disk as _disk
from lightning_monitor._run import lock as _run_lock
from lightning_monitor._run.run import Run


class RunFiles(Protocol):
    """A writer that keeps its files in the run directory (MultiLogger's TensorBoard and wandb writers)."""

    name: str
    failed: bool

    def keeps_after_loss(self) -> Optional[bool]:
        """What it still keeps when the run directory is lost: ``None`` when off or failed already, ``True`` when
        it keeps sending elsewhere (an online wandb run), ``False`` when it keeps nothing."""

    def lose_run_dir(self) -> None:
        """The run directory was deleted or its disk is full: stop writing (unless it keeps sending elsewhere)."""

    def local_files(self) -> Optional[str]:
        """Where its files of this run are on disk (for TensorBoard the run directory, for wandb the folder of the
        run it finished last, which ``wandb sync`` uploads), or ``None``."""


class RunGuard:
    """What a MultiLogger checks around its writes on rank 0 (the only rank that writes)."""

    def __init__(self, run: Run) -> None:
        self.run = run
        self.files: Sequence[RunFiles] = ()  # the writers keeping files in the run directory (:meth:`attach`)
        self.lock_pid: Optional[int] = None  # the process holding the run directory's lock through this logger
        self.disk: Optional[_disk.DiskWatch] = None
        self.fault_told = False
        self.monitor_keys: dict[str, Optional[int]] = {}  # key -> last step a monitor wrote it at
        self.model_keys: dict[str, Optional[int]] = {}  # key -> last step the model's self.log wrote it at
        self.from_model = False  # inside MultiLogger.log_metrics (Lightning's self.log path)
        self.clashes: set[str] = set()
        self.warn = WarnOnce()
        run.on_ledger_fault = self.ledger_fault

    def attach(self, files: Sequence[RunFiles]) -> None:
        """The writers that keep their files in the run directory: turned off when it is lost."""
        self.files = files

    def claim(self) -> None:
        """Hold the run directory's lock (:mod:`~lightning_monitor._run.lock`) from the first write until
        :meth:`release`, and look at its free space (a clock read; a ``statvfs`` every ``CHECK_EVERY_SEC``)."""
        if self.lock_pid != os.getpid():
            _run_lock.claim(self.run.log_dir, self)
            self.lock_pid = os.getpid()
            self.disk = self.disk or _disk.DiskWatch(self.run.log_dir)
        self.disk.check()  # type: ignore[union-attr]

    def release(self) -> None:
        if self.lock_pid == os.getpid():
            _run_lock.release(self.run.log_dir, self)  # the next write (``test`` after ``fit``) retakes it
            self.lock_pid = None

    def run_dir_fault(self, err: BaseException) -> Optional[str]:
        """When ``err`` means the run directory was deleted or its disk is full: turn off every writer that keeps
        its files there (TensorBoard, an offline or not yet started wandb run) and return the warning saying what is
        still kept (:func:`~lightning_monitor._run.disk.what_is_kept`); ``None`` for any other error."""
        kind = _disk.fault(self.run.log_dir, err)
        if kind is None:
            return None
        keeps = {writer.name: writer.keeps_after_loss() for writer in self.files}
        message = _disk.what_is_kept(self.run.log_dir, kind, keeps.get("TensorBoard") is not None,
                                     keeps.get("wandb"))
        for writer in self.files:
            writer.lose_run_dir()
        self.fault_told = True
        return message

    def finish_failed(self, status: str, failures: Sequence[tuple[str, BaseException]]) -> None:
        """Some writers could not finish the run (wandb's service crashing while it finishes, a disk failing at the
        last flush): one warning saying so and where every backend's files are, and nothing raised, so that ``fit``
        returns and whatever the script does next still runs."""
        failed = {name for name, _ in failures}
        told = "; ".join(f"{name} could not finish ({type(err).__name__}{f': {err}' if str(err) else ''})"
                         for name, err in failures)
        kept = []
        for writer in self.files:
            where = writer.local_files()
            if where is None:
                continue
            if writer.name == "wandb":
                kept.append(f"wandb's local copy of the run is in {where}: upload it with `wandb sync {where}`")
            elif writer.name in failed:
                kept.append(f"{writer.name}'s files are in {where}, perhaps without their last values")
            else:
                kept.append(f"{writer.name} has every value in {where}")
        message = f"MultiLogger.finalize({status!r}): {told}; nothing is raised for it"
        message += f", and the run's files stay on disk: {'; '.join(kept)}." if kept else "."
        self.warn(message, message)

    def ledger_fault(self, err: OSError) -> None:
        """The step ledger could not be written (it is written at every step, before TensorBoard's writer thread
        notices): warn once if the run directory is gone or full."""
        told = self.fault_told
        message = self.run_dir_fault(err)
        if message and not told:
            rank_zero_warn(message)

    def scalars_written(self, metrics: Mapping[str, Any], step: Optional[int]) -> None:
        """A writer wrote ``metrics``: note a monitor's keys (a dict write each), and say when the model's ``self.log``
        wrote one of them at this step already."""
        if not self.from_model:
            model = self.model_keys
            for key in metrics:
                self.monitor_keys[key] = step
                if key in model and model[key] == step:
                    self._clash(key, step)

    def model_scalars(self, metrics: Mapping[str, Any], step: Optional[int]) -> None:
        """Lightning's ``self.log`` values (written just before the monitors' of the same step, or after them when
        Lightning writes late): one warning per key that a monitor writes at the same step too (each backend would
        show two values there)."""
        for key in metrics:
            self.model_keys[key] = step
            if key in self.monitor_keys and self.monitor_keys[key] == step:
                self._clash(key, step)

    def _clash(self, key: str, step: Optional[int]) -> None:
        if key not in self.clashes:
            self.clashes.add(key)
            rank_zero_warn(
                f"{key!r} is logged both by a lightning-monitor callback and by the model (self.log) at step"
                f" {step}: each backend gets two values per step. Rename the model's key, or leave the monitor's"
                " out with its `exclude_keys` option."
            )
