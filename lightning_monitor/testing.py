"""Tools to check a callback's cost: count host-device synchronisation points per training step.

Example::

    with HostSyncCounter() as counter:
        trainer.fit(model)
    print(counter.calls)   # [(op name, file, line), ...] made from lightning_monitor code
"""

from __future__ import annotations

import os
import sys
from typing import Any, Optional, Sequence

import torch
from torch.overrides import TorchFunctionMode

#: Tensor methods that make the host wait for the device (or copy to the host) when the tensor lives on a GPU.
SYNC_METHODS = ("item", "tolist", "cpu", "numpy", "__bool__", "__float__", "__int__", "__index__")
_PACKAGE_DIR = os.path.dirname(os.path.abspath(__file__))
_SKIP_DIRS = (os.path.dirname(torch.__file__), os.path.abspath(__file__))


class HostSyncCounter(TorchFunctionMode):
    """Counts sync-forcing tensor calls made from code under ``only_from`` (default: this package).

    Attribution walks up the stack to the first frame outside torch and this module; the call counts when that
    frame's file lies under one of ``only_from`` (``None`` counts every call, whoever makes it).
    """

    def __init__(self, only_from: Optional[Sequence[str]] = (_PACKAGE_DIR,)) -> None:
        super().__init__()
        self.only_from = None if only_from is None else tuple(os.path.abspath(p) for p in only_from)
        self.calls: list[tuple[str, str, int]] = []

    def __torch_function__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        name = getattr(func, "__name__", "")
        if name in SYNC_METHODS:
            frame = sys._getframe(1)
            while frame is not None and frame.f_code.co_filename.startswith(_SKIP_DIRS):
                frame = frame.f_back
            filename = frame.f_code.co_filename if frame is not None else "?"
            if self.only_from is None or filename.startswith(self.only_from):
                self.calls.append((name, filename, frame.f_lineno if frame is not None else 0))
        return func(*args, **(kwargs or {}))

    def __len__(self) -> int:
        return len(self.calls)
