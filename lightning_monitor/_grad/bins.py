"""Binning for :mod:`~lightning_monitor._grad.stats`: counts on the device that equal ``numpy.histogram`` count for
count, for many rows at once, each row over its own tensor's edges (no host sync)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional

import torch

_SHIFT = 2.0**-10  # candidate bins are computed this far low, then moved up by one exact comparison


def edge_table(lo: torch.Tensor, hi: torch.Tensor, bins: int, work: torch.dtype) -> torch.Tensor:
    """``[1 + T * (bins + 1)]`` step-up limits: entry ``1 + t * (bins + 1) + j`` is the largest ``work`` value below
    edge ``j + 1`` of tensor ``t`` (a value is in bin ``j + 1`` or above exactly when it is greater); ``+inf``
    for the last edge (closed last bin, clamped values) and for each tensor's spare slot ``j = bins`` (where a
    NaN/Inf in the last bin may step: that tensor is redone by :func:`summarize_finite`, no other one is
    touched). Entry 0 is the padding's slot.

    Edges are computed in float64 exactly as ``numpy.linspace`` does (``arange * step``, then ``+ lo``, the last
    one ``hi``); rounded to float32 (up, then one float32 down) a float32 value compares with the limit as it
    does with the float64 edge.
    """
    step = (hi - lo) / bins
    edges = torch.arange(1, bins + 1, dtype=torch.float64, device=lo.device).unsqueeze(0) * step.unsqueeze(1)
    edges = edges + lo.unsqueeze(1)
    inf = torch.full_like(edges[:, -1:], math.inf)
    if work == torch.float32:
        rounded = edges.float()  # the smallest float32 >= the float64 edge, one float32 below it
        below = torch.where(rounded.double() < edges, rounded, torch.nextafter(rounded, -inf.float()))
    else:
        below = torch.nextafter(edges, -inf)
    limits = torch.cat([below[:, :-1].to(work), inf.to(work), inf.to(work)], dim=1)  # last edge, spare slot
    limits = torch.where((hi > lo).unsqueeze(1), limits, inf.to(work))  # a constant tensor stays in bin 0
    return torch.cat([limits.new_zeros(1), limits.reshape(-1)])


def bin_rows(
    x: torch.Tensor,
    row_lo: torch.Tensor,
    row_scale: torch.Tensor,
    row_offset: torch.Tensor,
    table: torch.Tensor,
    bins: int,
    work: torch.Tensor,
    index: torch.Tensor,
    flags: torch.Tensor,
    trash: Optional[torch.Tensor],
    clamp: bool = True,
) -> torch.Tensor:
    """``[T, bins]`` int64 counts of ``x`` (``[K, C]``), row ``r`` binned over its tensor's edges.

    A candidate bin ``floor((x - lo) * scale - _SHIFT)``, clamped into ``[0, bins)``, is exact or one too low
    (rounding moves it by far less than ``_SHIFT`` for at most 512 bins); ONE comparison with the limit below the
    next edge (a gather from ``table``, see :func:`edge_table`) moves it up. This is numpy's rule: ``edges[i]
    <= x < edges[i + 1]``, the last bin closed, values outside ``[lo, hi]`` in the edge bins. ``row_offset`` is
    ``1 + tensor * (bins + 1)`` per row; positions listed in ``trash`` (padding) are counted in the unused slot 0.
    ``work``/``index``/``flags`` are ``x``-shaped buffers (work dtype, int32, bool). ``clamp=False`` when every
    finite value lies in its row's ``[lo, hi]`` (a min..max or symmetric range): truncation already lands in
    ``[0, bins)`` and one pass is saved; NaN/Inf are still mapped into range.
    """
    torch.sub(x, row_lo, out=work)
    work.mul_(row_scale).sub_(_SHIFT)  # (an addcmul is slower on a CPU than these two)
    if clamp:
        work.nan_to_num_(nan=0.0).clamp_(0, bins - 1)
    else:
        work.nan_to_num_(nan=0.0, posinf=bins - 1, neginf=0.0)
    index.copy_(work)  # truncation == floor for values > -1
    index.add_(row_offset)
    flat = index.view(-1)
    torch.index_select(table, 0, flat, out=work.view(-1))  # the step-up limit of each candidate
    if work.dtype == torch.float32:
        # limit - x < 0 exactly when x > limit (a rounded difference keeps its sign and is 0 only for equal
        # values): its sign bit, shifted over the int32 (-1 or 0), is the step. 2x faster on a CPU than a
        # comparison into bool, its copy to int32 and an add.
        torch.sub(work, x, out=work)
        step = work.view(torch.int32).bitwise_right_shift_(31)
        index.sub_(step)
    else:
        torch.gt(x, work, out=flags)
        step = work.view(-1).view(torch.int32)[: flags.numel()].view(flags.shape)  # the limits are spent
        index.add_(step.copy_(flags))  # bool -> int32 into existing memory: an add of bool would allocate
    if trash is not None:
        flat.index_fill_(0, trash, 0)
    size = int(table.numel())
    if flat.device.type == "cpu":
        counts = torch.bincount(flat, minlength=size)[1:]
    else:  # CUDA bincount reads max() on the host to size its output (a sync); histc with a fixed range does not
        counts = torch.histc(flat.double().add_(0.5), bins=size, min=0, max=size)[1:].long()
    return counts.view(-1, bins + 1)[:, :bins]


def bin_counts(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of each row of ``sample`` (``[k, m]``, or 1-D) in ``bins`` equal bins over its ``[lo, hi]``.

    ``lo``/``hi`` are device tensors (``[k]`` or 0-d), so nothing is read back to the host. Counts equal
    ``numpy.histogram(row, bins, range=(lo, hi))`` with values outside the range in the edge bins; a constant
    row (``lo == hi``) lands in bin 0.
    """
    rows = (sample.reshape(1, -1) if sample.dim() == 1 else sample).double()
    k = rows.shape[0]
    lo64, hi64 = lo.reshape(-1).double().expand(k), hi.reshape(-1).double().expand(k)
    span = torch.where(hi64 > lo64, hi64 - lo64, torch.ones_like(hi64))
    offset = (1 + torch.arange(k, device=rows.device, dtype=torch.int32) * (bins + 1)).unsqueeze(1)
    counts = bin_rows(rows, lo64.unsqueeze(1), (bins / span).unsqueeze(1), offset,
                       edge_table(lo64, hi64, bins, torch.float64), bins, torch.empty_like(rows),
                       torch.empty(rows.shape, dtype=torch.int32, device=rows.device),
                       torch.empty(rows.shape, dtype=torch.bool, device=rows.device), None)
    counts = counts.reshape(k, bins).to(sample.dtype if sample.is_floating_point() else torch.float32)
    return counts if sample.dim() > 1 else counts[0]


def scaled_counts(pieces: Sequence[torch.Tensor], group: Sequence[int], scale: Sequence[float], lo: torch.Tensor,
                  hi: torch.Tensor, bins: int) -> torch.Tensor:
    """``[G, bins]`` float64: the counts of 1-D ``pieces``, piece ``p`` binned over the ``[lo, hi]`` of its group
    ``group[p]`` (``lo``/``hi``: ``[G]`` device tensors), scaled by ``scale[p]`` and added up per group.

    Counts are :func:`bin_counts`'s (``numpy.histogram``'s rule); a fixed number of device ops for any number of
    pieces and no host read (the pieces' groups, sizes and scales, known on the host, go to the device in one copy).
    """
    device, groups = lo.device, lo.numel()
    out = torch.zeros(groups, bins, dtype=torch.float64, device=device)
    if not pieces:
        return out
    values = torch.cat([p.reshape(-1).to(device=device, dtype=torch.float64) for p in pieces]).unsqueeze(1)  # [N, 1]
    host = torch.tensor([list(group), [p.numel() for p in pieces], list(scale)], dtype=torch.float64)
    if device.type == "cuda":  # pinned: a pageable host-to-device copy would wait for the device
        host = host.pin_memory()
    meta = host.to(device, non_blocking=True)
    which, sizes, factor = meta[0].long(), meta[1].long(), meta[2]
    seg = torch.repeat_interleave(torch.arange(len(pieces), device=device), sizes, output_size=values.shape[0])
    piece_lo, piece_hi = lo.double().index_select(0, which), hi.double().index_select(0, which)
    span = torch.where(piece_hi > piece_lo, piece_hi - piece_lo, torch.ones_like(piece_hi))
    counts = bin_rows(
        values, piece_lo.index_select(0, seg).unsqueeze(1), (bins / span).index_select(0, seg).unsqueeze(1),
        (1 + seg.to(torch.int32) * (bins + 1)).unsqueeze(1), edge_table(piece_lo, piece_hi, bins, torch.float64),
        bins, torch.empty_like(values), torch.empty(values.shape, dtype=torch.int32, device=device),
        torch.empty(values.shape, dtype=torch.bool, device=device), None,
    )  # [P, bins]
    return out.index_add_(0, which, counts.double() * factor.unsqueeze(1))
