"""Global gradient statistics over sharded parameters (DTensor: FSDP2 ``fully_shard``, tensor parallel).

Every rank holds a shard (``DTensor.to_local()``, possibly uneven or empty) of each parameter. The numbers of the
full tensors are built from per-shard pieces that combine exactly: squared norms, NaN/Inf counts, finite sums,
finite sums of squares, finite element counts and bin counts add across ranks; finite ``max`` and ``-min`` take
the maximum. Histograms bin each local shard against the GLOBAL range (known after the MAX collective) with
:func:`~lightning_monitor._grad.bins.bin_counts`, numpy's rule, so the summed counts equal the counts of the full
tensor, element for element (``max_elements=None``).

Collectives: :func:`global_stats` makes :data:`COLLECTIVES_PER_EVENT` (2) all-reduces on the default process
group, on every rank, whatever the number of parameters: one packed MAX (``max`` and ``-min`` of every histogram
tensor, plus the caller's ``extra_max``), then one packed SUM (squared norms, weight squared norms, histogram sums,
element counts and bin counts). A step whose reduced norms hold NaN/Inf (every rank sees it) adds one MAX and
one SUM for the offending tensors: exact NaN/Inf counts and finite-only histograms. :func:`global_squared_norms` and
:func:`global_squared_diffs` make one SUM each. Nothing here runs between logging steps unless the caller asks.

A shard is counted once: a rank adds its local values to a SUM only when it is the first replica (coordinate 0 on
every ``Replicate`` mesh dimension of the tensor, and on the sub-mesh that holds global rank 0); a plain tensor (not
a DTensor) in a sharded run is counted from global rank 0 only. ``Partial`` placements (unreduced values) are
reduced to ``Replicate`` first (one more collective per such tensor).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor, Replicate

from lightning_monitor._grad import stats as _grad_stats
from lightning_monitor._grad.bins import bin_counts
from lightning_monitor._grad.norms import fast_norms, squared_norms
from lightning_monitor._grad.stats import STAT_COLUMNS, HistRange, sample_stride, summarize
from lightning_monitor._monitor import dist as _dist

COLLECTIVES_PER_EVENT = 2  # one packed MAX, one packed SUM: the all-reduces of one global_stats call


def is_sharded(tensors: Sequence[Optional[torch.Tensor]]) -> bool:
    """Whether any of ``tensors`` is a DTensor (a parameter or gradient sharded by FSDP2 or tensor parallel)."""
    return any(isinstance(t, DTensor) for t in tensors)


def local_shard(tensor: torch.Tensor, reduce_partial: bool = True) -> tuple[torch.Tensor, bool]:
    """(this rank's local values of ``tensor``, whether this rank counts them in a SUM across ranks).

    A ``Partial`` placement (unreduced summands) is reduced first (a collective, the same on every rank since the
    placements are), unless ``reduce_partial=False`` (per-step NaN/Inf flags: a summand with NaN/Inf flags it too).
    """
    rank, world = _dist.world()
    if not isinstance(tensor, DTensor):
        return tensor.detach(), rank == 0 or world == 1
    if reduce_partial and any(p.is_partial() for p in tensor.placements):
        tensor = tensor.redistribute(tensor.device_mesh, [Replicate() if p.is_partial() else p for p in
                                                          tensor.placements])  # collective: logging steps only
    mesh = tensor.device_mesh
    counted = world == 1 or 0 in mesh.mesh.reshape(-1).tolist()  # one copy of a sub-mesh: the one holding rank 0
    coordinate = list(mesh.get_coordinate() or ())
    for dim, placement in enumerate(tensor.placements):
        if (placement.is_replicate() or placement.is_partial()) and coordinate and coordinate[dim] != 0:
            counted = False  # Replicate (or Partial, unreduced): coordinate 0 along this mesh dimension counts it
    return tensor.to_local().detach(), counted


def _local_squares(local: list[torch.Tensor], counted: list[bool], device: torch.device) -> torch.Tensor:
    """``[n]`` float64: squared norms of the counted, non-empty local shards, 0 elsewhere."""
    out = torch.zeros(len(local), dtype=torch.float64, device=device)
    take = [j for j, (t, c) in enumerate(zip(local, counted, strict=True)) if c and t.numel() > 0]
    if take:
        index = torch.tensor(take, device=device)
        out.index_copy_(0, index, squared_norms([local[j] for j in take]).to(device))
    return out


def global_squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[n]`` float64 device tensor: squared L2 norms of the full tensors (one all-reduce SUM, on every rank)."""
    pairs = [local_shard(t) for t in tensors]
    local = [p[0] for p in pairs]
    return _dist.all_reduce(_local_squares(local, [p[1] for p in pairs], local[0].device), dist.ReduceOp.SUM)


def global_squared_diffs(after: Sequence[torch.Tensor], before: Sequence[torch.Tensor]) -> np.ndarray:
    """``[n]`` squared norms of ``after - before`` over the full tensors (one all-reduce SUM); ``before`` are
    copies of the local shards."""
    pairs = [local_shard(t) for t in after]
    diffs = [a - b for (a, _), b in zip(pairs, before, strict=True)]
    sq = _local_squares(diffs, [p[1] for p in pairs], diffs[0].device)
    return np.array(_dist.all_reduce(sq, dist.ReduceOp.SUM).tolist())  # sync point: update_ratio logging steps only


@dataclass
class GlobalStats:
    """Host values of one logging step, for the full tensors (every rank gets the same)."""

    sq: np.ndarray  #: ``[n]`` squared gradient norms (NaN/Inf when any shard holds NaN/Inf)
    wsq: Optional[np.ndarray]  #: ``[n]`` squared weight norms, when weights were given
    nonfinite: np.ndarray  #: ``[n]`` NaN/Inf elements per gradient
    grad_rows: np.ndarray  #: ``[len(grad_hist), STAT_COLUMNS + bins]``: finite elements only, :func:`summarize` rows
    param_rows: np.ndarray  #: ``[len(param_hist), STAT_COLUMNS + bins]`` of the weights
    extra_max: np.ndarray  #: the caller's ``extra_max`` values, maximum over ranks
    extra_sum: np.ndarray  #: the caller's ``extra_sum`` values, summed over ranks


class _Hist:
    """Local pieces of the histogram of one tensor: phase 1 before the global range, phase 2 after it."""

    def __init__(self, local: torch.Tensor, counted: bool, max_elements: Optional[int]) -> None:
        self.flat = local.reshape(-1)
        self.max_elements = max_elements
        inf = torch.tensor(float("inf"), dtype=torch.float64, device=local.device)
        self.mask: Optional[torch.Tensor] = None
        if not counted or self.flat.numel() == 0:  # nothing to add; another replica gives the same max/min
            self.high, self.neg_low = -inf, -inf
            return
        flat64 = self.flat.double()
        self.mask = torch.isfinite(flat64)
        self.flat64 = flat64
        self.high = torch.where(self.mask, flat64, -inf).amax()
        self.neg_low = torch.where(self.mask, -flat64, -inf).amax()

    def sums(self) -> torch.Tensor:
        """``[3]``: finite sum, finite sum of squares, finite element count (zeros when not counted here)."""
        if self.mask is None:
            return torch.zeros(3, dtype=torch.float64, device=self.flat.device)
        finite = torch.where(self.mask, self.flat64, 0.0)
        return torch.stack([finite.sum(), finite.square().sum(), self.mask.sum().double()])

    def counts(self, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
        """``[bins]`` float64 counts of the finite local elements over the global ``[lo, hi]``."""
        if self.mask is None:
            return torch.zeros(bins, dtype=torch.float64, device=self.flat.device)
        numel = self.flat.numel()
        stride = sample_stride(numel, self.max_elements)
        values, mask = self.flat64[::stride], self.mask[::stride]
        nonfinite = mask.numel() - mask.sum()
        counts = bin_counts(torch.where(mask, values, lo), lo, hi, bins)  # NaN/Inf stand in at lo: bin 0, taken out
        counts[0] -= nonfinite
        return counts * (numel / values.numel()) if stride > 1 else counts


def _range(high: torch.Tensor, low: torch.Tensor, hist_range: HistRange) -> tuple[torch.Tensor, torch.Tensor]:
    """``[T]`` float64 global (lo, hi) from the global finite max/min (0 where a tensor has no finite element)."""
    high = torch.where(torch.isfinite(high), high, 0.0)
    low = torch.where(torch.isfinite(low), low, 0.0)
    return _grad_stats.histogram_range(low, high, hist_range)  # the unsharded rule: minmax, symmetric or fixed


def _local_rows(tensors: list[torch.Tensor], lo: torch.Tensor, hi: torch.Tensor, bins: int,
                max_elements: Optional[int], hist_range: HistRange) -> torch.Tensor:
    """``[T, 2 + bins]`` float64: (sum, element count, counts...) of local shards binned over the GLOBAL ranges.

    Rows of tensors holding NaN/Inf are wrong here (the caller redoes them in :func:`_finite_pieces`). Each
    (sampled) shard goes through :func:`summarize` with the global ``lo`` and ``hi`` added: its own min..max is then
    exactly the global range (``minmax``, ``symmetric``), so its bins are the full tensor's; the two added elements
    are taken out of the edge bins again (both of bin 0 when ``lo == hi``).
    """
    samples, scales = [], []
    for t in tensors:
        flat = t.reshape(-1)
        stride = sample_stride(flat.numel(), max_elements)
        samples.append(flat[::stride] if stride > 1 else flat)
        scales.append(flat.numel() / samples[-1].numel())
    device, zeros = lo.device, torch.zeros(len(tensors), dtype=torch.float64, device=lo.device)
    # NaN/Inf (their rows are redone) become 0: summarize assumes finite values, and an Inf would spill a count into
    # the next tensor's first bin
    parts = [torch.cat([a.to(s.dtype).reshape(1), s, b.to(s.dtype).reshape(1)]).nan_to_num_(0.0, 0.0, 0.0)
             for s, a, b in zip(samples, lo.unbind(), hi.unbind(), strict=True)]
    rows = summarize(parts, zeros, bins, None, "minmax" if isinstance(hist_range, str) else hist_range)
    counts = rows[:, STAT_COLUMNS:].clone()
    flat_range = (lo == hi).double()
    counts[:, 0] -= 1.0 + flat_range
    counts[:, bins - 1] -= 1.0 - flat_range
    sums = rows[:, 2] - lo - hi
    scale = torch.tensor(scales, dtype=torch.float64, device=device)
    if any(v != 1.0 for v in scales):  # sampled: counts scaled to the shard, the sum over the whole shard
        counts = counts * scale.unsqueeze(1)
        sums = torch.stack([t.sum(dtype=torch.float64) for t in tensors])
    numel = torch.tensor([float(t.numel()) for t in tensors], dtype=torch.float64, device=device)
    return torch.cat([sums.unsqueeze(1), numel.unsqueeze(1), counts], dim=1)


def _finite_pieces(tensors: list[tuple[torch.Tensor, bool]], hist: Sequence[int], bins: int,
                   max_elements: Optional[int], hist_range: HistRange) -> tuple[np.ndarray, np.ndarray]:
    """Slow path, only at a logging step whose global norms hold NaN/Inf (the same on every rank): exact NaN/Inf
    counts of ``tensors`` and finite-only rows of those at positions ``hist``. Two all-reduces, one transfer."""
    device = tensors[0][0].device
    pieces = [_Hist(tensors[k][0], tensors[k][1], max_elements) for k in hist]
    high = torch.stack([h.high for h in pieces]) if pieces else torch.zeros(0, dtype=torch.float64, device=device)
    low_neg = torch.stack([h.neg_low for h in pieces]) if pieces else high
    max_pack = _dist.all_reduce(torch.cat([high, low_neg]), dist.ReduceOp.MAX)
    t = len(pieces)
    lo, hi = _range(max_pack[:t], -max_pack[t:], hist_range)
    nonfinite = [(x.numel() - torch.isfinite(x).sum()).double() if c else torch.zeros((), device=device,
                 dtype=torch.float64) for x, c in tensors]
    parts = [torch.stack(nonfinite)] + [torch.cat([h.sums(), h.counts(lo[k], hi[k], bins)])
                                        for k, h in enumerate(pieces)]
    sum_pack = _dist.all_reduce(torch.cat(parts), dist.ReduceOp.SUM)
    host = torch.cat([max_pack, sum_pack, lo, hi]).tolist()  # sync point: only at steps with NaN/Inf
    n, off = len(tensors), 2 * t
    counts, off = np.array(host[off : off + n]), off + n
    rows = np.full((t, STAT_COLUMNS + bins), np.nan)
    for k in range(t):
        total, sum_sq, num = host[off : off + 3]
        if num > 0:
            rows[k] = [-host[t + k], host[k], total, sum_sq, num, host[-2 * t + k], host[-t + k],
                       *host[off + 3 : off + 3 + bins]]
        off += 3 + bins
    return counts, rows


def global_stats(
    grads: Sequence[torch.Tensor],
    *,
    params: Optional[Sequence[torch.Tensor]] = None,
    grad_hist: Sequence[int] = (),
    param_hist: Sequence[int] = (),
    bins: int = 64,
    max_elements: Optional[int] = None,
    hist_range: HistRange = "minmax",
    extra_max: Sequence[torch.Tensor] = (),
    extra_sum: Optional[torch.Tensor] = None,
) -> GlobalStats:
    """Norms, NaN/Inf counts and histograms of the full tensors behind ``grads`` (and ``params``), on every rank.

    Call it on EVERY rank with the same arguments' shapes: it makes :data:`COLLECTIVES_PER_EVENT` all-reduces
    (one MAX, one SUM) and one host transfer, plus two all-reduces and a transfer at a step whose gradients hold
    NaN/Inf (known from the reduced norms, so on every rank alike). ``grads``/``params`` are DTensors or plain
    tensors (counted from rank 0); ``grad_hist``/``param_hist`` index the tensors to histogram; ``extra_max``
    are device tensors (e.g. per-rank step counts) reduced by maximum in the same MAX collective, ``extra_sum`` a flat
    device tensor (e.g. the optimizer state's addends) summed in the same SUM collective.

    Histogram rows follow :func:`~lightning_monitor._grad.stats.summarize`: ``[min, max, sum, sum_squares, num, lo,
    hi, counts...]`` over the finite elements (a row of NaN when there are none; weights holding NaN/Inf get a NaN
    row); ``hist_range`` as in ``GradientMonitor``. With ``max_elements`` each rank bins at most that many elements
    of its shard (a prime stride), scaled to the shard's element count; ``None`` gives exact counts.
    """
    gpairs = [local_shard(g) for g in grads]
    ppairs = [local_shard(p) for p in params] if params is not None else []
    device = gpairs[0][0].device
    tensors = [gpairs[j] for j in grad_hist] + [ppairs[j] for j in param_hist]
    t = len(tensors)
    live = [k for k, (x, c) in enumerate(tensors) if c and x.numel() > 0]  # shards this rank adds
    live_index = torch.tensor(live, dtype=torch.int64, device=device)

    # collective 1 (MAX): the global max and -min of every histogram tensor, and the caller's extra values
    high = torch.full((t,), -math.inf, dtype=torch.float64, device=device)
    low_neg = high.clone()
    if live:
        low, top = zip(*(torch.aminmax(tensors[k][0]) for k in live), strict=True)
        high.index_copy_(0, live_index, torch.stack(top).double())
        low_neg.index_copy_(0, live_index, -torch.stack(low).double())
    extras = [e.reshape(-1).double().to(device) for e in extra_max]
    max_pack = _dist.all_reduce(torch.cat([high, low_neg, *extras]), dist.ReduceOp.MAX)
    lo, hi = _range(max_pack[:t], -max_pack[t : 2 * t], hist_range)

    # collective 2 (SUM): squared norms, then per histogram tensor (sum, element count, counts...)
    sum_parts = [_local_squares([x for x, _ in gpairs], [c for _, c in gpairs], device)]
    if params is not None:
        sum_parts.append(_local_squares([x for x, _ in ppairs], [c for _, c in ppairs], device))
    rows_local = torch.zeros(t, 2 + bins, dtype=torch.float64, device=device)
    if live:
        rows_local.index_copy_(0, live_index, _local_rows(
            [tensors[k][0] for k in live], lo[live_index], hi[live_index], bins, max_elements, hist_range))
    extra = [] if extra_sum is None else [extra_sum.reshape(-1).to(device=device, dtype=torch.float64)]
    sum_pack = _dist.all_reduce(torch.cat([*sum_parts, rows_local.reshape(-1), *extra]), dist.ReduceOp.SUM)
    host = np.array(torch.cat([max_pack, sum_pack, lo, hi]).tolist())  # sync point: one transfer per logging step

    n, off = len(grads), len(max_pack)
    sq, off = host[off : off + n], off + n
    wsq = None
    if params is not None:
        wsq, off = host[off : off + n], off + n
    table = host[off : off + t * (2 + bins)].reshape(t, 2 + bins)
    off += t * (2 + bins)
    extra_host = host[off : off + (0 if extra_sum is None else extra_sum.numel())]
    square = np.concatenate([sq[list(grad_hist)], (wsq if wsq is not None else sq)[list(param_hist)]])
    rows = np.concatenate([-host[t : 2 * t, None], host[:t, None], table[:, :1], square[:, None], table[:, 1:2],
                           host[host.size - 2 * t :].reshape(2, t).T, table[:, 2:]], axis=1)
    rows[~np.isfinite(square)] = np.nan  # redone below from the finite elements (gradients) or left out (weights)
    nonfinite = np.zeros(n)
    bad = np.flatnonzero(~np.isfinite(sq))
    if bad.size:  # the same on every rank: the reduced norms say so
        where = {j: b for b, j in enumerate(bad.tolist())}
        redo = [k for k, j in enumerate(grad_hist) if j in where]
        counts, fixed = _finite_pieces([gpairs[j] for j in bad.tolist()], [where[grad_hist[k]] for k in redo],
                                       bins, max_elements, hist_range)
        nonfinite[bad] = counts
        rows[redo] = fixed
    g = len(grad_hist)
    return GlobalStats(sq=sq, wsq=wsq, nonfinite=nonfinite, grad_rows=rows[:g], param_rows=rows[g:],
                       extra_max=host[2 * t : len(max_pack)], extra_sum=extra_host)


def local_shards(tensors: list[torch.Tensor], trainer: "pl.Trainer") -> list[torch.Tensor]:
    """This rank's local values of each tensor for per-rank work between logging steps (NaN/Inf flags):
    ``tensors`` itself, unchecked, outside ``ModelParallelStrategy``."""
    if not _dist.model_on_every_rank(trainer) or not is_sharded(tensors):
        return tensors
    return [local_shard(t, reduce_partial=False)[0] for t in tensors]


def step_norms(grads: list[torch.Tensor], trainer: "pl.Trainer") -> torch.Tensor:
    """Per-step norms for ``nonfinite="raise"``/``"skip"``: float32 ``fast_norms``, or, for DTensors, the full
    tensors' squared norms (one all-reduce per step, so that every rank acts alike)."""
    sharded = _dist.model_on_every_rank(trainer) and is_sharded(grads)
    return global_squared_norms(grads) if sharded else fast_norms(grads)
