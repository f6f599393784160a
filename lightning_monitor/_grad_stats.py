"""On-device statistics for :class:`~lightning_monitor.GradientMonitor`: histograms, exact stats, non-finite counts.

Everything here only queues device work and returns device tensors; the caller makes the one host transfer.
A row of :func:`summarize` is ``[min, max, sum, sum_squares, num, lo, hi, counts...]`` where ``lo``/``hi`` is the
binned range (``bins + 1`` edges ``linspace(lo, hi)``).
"""

from __future__ import annotations

import math
from typing import Optional, Sequence, Union

import numpy as np
import torch

STAT_COLUMNS = 7  # min, max, sum, sum_squares, num, lo, hi
_EXACT_FLOAT32_COUNT = 2**24  # float32 counts stop being exact integers beyond this
_BATCH_NUMEL = 2**18  # tensors up to this size are stacked with others of the same size ...
_BATCH_ELEMENTS = 2**22  # ... into blocks of at most this many elements
_BATCH_ROWS = 4096

HistRange = Union[str, Sequence[float]]


def squared_norms(tensors: Sequence[torch.Tensor]) -> torch.Tensor:
    """``[P]`` float64 device tensor: the squared L2 norm of each tensor, from one ``torch._foreach_norm`` pass.

    Accumulated in float32: an fp16 norm overflows at 65504 although every element is finite.
    """
    return torch.stack(torch._foreach_norm(list(tensors), 2, dtype=torch.float32)).double().square()


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


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def bin_counts(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of each row of ``sample`` (``[k, m]``, or 1-D) in ``bins`` equal bins over its ``[lo, hi]``.

    ``lo``/``hi`` are device tensors (``[k]`` or 0-d), so nothing is read back to the host. The bin index is
    computed like ``torch.histogram`` does, ``floor((x - lo) * bins / (hi - lo))``; values outside the range fall
    into the edge bins and NaN/Inf are not counted. The integer indices of all rows, offset by ``row * bins``
    and centred (``+ 0.5``, so float rounding inside ``histc`` cannot move them), are counted by ONE
    ``torch.histc`` call with a Python-number range.
    """
    rows = sample.reshape(1, -1) if sample.dim() == 1 else sample
    k = rows.shape[0]
    lo, hi = lo.reshape(-1, 1), hi.reshape(-1, 1)
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))  # a constant tensor lands in bin 0; host recentres
    index = (rows - lo).mul_(bins).div_(span).floor_().clamp_(0, bins - 1)
    if k > 1:
        index = index.add_(torch.arange(k, device=index.device, dtype=index.dtype).unsqueeze(1) * bins)
    if index.numel() > _EXACT_FLOAT32_COUNT or k * bins > _EXACT_FLOAT32_COUNT // 4:
        index = index.double()
    counts = torch.histc(index.add_(0.5), bins=k * bins, min=0, max=k * bins).reshape(k, bins)
    return counts if sample.dim() > 1 else counts[0]


def summarize(
    tensors: Sequence[torch.Tensor],
    sum_squares: Sequence[torch.Tensor],
    bins: int,
    max_elements: Optional[int],
    hist_range: HistRange,
) -> torch.Tensor:
    """``[len(tensors), STAT_COLUMNS + bins]`` float64 device tensor of exact stats and (sampled) bin counts.

    Assumes every element is finite (the caller checks ``sum_squares`` on the host and sends non-finite tensors
    through :func:`summarize_finite`). Sampled counts are scaled to the tensor's element count. Small tensors of
    the same size are stacked and summarised together (a few kernels for hundreds of biases, not a few each).
    """
    batches: dict[tuple, list[int]] = {}
    for i, tensor in enumerate(tensors):
        n = tensor.numel()
        batched = n <= _BATCH_NUMEL
        batches.setdefault((n, tensor.dtype, tensor.device, i if not batched else -1), []).append(i)
    rows: list[Optional[torch.Tensor]] = [None] * len(tensors)
    for (numel, *_), idx in batches.items():
        per_chunk = max(1, min(_BATCH_ROWS, _BATCH_ELEMENTS // max(numel, 1)))
        for c in range(0, len(idx), per_chunk):
            ids = idx[c : c + per_chunk]
            flats = [_flat(tensors[i]) for i in ids]
            block = flats[0].unsqueeze(0) if len(ids) == 1 else torch.stack(flats)  # [k, numel]
            if len(ids) == 1:  # a full reduction: torch.aminmax(dim=1) is ~10x slower on CPU than these
                lo_val, hi_val = (v.reshape(1) for v in torch.aminmax(block))
            else:
                lo_val, hi_val = block.amin(dim=1), block.amax(dim=1)
            lo, hi = _range(lo_val, hi_val, hist_range)
            stride = sample_stride(numel, max_elements)
            sample = block if stride == 1 else block[:, ::stride]
            counts = bin_counts(sample, lo, hi, bins)
            if stride != 1:
                counts = counts * (numel / sample.shape[1])
            sq = torch.stack([sum_squares[i] for i in ids]).to(block.dtype)
            total = block.sum().reshape(1) if len(ids) == 1 else block.sum(dim=1)
            stats = torch.stack([lo_val, hi_val, total, sq, torch.full_like(sq, numel), lo, hi], dim=1)
            block_rows = torch.cat([stats.double(), counts.double()], dim=1)
            for r, i in enumerate(ids):
                rows[i] = block_rows[r]
    return torch.stack(rows)


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
        flat = _flat(tensor)
        finite = torch.isfinite(flat)
        nonfinite.append(flat.numel() - finite.sum())
        values = flat[finite]
        if values.numel() == 0:
            rows.append(flat.new_full((width,), float("nan"), dtype=torch.float64))
            continue
        row = summarize([values], [values.square().sum()], bins, max_elements, hist_range)[0]
        rows.append(row)
    return torch.stack(nonfinite).double(), torch.stack(rows)


def _range(lo: torch.Tensor, hi: torch.Tensor, hist_range: HistRange) -> tuple[torch.Tensor, torch.Tensor]:
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
