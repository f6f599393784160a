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


def _flat(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.detach().reshape(-1)
    return flat if flat.dtype in (torch.float32, torch.float64) else flat.float()


def bin_counts(sample: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor, bins: int) -> torch.Tensor:
    """Counts of ``sample`` in ``bins`` equal bins over ``[lo, hi]`` (0-d device tensors), with no host sync.

    The bin index is computed like ``torch.histogram`` does, ``floor((x - lo) * bins / (hi - lo))``, and values
    outside the range fall into the edge bins; NaN/Inf are not counted. ``torch.histc`` then counts the integer
    indices with a Python-number range, so nothing is read back to the host.
    """
    span = hi - lo
    span = torch.where(span > 0, span, torch.ones_like(span))  # a constant tensor lands in bin 0; host recentres
    index = (sample - lo).mul_(bins).div_(span).floor_().clamp_(0, bins - 1)
    if index.numel() > _EXACT_FLOAT32_COUNT:
        index = index.double()
    return torch.histc(index, bins=bins, min=0, max=bins)


def summarize(
    tensors: Sequence[torch.Tensor],
    sum_squares: Sequence[torch.Tensor],
    bins: int,
    max_elements: Optional[int],
    hist_range: HistRange,
) -> torch.Tensor:
    """``[len(tensors), STAT_COLUMNS + bins]`` float64 device tensor of exact stats and (sampled) bin counts.

    Assumes every element is finite (the caller checks ``sum_squares`` on the host and sends non-finite tensors
    through :func:`summarize_finite`). Sampled counts are scaled to the tensor's element count.
    """
    rows = []
    for tensor, sq in zip(tensors, sum_squares):
        flat = _flat(tensor)
        lo_val, hi_val = torch.aminmax(flat)
        lo, hi = _range(lo_val, hi_val, hist_range)
        stride = sample_stride(flat.numel(), max_elements)
        sample = flat if stride == 1 else flat[::stride]
        counts = bin_counts(sample, lo, hi, bins)
        if stride != 1:
            counts = counts * (flat.numel() / sample.numel())
        stats = torch.stack([lo_val, hi_val, flat.sum(), sq.to(flat.dtype), flat.new_tensor(float(flat.numel())), lo, hi])
        rows.append(torch.cat([stats.double(), counts.double()]))
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
    return lo.new_tensor(float(hist_range[0])), lo.new_tensor(float(hist_range[1]))


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
