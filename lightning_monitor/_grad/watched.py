"""The parameters GradientMonitor watches: read once a fit, at its first optimizer step (after ``configure_model``),
with their names, groups and what the caps keep; the parameters of each optimizer; and the norm values of a logging
step made from them."""

from __future__ import annotations

import fnmatch
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch

from lightning_monitor._grad import groups as _grad_groups
from lightning_monitor._grad.event import Measured

_EMPTY = np.zeros(0, dtype=np.int64)


@dataclass(frozen=True)
class Selection:
    """GradientMonitor's options that say which parameters get which keys (made from them once)."""

    group_depth: int
    group_patterns: dict[str, list[str]]
    include: Optional[list[str]]
    exclude: list[str]
    max_histograms: Optional[int]
    max_param_keys: Optional[int]
    param_select: str
    histograms: bool  # any histograms (gradients or weights): the histogram cap is worth a warning
    per_param_norms: bool

    def selected(self, name: str) -> bool:
        """Whether ``name`` passes ``include`` / ``exclude`` (histograms and per-parameter norms)."""
        included = self.include is None or any(fnmatch.fnmatchcase(name, g) for g in self.include)
        return included and not any(fnmatch.fnmatchcase(name, g) for g in self.exclude)


@dataclass
class Norms:
    """The host values of a logging batch's optimizer steps, one row per watched parameter."""

    have: Optional[np.ndarray]  # [P] parameters with values; None: every one (one optimizer stepped them all)
    sq: np.ndarray  # [P] squared gradient norms
    nonfinite: np.ndarray  # [P] NaN/Inf elements
    wsq: Optional[np.ndarray]  # [P] squared weight norms, when measured
    total: float  # the sum of ``sq`` over ``have``


class Watched:
    """One model's parameters as GradientMonitor sees them (empty until :meth:`read`)."""

    def __init__(self) -> None:
        self.names: list[str] = []
        self.params: list[torch.nn.Parameter] = []
        self.prefix = ""  # module path of the first level with more than one child (groups.wrapper_prefix)
        self.gid = _EMPTY  # [P] group id per parameter, -1 for none
        self.group_names: list[str] = []
        self.plan = _grad_groups.GroupPlan([], _EMPTY)  # the groups' norms
        self.hist_mask = np.zeros(0, dtype=bool)  # [P] histogram logged (selected, within the cap)
        self.norm_mask = np.zeros(0, dtype=bool)  # [P] per-parameter norm logged
        self.nonempty = np.zeros(0, dtype=bool)
        self._norm_chosen: list[int] = []  # the parameters with a per-parameter norm key, and their keys
        self._norm_keys: list[str] = []
        #: id(optimizer) -> (its number, indices of its parameters, the parameters)
        self._optimizers: dict[int, tuple[int, np.ndarray, list[torch.nn.Parameter]]] = {}

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "params": [], "_optimizers": {}}  # tensors stay behind (ddp_spawn pickles callbacks)

    def group_of(self, name: str, selection: Selection) -> Optional[str]:
        """The group of parameter ``name`` (``groups.group_of`` below this model's single-child wrappers)."""
        return _grad_groups.group_of(name, self.prefix, selection.group_depth, selection.group_patterns)

    def read(self, pl_module: "pl.LightningModule", selection: Selection, warn: Callable[[str, str], Any]) -> None:
        """Read the parameter list (frozen parameters included, so that a later unfreeze shows), its groups and which
        parameters the caps keep; ``warn(tag, message)`` says once what a cap leaves out."""
        named = list(pl_module.named_parameters())
        self.names = [_grad_groups.model_name(n) for n, _ in named]  # compiled or not, the same keys
        self.params = [p for _, p in named]
        self.prefix = _grad_groups.model_name(_grad_groups.wrapper_prefix(pl_module))
        self._optimizers = {}
        groups = [self.group_of(n, selection) for n in self.names]
        self.group_names = list(dict.fromkeys(g for g in groups if g is not None))
        where = {g: k for k, g in enumerate(self.group_names)}
        gid = np.array([-1 if g is None else where[g] for g in groups], dtype=np.int64)
        numels = [p.numel() for p in self.params]
        sizes = np.bincount(gid[gid >= 0], weights=np.array(numels)[gid >= 0], minlength=len(self.group_names))
        grouped = selection.group_depth > 0 or bool(selection.group_patterns)
        kept = _cap(np.arange(len(self.group_names)), sizes.tolist(), selection.max_param_keys, "group norms",
                    "max_param_keys", grouped, selection, warn)
        self.gid = np.where(kept[np.maximum(gid, 0)], gid, -1)  # groups over the cap: no key
        self.nonempty = np.array(numels, dtype=np.int64) > 0
        chosen = np.flatnonzero(np.array([selection.selected(n) for n in self.names], dtype=bool) & self.nonempty)
        self.hist_mask = _cap(chosen, numels, selection.max_histograms, "histograms", "max_histograms",
                              selection.histograms, selection, warn)
        self.norm_mask = _cap(chosen, numels, selection.max_param_keys, "per-parameter norms", "max_param_keys",
                              selection.per_param_norms, selection, warn)
        self._norm_chosen = np.flatnonzero(self.norm_mask).tolist()
        self._norm_keys = [f"grad/norm_param/{self.names[i]}" for i in self._norm_chosen]
        self.plan = _grad_groups.GroupPlan(self.group_names, self.gid)

    def optimizer(self, trainer: "pl.Trainer", optimizer: torch.optim.Optimizer
                  ) -> tuple[int, np.ndarray, list[torch.nn.Parameter]]:
        """(the optimizer's index in ``trainer.optimizers``, indices of the parameters it steps, those parameters)."""
        key = id(optimizer)
        if key not in self._optimizers:
            where = {id(p): i for i, p in enumerate(self.params)}
            ids = sorted({where[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in where})
            number = next((k for k, o in enumerate(trainer.optimizers) if o is optimizer), len(self._optimizers))
            self._optimizers[key] = (number, np.array(ids, dtype=np.int64), [self.params[i] for i in ids])
        return self._optimizers[key]

    def gather(self, measured: Sequence[Measured]) -> Norms:
        """The optimizers' steps of a logging batch as one row per parameter (their host arrays as they are when one
        optimizer stepped every parameter)."""
        n = len(self.params)
        if len(measured) == 1 and measured[0].present.size == n:
            m = measured[0]
            return Norms(None, m.sq, m.nonfinite, m.wsq, m.total)  # type: ignore[arg-type]
        have, sq, nonfinite = np.zeros(n, dtype=bool), np.zeros(n), np.zeros(n)
        wsq = np.zeros(n) if all(m.wsq is not None for m in measured) else None
        for m in measured:
            have[m.present], sq[m.present], nonfinite[m.present] = True, m.sq, m.nonfinite
            if wsq is not None and m.wsq is not None:
                wsq[m.present] = m.wsq
        return Norms(have, sq, nonfinite, wsq, float(sq[have].sum()))

    def norm_metrics(self, norms: Norms, per_param_norms: bool, param_norms: bool) -> dict[str, float]:
        """``grad/norm_total``, ``grad/norm/{group}``, ``grad/norm_param/{name}`` (``per_param_norms``) and
        ``param/norm*`` (``param_norms``, when the weights were measured). Every parameter (the common case): plain
        Python over the host values, no numpy call on small arrays."""
        have = norms.have
        values_sq = norms.sq.tolist() if have is None else None
        metrics: dict[str, float] = {"grad/norm_total": math.sqrt(norms.total)}
        metrics.update(self.plan.norms("grad/norm", have, norms.sq if values_sq is None else values_sq))
        if per_param_norms:
            if values_sq is not None:
                metrics.update(zip(self._norm_keys, [math.sqrt(values_sq[i]) for i in self._norm_chosen], strict=True))
            else:
                chosen = np.flatnonzero(have & self.norm_mask).tolist()
                root = np.sqrt(norms.sq[chosen]).tolist()
                metrics.update({f"grad/norm_param/{self.names[i]}": v for i, v in zip(chosen, root, strict=True)})
        wsq = norms.wsq
        if param_norms and wsq is not None:
            values_wsq = wsq.tolist() if have is None else None
            metrics["param/norm_total"] = math.sqrt(sum(values_wsq) if values_wsq is not None
                                                    else float(wsq[have].sum()))
            metrics.update(self.plan.norms("param/norm", have, wsq if values_wsq is None else values_wsq))
        return metrics

    def nonfinite_now(self, norms: Norms) -> np.ndarray:
        """The parameters whose gradient held NaN/Inf at the logged step."""
        if math.isfinite(norms.total):
            return _EMPTY
        bad = ~np.isfinite(norms.sq)
        return np.flatnonzero(bad if norms.have is None else norms.have & bad)


def _cap(chosen: np.ndarray, numels: list[int], cap: Optional[int], what: str, option: str, used: bool,
         selection: Selection, warn: Callable[[str, str], Any]) -> np.ndarray:
    """A mask of the ``chosen`` indices ``cap`` keeps (``param_select``), said once when ``used`` and it leaves
    some out."""
    kept = _grad_groups.pick(chosen, numels, cap, selection.param_select)
    if used and kept.size < chosen.size:
        warn(f"cap:{option}:{what}", (
            f"GradientMonitor: {chosen.size} {'groups' if what == 'group norms' else 'parameters'} selected for"
            f" {what}, logging {kept.size} per logging step"
            f" ({option}={cap}, chosen by param_select={selection.param_select!r}); raise {option} (None: no cap)"
            " or narrow include/exclude to choose others."
        ))
    mask = np.zeros(len(numels), dtype=bool)
    mask[kept] = True
    return mask
