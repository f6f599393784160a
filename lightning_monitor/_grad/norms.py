"""Gradient and weight norms for GradientMonitor: exact ones for logging steps, fast ones for NaN/Inf detection.

Both only queue device work and return device tensors; the caller makes the one host transfer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import numpy as np
import torch

from lightning_monitor._core.compat import foreach_mul, foreach_norm
from lightning_monitor._core.lru import Lru

_NORM_ROW = 64  # CPU norms: float32 over rows of this many elements, combined in float64
_NORM_SMALL = 2**17  # CPU norms: tensors up to this size are normed whole, in one float64 _foreach_norm
_MAX_PLANS = 4  # row-owner vectors kept for recently seen parameter sets

#: the pass :func:`squared_norms` takes: ``None`` picks by device (the fused float64 ``_foreach_norm`` on CUDA or for
#: float64 tensors, float32 rows elsewhere); ``True`` forces the fused one (benchmarks and tests count the CUDA
#: path's device ops on a CPU with it)
FUSED: Optional[bool] = None


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[P]`` float64 device tensor: the squared L2 norm of each tensor, within 1e-6 relative of float64 at any size.

    CUDA (or float64 tensors): one ``torch._foreach_norm`` accumulating in float64 (a memory-bound read: free on
    H100/H200-class parts). CPU, where float64 accumulation costs a float64 copy of every tensor (~20x per
    element): tensors of at most ``_NORM_SMALL`` elements as float32 sums of their squares (torch's CPU sum is a
    cascade sum: within ~3e-7 of float64 at any size measured; 100K elements in ~50 us where the float64 norm takes
    ~90 us, ~190 us run cold inside a fit); larger ones as float32 norms of rows of ``_NORM_ROW`` elements (few
    enough terms per SIMD lane that even a constant tensor stays below ~4e-7; the cascade sum of a 16M-element
    tensor's squares takes 7x as long), the rows' squares summed in float64. A whole float32 *norm* is not used:
    it drifts by ~1e-5 at 1e4 elements and ~1e-3 at 1e6. fp16/bf16 are squared in float32. A float32 square
    overflows past ~1.8e19 an element: a CPU norm that comes out Inf or NaN is measured again in float64, so only
    a real NaN/Inf reads as one.
    """
    tensors = _detached(tensors)
    if not tensors:
        return torch.zeros(0, dtype=torch.float64)
    device = tensors[0].device
    fused = FUSED if FUSED is not None else device.type == "cuda" or any(t.dtype == torch.float64 for t in tensors)
    if fused:
        return torch.stack(foreach_norm(tensors, 2, dtype=torch.float64)).square()
    sq = _cpu_squared_norms(tensors)
    values = sq.tolist()
    if not math.isfinite(sum(values)):  # an overflow of float32 (or a real NaN/Inf): those again in float64
        bad = [i for i, v in enumerate(values) if not math.isfinite(v)]
        sq[bad] = torch.stack(foreach_norm([tensors[i] for i in bad], 2, dtype=torch.float64)).square()
    return sq


def _detached(tensors: Sequence[torch.Tensor]) -> list[torch.Tensor]:
    """``tensors`` outside autograd: a gradient that needs no gradient itself (all but ``create_graph`` ones) as it is
    (``detach`` is a torch call, ~2 us each run cold inside a fit)."""
    return [t.detach() if t.requires_grad else t for t in tensors]


def _cpu_squared_norms(tensors: list[torch.Tensor]) -> torch.Tensor:
    """:func:`squared_norms` in float32 on a CPU (see there), float64 out."""
    small = [t if t.dtype == torch.float32 else t.float() for t in tensors if t.numel() <= _NORM_SMALL]
    whole = torch.stack([s.sum() for s in foreach_mul(small, small)]).double() if small else None
    parts = []
    for t in tensors:
        n = t.numel()
        if n > _NORM_SMALL:
            flat, body = t.reshape(-1), n - n % _NORM_ROW
            parts.append(torch.linalg.vector_norm(flat[:body].view(-1, _NORM_ROW), dim=1, dtype=torch.float32))
            if body < n:
                parts.append(torch.linalg.vector_norm(flat[body:], dtype=torch.float32).reshape(1))
    if not parts and whole is not None:
        return whole  # every tensor small: one row each, already in order
    rows = torch.cat(parts).double().square()
    if whole is not None:
        rows = torch.cat([whole, rows])
    device = tensors[0].device
    owner = _norm_owner(tuple(t.numel() for t in tensors), device)
    return torch.zeros(len(tensors), dtype=torch.float64, device=device).index_add_(0, owner, rows)


def fast_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[P]`` device tensor of L2 norms for NaN/Inf detection only: one ``torch._foreach_norm`` in the tensors' own
    precision (float32 for fp16/bf16, which would overflow), no float64 accuracy work. Non-finite exactly where
    a tensor holds NaN/Inf (or, for float32, where its norm exceeds float32's range: ~1e19 per element)."""
    tensors = _detached(tensors)
    if not tensors:
        return torch.zeros(0)
    low = [i for i, t in enumerate(tensors) if t.dtype in (torch.float16, torch.bfloat16)]
    if not low:
        return torch.stack(foreach_norm(tensors, 2))
    if len(low) == len(tensors):
        return torch.stack(foreach_norm(tensors, 2, dtype=torch.float32))
    high = [i for i, t in enumerate(tensors) if t.dtype not in (torch.float16, torch.bfloat16)]
    norms = torch.cat([torch.stack(foreach_norm([tensors[i] for i in low], 2, dtype=torch.float32)),
                       torch.stack(foreach_norm([tensors[i] for i in high], 2)).float()])
    order = torch.tensor(np.argsort(np.array(low + high), kind="stable"), device=norms.device)
    return norms.index_select(0, order)


_OWNERS: Lru[torch.Tensor] = Lru(_MAX_PLANS)


def _norm_owner(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    """Which tensor each row of :func:`squared_norms` belongs to (small tensors first, then the rows of each large
    one), cached per size list."""

    def make() -> torch.Tensor:
        owner = [i for i, n in enumerate(numels) if n <= _NORM_SMALL]
        for i, n in enumerate(numels):
            if n > _NORM_SMALL:
                owner += [i] * (n // _NORM_ROW + (1 if n % _NORM_ROW else 0))
        return torch.tensor(owner, device=device)

    return _OWNERS.get_or_make((numels, device), make)
