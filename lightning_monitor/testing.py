"""Tools to check a callback's cost: count host-device synchronisation points per training step.

Example::

    counter = HostSyncCounter(owners=CALLBACK_FILES)
    per_step = SyncsPerStep(counter)
    trainer = Trainer(callbacks=[per_step, GradientMonitor()], ...)
    with counter:
        trainer.fit(model)
    per_step.per_step   # {step: [(op, file, line, owner), ...]} for calls made from lightning_monitor code
"""

from __future__ import annotations

import inspect
import os
import sys
from collections.abc import Mapping, Sequence
from types import FrameType
from typing import Any, Optional

import lightning.pytorch as pl
import torch
from torch.overrides import TorchFunctionMode

#: Tensor methods that make the host wait for the device (or copy to the host) when the tensor lives on a GPU.
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")


def _callback_files() -> dict[str, tuple[str, ...]]:
    """Each callback in ``lightning_monitor.__all__`` -> the file of its module. A sync in a private helper
    (``_grad/stats.py``, ``_monitor/dist.py``, ...) is found to be the callback's by walking up the stack to that
    module, which is the only caller of its helpers, so a new monitor needs no entry here."""
    import lightning_monitor

    files: dict[str, tuple[str, ...]] = {}
    for name in lightning_monitor.__all__:
        obj = getattr(lightning_monitor, name)
        if isinstance(obj, type) and issubclass(obj, pl.Callback):
            files[name] = (os.path.basename(inspect.getfile(obj)),)
    return files


#: The module file of each of our callbacks, to say whose call a sync is (``HostSyncCounter(owners=...)``).
CALLBACK_FILES: dict[str, tuple[str, ...]] = _callback_files()
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP_DIRS = (os.path.dirname(torch.__file__), os.path.abspath(__file__))


class HostSyncCounter(TorchFunctionMode):
    """Counts sync-forcing tensor calls made from code under ``only_from`` (default: this package).

    Attribution walks up the stack to the first frame outside torch and this module; the call counts when that
    frame's file lies under one of ``only_from`` (``None`` counts every call, whoever makes it). With ``owners``
    (name -> file basenames, e.g. :data:`CALLBACK_FILES`) each counted call also gets the name of the first owner
    found further up the stack, in :attr:`owners` (``default_owner`` when none is).
    """

    def __init__(
        self,
        only_from: Optional[Sequence[str]] = (_PACKAGE_DIR,),
        owners: Optional[Mapping[str, Sequence[str]]] = None,
        default_owner: str = "-",
    ) -> None:
        super().__init__()
        self.only_from = None if only_from is None else tuple(os.path.abspath(p) for p in only_from)
        self.owner_files = owners
        self.default_owner = default_owner
        self.calls: list[tuple[str, str, int]] = []
        self.owners: list[str] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            frame: Optional[FrameType] = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_SKIP_DIRS):
                frame = frame.f_back
            filename = frame.f_code.co_filename if frame is not None else "?"
            if self.only_from is None or filename.startswith(self.only_from):
                self.calls.append((name, filename, frame.f_lineno if frame is not None else 0))
                if self.owner_files is not None:
                    self.owners.append(self._owner(frame))
        return func(*args, **(kwargs or {}))

    def _owner(self, frame: Any) -> str:
        while frame is not None:
            base = os.path.basename(frame.f_code.co_filename)
            for owner, files in (self.owner_files or {}).items():
                if base in files:
                    return owner
            frame = frame.f_back
        return self.default_owner

    def __len__(self) -> int:
        return len(self.calls)


class SyncsPerStep(pl.Callback):
    """Slices a :class:`HostSyncCounter`'s calls into training steps: from a batch's start to the next batch's
    start, the validation or the end of training, so every hook and logger call of a batch lands in its step.

    :attr:`per_step` maps ``trainer.global_step`` at the batch start to ``[(op, file, line, owner), ...]``. Place
    it first in the callback list.
    """

    def __init__(self, counter: HostSyncCounter) -> None:
        self.counter = counter
        self.per_step: dict[int, list[tuple[str, str, int, str]]] = {}
        self._open: Optional[tuple[int, int]] = None  # (step, len(counter) at its start)

    def _close(self) -> None:
        if self._open is not None:
            step, start = self._open
            owners = self.counter.owners[start:] if self.counter.owner_files is not None else []
            owners += [self.counter.default_owner] * (len(self.counter.calls) - start - len(owners))
            calls = self.counter.calls[start:]
            self.per_step[step] = [(*call, owner) for call, owner in zip(calls, owners, strict=True)]
            self._open = None

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._close()
        self._open = (trainer.global_step, len(self.counter.calls))

    def on_validation_start(self, trainer: Any, pl_module: Any) -> None:
        self._close()

    def on_train_end(self, trainer: Any, pl_module: Any) -> None:
        self._close()
