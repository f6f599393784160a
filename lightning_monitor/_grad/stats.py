"""On-device statistics for :class:`~lightning_monitor.GradientMonitor`: histograms, exact stats, non-finite counts.

Everything here only queues device work and returns device tensors; the caller makes the one host transfer.
A row of :func:`summarize` is ``[min, max, sum, sum_squares, num, lo, hi, counts...]`` where ``lo``/``hi`` is the
binned range (``bins + 1`` edges ``numpy.linspace(lo, hi, bins + 1)``, the edges :func:`host_histogram` reports).

One event is a fixed number of device ops whatever the number of tensors: all tensors are copied by ONE
``torch.cat`` into a flat buffer laid out in rows of ``_ROW`` elements (each tensor padded to whole rows), reduced
per row and then per tensor over the (few) rows, and binned by one ``bincount`` over ``bin + tensor * (bins + 1)``.
With sampled histograms a tensor of at least ``_IN_PLACE`` elements is the exception: reduced where it lies (a few
ops each, whose memory traffic dwarfs their launch) and only its sample copied. Bin indices agree with
``numpy.histogram`` count for count (see :func:`~lightning_monitor._grad.bins.bin_rows`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import numpy as np
import torch

from lightning_monitor._core.lru import Lru
from lightning_monitor._grad.bins import bin_rows, edge_table
from lightning_monitor._grad.norms import _NORM_ROW, fast_norms, squared_norms  # noqa: F401 - re-exported

STAT_COLUMNS = 7  # min, max, sum, sum_squares, num, lo, hi
_ROW = 256  # row width of the flat layout; a tensor is padded to whole rows
_IN_PLACE = 1 << 22  # sampled tensors this large are reduced where they lie, not copied (see _Plan)
_MAX_PLANS = 4  # layouts (and, on the CPU, their work buffers) kept for recently seen parameter sets
_FLT_MAX = float(torch.finfo(torch.float32).max)

HistRange = Union[str, Sequence[float]]


def _is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    return all(n % d for d in range(3, int(math.isqrt(n)) + 1, 2))


def sample_stride(numel: int, max_elements: Optional[int]) -> int:
    """1 for exact binning, else the smallest prime >= ``ceil(numel / max_elements)``.

    A prime stride walks every column of a row-major weight instead of hitting the same few columns again and
    again (a stride that divides the row length would bin one column only).
    """
    if max_elements is None or numel <= max_elements:
        return 1
    stride = -(-numel // max_elements)
    while not _is_prime(stride):
        stride += 1
    return stride


def _float32_exact(value: float) -> bool:
    return float(np.float32(value)) == value


class _Plan:
    """Layout, index vectors and (on the CPU) work buffers for one list of tensor sizes; reused every event.

    Tensors are copied into one flat buffer of ``_ROW``-element rows (each padded to whole rows) and reduced and
    binned there, a fixed number of ops for any number of tensors. The exception: when histograms are sampled, a
    tensor of at least ``_IN_PLACE`` elements is not copied; its min/max/sum/norm are reduced where it lies (a few
    ops whose memory traffic dwarfs their launch) and only its strided sample joins the binning, which spares
    copying the large gradients of a large model (on a CPU the copy cost more than the statistics).
    """

    def __init__(self, numels: list[int], dtype: torch.dtype, device: torch.device, bins: int,
                 max_elements: Optional[int], fixed: Optional[tuple[float, float]], keep_buffers: bool) -> None:
        if min(numels) < 1:
            raise ValueError(f"summarize needs non-empty tensors, got sizes {numels}")
        self.numels, self.dtype, self.device, self.bins = numels, dtype, device, bins
        self.keep_buffers = keep_buffers
        self._buffers: dict[str, torch.Tensor] = {}
        # float32 candidates are within _grad_bins._SHIFT when lo is a float32 value (min, -max|x| or a float32-exact
        # bound)
        exact32 = dtype == torch.float32 and (fixed is None or all(_float32_exact(v) for v in fixed))
        self.work = torch.float32 if exact32 else torch.float64
        sizes, ids = np.array(numels), np.arange(len(numels))
        strides = np.array([sample_stride(n, max_elements) for n in numels])
        self.sampled = bool((strides > 1).any())
        in_place = (strides > 1) & (sizes >= _IN_PLACE)
        self.copied = ~in_place
        self.in_place = np.flatnonzero(in_place)
        copied = np.where(in_place, 0, sizes)
        rows = -(-copied // _ROW)
        starts = np.concatenate([[0], np.cumsum(rows)[:-1]]) * _ROW
        self.rows = int(rows.sum())
        self.pads = rows * _ROW - copied
        self.full = self._layout(ids, rows, copied)
        if self.sampled:
            taken = -(-sizes // strides)
            srows = -(-taken // _ROW)
            order = np.concatenate([np.flatnonzero(self.copied), self.in_place])  # samples of copied tensors first
            self.sample = self._layout(order, srows[order], taken[order])
            # one gather index into the flat buffer: the samples of each copied tensor, padded with its first element
            src = [np.concatenate([starts[i] + np.arange(taken[i]) * strides[i], np.full(srows[i] * _ROW - taken[i],
                                                                                         starts[i])])
                   for i in np.flatnonzero(self.copied)]
            self.source = self._dev(np.concatenate(src).astype(np.int64)) if src else None
            self.source_len = int(srows[self.copied].sum()) * _ROW
            self.sample_len = int(srows.sum()) * _ROW
            self.in_place_take = [(int(strides[i]), int(srows[i] * _ROW - taken[i])) for i in self.in_place]
            self.scale = self._dev(sizes / taken).to(torch.float64).unsqueeze(1)
        self.in_place_dev = self._dev(self.in_place) if self.in_place.size else None
        self.num = self._dev(sizes.astype(np.float64))
        self.norm_seg = self._dev(np.repeat(ids, rows * (_ROW // _NORM_ROW)))  # [rows * 4]

    def _dev(self, array: np.ndarray) -> torch.Tensor:
        return torch.from_numpy(np.ascontiguousarray(array)).to(self.device)

    def _layout(self, ids: np.ndarray, rows: np.ndarray, counts: np.ndarray) -> dict[str, Optional[torch.Tensor]]:
        """Row-to-tensor map, bin offsets and padding positions (with each padding's tensor's start) of a layout
        holding ``counts[k]`` values of tensor ``ids[k]`` in ``rows[k]`` rows, in that order."""
        seg = np.repeat(ids, rows)
        out: dict[str, Optional[torch.Tensor]] = {
            "seg": self._dev(seg),
            "offset": self._dev((1 + seg * (self.bins + 1)).astype(np.int32)).unsqueeze(1),
        }
        where = np.concatenate([[0], np.cumsum(rows)[:-1]]) * _ROW
        trash = np.concatenate([np.arange(w + c, w + r * _ROW) for w, c, r in zip(where, counts, rows, strict=True)])
        out["trash"] = self._dev(trash.astype(np.int64)) if trash.size else None
        first = np.concatenate([np.full(r * _ROW - c, w) for w, c, r in zip(where, counts, rows, strict=True)])
        out["first"] = self._dev(first.astype(np.int64)) if trash.size else None
        return out

    def buffer(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A work buffer: kept between events on the CPU (fresh pages cost more than the work), else allocated
        (the CUDA caching allocator reuses its memory without holding it for us)."""
        buf = self._buffers.get(name)
        if buf is None:
            buf = torch.empty(shape, dtype=dtype, device=self.device)
            if self.keep_buffers:
                self._buffers[name] = buf
        return buf

    def _per_tensor(self, per_row: torch.Tensor, reduce: str) -> torch.Tensor:
        """``[T]`` reduction of per-row values over each tensor's rows (a scatter: no host sync, unlike segment ops)."""
        out = per_row.new_zeros(len(self.numels))
        return out.scatter_reduce_(0, self.full["seg"], per_row, reduce, include_self=False)  # type: ignore[arg-type]

    def run(self, tensors: list[torch.Tensor], sum_squares: Optional[torch.Tensor], hist_range: HistRange
            ) -> torch.Tensor:
        count, own_norms = len(self.numels), sum_squares is None
        buf: Optional[torch.Tensor] = None
        if self.rows:
            parts: list[torch.Tensor] = []
            for tensor, pad, copy in zip(tensors, self.pads, self.copied, strict=True):
                if copy:
                    flat = tensor.detach().reshape(-1)
                    parts.append(flat)
                    if pad:
                        parts.append(flat[:1].expand(int(pad)))  # padding repeats the first element: min/max unchanged
            buf = self.buffer("flat", (self.rows * _ROW,), self.dtype)
            torch.cat(parts, out=buf)
            x = buf.view(-1, _ROW)
            vmin = self._per_tensor(x.amin(dim=1).double(), "amin")
            vmax = self._per_tensor(x.amax(dim=1).double(), "amax")
            trash = self.full["trash"]
            if trash is not None:
                buf.index_fill_(0, trash, 0)  # zero for the sums ...
            total = self._per_tensor(x.sum(dim=1).double(), "sum")
            if sum_squares is None:  # float32 norms of 64-element rows combined in float64: as squared_norms on a CPU
                rows = torch.linalg.vector_norm(buf.view(-1, _NORM_ROW), dim=1, dtype=torch.float32).double().square()
                sum_squares = rows.new_zeros(count).index_add_(0, self.norm_seg, rows)
            if trash is not None:  # ... then the first element again: every value in range, binned into the trash bin
                buf.index_copy_(0, trash, buf.index_select(0, self.full["first"]))  # type: ignore[arg-type]
        else:
            vmin, vmax, total = (torch.zeros(count, dtype=torch.float64, device=self.device) for _ in range(3))
            if sum_squares is None:
                sum_squares = torch.zeros(count, dtype=torch.float64, device=self.device)
        large = [tensors[i].detach().reshape(-1) for i in self.in_place.tolist()]
        if large:  # reduced where they lie: no copy
            where = self.in_place_dev
            assert where is not None and sum_squares is not None
            vmin.index_copy_(0, where, torch.stack([t.amin() for t in large]).double())
            vmax.index_copy_(0, where, torch.stack([t.amax() for t in large]).double())
            total.index_copy_(0, where, torch.stack([t.sum(dtype=self.dtype) for t in large]).double())
            if own_norms:
                sum_squares.index_copy_(0, where, squared_norms(large))
        lo, hi = histogram_range(vmin, vmax, hist_range)
        span = torch.where(hi > lo, hi - lo, torch.ones_like(hi))
        scale = (self.bins / span).clamp(max=_FLT_MAX).to(self.work)
        table = edge_table(lo, hi, self.bins, self.work)
        if self.sampled:
            layout = self.sample
            values = self.buffer("sample", (self.sample_len,), self.dtype)
            if self.source is not None:
                torch.index_select(buf, 0, self.source, out=values[: self.source_len])  # type: ignore[arg-type]
            if large:  # strided samples straight from the large tensors, padded with their first element
                picks: list[torch.Tensor] = []
                for t, (stride, pad) in zip(large, self.in_place_take, strict=True):
                    picks.append(t[::stride])
                    if pad:
                        picks.append(t[:1].expand(pad))
                torch.cat(picks, out=values[self.source_len :])
            values = values.view(-1, _ROW)
        else:
            layout, values = self.full, buf.view(-1, _ROW)  # type: ignore[union-attr]
        seg = layout["seg"]
        assert seg is not None  # every layout has one
        shape = tuple(values.shape)
        counts = bin_rows(
            values, lo.to(self.work).index_select(0, seg).unsqueeze(1), scale.index_select(0, seg).unsqueeze(1),
            layout["offset"], table, self.bins, self.buffer("work", shape, self.work),  # type: ignore[arg-type]
            self.buffer("index", shape, torch.int32), self.buffer("flags", shape, torch.bool), layout["trash"],
            clamp=not isinstance(hist_range, str),
        ).double()
        if self.sampled:
            counts = counts * self.scale
        stats = torch.stack([vmin, vmax, total, sum_squares, self.num, lo, hi], dim=1)
        return torch.cat([stats, counts], dim=1)


_PLANS: Lru[_Plan] = Lru(_MAX_PLANS)


def _plan(tensors: list[torch.Tensor], bins: int, max_elements: Optional[int], hist_range: HistRange,
          cache: bool) -> _Plan:
    dtype = torch.float64 if any(t.dtype == torch.float64 for t in tensors) else torch.float32
    fixed = None if isinstance(hist_range, str) else (float(hist_range[0]), float(hist_range[1]))
    numels = [t.numel() for t in tensors]
    device = tensors[0].device
    key = (tuple(numels), dtype, device, bins, max_elements, fixed)
    if not cache:  # a kept plan is used all the same; a new one is not kept
        plan = _PLANS.get(key)
        return plan if plan is not None else _Plan(numels, dtype, device, bins, max_elements, fixed, keep_buffers=False)
    return _PLANS.get_or_make(key, lambda: _Plan(numels, dtype, device, bins, max_elements, fixed,
                                                 keep_buffers=device.type == "cpu"))


def summarize(
    tensors: Sequence[torch.Tensor],
    sum_squares: Union[Sequence[torch.Tensor], torch.Tensor, None],
    bins: int,
    max_elements: Optional[int],
    hist_range: HistRange,
    *,
    cache: bool = True,
) -> torch.Tensor:
    """``[len(tensors), STAT_COLUMNS + bins]`` float64 device tensor of exact stats and (sampled) bin counts.

    ``sum_squares`` are the squared norms to report, or ``None``: computed here from the flat copy (float32
    norms of 64-element rows summed in float64, within 1e-6 of float64 as :func:`squared_norms` on a CPU), which
    spares the caller its own pass over these tensors. Assumes every element is finite (the caller checks the
    squared norms on the host and sends non-finite tensors through :func:`summarize_finite`). Exact
    ``min``/``max``/``sum`` cover every element; counts cover every element (``max_elements=None``) or at most
    ``max_elements`` per tensor taken with a prime stride, scaled to the element count. The same number of device
    ops for 6 tensors or 400 (plus one view per tensor, and a few ops per sampled tensor of at least
    ``_IN_PLACE`` elements, which is not copied); the layout is planned once per list of sizes.
    ``cache=False`` for one-off sizes (no plan or buffer kept).
    """
    tensors = list(tensors)
    if not tensors:
        return torch.zeros(0, STAT_COLUMNS + bins, dtype=torch.float64)
    sq: Optional[torch.Tensor] = None
    if isinstance(sum_squares, torch.Tensor):
        sq = sum_squares.reshape(-1).double()
    elif sum_squares is not None:
        sq = torch.stack([s.reshape(()) for s in sum_squares]).double()
    devices = {t.device for t in tensors}
    if len(devices) > 1:  # one plan per device, rows put back in order
        rows: list[Optional[torch.Tensor]] = [None] * len(tensors)
        for device in devices:
            ids = [i for i, t in enumerate(tensors) if t.device == device]
            block = summarize([tensors[i] for i in ids], None if sq is None else sq.to(device)[ids], bins,
                              max_elements, hist_range, cache=cache)
            for r, i in enumerate(ids):
                rows[i] = block[r].to(tensors[0].device)
        return torch.stack(rows)  # type: ignore[arg-type]
    sq = None if sq is None else sq.to(tensors[0].device)
    return _plan(tensors, bins, max_elements, hist_range, cache).run(tensors, sq, hist_range)


def summarize_finite(
    tensors: Sequence[torch.Tensor], bins: int, max_elements: Optional[int], hist_range: HistRange
) -> tuple[torch.Tensor, torch.Tensor]:
    """Slow path for tensors holding NaN/Inf: (``[T]`` non-finite counts, ``[T, STAT_COLUMNS + bins]`` rows).

    Stats and counts cover the finite elements only (a row of NaN when there are none). Boolean masking makes
    this sync on a GPU; it runs only at a logging step that already found non-finite values.
    """
    nonfinite, rows = [], []
    width = STAT_COLUMNS + bins
    for tensor in tensors:
        flat = tensor.detach().reshape(-1)
        finite = torch.isfinite(flat)
        nonfinite.append(flat.numel() - finite.sum())
        values = flat[finite]  # sync point (GPU): boolean mask, a data-dependent size
        if values.numel() == 0:
            rows.append(flat.new_full((width,), float("nan"), dtype=torch.float64))
            continue
        rows.append(summarize([values], squared_norms([values]), bins, max_elements, hist_range, cache=False)[0])
    return torch.stack(nonfinite).double(), torch.stack(rows)


def histogram_range(lo: torch.Tensor, hi: torch.Tensor, hist_range: HistRange) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(lo, hi)`` per tensor: exactly the values reported in the row (the host builds edges from them)."""
    if isinstance(hist_range, str):
        if hist_range == "symmetric":
            bound = torch.maximum(lo.abs(), hi.abs())
            return -bound, bound
        return lo, hi
    return torch.full_like(lo, float(hist_range[0])), torch.full_like(hi, float(hist_range[1]))


def host_histogram(row: np.ndarray, bins: int) -> tuple[np.ndarray, np.ndarray, dict[str, float]]:
    """(counts, edges, stats) from one host row of :func:`summarize`; a constant tensor gets a unit-wide range."""
    vmin, vmax, total, sum_sq, num, lo, hi = (float(v) for v in row[:STAT_COLUMNS])
    counts = np.asarray(row[STAT_COLUMNS:], dtype=np.float64)
    if hi > lo:
        edges = np.linspace(lo, hi, bins + 1)
    else:  # every value equals lo: centre it in the middle bin of [lo - 0.5, lo + 0.5]
        edges = np.linspace(lo - 0.5, lo + 0.5, bins + 1)
        counts = np.zeros(bins)
        counts[min(bins - 1, bins // 2)] = num
    stats = dict(min=vmin, max=vmax, num=num, sum=total, sum_squares=sum_sq)
    return counts, edges, stats
