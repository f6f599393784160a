"""ActivationMonitor's module choice: by type and name globs, below no compiled region, capped evenly over the model."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Optional

import numpy as np
from torch import nn

from lightning_monitor._core.compat import COMPILED_MODULE_ATTRIBUTE, compiled_in_place


def model_name(name: str) -> str:
    """A module path as the user's model names it, without ``torch.compile``'s wrapper segment (``_orig_mod``)."""
    return ".".join(p for p in name.split(".") if p != COMPILED_MODULE_ATTRIBUTE)


def _compiled_paths(model: nn.Module) -> list[str]:
    """Module paths (``""``: the model itself) under which Dynamo traces the forward."""
    out = []
    for name, module in model.named_modules():
        if compiled_in_place(module) or type(module).__name__ == "OptimizedModule":
            out.append(name)
    return out


def _below(name: str, roots: Sequence[str]) -> bool:
    return any(r == "" or name == r or name.startswith(r + ".") for r in roots)


def choose(model: nn.Module, types: Optional[Sequence[str]], include: Optional[Sequence[str]],
           exclude: Sequence[str]) -> tuple[list[tuple[str, nn.Module]], list[str]]:
    """``([(key name, module)] chosen, [names left out because they run compiled])``.

    Candidates: modules whose class name is in ``types``; without ``types``, every module matching ``include``; with
    neither, the leaf modules that hold parameters. Then ``include`` / ``exclude`` globs over the names.
    """
    compiled = _compiled_paths(model)
    chosen: list[tuple[str, nn.Module]] = []
    skipped: list[str] = []
    for name, module in model.named_modules():
        if not name:
            continue
        key = model_name(name)
        if types is not None:
            candidate = type(module).__name__ in types
        elif include is not None:
            candidate = True
        else:
            candidate = not any(True for _ in module.children()) and any(True for _ in module.parameters(False))
        if not candidate or type(module).__name__ == "OptimizedModule":
            continue
        if include is not None and not any(fnmatch.fnmatchcase(key, g) for g in include):
            continue
        if any(fnmatch.fnmatchcase(key, g) for g in exclude):
            continue
        if _below(name, compiled) or COMPILED_MODULE_ATTRIBUTE in name.split("."):
            skipped.append(key)
            continue
        chosen.append((key, module))
    return chosen, skipped


def spread(count: int, cap: Optional[int]) -> np.ndarray:
    """Indices of at most ``cap`` of ``count`` items, evenly spaced, first and last included."""
    if cap is None or count <= cap:
        return np.arange(count)
    if cap == 1:
        return np.zeros(1, dtype=np.int64)
    return np.unique(np.round(np.linspace(0, count - 1, cap)).astype(np.int64))
