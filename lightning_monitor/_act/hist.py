"""ActivationMonitor's sampled histograms: one binning range per module on every rank, and the host rows.

At a logging batch's end :func:`ranges` takes each module's range from its taps' finite sample min and max (under
DDP one MAX all-reduce of the packed ``[max, -min]``, so every rank bins over the same edges); the monitor bins the
samples (:func:`pieces`) on the device with the gradients' binning (``_grad/bins.scaled_counts``:
``numpy.histogram``'s rule over ``numpy.linspace`` edges, each call scaled by ``numel / sampled``) and appends
``lo``, ``hi`` and the counts to :func:`~lightning_monitor._act.tap.pack`'s tensor, so the one gather carries
them; :func:`rows` adds the counts over the ranks on the host.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from lightning_monitor._act.tap import Tap
from lightning_monitor._monitor import dist as _dist


def ranges(taps: Sequence[Tap], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(lo, hi)`` per module on ``device``, the same on every rank (``+inf, -inf`` where no rank saw a
    finite value). Device work only."""
    none = torch.full((), -float("inf"), dtype=torch.float64, device=device)
    high = [none if t.high is None else t.high.to(device) for t in taps]
    neg_low = [none if t.neg_low is None else t.neg_low.to(device) for t in taps]
    packed = _dist.all_reduce(torch.stack(high + neg_low), dist.ReduceOp.MAX)  # collective: logging steps only
    return -packed[len(taps) :], packed[: len(taps)]


def pieces(taps: Sequence[Tap]) -> tuple[list[torch.Tensor], list[int], list[float]]:
    """Every kept sample, its module's index and its scale (``numel / sampled``)."""
    kept = [(m, sample, scale) for m, tap in enumerate(taps) for sample, scale in tap.samples]
    return [s for _, s, _ in kept], [m for m, _, _ in kept], [scale for _, _, scale in kept]


def rows(gathered: np.ndarray, totals: np.ndarray, bins: int) -> np.ndarray:
    """``[modules, 7 + bins]`` rows in the layout of ``_grad.stats.summarize`` (``min, max, sum, sum_squares, num,
    lo, hi, counts...``; min and max: the binned range) from the gathered ``[world, 2 * modules + modules * bins]``
    part (``lo``, ``hi``, counts) and each module's ``(sum, sum of squares, count)`` over the ranks
    (:func:`~lightning_monitor._act.tap.totals`); the counts add up over the ranks."""
    m = totals.shape[0]
    lo, hi = gathered[0, :m], gathered[0, m : 2 * m]  # the same on every rank
    counts = gathered[:, 2 * m :].sum(axis=0).reshape(m, bins)
    return np.concatenate([np.column_stack([lo, hi, totals, lo, hi]), counts], axis=1)
