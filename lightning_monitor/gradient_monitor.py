"""GradientMonitor: gradient norms, on-device histograms to every dashboard, NaN/Inf detection."""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from typing_extensions import override

from lightning_monitor import _grad_nonfinite
from lightning_monitor._grad_stats import STAT_COLUMNS, host_histogram, squared_norms, summarize, summarize_finite
from lightning_monitor._keys import document_keys
from lightning_monitor._media import make_histogram
from lightning_monitor._monitor import Monitor

_POLICIES = ("warn", "raise", "skip")


@document_keys
class GradientMonitor(Monitor):
    """Gradient norms (total, per module group, per parameter), histograms and NaN/Inf detection.

    Runs in ``on_before_optimizer_step``: once per optimizer step (gradient accumulation respected), after AMP
    unscaling and after the DDP all-reduce, before gradient clipping. Every ``every_n_steps`` optimizer steps
    (default: the trainer's ``log_every_n_steps``) it logs, on global rank 0, to every logger the trainer has:

    {logged_keys}

    Groups are module paths cut to ``group_depth`` (``1``: the model's top-level children; a parameter that
    sits on the LightningModule itself is its own group), unless a ``group_patterns`` glob claims it first.
    ``grad/nonfinite/{name}`` appears for a parameter once it has had NaN/Inf and stays (0 when clean again).

    Cost: between logging steps the only work is one ``torch._foreach_norm`` over all gradients, accumulated on
    the device (no host sync) so that NaN/Inf on any step is counted. A logging step makes one packed host
    transfer (a second one only when it found NaN/Inf, and a second with ``update_ratio``, read after the
    optimizer step). Histograms are binned on the gradient's device: exact ``min``/``max``/``sum``/
    ``sum_squares`` over the full tensor, bin counts over at most ``max_hist_elements`` elements taken with a
    deterministic prime stride and scaled to the element count; NaN/Inf never reach a histogram.
    ``nonfinite="raise"`` or ``"skip"`` must read the NaN/Inf flags on the host at EVERY optimizer step: one
    small device-to-host copy per step, which on a GPU waits for the backward pass to finish (the CPU can no
    longer queue ahead), typically costing a few percent of step time.

    Args:
        every_n_steps: log every n optimizer steps; ``None`` uses ``trainer.log_every_n_steps``.
        group_depth: module-path depth that defines a group (0: no group norms).
        group_patterns: ``{group: glob or [globs]}`` over parameter names, checked before ``group_depth``.
        per_param_norms: also log one norm per parameter (of those selected by ``include``/``exclude``).
        param_norms: also log weight norms per group.
        update_ratio: also log ||delta w|| / ||w|| per group (snapshots the weights on logging steps only).
        histograms: log gradient histograms (of those selected by ``include``/``exclude``).
        param_histograms: log weight histograms too.
        bins: histogram bins (1..512).
        hist_range: ``"minmax"`` (the tensor's finite min..max), ``"symmetric"`` (-max|x|..max|x|) or a fixed
            ``[lo, hi]`` (values outside fall into the edge bins).
        max_hist_elements: bin at most this many elements per tensor; ``None`` bins every element.
        include: globs over parameter names for histograms and per-parameter norms (default: all).
        exclude: globs over parameter names removed from histograms and per-parameter norms.
        nonfinite: ``"warn"`` (count, log, warn once), ``"raise"`` (raise ``FloatingPointError`` naming the
            parameters) or ``"skip"`` (drop all gradients of that optimizer step so no weight, momentum or
            weight decay changes; training continues). Under ``precision="16-mixed"`` the GradScaler's own overflow
            steps (which it skips itself) show up here as non-finite gradients, so ``"raise"`` would stop fp16 AMP
            training in its first steps: keep ``"warn"`` there.
        exclude_keys: globs over the keys this monitor logs, left out of every backend (e.g. ``["grad/hist/*"]``
            drops a whole family, ``["memory/host/available_gib"]`` one key).

    Raises:
        ValueError: for a bad argument, echoing it.
        MisconfigurationException: in ``setup`` when the trainer has no logger (under ``nonfinite="warn"``: the
            other policies act without one) or shards gradients (FSDP, DeepSpeed, model parallel), where local
            gradients are not the full gradients.

    Example::

        trainer = Trainer(logger=MultiLogger(), callbacks=[GradientMonitor(every_n_steps=50, update_ratio=True)])
    """

    LOGGED_KEYS = {
        "grad/norm_total": "L2 norm of all gradients together",
        "grad/norm/{group}": "L2 norm of the gradients of one module group",
        "grad/norm_param/{name}": "L2 norm of one parameter's gradient (``per_param_norms=True``)",
        "grad/hist/{name}": "histogram of one parameter's gradient (``histograms=True``)",
        "grad/nonfinite_count": "NaN/Inf elements in all gradients at this step",
        "grad/nonfinite_steps": "optimizer steps since the last logging step with any NaN/Inf",
        "grad/nonfinite/{name}": "NaN/Inf elements in one parameter's gradient (offenders only)",
        "param/norm_total": "L2 norm of the stepped weights before the step (``param_norms``)",
        "param/norm/{group}": "L2 norm of one group's stepped weights before the step",
        "param/hist/{name}": "histogram of one parameter's weights (``param_histograms=True``)",
        "param/update_ratio_total": "||w_after - w_before|| / ||w_before|| of all weights (``update_ratio``)",
        "param/update_ratio/{group}": "the same ratio for one module group (``update_ratio=True``)",
    }
    SHARDED_UNSUPPORTED = "needs full gradients on every rank"

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        *,
        group_depth: int = 1,
        group_patterns: Optional[dict[str, Union[str, list[str]]]] = None,
        per_param_norms: bool = False,
        param_norms: bool = False,
        update_ratio: bool = False,
        histograms: bool = True,
        param_histograms: bool = False,
        bins: int = 64,
        hist_range: Union[Literal["minmax", "symmetric"], tuple[float, float]] = "minmax",
        max_hist_elements: Optional[int] = 16384,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        nonfinite: Literal["warn", "raise", "skip"] = "warn",
        exclude_keys: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(every_n_steps, exclude_keys)
        if group_depth < 0:
            raise ValueError(f"`group_depth` must be >= 0, got {group_depth!r}")
        if not 1 <= bins <= 512:
            raise ValueError(f"`bins` must be in 1..512 (wandb's limit), got {bins!r}")
        if max_hist_elements is not None and max_hist_elements < 1:
            raise ValueError(f"`max_hist_elements` must be >= 1 or None, got {max_hist_elements!r}")
        if nonfinite not in _POLICIES:
            raise ValueError(f"`nonfinite` must be one of {_POLICIES}, got {nonfinite!r}")
        if isinstance(hist_range, str):
            if hist_range not in ("minmax", "symmetric"):
                raise ValueError(f"`hist_range` must be 'minmax', 'symmetric' or [lo, hi], got {hist_range!r}")
        elif len(hist_range) != 2 or not float(hist_range[0]) < float(hist_range[1]):
            raise ValueError(f"`hist_range` as [lo, hi] needs lo < hi, got {hist_range!r}")
        else:
            hist_range = (float(hist_range[0]), float(hist_range[1]))
        patterns = {g: [p] if isinstance(p, str) else list(p) for g, p in (group_patterns or {}).items()}
        self.group_depth = group_depth
        self.group_patterns = patterns
        self.per_param_norms = per_param_norms
        self.param_norms = param_norms
        self.update_ratio = update_ratio
        self.histograms = histograms
        self.param_histograms = param_histograms
        self.bins = bins
        self.hist_range = hist_range
        self.max_hist_elements = max_hist_elements
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.nonfinite = nonfinite
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._names: list[str] = []
        self._params: list[torch.nn.Parameter] = []
        self._groups: list[Optional[str]] = []
        self._selected: list[bool] = []
        self._nonfinite = _grad_nonfinite.NonfiniteLedger()
        self._snapshot: Optional[tuple[int, list[int], list[torch.Tensor], np.ndarray]] = None
        self._opt_index: dict[int, list[int]] = {}  # id(optimizer) -> indices of the parameters it steps

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_params"], state["_snapshot"] = [], None  # tensors stay behind (ddp_spawn pickles callbacks)
        return state

    def group_of(self, name: str) -> Optional[str]:
        """The group of parameter ``name``: the first matching ``group_patterns`` entry, else its module prefix."""
        for group, globs in self.group_patterns.items():
            if any(fnmatch.fnmatchcase(name, g) for g in globs):
                return group
        if self.group_depth == 0:
            return None
        parts = name.split(".")
        return ".".join(parts[: min(self.group_depth, len(parts) - 1)]) or name

    def _is_selected(self, name: str) -> bool:
        included = self.include is None or any(fnmatch.fnmatchcase(name, g) for g in self.include)
        return included and not any(fnmatch.fnmatchcase(name, g) for g in self.exclude)

    def _needs_logger(self) -> bool:
        return self.nonfinite == "warn"  # raise/skip act on NaN/Inf without a logger

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._reset_runtime()

    def _index(self, pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer) -> list[int]:
        """Indices (into ``self._params``) of the parameters ``optimizer`` steps. The parameter list is read at the
        first optimizer step, after ``configure_model``; frozen parameters are included (a later unfreeze shows)."""
        if not self._params:
            named = list(pl_module.named_parameters())
            self._names = [n for n, _ in named]
            self._params = [p for _, p in named]
            self._groups = [self.group_of(n) for n in self._names]
            self._selected = [self._is_selected(n) for n in self._names]
        key = id(optimizer)
        if key not in self._opt_index:  # several optimizers (manual optimization): each logs its own parameters
            where = {id(p): i for i, p in enumerate(self._params)}
            ids = [where[id(p)] for group in optimizer.param_groups for p in group["params"] if id(p) in where]
            self._opt_index[key] = sorted(set(ids))
        return self._opt_index[key]

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        present = tuple(i for i in self._index(pl_module, optimizer) if self._params[i].grad is not None)
        if not present:
            return
        step = trainer.global_step
        grads = [g for g in (self._params[i].grad for i in present) if g is not None]  # one per present index
        sq = squared_norms(grads)  # [P]: one pass over all gradients
        if trainer.is_global_zero and self._logs_at(trainer, step):
            self._log_step(trainer, optimizer, step, present, grads, sq)
        elif self.nonfinite == "warn":
            self._nonfinite.queue(present, sq)  # queued on the device; read at the next logging step
        else:
            bad = self._nonfinite.count(present, sq)
            if bad:
                _grad_nonfinite.act(self.nonfinite, bad, self._params, self._names, optimizer, step)

    def _log_step(
        self,
        trainer: "pl.Trainer",
        optimizer: Any,
        step: int,
        present: tuple[int, ...],
        grads: list[torch.Tensor],
        sq: torch.Tensor,
    ) -> None:
        bins, params = self.bins, [self._params[i] for i in present]
        hist_idx = [j for j, i in enumerate(present) if self._selected[i] and grads[j].numel() > 0]
        parts = [sq]
        if self.histograms and hist_idx:
            parts.append(summarize([grads[j] for j in hist_idx], [sq[j] for j in hist_idx], bins,
                                   self.max_hist_elements, self.hist_range).reshape(-1))
        pidx = [j for j in hist_idx if params[j].numel() > 0]
        want_wsq = self.param_norms or self.update_ratio or self.param_histograms
        if want_wsq:
            wsq = squared_norms([p.detach() for p in params])
            parts.append(wsq)
            if self.param_histograms and pidx:
                parts.append(summarize([params[j] for j in pidx], [wsq[j] for j in pidx], bins,
                                       self.max_hist_elements, self.hist_range).reshape(-1))
        parts.extend(self._nonfinite.pending())
        host = np.array(torch.cat([p.reshape(-1).double() for p in parts]).tolist())  # sync point: one per logging step

        n, width = len(present), STAT_COLUMNS + bins
        host_sq, off = host[:n], n
        grad_rows: Optional[np.ndarray] = None
        wsq_host: Optional[np.ndarray] = None
        param_rows: Optional[np.ndarray] = None
        if self.histograms and hist_idx:
            grad_rows, off = host[off : off + len(hist_idx) * width].reshape(-1, width), off + len(hist_idx) * width
        if want_wsq:
            wsq_host, off = host[off : off + n], off + n
            if self.param_histograms and pidx:
                param_rows = host[off : off + len(pidx) * width].reshape(-1, width)
                off += len(pidx) * width
        bad_steps, any_steps = self._nonfinite.read(host[off:])
        bad_now = [j for j in range(n) if not np.isfinite(host_sq[j])]

        metrics: dict[str, float] = {"grad/norm_total": float(np.sqrt(host_sq.sum()))}
        metrics.update(self._group_norms("grad/norm", present, host_sq))
        if self.per_param_norms:
            metrics.update({f"grad/norm_param/{self._names[i]}": float(np.sqrt(host_sq[j]))
                            for j, i in enumerate(present) if self._selected[i]})
        if self.param_norms and wsq_host is not None:
            metrics["param/norm_total"] = float(np.sqrt(wsq_host.sum()))
            metrics.update(self._group_norms("param/norm", present, wsq_host))

        # NaN/Inf: exact counts and finite-only histograms, read in a second transfer (only when there are any)
        nonfinite = np.zeros(n)
        if bad_now:
            counts, rows = summarize_finite([grads[j] for j in bad_now], bins, self.max_hist_elements, self.hist_range)
            packed = np.array(torch.cat([counts, rows.reshape(-1)]).tolist())  # sync point: only with NaN/Inf present
            nonfinite[bad_now] = packed[: len(bad_now)]
            fixed = packed[len(bad_now) :].reshape(len(bad_now), width)
            if grad_rows is not None:
                row_of = {j: r for r, j in enumerate(hist_idx)}
                for b, j in enumerate(bad_now):
                    if j in row_of:
                        grad_rows[row_of[j]] = fixed[b]
        values, offenders = self._nonfinite.report(self._names, present, nonfinite, bad_now, bad_steps, any_steps)
        metrics.update(values)
        if offenders:
            names = ", ".join(sorted(offenders)[: _grad_nonfinite.MAX_NAMED])
            self._warn("nonfinite", (
                f"GradientMonitor: NaN/Inf gradients by step {step} in {names}"
                f"{' and more' if len(offenders) > _grad_nonfinite.MAX_NAMED else ''}; counted under grad/nonfinite_*"
                f" (policy {self.nonfinite!r}, warned once)."
            ))

        self._log_scalars(trainer, metrics, step)
        hists = {}
        for host_rows, idx, area in ((grad_rows, hist_idx, "grad"), (param_rows, pidx, "param")):
            if host_rows is None:
                continue
            for row, j in zip(host_rows, idx, strict=True):
                if not np.all(np.isfinite(row[:STAT_COLUMNS])) or row[4] <= 0:
                    continue  # no finite element at all, or non-finite weights (counted via the gradients)
                key = f"{area}/hist/{self._names[present[j]]}"
                hist_counts, edges, stats = host_histogram(row, bins)
                hists[key] = make_histogram(hist_counts, edges, key=key, stats=stats)
        self._log_histograms(trainer, hists, step)  # one wandb row for all of them
        if self.nonfinite != "warn" and bad_now:
            bad = [present[j] for j in bad_now]  # acted on after logging what we saw
            _grad_nonfinite.act(self.nonfinite, bad, self._params, self._names, optimizer, step)
        if self.update_ratio and wsq_host is not None:
            self._snapshot = (step, list(present), [p.detach().clone() for p in params], wsq_host)

    def _group_norms(self, prefix: str, present: tuple[int, ...], sq: np.ndarray) -> dict[str, float]:
        sums: dict[str, float] = {}
        for j, i in enumerate(present):
            group = self._groups[i]
            if group is not None:
                sums[group] = sums.get(group, 0.0) + float(sq[j])
        return {f"{prefix}/{g}": float(np.sqrt(v)) for g, v in sums.items()}

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._snapshot is None:
            return
        step, present, before, wsq = self._snapshot
        self._snapshot = None
        after = [self._params[i].detach() for i in present]
        # sync point: logging steps with update_ratio only
        dsq = np.array(squared_norms(torch._foreach_sub(after, before)).tolist())
        metrics = {"param/update_ratio_total": float(np.sqrt(dsq.sum() / wsq.sum())) if wsq.sum() > 0 else 0.0}
        num = self._group_norms("x", tuple(present), dsq)
        den = self._group_norms("x", tuple(present), wsq)
        for key, value in num.items():
            metrics[f"param/update_ratio/{key[2:]}"] = value / den[key] if den[key] > 0 else 0.0
        self._log_scalars(trainer, metrics, step)
