"""FLOPs of a real training step, measured with ``FlopCounterMode``, and peak dense FLOP/s of common GPUs.

How the FLOPs are measured (and why this way): :class:`StepFlopCounter` enters
:class:`torch.utils.flop_counter.FlopCounterMode` at ``on_train_batch_start`` and leaves it at ``on_train_batch_end``
of the *real* training step, so it counts exactly what that step ran: the forward and the backward of
``training_step`` (matmuls, convolutions, attention; elementwise ops and the optimizer's update carry no FLOP formula
and count 0). Nothing is run twice, so no parameter, buffer (BatchNorm statistics), RNG state or ``self.log`` call is
disturbed, which a separate dry forward/backward cannot promise. The cost: that one step runs under a Python dispatch
mode and is slower, so SpeedMonitor leaves measured steps out of its timing windows.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Any, Optional

import torch

# Peak *dense* (no structured sparsity) tensor-core FLOP/s per GPU and compute dtype, from the vendor datasheets.
# Datasheets print the sparsity figure for TF32/BF16/FP16/FP8 (marked "with sparsity"); the dense figure is half
# of it, and that halved number is what is stored here. "fp32" is the non-tensor-core FP32 rate; "tf32" is used for
# fp32 training when torch.get_float32_matmul_precision() != "highest" on Ampere or newer.
_T = 1e12
PEAK_FLOPS: dict[str, dict[str, float]] = {
    # NVIDIA H100 datasheet (nvidia-h100-datasheet, 2023): SXM5 FP32 67 TF, TF32 989 TF*, BF16/FP16 1,979 TF*,
    # FP8 3,958 TF* (* with sparsity); PCIe FP32 51, TF32 756*, BF16 1,513*, FP8 3,026*; NVL FP32 60, TF32 835*,
    # BF16 1,671*, FP8 3,341*.
    "h100 sxm": {"fp64": 34 * _T, "fp32": 67 * _T, "tf32": 494.5 * _T, "bf16": 989.5 * _T, "fp16": 989.5 * _T,
                 "fp8": 1979 * _T},
    "h100 pcie": {"fp64": 26 * _T, "fp32": 51 * _T, "tf32": 378 * _T, "bf16": 756.5 * _T, "fp16": 756.5 * _T,
                  "fp8": 1513 * _T},
    "h100 nvl": {"fp64": 30 * _T, "fp32": 60 * _T, "tf32": 417.5 * _T, "bf16": 835.5 * _T, "fp16": 835.5 * _T,
                 "fp8": 1670.5 * _T},
    # NVIDIA H200 datasheet (hpc-datasheet-sc23-h200): SXM same compute as H100 SXM (TF32 989*, BF16 1,979*,
    # FP8 3,958*); NVL TF32 835*, BF16 1,671*, FP8 3,341*. GH200 datasheet: same Hopper SXM figures.
    "h200 sxm": {"fp64": 34 * _T, "fp32": 67 * _T, "tf32": 494.5 * _T, "bf16": 989.5 * _T, "fp16": 989.5 * _T,
                 "fp8": 1979 * _T},
    "h200 nvl": {"fp64": 30 * _T, "fp32": 60 * _T, "tf32": 417.5 * _T, "bf16": 835.5 * _T, "fp16": 835.5 * _T,
                 "fp8": 1670.5 * _T},
    # NVIDIA HGX B200 datasheet (8 GPUs, * with sparsity): TF32 18 PF*, FP16/BF16 36 PF*, FP8 72 PF*, FP32 600 TF.
    "b200": {"fp32": 75 * _T, "tf32": 1125 * _T, "bf16": 2250 * _T, "fp16": 2250 * _T, "fp8": 4500 * _T},
    # NVIDIA A100 datasheet (nvidia-a100-datasheet-us-1758950-r4): SXM and PCIe alike, FP64 9.7, FP32 19.5,
    # TF32 156 (312*), BF16/FP16 312 (624*) TF. No FP8.
    "a100": {"fp64": 9.7 * _T, "fp32": 19.5 * _T, "tf32": 156 * _T, "bf16": 312 * _T, "fp16": 312 * _T},
    # NVIDIA L40S datasheet: FP32 91.6, TF32 366*, BF16/FP16 733*, FP8 1,466*. L40: FP32 90.5, TF32 181*,
    # BF16/FP16 362*, FP8 724*.
    "l40s": {"fp32": 91.6 * _T, "tf32": 183 * _T, "bf16": 366.5 * _T, "fp16": 366.5 * _T, "fp8": 733 * _T},
    "l40": {"fp32": 90.5 * _T, "tf32": 90.5 * _T, "bf16": 181 * _T, "fp16": 181 * _T, "fp8": 362 * _T},
    # NVIDIA L4 datasheet: FP32 30.3, TF32 120*, BF16/FP16 242*, FP8 485* TF.
    "l4": {"fp32": 30.3 * _T, "tf32": 60 * _T, "bf16": 121 * _T, "fp16": 121 * _T, "fp8": 242.5 * _T},
    # NVIDIA A10 datasheet: FP32 31.2, TF32 62.5 (125*), BF16/FP16 125 (250*) TF. The A10G is AWS's variant of the
    # same GA102 part and has no NVIDIA datasheet of its own; the A10 figures are used (approximate).
    "a10": {"fp32": 31.2 * _T, "tf32": 62.5 * _T, "bf16": 125 * _T, "fp16": 125 * _T},
    "a10g": {"fp32": 31.2 * _T, "tf32": 62.5 * _T, "bf16": 125 * _T, "fp16": 125 * _T},
    # NVIDIA V100 datasheet: SXM2 FP64 7.8, FP32 15.7, tensor (FP16) 125 TF; PCIe 7, 14, 112; V100S 8.2, 16.4, 130.
    # Volta has no TF32/BF16 tensor cores.
    "v100 sxm2": {"fp64": 7.8 * _T, "fp32": 15.7 * _T, "fp16": 125 * _T},
    "v100 pcie": {"fp64": 7 * _T, "fp32": 14 * _T, "fp16": 112 * _T},
    "v100s": {"fp64": 8.2 * _T, "fp32": 16.4 * _T, "fp16": 130 * _T},
    # NVIDIA T4 datasheet: FP32 8.1, mixed FP16/FP32 65 TF. Turing has no TF32/BF16 tensor cores.
    "t4": {"fp32": 8.1 * _T, "fp16": 65 * _T},
    # NVIDIA Ada Lovelace architecture whitepaper v2.1, appendix (RTX 4090): FP32 82.6, TF32 82.6, BF16 and FP16
    # with FP32 accumulate 165.2, FP8 with FP32 accumulate 330.3 TF (dense; what PyTorch's matmuls use).
    "rtx 4090": {"fp32": 82.6 * _T, "tf32": 82.6 * _T, "bf16": 165.2 * _T, "fp16": 165.2 * _T, "fp8": 330.3 * _T},
    # NVIDIA Ampere GA102 whitepaper v2 (RTX 3090): FP32 35.6, TF32 35.6, BF16/FP16 with FP32 accumulate 71 TF;
    # RTX 3090 Ti: FP32 40, TF32 40, BF16/FP16 (FP32 acc.) 80 TF.
    "rtx 3090 ti": {"fp32": 40 * _T, "tf32": 40 * _T, "bf16": 80 * _T, "fp16": 80 * _T},
    "rtx 3090": {"fp32": 35.6 * _T, "tf32": 35.6 * _T, "bf16": 71 * _T, "fp16": 71 * _T},
}

# torch.cuda.get_device_name() -> table row; first match wins, so the more specific patterns come first.
# Real names: "NVIDIA H100 80GB HBM3" (SXM5), "NVIDIA H100 PCIe", "NVIDIA H100 NVL", "NVIDIA H200",
# "NVIDIA GH200 480GB", "NVIDIA A100-SXM4-80GB", "NVIDIA L4", "NVIDIA A10G", "Tesla V100-SXM2-16GB", "Tesla T4",
# "NVIDIA GeForce RTX 4090".
_NAME_PATTERNS: list[tuple[str, str]] = [
    (r"h200.*nvl", "h200 nvl"),
    (r"h200", "h200 sxm"),
    (r"h100.*nvl", "h100 nvl"),
    (r"h100.*pcie", "h100 pcie"),
    (r"h100", "h100 sxm"),
    (r"b200", "b200"),
    (r"a100", "a100"),
    (r"l40s", "l40s"),
    (r"l40\b", "l40"),
    (r"\bl4\b", "l4"),
    (r"a10g", "a10g"),
    (r"\ba10\b", "a10"),
    (r"v100s", "v100s"),
    (r"v100.*pcie", "v100 pcie"),
    (r"v100", "v100 sxm2"),
    (r"\bt4\b", "t4"),
    (r"rtx 4090", "rtx 4090"),
    (r"rtx 3090 ti", "rtx 3090 ti"),
    (r"rtx 3090", "rtx 3090"),
]

_PRECISION_DTYPE = {
    "bf16-mixed": "bf16", "bf16-true": "bf16", "bf16": "bf16",
    "16-mixed": "fp16", "16-true": "fp16", "16": "fp16",
    "32-true": "fp32", "32": "fp32",
    "64-true": "fp64", "64": "fp64",
    "transformer-engine": "fp8", "transformer-engine-float16": "fp8",
}


def chip_for(device_name: str) -> Optional[str]:
    """The :data:`PEAK_FLOPS` row for a CUDA device name, or ``None`` when the table has no such GPU."""
    name = device_name.lower()
    for pattern, chip in _NAME_PATTERNS:
        if re.search(pattern, name):
            return chip
    return None


def compute_dtype(precision: Any, tf32: bool) -> Optional[str]:
    """``"bf16"``/``"fp16"``/``"fp32"``/``"tf32"``/``"fp64"``/``"fp8"`` for a trainer precision string."""
    dtype = _PRECISION_DTYPE.get(str(precision))
    if dtype == "fp32" and tf32:
        return "tf32"
    return dtype


def peak_flops(device_name: str, dtype: Optional[str]) -> Optional[float]:
    """Dense peak FLOP/s of ``device_name`` at ``dtype`` from :data:`PEAK_FLOPS`, ``None`` when unknown."""
    chip = chip_for(device_name)
    if chip is None or dtype is None:
        return None
    return PEAK_FLOPS[chip].get(dtype)


def cuda_peak(device: torch.device, precision: Any) -> tuple[Optional[float], str]:
    """(peak FLOP/s, description) for a CUDA ``device`` under a trainer ``precision``; ``(None, why)`` if unknown."""
    name = torch.cuda.get_device_name(device)
    major, _ = torch.cuda.get_device_capability(device)
    tf32 = major >= 8 and torch.get_float32_matmul_precision() != "highest"
    dtype = compute_dtype(precision, tf32)
    peak = peak_flops(name, dtype)
    if peak is None:
        return None, f"no table entry for {name!r} at precision {precision!r} ({dtype})"
    return peak, f"{peak / 1e12:g} TFLOP/s from table: {name} {dtype}"


def tensors_in(batch: Any) -> list[torch.Tensor]:
    """Every tensor in a batch, depth first through lists, tuples and dicts (host metadata only, no sync)."""
    if isinstance(batch, torch.Tensor):
        return [batch]
    if type(batch) in (tuple, list) and all(type(v) is torch.Tensor for v in batch):  # (inputs, targets): most batches
        return list(batch)
    if isinstance(batch, dict):
        return [t for v in batch.values() for t in tensors_in(v)]
    if isinstance(batch, (list, tuple)):
        return [t for v in batch for t in tensors_in(v)]
    return []


def shape_key(batch: Any) -> tuple[tuple[int, ...], ...]:
    """The shapes of a batch's tensors (:func:`tensors_in`, ``torch.Size`` values: tuples): the key FLOPs are cached
    under, and the batch size (the first tensor's leading dimension)."""
    kind = type(batch)
    if kind is tuple or kind is list:  # (inputs, targets): most batches, without a walk
        if len(batch) == 2:
            first, second = batch
            if type(first) is torch.Tensor and type(second) is torch.Tensor:
                return (first.shape, second.shape)
        shapes = tuple([v.shape for v in batch if type(v) is torch.Tensor])
        if len(shapes) == len(batch):
            return shapes
    return tuple(t.shape for t in tensors_in(batch))


def format_flops(flops: float) -> str:
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6), ("kFLOP", 1e3)):
        if flops >= scale:
            return f"{flops / scale:.3g} {unit}"
    return f"{flops:.3g} FLOP"


class StepFlopCounter:
    """Counts the FLOPs of one real step: :meth:`start` at batch start, :meth:`stop` at batch end."""

    def __init__(self) -> None:
        self._mode: Optional[Any] = None

    @property
    def active(self) -> bool:
        return self._mode is not None

    def start(self) -> None:
        from torch.utils.flop_counter import FlopCounterMode

        self._mode = FlopCounterMode(display=False)
        self._mode.__enter__()

    def stop(self) -> Optional[int]:
        """Leave the mode; the step's total FLOPs (``None`` if nothing was being counted)."""
        if self._mode is None:
            return None
        mode, self._mode = self._mode, None
        mode.__exit__(None, None, None)
        return int(mode.get_total_flops())


class FlopBook:
    """SpeedMonitor's FLOPs per batch and where they come from: ``given`` (``flops_per_batch``), else measured by
    ``FlopCounterMode`` on the real step once per batch shape (``measure``; at most ``max_shapes`` shapes, further
    ones scaled from the FLOPs per sample), else none. ``source`` says where the figure comes from, with the peak's
    own source (``peak_source``, set at setup)."""

    def __init__(self, given: Optional[float], measure: bool, max_shapes: int) -> None:
        self.given, self.measure, self.max_shapes = given, measure, max_shapes
        self.peak_source = "none"
        self.cache: dict[tuple, int] = {}  # FLOPs per batch shape (shape_key)
        self.source: Optional[str] = None
        self.measuring: Optional[tuple] = None  # the shapes counted in the batch now running
        self._counter = StepFlopCounter()

    def for_batch(self, shapes: tuple, samples: int, say: Callable[[str], Any],
                  warn: Callable[[str, str], Any]) -> Optional[float]:
        """The FLOPs of a batch of ``shapes`` (``samples`` in it); ``None`` when not measured, or while this batch is
        counted (:attr:`measuring` is then set: FlopCounterMode slows the step down, so the caller leaves it out of
        its timing, and :meth:`finish` ends the count at the batch's end)."""
        if self.given is not None:
            if self.source is None:
                self._announce(f"{format_flops(self.given)}/batch given by `flops_per_batch`", say)
            return self.given
        if not self.measure:
            return None
        flops = self.cache.get(shapes)
        if flops is not None:
            return flops
        if len(self.cache) < self.max_shapes:
            self.measuring = shapes
            self._counter.start()
            return None
        per_sample = sum(self.cache.values()) / max(1, sum(k[0][0] for k in self.cache if k and k[0]))
        warn("shapes", f"SpeedMonitor measured {self.max_shapes} batch shapes; FLOPs of further shapes are scaled"
                       " from the measured FLOPs per sample.")
        return per_sample * samples

    def finish(self, step: Optional[int], say: Callable[[str], Any]) -> None:
        """The counted batch (at ``step``) ended: keep its FLOPs for its shapes, and say them."""
        flops = self._counter.stop()
        key, self.measuring = self.measuring, None
        if flops is None or key is None:
            return
        self.cache[key] = flops
        shapes = ", ".join("(" + ",".join(map(str, s)) + ")" for s in key)
        what = (f"{format_flops(flops)}/batch measured by FlopCounterMode (forward + backward of the real"
                f" training step at global_step {step}) on batch shape {shapes}")
        if self.source is None:
            self._announce(what, say)
        else:
            say(f"SpeedMonitor: {what}")

    def abort(self) -> None:
        """Stop a count the batch did not finish (the fit ended or raised)."""
        if self.measuring is not None:
            self._counter.stop()
            self.measuring = None

    def _announce(self, what: str, say: Callable[[str], Any]) -> None:
        self.source = f"{what}; peak {self.peak_source}"
        say(f"SpeedMonitor: {self.source}")
