"""GradientMonitor's parameter bookkeeping: default groups below single-child wrappers, capped per-parameter picks."""

from __future__ import annotations

import fnmatch
import functools
import math
from collections.abc import Sequence
from typing import Literal, Optional, Union

import numpy as np
from torch import nn

from lightning_monitor._core.compat import COMPILED_MODULE_ATTRIBUTE

ParamSelect = Literal["spread", "first", "largest"]
SELECTS = ("spread", "first", "largest")


def model_name(name: str) -> str:
    """A parameter or module path as the user's model names it: without ``torch.compile``'s wrapper segment, wherever
    it sits (``net._orig_mod.1.weight`` is ``net.1.weight``), so a model logs the same keys compiled and not."""
    parts = name.split(".")
    return ".".join(p for p in parts if p != COMPILED_MODULE_ATTRIBUTE) if COMPILED_MODULE_ATTRIBUTE in parts else name


def wrapper_prefix(module: nn.Module) -> str:
    """The module path of the first level below ``module`` with more than one child that holds parameters.

    Single-child wrappers (``self.net = nn.Sequential(...)``, ``self.model = Wrapper(inner=...)``) are descended
    through, so that the groups they hold are told apart: for ``self.model = Wrapper(inner=nn.Sequential(a, b))``
    the prefix is ``"model.inner"``. A parameter that sits on a module itself counts as one of its children, and
    children without parameters (a loss module, a metric) do not count. ``""`` when ``module`` itself branches.
    """
    path: list[str] = []
    while True:
        if any(True for _ in module.named_parameters(recurse=False)):
            break
        holders = [(name, child) for name, child in module.named_children()
                   if any(True for _ in child.parameters())]
        if len(holders) != 1:
            break
        name, module = holders[0]
        path.append(name)
    return ".".join(path)


def group_of(name: str, prefix: str, depth: int, patterns: dict[str, list[str]]) -> Optional[str]:
    """The group of parameter ``name``: the first matching ``patterns`` entry, else its module path cut to ``depth``
    levels below ``prefix`` (the parameter's own name when it sits directly on that level); ``None`` at depth 0."""
    for group, globs in patterns.items():
        if any(fnmatch.fnmatchcase(name, g) for g in globs):
            return group
    if depth == 0:
        return None
    parts = name.split(".")
    skip = len(prefix.split(".")) if prefix and name.startswith(prefix + ".") else 0
    cut = min(skip + depth, len(parts) - 1)
    return ".".join(parts[:cut]) if cut > skip else name


def pick(candidates: np.ndarray, numels: Sequence[int], cap: Optional[int], how: str) -> np.ndarray:
    """At most ``cap`` of ``candidates`` (indices in model order), chosen deterministically, in model order.

    ``"spread"``: evenly spaced over the model's order (the first and the last parameter included); ``"first"``:
    the first ``cap``; ``"largest"``: the ``cap`` with most elements (ties: model order).
    """
    if cap is None or candidates.size <= cap:
        return candidates
    if cap == 0:
        return candidates[:0]
    if how == "first":
        return candidates[:cap]
    if how == "largest":
        sizes = np.array([numels[i] for i in candidates])
        order = np.argsort(-sizes, kind="stable")[:cap]
        return candidates[np.sort(order)]
    positions = np.unique(np.round(np.linspace(0, candidates.size - 1, cap)).astype(np.int64))
    return candidates[positions]


def group_norms(prefix: str, group_names: Sequence[str], gid: np.ndarray, have: np.ndarray, sq: np.ndarray
                ) -> dict[str, float]:
    """``{prefix/group: sqrt(sum of sq)}`` over the parameters in ``have`` (``gid``: group per parameter, -1: none)."""
    use = have & (gid >= 0)
    ids = gid[use]
    if not ids.size:
        return {}
    size = len(group_names)
    sums = np.sqrt(np.bincount(ids, weights=sq[use], minlength=size)).tolist()
    keys = _keys(prefix, tuple(group_names))
    return {keys[g]: sums[g] for g in np.unique(ids).tolist()}


class GroupPlan:
    """One model's groups (``gid``: group per parameter, -1: none) with what :func:`group_norms` derives from them
    at every logging step made once. A step where every parameter has a value is summed in plain Python: a few
    additions per parameter, where each numpy call on a small array costs ~10 us run cold after a training step."""

    def __init__(self, group_names: Sequence[str], gid: np.ndarray) -> None:
        self.names, self.gid = tuple(group_names), gid
        members: dict[int, list[int]] = {}
        for i, g in enumerate(gid.tolist()):
            if g >= 0:
                members.setdefault(g, []).append(i)
        self._members = sorted(members.items())  # (group, its parameters) for the groups that hold any

    def norms(self, prefix: str, have: Optional[np.ndarray], sq: Union[np.ndarray, Sequence[float]]
              ) -> dict[str, float]:
        """:func:`group_norms` of ``sq``; ``have=None``: every parameter has a value (``sq`` may then be a list)."""
        if have is not None:
            return group_norms(prefix, self.names, self.gid, have, np.asarray(sq))
        values = sq.tolist() if isinstance(sq, np.ndarray) else sq
        keys = _keys(prefix, self.names)
        return {keys[g]: math.sqrt(sum([values[i] for i in members])) for g, members in self._members}


@functools.lru_cache(maxsize=16)
def _keys(prefix: str, group_names: tuple[str, ...]) -> list[str]:
    """``prefix/group`` for every group (made once per prefix and model)."""
    return [f"{prefix}/{name}" for name in group_names]
