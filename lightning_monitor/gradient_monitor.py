"""GradientMonitor: gradient norms, on-device histograms to every dashboard, NaN/Inf detection."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal, Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch
from typing_extensions import override

from lightning_monitor._core import clock as _clock
from lightning_monitor._core import options as _options
from lightning_monitor._core.keys import document_keys
from lightning_monitor._grad import event as _grad_event
from lightning_monitor._grad import groups as _grad_groups
from lightning_monitor._grad import nonfinite as _grad_nonfinite
from lightning_monitor._grad import optstate as _grad_optstate
from lightning_monitor._grad import sharded as _grad_sharded
from lightning_monitor._grad import watched as _grad_watched
from lightning_monitor._grad.norms import fast_norms
from lightning_monitor._monitor import dist as _dist
from lightning_monitor._monitor.base import Monitor
from lightning_monitor._monitor.budget import DEFAULT_SHARE

_POLICIES = ("warn", "raise", "skip")
_EMPTY = np.zeros(0, dtype=np.int64)


@document_keys
class GradientMonitor(Monitor):
    """Gradient norms (total, per module group, per parameter, per optimizer), histograms and NaN/Inf detection.

    Measures in ``on_before_optimizer_step`` (after AMP unscaling and the DDP all-reduce, before gradient
    clipping) and logs at the end of the training batch, on global rank 0, to every logger the trainer has, at
    the steps and on the step axis of Lightning's own ``self.log``: every ``every_n_steps`` (default: the trainer's
    ``log_every_n_steps``) optimizer steps under automatic optimization (gradient accumulation respected), every
    ``every_n_steps`` training batches under manual optimization, where ``self.log`` counts batches and
    ``trainer.global_step`` counts every ``optimizer.step()`` call:

    {logged_keys}

    Several optimizers (manual optimization, e.g. a GAN's generator and discriminator): in a logging batch every
    optimizer's gradients are measured at its own step (its last one when it steps more than once), so the
    ``grad/norm_total``, group, per-parameter and histogram keys cover all of them, and ``grad/optimizer_*/{index}``
    (``index`` in ``trainer.optimizers``) give each optimizer its own series.

    Groups are module paths cut to ``group_depth`` levels below the first level with more than one child
    that holds parameters: single-child wrappers are descended through, so a group never repeats the total.
    With ``self.model = Wrapper(inner=nn.Sequential(a, b))`` the groups are ``model.inner.0`` and
    ``model.inner.1`` (``group_depth=2``: ``model.inner.0.weight``, ...). A parameter that sits on that level's
    module itself is its own group; a ``group_patterns`` glob claims a parameter first.
    ``grad/nonfinite/{name}`` appears for a parameter once it has had NaN/Inf and stays (0 when clean again);
    ``grad/nonfinite_count`` and ``grad/nonfinite_steps`` appear at the first logging step that saw a NaN/Inf and
    stay, so a clean run has no chart of zeros.

    Bounded cost: at most ``max_histograms`` gradient (and weight) histograms and ``max_param_keys`` keys per
    family of per-parameter or per-group scalars per logging step, chosen by ``param_select``; one warning names
    the cap when it leaves parameters out.

    Cost: between logging steps the only work is one float32 ``torch._foreach_norm`` over all gradients,
    accumulated on the device (no host sync) so that NaN/Inf on any step is counted. A logging step computes
    norms within 1e-6 of float64 and makes one packed host transfer per optimizer step it measures (a second one
    only when it found NaN/Inf, and one more with ``update_ratio``, read after the optimizer step). Histograms
    are binned on the gradient's device: exact ``min``/``max``/``sum``/``sum_squares`` over the full tensor, bin
    counts over at most ``max_hist_elements`` elements taken with a deterministic prime stride and scaled to the
    element count; NaN/Inf never reach a histogram. ``nonfinite="raise"`` or ``"skip"`` must read the NaN/Inf
    flags on the host at EVERY optimizer step: one small device-to-host copy per step, which on a GPU waits for
    the backward pass to finish (the CPU can no longer queue ahead), typically costing a few percent of step time.
    FSDP2 / tensor parallel (DTensor shards): the full tensors' numbers, 2 all-reduces per logging step, rank 0 writes.

    Args:
        every_n_steps: log every n steps of ``self.log``'s axis; ``None`` uses ``trainer.log_every_n_steps``.
        group_depth: module-path depth below the single-child wrappers that defines a group (0: no group norms).
        group_patterns: ``{group: glob or [globs]}`` over parameter names, checked before ``group_depth``.
        per_param_norms: also log one norm per parameter (of those selected by ``include``/``exclude``).
        param_norms: also log weight norms per group.
        update_ratio: also log ||delta w|| / ||w|| per group (snapshots the weights on logging steps only).
        optimizer_state: also log Adam-style optimizer state per group (any optimizer keeping ``exp_avg`` and
            ``exp_avg_sq``: Adam, AdamW, ...), as it stands before the step: the moments' norms, the effective
            per-element step ``lr / (sqrt(v_hat) + eps)`` (``v_hat`` bias-corrected with the state's step count,
            ``max_exp_avg_sq`` under ``amsgrad``; median and 99th percentile over at most 1024 elements per parameter
            at a prime stride), the share of collapsed second moments and the cosine between the Adam direction and
            the gradient (``p.grad``). Computed on the device and read back in the gradients' one transfer (temporary
            buffers of a few times the measured parameters' size at logging steps). Under FSDP2 / tensor parallel
            the numbers are the full tensors', from each rank's shards, in the gradients' one SUM all-reduce.
        histograms: log gradient histograms (of those selected by ``include``/``exclude``).
        param_histograms: log weight histograms too.
        bins: histogram bins (1..512).
        hist_range: ``"minmax"`` (the tensor's finite min..max), ``"symmetric"`` (-max|x|..max|x|) or a fixed
            ``[lo, hi]`` (values outside fall into the edge bins).
        max_hist_elements: bin at most this many elements per tensor; ``None`` bins every element.
        include: globs over parameter names for histograms and per-parameter norms (default: all).
        exclude: globs over parameter names removed from histograms and per-parameter norms.
        max_histograms: at most this many gradient (and weight) histograms per logging step; ``None``: no cap.
        max_param_keys: at most this many ``grad/norm_param/*`` keys, as many groups (``grad/norm/*``,
            ``param/norm/*``, ``param/update_ratio/*``) and as many ``grad/nonfinite/*`` keys (the first
            parameters found with NaN/Inf); ``None``: no cap.
        param_select: which parameters the caps keep, deterministically, in model order: ``"spread"`` (evenly
            spaced over the model, first and last included), ``"first"`` or ``"largest"`` (most elements).
        nonfinite: ``"warn"`` (count, log, warn once), ``"raise"`` (raise ``FloatingPointError`` naming the
            parameters) or ``"skip"`` (drop all gradients of that optimizer step so no weight, momentum or
            weight decay changes; training continues). Under ``precision="16-mixed"`` the GradScaler's own overflow
            steps (which it skips itself) show up here as non-finite gradients, so ``"raise"`` would stop fp16 AMP
            training in its first steps: keep ``"warn"`` there.
        exclude_keys: globs over the keys this monitor logs, left out of every backend (e.g. ``["grad/hist/*"]``
            drops a whole family, ``["memory/host/available_gib"]`` one key).
        cost_budget: the share of training time all lightning-monitor monitors together may take (their own hook
            time, measured, from the end of the first batch); on a fast model this monitor then spaces out its
            expensive parts to stay within it: histograms at fewer logging steps, and under ``nonfinite="warn"`` the
            NaN/Inf check at fewer steps between logging steps (``grad/nonfinite_steps`` then counts the steps
            checked; a NaN that persists is still seen at the next logging step, which always checks). The scalars
            are never spaced out. Said once when it happens. ``None``: every part at every step, whatever it costs.
            Under ``ModelParallelStrategy`` the histograms (computed with collectives) are never spaced out.

    Raises:
        TypeError: for an argument of the wrong type (``bins=2.5``, ``group_depth=True``), echoing it.
        ValueError: for an argument out of range or not one of the choices, echoing it.
        MisconfigurationException: in ``setup`` without a logger (``nonfinite="warn"`` only) or under
            ``FSDPStrategy`` (FSDP1) or DeepSpeed, whose flat gradient shards have no per-parameter global view.

    Example::

        trainer = Trainer(logger=MultiLogger(), callbacks=[GradientMonitor(every_n_steps=50, update_ratio=True)])
    """

    LOGGED_KEYS = {
        "grad/norm_total": "L2 norm of all gradients together (every optimizer's, in a logging step)",
        "grad/norm/{group}": "L2 norm of the gradients of one module group",
        "grad/norm_param/{name}": "L2 norm of one parameter's gradient (``per_param_norms=True``)",
        "grad/hist/{name}": "histogram of one parameter's gradient (``histograms=True``)",
        "grad/optimizer_norm/{index}": "L2 norm of one optimizer's gradients (several optimizers only)",
        "grad/optimizer_nonfinite_count/{index}": "NaN/Inf elements in one optimizer's gradients (several only;"
        " from the first logging step that saw a NaN/Inf on)",
        "grad/nonfinite_count": "NaN/Inf elements in all gradients at this step (from the first logging step that saw"
        " a NaN/Inf on: no chart of zeros for a clean run)",
        "grad/nonfinite_steps": "optimizer steps since the last logging step with any NaN/Inf (from the first logging"
        " step that saw a NaN/Inf on)",
        "grad/nonfinite/{name}": "NaN/Inf elements in one parameter's gradient (offenders only)",
        "param/norm_total": "L2 norm of the stepped weights before the step (``param_norms``)",
        "param/norm/{group}": "L2 norm of one group's stepped weights before the step",
        "param/hist/{name}": "histogram of one parameter's weights (``param_histograms=True``)",
        "param/update_ratio_total": "||w_after - w_before|| / ||w_before|| of all weights (``update_ratio``)",
        "param/update_ratio/{group}": "the same ratio for one module group (``update_ratio=True``)",
        "optim/exp_avg_norm/{group}": "L2 norm of a group's Adam first moment ``exp_avg`` (``optimizer_state=True``)",
        "optim/exp_avg_sq_sqrt_norm/{group}": "L2 norm of the square root of a group's second moment ``exp_avg_sq``",
        "optim/step_median/{group}": "median effective per-element step ``lr / (sqrt(v_hat) + eps)`` (sampled)",
        "optim/step_p99/{group}": "99th percentile of the effective per-element step (sampled)",
        "optim/small_v_share/{group}": "share of a group's elements whose ``exp_avg_sq`` is below 1e-16",
        "optim/update_cos/{group}": "cosine between the Adam direction ``m_hat / (sqrt(v_hat) + eps)`` and ``p.grad``",
    }
    FLAT_SHARDS_UNSUPPORTED = "shards gradients into flat buffers with no per-parameter global view"

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        *,
        group_depth: int = 1,
        group_patterns: Optional[dict[str, Union[str, list[str]]]] = None,
        per_param_norms: bool = False,
        param_norms: bool = False,
        update_ratio: bool = False,
        optimizer_state: bool = False,
        histograms: bool = True,
        param_histograms: bool = False,
        bins: int = 64,
        hist_range: Union[Literal["minmax", "symmetric"], tuple[float, float]] = "minmax",
        max_hist_elements: Optional[int] = 16384,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        max_histograms: Optional[int] = 64,
        max_param_keys: Optional[int] = 256,
        param_select: Literal["spread", "first", "largest"] = "spread",
        nonfinite: Literal["warn", "raise", "skip"] = "warn",
        exclude_keys: Optional[Sequence[str]] = None,
        cost_budget: Optional[float] = DEFAULT_SHARE,
    ) -> None:
        super().__init__(every_n_steps, exclude_keys, cost_budget)
        group_depth = _options.check_count("group_depth", group_depth)
        bins = _options.check_int("bins", bins, low=1, high=512)  # 512: wandb's limit
        max_hist_elements = _options.check_int("max_hist_elements", max_hist_elements, low=1, none_ok=True)
        max_histograms = _options.check_count("max_histograms", max_histograms, none_ok=True)  # None: no cap
        max_param_keys = _options.check_count("max_param_keys", max_param_keys, none_ok=True)
        flags = dict(per_param_norms=per_param_norms, param_norms=param_norms, update_ratio=update_ratio,
                     optimizer_state=optimizer_state, histograms=histograms, param_histograms=param_histograms)
        for option, flag in flags.items():
            _options.check_bool(option, flag)
        _options.check_choice("param_select", param_select, _grad_groups.SELECTS)
        _options.check_choice("nonfinite", nonfinite, _POLICIES)
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
        self.optimizer_state = optimizer_state
        self.histograms = histograms
        self.param_histograms = param_histograms
        self.bins = bins
        self.hist_range = hist_range
        self.max_hist_elements = max_hist_elements
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.max_histograms = max_histograms
        self.max_param_keys = max_param_keys
        self.param_select = param_select
        self.nonfinite = nonfinite
        # spaced out by the cost budget on a fast model (cost_budget=None: never): the histograms of a logging step,
        # and the NaN/Inf check of the steps between logging steps (only under nonfinite="warn", which acts on nothing)
        self._hist_part = self._part("gradient histograms", 0.5)
        self._watch_part = self._part("the NaN/Inf checks between logging steps", 0.3)
        self._hist_now = True  # this logging step logs histograms
        self._hist_seconds = 0.0  # what this logging step's histograms cost so far
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._spec = _grad_event.MeasureSpec(  # what a logging step measures, from the options (again in setup)
            bins=self.bins, max_elements=self.max_hist_elements, hist_range=self.hist_range,
            grad_histograms=self.histograms, param_histograms=self.param_histograms,
            weights=self.param_norms or self.update_ratio or self.param_histograms,
        )
        self._selection = _grad_watched.Selection(  # which parameters get which keys, from the options as they are
            group_depth=self.group_depth, group_patterns=self.group_patterns, include=self.include,
            exclude=self.exclude, max_histograms=self.max_histograms, max_param_keys=self.max_param_keys,
            param_select=self.param_select, histograms=self.histograms or self.param_histograms,
            per_param_norms=self.per_param_norms)
        self._watched = _grad_watched.Watched()  # the parameters, read at the first optimizer step
        self._nonfinite = _grad_nonfinite.NonfiniteLedger()
        self._log_step: Optional[int] = None  # self.log's step of this batch when it is a logging batch
        self._measured: dict[int, _grad_event.Measured] = {}  # this logging batch's steps, per optimizer
        self._snapshots: dict[int, tuple[np.ndarray, list[torch.Tensor], np.ndarray]] = {}  # update_ratio
        self._optstate: dict[int, Any] = {}  # optimizer_state: per optimizer, what _grad_optstate.metrics takes

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_snapshots"] = {}  # tensors stay behind (ddp_spawn pickles callbacks; Watched leaves its own)
        return state

    def group_of(self, name: str) -> Optional[str]:
        """The group of parameter ``name``: the first matching ``group_patterns`` entry, else its module path cut to
        ``group_depth`` levels below the model's single-child wrappers (known once training started)."""
        return _grad_groups.group_of(name, self._watched.prefix, self.group_depth, self.group_patterns)

    def _needs_logger(self) -> bool:
        return self.nonfinite == "warn"  # raise/skip act on NaN/Inf without a logger

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._reset_runtime()

    def _watch(self, pl_module: "pl.LightningModule") -> None:
        """Read the parameter list (at the first optimizer step, after ``configure_model``; frozen parameters
        included, so that a later unfreeze shows), its groups and which parameters the caps keep."""
        self._watched.read(pl_module, self._selection, self._warn)

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._begin_batch(trainer, pl_module, batch, batch_idx)
        if self._measured or self._snapshots or self._optstate:  # empty unless a batch raised before its end
            self._measured.clear()
            self._snapshots.clear()
            self._optstate.clear()
        # self.log's step when the batch starts at a logging step (Monitor.on_train_batch_start); sharded: every rank
        self._log_step = self._candidate if self._works_here else None
        # every rank measures sharded gradients with collectives: each rank's own clock must not decide for them
        self._hist_now = (self._log_step is None or not (self.histograms or self.param_histograms)
                          or _dist.model_on_every_rank(trainer) or self._affordable(self._hist_part))

    @override
    def on_before_optimizer_step(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", optimizer: torch.optim.Optimizer
    ) -> None:
        watch_only = self._log_step is None and self.nonfinite == "warn"
        if watch_only and not self._works_here:
            return  # under DDP only rank 0 reads the NaN/Inf counts (every rank holds the same reduced gradients)
        if watch_only and not self._affordable(self._watch_part):
            return  # spaced out by the cost budget: grad/nonfinite_steps counts the steps checked
        if not self._watched.params:
            self._watch(pl_module)
        number, index, params = self._watched.optimizer(trainer, optimizer)
        maybe = [p.grad for p in params]
        grads = [g for g in maybe if g is not None]  # one per present index
        if len(grads) < len(maybe):  # a parameter without a gradient at this step (frozen, unused)
            if not grads:
                return
            index = np.array([i for i, g in zip(index.tolist(), maybe, strict=True) if g is not None], dtype=np.int64)
        if self._log_step is not None:
            bad = self._measure(number, index, grads, optimizer)
        elif watch_only:
            with self._spending(self._watch_part):
                self._nonfinite.queue(tuple(index.tolist()), fast_norms(_grad_sharded.local_shards(grads, trainer)))
            return
        else:  # sync: raise/skip
            bad = self._nonfinite.count(tuple(index.tolist()), _grad_sharded.step_norms(grads, trainer))
        if bad and self.nonfinite != "warn":
            if self.nonfinite == "raise" and self._log_step is not None:
                self._flush(trainer)  # log what we saw before raising
            watched = self._watched
            _grad_nonfinite.act(self.nonfinite, bad, watched.params, watched.names, optimizer, trainer.global_step)

    def _measure(self, number: int, present: np.ndarray, grads: list[torch.Tensor],
                 optimizer: torch.optim.Optimizer) -> list[int]:
        """Measure one optimizer step of a logging batch (one host transfer); the parameters with NaN/Inf."""
        watched = self._watched
        weights = [watched.params[i].detach() for i in present.tolist()] if self._spec.weights else []
        hist = np.flatnonzero(watched.hist_mask[present] & watched.nonempty[present]) if self._hist_now else _EMPTY
        began = _clock.now()
        opt = None
        if self.optimizer_state:  # queued on the device, read back in measure's one transfer (sharded: its SUM)
            opt = _grad_optstate.queue(optimizer, [watched.params[i] for i in present.tolist()], grads)
            for tag, message in _grad_optstate.warnings(optimizer, opt, watched.names, present):
                self._warn(tag, message)
        measured, pending = _grad_event.measure(self._spec, number, present, grads, weights=weights, hist=hist,
                                                pending=self._nonfinite.pending(),
                                                extra=opt.packed if opt is not None else None)
        if opt is not None:
            rows, samples = _grad_optstate.unpack(measured.extra, opt.lengths)
            numels = np.array([watched.params[i].numel() for i in present[opt.positions].tolist()])
            self._optstate[number] = (present[opt.positions], rows, samples, measured.sq[opt.positions], numels)
        if hist.size:  # what the budget expects the histograms to cost: the whole measurement (an upper bound) ...
            self._hist_seconds += _clock.now() - began
        if pending.size:
            self._nonfinite.read_pending(pending)
        earlier = self._measured.pop(number, None)
        if earlier is not None:  # the same optimizer stepped again in this batch: the last step is logged
            self._nonfinite.note(earlier.bad.tolist())
        self._measured[number] = measured
        if self.update_ratio and measured.wsq is not None:
            self._snapshots[number] = (present, [w.clone() for w in weights], measured.wsq)
        return measured.bad.tolist()

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._log_step
        if step is None:
            return
        if self._measured:
            self._flush(trainer)
        if self._snapshots:
            self._log_update_ratio(trainer, step)
        self._log_step = None

    def _flush(self, trainer: "pl.Trainer") -> None:
        """Log this logging batch's measurements, every optimizer's together, at ``self.log``'s step."""
        step, measured = self._log_step, sorted(self._measured.values(), key=lambda m: m.optimizer)
        self._measured = {}
        if step is None or not measured:
            return
        watched = self._watched
        norms = watched.gather(measured)
        metrics: dict[str, float] = {}
        if len(trainer.optimizers) > 1:
            for m in measured:
                metrics[f"grad/optimizer_norm/{m.optimizer}"] = float(np.sqrt(m.sq.sum()))
                metrics[f"grad/optimizer_nonfinite_count/{m.optimizer}"] = float(m.nonfinite.sum())
        metrics.update(watched.norm_metrics(norms, self.per_param_norms, self.param_norms))
        optstate, self._optstate = [self._optstate[k] for k in sorted(self._optstate)], {}
        metrics.update(_grad_optstate.metrics(watched.group_names, watched.gid, optstate))
        bad_now = watched.nonfinite_now(norms)
        bad_steps, any_steps = self._nonfinite.take_read()
        values, offenders, capped = self._nonfinite.report(
            watched.names, norms.nonfinite, bad_now, sum(1 for m in measured if m.bad.size), bad_steps, any_steps,
            self.max_param_keys,
        )
        metrics.update(values)
        if not self._nonfinite.seen:  # no NaN/Inf in this run yet: no chart of zeros
            for m in measured:
                metrics.pop(f"grad/optimizer_nonfinite_count/{m.optimizer}", None)
        for tag, message in _grad_nonfinite.warnings(offenders, capped, step, self.nonfinite, self.max_param_keys):
            self._warn(tag, message)
        self._log_scalars(trainer, metrics, step)
        hists: dict[str, Any] = {}
        for m in measured:
            hists.update(_grad_event.histograms("grad/hist", watched.names, m.hist, m.rows, self._spec.bins))
            hists.update(_grad_event.histograms("param/hist", watched.names, m.phist, m.prows, self._spec.bins))
        began = _clock.now()
        self._log_histograms(trainer, hists, step)  # one wandb row for all of them
        if hists:  # ... and their writes
            self._hist_part.record(self._hist_seconds + _clock.now() - began)
        self._hist_seconds = 0.0

    def _log_update_ratio(self, trainer: "pl.Trainer", step: int) -> None:
        snapshots, self._snapshots = [self._snapshots[k] for k in sorted(self._snapshots)], {}
        watched = self._watched
        ratios = _grad_event.update_ratios(watched.params, snapshots, watched.group_names, watched.gid)
        self._log_scalars(trainer, ratios, step)
