"""ActivationMonitor: RMS, mean, max |x|, dead units and (optionally) sampled histograms of chosen modules' outputs,
at logging steps only."""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch.utils.hooks import RemovableHandle
from typing_extensions import override

from lightning_monitor._act import hist as _hist
from lightning_monitor._act import select as _select
from lightning_monitor._act import tap as _tap
from lightning_monitor._core import options as _options
from lightning_monitor._core.keys import document_keys
from lightning_monitor._grad import bins as _grad_bins
from lightning_monitor._grad import event as _grad_event
from lightning_monitor._grad.stats import sample_stride
from lightning_monitor._monitor import dist as _dist
from lightning_monitor._monitor.base import Monitor
from lightning_monitor._monitor.budget import DEFAULT_SHARE


@document_keys
class ActivationMonitor(Monitor):
    """Statistics of the outputs of chosen modules in the training forward pass, at logging steps only.

    Forward hooks are attached at the start of a logging batch (the steps and step axis of Lightning's own
    ``self.log``, as :class:`GradientMonitor`) and removed at its end: between logging steps the model runs with no
    hook at all. Under gradient accumulation every micro-batch of a logging step counts. Keys, per module (its path
    in the LightningModule, without ``torch.compile``'s ``_orig_mod``):

    {logged_keys}

    A unit is a feature (the last dimension: a Linear's outputs, a transformer's hidden size) or, after a
    convolution or batch norm, a channel (dimension 1); it is dead when it is exactly 0 for every sample and position
    of the (global) batch, e.g. after a ReLU whose inputs are all negative.

    Cost: each hook queues a few reductions on the output's device (no host read); a logging step packs every
    module's numbers into one tensor and reads it back in ONE transfer, under DDP in one all-gather on every rank
    that combines sums and counts (the mean and RMS of the global batch exactly), maxima, and dead units (zero on
    every rank). Every chosen module must run on every rank in a logging batch (it does in data parallel training).

    Counted calls: the forward calls of a training batch before its backward (``on_before_backward``): with
    activation checkpointing the recomputed forward runs inside the backward and is not counted again. A module
    called twice in a forward (weights shared) counts both calls. ``torch.compile``: a module inside a compiled
    region (``torch.compile(module)``, ``module.compile()``, a compiled LightningModule) is skipped, with one warning:
    a hook attached there after compiling either never runs (Dynamo does not guard on hooks by default) or, where
    it is guarded, makes Dynamo recompile at every logging step. Compile the modules below the ones you watch.
    FSDP2: the outputs are each rank's batch, as under DDP (tested equal to DDP). Tensor parallel: an output left
    as a DTensor is read as this rank's local part; mean, RMS and max |x| stay exact, the dead share of a
    feature-sharded output does not (its units differ across ranks).

    Histograms (``histograms=True``): each counted call keeps a strided sample of the output (at most
    ``max_hist_elements`` elements at a prime stride, a device copy) and its finite min and max. At the logging
    step every module's samples are binned on the device over one range, the finite min..max of the samples of the
    step (under DDP of every rank: one MAX all-reduce more, on every rank), with the gradients' binning
    (``numpy.histogram``'s counts over ``numpy.linspace`` edges), each call's counts scaled to its element count;
    the counts ride in the same packed transfer (and all-gather) as the numbers above. A module whose output holds
    NaN/Inf at a logging step gets no histogram there.

    Args:
        every_n_steps: log every n steps of ``self.log``'s axis; ``None`` uses ``trainer.log_every_n_steps``.
        types: module class names to watch (e.g. ``["Linear", "ReLU"]``); ``None``: see ``include``.
        include: globs over module paths; without ``types`` any module that matches is watched. With neither, the
            leaf modules that hold parameters are watched.
        exclude: globs over module paths left out.
        max_modules: at most this many modules, evenly spread over the model (first and last kept); one warning
            names the cap when it leaves modules out; ``None``: no cap.
        histograms: log a histogram of each watched module's output (``act/hist/{module}``).
        bins: histogram bins (1..512).
        max_hist_elements: bin at most this many elements of a module's output per forward call (a prime stride,
            counts scaled to the element count); ``None`` bins every element.
        exclude_keys: globs over the keys this monitor logs, left out of every backend.
        cost_budget: the share of training time all lightning-monitor monitors together may take (see
            :class:`GradientMonitor`); this monitor's work is all at logging steps and is never spaced out.

    Raises:
        TypeError: for an argument of the wrong type, echoing it.
        ValueError: for an argument out of range, echoing it.
        MisconfigurationException: in ``setup`` without a logger.

    Example::

        trainer = Trainer(logger=MultiLogger(), callbacks=[ActivationMonitor(types=["Linear", "ReLU"])])
    """

    LOGGED_KEYS = {
        "act/rms/{module}": "root mean square of a module's output over the (global) batch",
        "act/mean/{module}": "mean of a module's output over the (global) batch",
        "act/max_abs/{module}": "largest |x| in a module's output",
        "act/dead_share/{module}": "share of a module's units (features, or channels after a conv) that are exactly"
        " 0 over the whole (global) batch",
        "act/hist/{module}": "histogram of a module's output over the (global) batch, sampled (``histograms=True``)",
    }

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        *,
        types: Optional[list[str]] = None,
        include: Optional[list[str]] = None,
        exclude: Optional[list[str]] = None,
        max_modules: Optional[int] = 64,
        histograms: bool = False,
        bins: int = 64,
        max_hist_elements: Optional[int] = 16384,
        exclude_keys: Optional[Sequence[str]] = None,
        cost_budget: Optional[float] = DEFAULT_SHARE,
    ) -> None:
        super().__init__(every_n_steps, exclude_keys, cost_budget)
        for option, globs in (("types", types), ("include", include), ("exclude", exclude)):
            if globs is not None and (isinstance(globs, str) or not all(isinstance(g, str) for g in globs)):
                raise TypeError(f"`{option}` must be a list of strings, got {globs!r}")
        self.types = list(types) if types is not None else None
        self.include = list(include) if include is not None else None
        self.exclude = list(exclude or [])
        self.max_modules = _options.check_count("max_modules", max_modules, none_ok=True)
        self.histograms = _options.check_bool("histograms", histograms)
        self.bins = _options.check_int("bins", bins, low=1, high=512)  # 512: wandb's limit
        self.max_hist_elements = _options.check_int("max_hist_elements", max_hist_elements, low=1, none_ok=True)
        self._reset_runtime()

    def _reset_runtime(self) -> None:
        self._modules: Optional[list[tuple[str, torch.nn.Module]]] = None  # chosen at the first logging batch
        self._taps: list[_tap.Tap] = []
        self._handles: list[RemovableHandle] = []
        self._counting = False  # between a logging batch's start and its backward
        self._step: Optional[int] = None  # the logging step the taps hold numbers for

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_modules"], state["_taps"], state["_handles"] = None, [], []  # modules and tensors stay behind
        return state

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._detach()
        self._reset_runtime()

    def _choose(self, pl_module: "pl.LightningModule") -> list[tuple[str, torch.nn.Module]]:
        chosen, compiled = _select.choose(pl_module, self.types, self.include, self.exclude)
        if compiled:
            self._warn("compiled", (
                f"ActivationMonitor: {len(compiled)} chosen module(s) run inside a torch.compile region"
                f" ({', '.join(compiled[:3])}{', ...' if len(compiled) > 3 else ''}); skipped: a hook attached there"
                " would not run, or would make Dynamo recompile at every logging step. Compile the modules below"
                " them instead."
            ))
        kept = _select.spread(len(chosen), self.max_modules)
        if kept.size < len(chosen):
            self._warn("cap", (
                f"ActivationMonitor: {len(chosen)} modules chosen, watching {kept.size} spread over the model"
                f" (max_modules={self.max_modules}); raise max_modules (None: no cap) or narrow types/include/exclude."
            ))
        return [chosen[i] for i in kept.tolist()]

    def _hook(self, tap: _tap.Tap) -> Any:
        def hook(module: torch.nn.Module, inputs: Any, output: Any) -> None:
            if self._counting:  # not in the backward's recompute (activation checkpointing)
                tap.add(module, output)
        return hook

    def _detach(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
        self._counting = False

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._begin_batch(trainer, pl_module, batch, batch_idx)
        step = self._candidate  # self.log's step when the batch starts at a logging step, else None
        if step is None:
            return
        if self._modules is None:
            self._modules = self._choose(pl_module)
        if self._step != step:  # a new logging step (micro-batches of one step add up)
            stride = functools.partial(sample_stride, max_elements=self.max_hist_elements) if self.histograms else None
            self._taps = [_tap.Tap(stride) for _ in self._modules]
            self._step = step
        self._handles = [m.register_forward_hook(self._hook(t)) for (_, m), t in zip(self._modules, self._taps,
                                                                                     strict=True)]
        self._counting = True

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        self._counting = False  # the forward is done: a recompute inside the backward is not counted

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        self._detach()
        step = self._batch_logging_step(trainer)
        if step is None or self._step is None or not self._modules:
            return
        names = [name for name, _ in self._modules]
        units = [t.units for t in self._taps]
        device = trainer.strategy.root_device
        packed = _tap.pack(self._taps, units, device)
        if self.histograms:
            lo, hi = _hist.ranges(self._taps, device)  # one range per module (under DDP one MAX all-reduce, every rank)
            counts = _grad_bins.scaled_counts(*_hist.pieces(self._taps), lo, hi, self.bins)  # on the device
            packed = torch.cat([packed, lo, hi, counts.reshape(-1)])
        self._taps, self._step = [], None
        # sync point: one packed host transfer per logging step (under DDP one all-gather, on every rank)
        gathered = _dist.gather_packed(trainer, packed)
        self._log_scalars(trainer, _tap.combine(gathered, names, units), step)
        if self.histograms:  # a module whose output held NaN/Inf (sums not finite) or nothing finite is left out
            rows = _hist.rows(gathered[:, _tap.pack_width(units) :], _tap.totals(gathered, units), self.bins)
            hists = _grad_event.histograms("act/hist", names, np.arange(len(names)), rows, self.bins)
            self._log_histograms(trainer, hists, step)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._detach()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._detach()
        super().teardown(trainer, pl_module, stage)
