"""ActivationMonitor's forward hooks: per module output, device sums kept between the calls of a logging batch.

A hook only queues device work (no host read): ``sum x``, ``sum x^2``, ``max |x|`` and, per unit, whether
it was ever non-zero, and with histograms a strided sample of the output (a copy) with its finite min and max.
The element count is the output's shape, known on the host. :func:`pack` lays every module's
numbers out in one flat float64 tensor for the one gather of a logging step; :func:`combine` reduces the gathered
``[world, n]`` rows over the ranks: sums and counts add up (exact mean and RMS of the global batch), maxima take the
maximum, a unit is dead when it was zero on every rank.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch import nn
from torch.distributed.tensor import DTensor

STATS = ("rms", "mean", "max_abs", "dead_share")
_HEAD = 4  # per module in the pack: sum, sum of squares, count, max |x|; then one 0/1 per unit (ever non-zero)


def unit_dim(module: nn.Module, output: torch.Tensor) -> int:
    """The dimension that holds a module's units: channels (dim 1) after a convolution or batch norm, else the last
    (features of a Linear, a transformer's hidden size)."""
    if output.dim() >= 3 and isinstance(module, (nn.modules.conv._ConvNd, nn.modules.batchnorm._BatchNorm)):
        return 1
    return output.dim() - 1


class Tap:
    """One chosen module's running sums over the counted forward calls of a logging step."""

    def __init__(self, stride: Optional[Callable[[int], int]] = None) -> None:
        self.stride = stride  # the sampling stride for an output of n elements; None: no histogram samples
        self.samples: list[tuple[torch.Tensor, float]] = []  # (strided copy, numel / sampled) per counted call
        self.high: Optional[torch.Tensor] = None  # [] float64: the samples' largest finite value (-inf: none)
        self.neg_low: Optional[torch.Tensor] = None  # [] float64: minus their smallest finite value
        self.sums: Optional[torch.Tensor] = None  # [2] float64: sum x, sum x^2
        self.max_abs: Optional[torch.Tensor] = None  # [] float64
        self.alive: Optional[torch.Tensor] = None  # [units] bool: non-zero somewhere
        self.count = 0  # elements seen (host: from the shapes)
        self.units = 0  # the unit dimension's size (host, from the first counted call)

    def add(self, module: nn.Module, output: Any) -> None:
        x = output[0] if isinstance(output, (tuple, list)) and output else output
        if not isinstance(x, torch.Tensor) or not x.is_floating_point() or x.numel() == 0:
            return
        with torch.no_grad():
            # tensor parallel: an output left as a DTensor (use_local_output=False) is read as this rank's part; its
            # sums and counts add up over the ranks like a data-parallel batch's (a replicated one counts each
            # copy, which leaves mean and RMS as they are)
            x = x.to_local().detach() if isinstance(x, DTensor) else x.detach()
            dim = unit_dim(module, x)
            if self.alive is not None and x.shape[dim] != self.units:
                return  # a call with another width (shared module used twice): the first width is kept
            flat = x.reshape(-1)
            # float32 reductions (pairwise/tree sums, within 1e-6 here), accumulated across calls in float64: a float64
            # sum of a float32 tensor costs ~20x a float32 one on the CPU
            f32 = torch.float32  # half-precision outputs too: their sum of squares would overflow float16
            sums = torch.stack([flat.sum(dtype=f32), torch.linalg.vector_norm(flat, dtype=f32).square()]).double()
            unit_max = x.abs().movedim(dim, -1).reshape(-1, x.shape[dim]).amax(dim=0)  # [units] max |x|
            peak = unit_max.amax().double()
            alive = unit_max != 0
            if self.sums is None or self.max_abs is None or self.alive is None:
                self.sums, self.max_abs, self.alive, self.units = sums, peak, alive, int(x.shape[dim])
            else:
                self.sums = self.sums + sums
                self.max_abs = torch.maximum(self.max_abs, peak)
                self.alive = self.alive | alive
            self.count += x.numel()
            if self.stride is not None:
                self._sample(flat, self.stride(flat.numel()))

    def _sample(self, flat: torch.Tensor, stride: int) -> None:
        """Keep every ``stride``-th element of ``flat`` and their finite min and max; device work only."""
        work = torch.float64 if flat.dtype == torch.float64 else torch.float32
        # a copy: a later in-place op (ReLU(inplace=True)) must not change what was sampled
        sample = flat[::stride].to(dtype=work, copy=True)
        self.samples.append((sample, flat.numel() / sample.numel()))
        # NaN/Inf never set the range (-inf / +inf when nothing is finite: that histogram is left out)
        high = sample.nan_to_num(nan=-math.inf, posinf=-math.inf).amax().double()
        neg_low = sample.nan_to_num(nan=math.inf, neginf=math.inf).amin().double().neg()
        if self.high is None or self.neg_low is None:
            self.high, self.neg_low = high, neg_low
        else:
            self.high, self.neg_low = torch.maximum(self.high, high), torch.maximum(self.neg_low, neg_low)


def pack(taps: Sequence[Tap], units: Sequence[int], device: torch.device) -> torch.Tensor:
    """Every tap's numbers in one flat float64 tensor (``units``: each module's unit count, the same on every rank;
    a tap that saw no call packs zeros of that width)."""
    parts: list[torch.Tensor] = []
    for tap, width in zip(taps, units, strict=True):
        if tap.sums is None or tap.max_abs is None or tap.alive is None:
            parts.append(torch.zeros(_HEAD + width, dtype=torch.float64, device=device))
            continue
        count = torch.full((1,), float(tap.count), dtype=torch.float64, device=tap.sums.device)  # a fill, no copy
        head = torch.cat([tap.sums, count, tap.max_abs.reshape(1)])
        parts.append(torch.cat([head.to(device), tap.alive.to(device=device, dtype=torch.float64)]))
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.float64, device=device)


def pack_width(units: Sequence[int]) -> int:
    """The length of :func:`pack`'s tensor (what follows it in the gathered rows starts there)."""
    return sum(_HEAD + width for width in units)


def _blocks(gathered: np.ndarray, units: Sequence[int]) -> list[np.ndarray]:
    """Each module's ``[world, _HEAD + units]`` block of the gathered packs."""
    starts = np.cumsum([0, *(_HEAD + width for width in units)])
    return [gathered[:, a:b] for a, b in zip(starts[:-1], starts[1:], strict=True)]


def totals(gathered: np.ndarray, units: Sequence[int]) -> np.ndarray:
    """``[modules, 3]``: sum, sum of squares and element count of each module's output over every rank."""
    return np.array([block[:, :3].sum(axis=0) for block in _blocks(gathered, units)]).reshape(-1, 3)


def combine(gathered: np.ndarray, names: Sequence[str], units: Sequence[int]) -> dict[str, float]:
    """``act/{stat}/{module}`` from the gathered ``[world, n]`` packs (modules that saw no element are left out)."""
    out: dict[str, float] = {}
    for name, width, block, (total, squares, count) in zip(names, units, _blocks(gathered, units),
                                                           totals(gathered, units), strict=True):
        if count <= 0:
            continue
        alive = block[:, _HEAD:].max(axis=0) if width else np.zeros(0)
        out[f"act/rms/{name}"] = float(np.sqrt(squares / count))
        out[f"act/mean/{name}"] = float(total / count)
        out[f"act/max_abs/{name}"] = float(block[:, 3].max())
        out[f"act/dead_share/{name}"] = float(1.0 - alive.mean()) if width else 0.0
    return out
