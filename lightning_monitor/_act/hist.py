"""ActivationMonitor's sampled histograms: one binning range per module on every rank, counts binned on the device.

At a logging batch's end :func:`device_counts` takes each module's range from its taps' finite sample min and max
(under DDP one MAX all-reduce of the packed ``[max, -min]``, so every rank bins over the same edges) and bins every
kept sample on the device with the gradients' binning (:func:`~lightning_monitor._grad.bins.bin_rows`:
``numpy.histogram``'s rule over ``numpy.linspace`` edges), each call's counts scaled by its ``numel / sampled``. The
result is appended to :func:`~lightning_monitor._act.tap.pack`'s tensor, so the one gather carries it; :func:`rows`
adds the counts over the ranks on the host and :func:`histograms` makes the ``act/hist/{module}`` values.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.distributed as dist

from lightning_monitor._act.tap import Tap
from lightning_monitor._grad.bins import bin_rows, edge_table
from lightning_monitor._grad.event import histograms as _histograms
from lightning_monitor._grad.stats import STAT_COLUMNS
from lightning_monitor._writers.media import HistogramData


def _ranges(taps: Sequence[Tap], device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``(lo, hi)`` per module, the same on every rank (``+inf, -inf`` where no rank saw a finite value)."""
    none = torch.full((), -float("inf"), dtype=torch.float64, device=device)
    high = [none if t.high is None else t.high.to(device) for t in taps]
    neg_low = [none if t.neg_low is None else t.neg_low.to(device) for t in taps]
    packed = torch.stack(high + neg_low)
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        dist.all_reduce(packed, op=dist.ReduceOp.MAX)  # collective: every rank, same size, logging steps only
    return -packed[len(taps) :], packed[: len(taps)]


def device_counts(taps: Sequence[Tap], bins: int, device: torch.device) -> torch.Tensor:
    """``[2 * modules + modules * bins]`` float64 on ``device``: every module's ``lo``, then ``hi``, then its counts
    (scaled to the element count). Device work only, a fixed number of ops for any number of modules and calls."""
    lo, hi = _ranges(taps, device)
    pieces = [(m, sample, scale) for m, tap in enumerate(taps) for sample, scale in tap.samples]
    counts = torch.zeros(len(taps), bins, dtype=torch.float64, device=device)
    if pieces:
        values = torch.cat([s.to(device=device, dtype=torch.float64) for _, s, _ in pieces]).unsqueeze(1)  # [N, 1]
        # each piece's module, size and scale, known on the host: one copy to the device, no sync
        host = torch.tensor([[m, s.numel(), scale] for m, s, scale in pieces], dtype=torch.float64).T.contiguous()
        if device.type == "cuda":  # pinned: a pageable host-to-device copy would wait for the device
            host = host.pin_memory()
        module_f, sizes_f, scale = host.to(device, non_blocking=True)
        module, sizes = module_f.long(), sizes_f.long()
        seg = torch.repeat_interleave(torch.arange(len(pieces), device=device), sizes, output_size=values.shape[0])
        piece_lo, piece_hi = lo.index_select(0, module), hi.index_select(0, module)
        span = torch.where(piece_hi > piece_lo, piece_hi - piece_lo, torch.ones_like(piece_hi))
        piece_counts = bin_rows(
            values, piece_lo.index_select(0, seg).unsqueeze(1), (bins / span).index_select(0, seg).unsqueeze(1),
            (1 + seg.to(torch.int32) * (bins + 1)).unsqueeze(1), edge_table(piece_lo, piece_hi, bins, torch.float64),
            bins, torch.empty_like(values), torch.empty(values.shape, dtype=torch.int32, device=device),
            torch.empty(values.shape, dtype=torch.bool, device=device), None,
        )  # [P, bins]
        counts.index_add_(0, module, piece_counts.double() * scale.unsqueeze(1))
    return torch.cat([lo, hi, counts.reshape(-1)])


def rows(gathered: np.ndarray, totals: np.ndarray, bins: int) -> np.ndarray:
    """``[modules, STAT_COLUMNS + bins]`` rows as :func:`~lightning_monitor._grad.stats.summarize` makes them
    (min and max: the binned range) from the gathered ``[world, len(device_counts)]`` part and each module's
    ``(sum, sum of squares, count)`` over the ranks; the counts add up over the ranks."""
    m = totals.shape[0]
    lo, hi = gathered[0, :m], gathered[0, m : 2 * m]  # the same on every rank
    counts = gathered[:, 2 * m :].sum(axis=0).reshape(m, bins)
    stats = np.column_stack([lo, hi, totals, lo, hi])
    return np.concatenate([stats, counts], axis=1).reshape(m, STAT_COLUMNS + bins)


def histograms(names: Sequence[str], host_rows: np.ndarray, bins: int) -> dict[str, HistogramData]:
    """``{act/hist/{module}: HistogramData}``; a module whose output held NaN/Inf (its sums are not finite) or had
    no finite value at this step is left out (a constant output gets the gradients' unit-wide range)."""
    return _histograms("act/hist", names, np.arange(len(names)), host_rows, bins)
