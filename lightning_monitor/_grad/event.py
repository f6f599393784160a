"""GradientMonitor's logging step: one optimizer step measured on the device and read back in one transfer.

:func:`measure` and :func:`update_ratios` are the one entry for plain and sharded (DTensor) tensors alike: sharded
ones go to :mod:`lightning_monitor._grad.sharded` (the full tensors' numbers, with collectives on every rank)."""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Optional

import numpy as np
import torch

from lightning_monitor._core.compat import foreach_sub
from lightning_monitor._core.lru import Lru
from lightning_monitor._grad import sharded as _grad_sharded
from lightning_monitor._grad.groups import group_norms
from lightning_monitor._grad.stats import STAT_COLUMNS, HistRange, squared_norms, summarize, summarize_finite
from lightning_monitor._writers.media import HistogramData

_INDEX_CACHE: Lru[torch.Tensor] = Lru(8)


def _device_index(positions: np.ndarray, device: torch.device) -> torch.Tensor:
    """``positions`` as an int64 tensor on ``device``, made once per (positions, device) and reused."""
    return _INDEX_CACHE.get_or_make((positions.tobytes(), device),
                                    lambda: torch.from_numpy(positions.astype(np.int64)).to(device))


@dataclass(frozen=True)
class MeasureSpec:
    """What a logging step measures, fixed by GradientMonitor's options (built with them, passed to :func:`measure`)."""

    bins: int  # histogram bins
    max_elements: Optional[int]  # bin at most this many elements per tensor (None: all)
    hist_range: HistRange  # "minmax", "symmetric" or (lo, hi)
    grad_histograms: bool  # histograms of the gradients
    param_histograms: bool  # histograms of the weights
    weights: bool  # squared weight norms (param_norms, update_ratio, param_histograms)


_NONE = np.zeros(0, dtype=np.int64)


@dataclass
class Measured:
    """Host values of one optimizer step of a logging batch; parameter indices into the monitor's list."""

    optimizer: int  # the optimizer's index in ``trainer.optimizers``
    present: np.ndarray  # [n] parameters with a gradient at this step
    sq: np.ndarray  # [n] squared gradient norms (NaN/Inf where the gradient holds any)
    nonfinite: np.ndarray  # [n] NaN/Inf elements per gradient
    hist: np.ndarray  # [h] parameters with a gradient histogram row
    rows: np.ndarray  # [h, STAT_COLUMNS + bins]
    wsq: Optional[np.ndarray]  # [n] squared weight norms (param_norms / update_ratio / param_histograms)
    phist: np.ndarray  # [k] parameters with a weight histogram row
    prows: np.ndarray  # [k, STAT_COLUMNS + bins]
    extra: np.ndarray = field(default_factory=lambda: np.zeros(0))  # host copy of ``measure``'s ``extra``
    total: Optional[float] = None  # the sum of ``sq`` (made once, in plain Python: ~10 us less than numpy run cold)

    def __post_init__(self) -> None:
        if self.total is None:
            self.total = sum(self.sq.tolist())

    @property
    def bad(self) -> np.ndarray:
        """Parameters (indices) whose gradient holds NaN/Inf at this step."""
        if math.isfinite(self.total):  # type: ignore[arg-type]  # one check for the common case: all finite
            return _NONE
        return self.present[~np.isfinite(self.sq)]


def _norms_and_rows(tensors: list[torch.Tensor], positions: np.ndarray, bins: int, max_elements: Optional[int],
                    hist_range: HistRange) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
    """(``[n]`` squared norms of every tensor, flat histogram rows of those at ``positions`` or ``None``).

    The histogrammed tensors' norms come out of :func:`summarize`'s own copy of them (no second pass over them);
    the others go through :func:`squared_norms`.
    """
    if positions.size == 0:
        return squared_norms(tensors), None
    rows = summarize([tensors[j] for j in positions], None, bins, max_elements, hist_range)
    if positions.size == len(tensors):
        return rows[:, 3], rows.reshape(-1)
    device = rows.device
    rest = np.setdiff1d(np.arange(len(tensors)), positions)
    sq = rows.new_zeros(len(tensors)).index_copy_(0, _device_index(positions, device), rows[:, 3])
    sq.index_copy_(0, _device_index(rest, device), squared_norms([tensors[j] for j in rest.tolist()]))
    return sq, rows.reshape(-1)


def measure(
    spec: MeasureSpec,
    optimizer: int,
    present: np.ndarray,
    grads: list[torch.Tensor],
    *,
    weights: list[torch.Tensor],
    hist: np.ndarray,
    pending: Sequence[torch.Tensor],
    extra: Optional[torch.Tensor] = None,
) -> tuple[Measured, np.ndarray]:
    """Norms and histogram rows of one optimizer step (``present``: the parameters, ``grads`` their gradients,
    ``weights`` their weights when ``spec.weights``), read back with ``pending`` (NaN/Inf counts queued since the last
    logging step) in ONE packed transfer; a second one only when a gradient holds NaN/Inf.

    ``hist`` are positions in ``present`` (non-empty tensors, within the cap) whose histograms are logged (gradients
    with ``spec.grad_histograms``, weights with ``spec.param_histograms``). Returns the host values and the host copy
    of ``pending``. ``extra`` (a flat device tensor: the optimizer state's statistics) rides in the same transfer and
    comes back as ``Measured.extra`` (sharded: summed over the ranks in the SUM all-reduce).

    Sharded gradients (DTensor: FSDP2, tensor parallel) are measured on EVERY rank: the same host values for the full
    tensors, with :data:`~lightning_monitor._grad.sharded.COLLECTIVES_PER_EVENT` all-reduces and one host transfer;
    ``pending`` comes back as the maximum over ranks (exact when the NaN/Inf shows on one rank or on all at the same
    steps, a lower bound otherwise).
    """
    hist_pos = hist if spec.grad_histograms else _NONE
    phist_pos = hist if spec.param_histograms else _NONE
    bins, max_elements, hist_range = spec.bins, spec.max_elements, spec.hist_range
    sharded = _grad_sharded.is_sharded(grads)
    if not (sharded or hist_pos.size or phist_pos.size or spec.weights or extra is not None or pending) \
            and grads[0].device.type == "cpu":
        plain = _norms_only(optimizer, present, grads, STAT_COLUMNS + bins)
        if plain is not None:
            return plain, _NO_VALUES
    if sharded:
        stats = _grad_sharded.global_stats(
            grads, params=weights if spec.weights else None, grad_hist=hist_pos.tolist(), param_hist=phist_pos.tolist(),
            bins=bins, max_elements=max_elements, hist_range=hist_range, extra_max=pending, extra_sum=extra,
        )
        return Measured(optimizer, present, stats.sq, stats.nonfinite, present[hist_pos], stats.grad_rows, stats.wsq,
                        present[phist_pos], stats.param_rows, stats.extra_sum), stats.extra_max
    want_wsq = spec.weights
    sq, grad_rows = _norms_and_rows(grads, hist_pos, bins, max_elements, hist_range)  # float64, within 1e-6
    parts = [sq]
    parts += [grad_rows] if grad_rows is not None else []
    if want_wsq:
        wsq_dev, param_rows = _norms_and_rows(weights, phist_pos, bins, max_elements, hist_range)
        parts += [wsq_dev]
        parts += [param_rows] if param_rows is not None else []
    parts += [extra.reshape(-1).to(sq.dtype)] if extra is not None else []
    parts += [p.reshape(-1).double() for p in pending]
    # sync point: one packed host transfer per optimizer step of a logging step (``to`` copies, ``numpy`` is free)
    one = len(parts) == 1 and parts[0].device.type == "cpu"  # the norms alone, on the host already: no copy
    host = parts[0].numpy() if one else torch.cat(parts).to("cpu").numpy()
    n, width = len(present), STAT_COLUMNS + bins
    host_sq, off = host[:n], n
    rows = host[off : off + hist_pos.size * width].reshape(-1, width)
    off += hist_pos.size * width
    wsq = None
    if want_wsq:
        wsq, off = host[off : off + n], off + n
    prows = host[off : off + phist_pos.size * width].reshape(-1, width)
    off += phist_pos.size * width
    extra_host = np.zeros(0)
    if extra is not None:
        extra_host, off = host[off : off + extra.numel()], off + extra.numel()
    nonfinite = np.zeros(n)
    total = sum(host_sq.tolist())
    bad_now = _NONE if math.isfinite(total) else np.flatnonzero(~np.isfinite(host_sq))
    if bad_now.size:  # exact counts and finite-only histograms, read in a second transfer (only with NaN/Inf)
        counts, fixed = summarize_finite([grads[j] for j in bad_now], bins, max_elements, hist_range)
        packed = torch.cat([counts, fixed.reshape(-1)]).to("cpu").numpy()  # sync point: only with NaN/Inf present
        nonfinite[bad_now] = packed[: bad_now.size]
        fixed_rows = packed[bad_now.size :].reshape(bad_now.size, width)
        rows = rows.copy()
        where = {int(j): r for r, j in enumerate(hist_pos)}
        for b, j in enumerate(bad_now):
            if int(j) in where:
                rows[where[int(j)]] = fixed_rows[b]
    measured = Measured(optimizer, present, host_sq, nonfinite, present[hist_pos], rows, wsq, present[phist_pos],
                        prows, extra_host, total)
    return measured, host[off:]


def _norms_only(optimizer: int, present: np.ndarray, grads: list[torch.Tensor], width: int) -> Optional[Measured]:
    """:func:`measure` of most logging steps on a CPU: the gradients' norms and nothing else (no histogram, no
    weights, nothing pending), with no packing (the norms are on the host already); ``None`` when a norm is NaN/Inf
    (the full path then counts them)."""
    host_sq = squared_norms(grads).numpy()
    total = sum(host_sq.tolist())
    if not math.isfinite(total):
        return None
    rows = _NO_ROWS.get_or_make(width, lambda: np.zeros((0, width)))
    return Measured(optimizer, present, host_sq, np.zeros(len(present)), _NONE, rows, None, _NONE, rows, _NO_VALUES,
                    total)


#: empty host rows of a histogram width, shared by every step that logs no histogram (never written to)
_NO_ROWS: Lru[np.ndarray] = Lru(4)
_NO_VALUES = np.zeros(0)


def histograms(prefix: str, names: Sequence[str], params: np.ndarray, rows: np.ndarray, bins: int
               ) -> dict[str, HistogramData]:
    """``{prefix/name: HistogramData}`` from host rows of :func:`summarize`, edges built for all rows at once
    exactly as ``numpy.linspace`` builds them; rows with no finite element (or non-finite stats) are left out."""
    if rows.size == 0:
        return {}
    keep = np.all(np.isfinite(rows[:, :STAT_COLUMNS]), axis=1) & (rows[:, 4] > 0)
    params, rows = params[keep], rows[keep]
    lo, hi = rows[:, 5].copy(), rows[:, 6].copy()
    flat = ~(hi > lo)  # constant tensor: centred in the middle bin of [lo - 0.5, lo + 0.5]
    lo[flat], hi[flat] = lo[flat] - 0.5, hi[flat] + 0.5
    edges = np.arange(bins + 1, dtype=np.float64)[None, :] * ((hi - lo) / bins)[:, None] + lo[:, None]
    edges[:, -1] = hi
    counts = rows[:, STAT_COLUMNS:]
    if flat.any():
        counts = counts.copy()
        counts[flat] = 0.0
        counts[flat, min(bins - 1, bins // 2)] = rows[flat, 4]
    out: dict[str, HistogramData] = {}
    for r, i in enumerate(params.tolist()):
        vmin, vmax, total, sum_sq, num = rows[r, :5].tolist()
        out[f"{prefix}/{names[i]}"] = HistogramData(counts=counts[r], edges=edges[r], min=vmin, max=vmax, num=num,
                                                    sum=total, sum_squares=sum_sq)
    return out


Snapshot = tuple[np.ndarray, list[torch.Tensor], np.ndarray]


def update_ratios(params: Sequence[torch.Tensor], snapshots: Sequence[Snapshot], group_names: Sequence[str],
                  gid: np.ndarray) -> dict[str, float]:
    """``param/update_ratio*`` from weight snapshots ``(parameters, weights before, squared norms before)`` taken
    at a logging batch's optimizer steps, against the weights now (after the steps). Sharded weights (DTensor): the
    full tensors' changes, one all-reduce SUM on EVERY rank."""
    present = np.concatenate([s[0] for s in snapshots])
    before = [t for s in snapshots for t in s[1]]
    if _grad_sharded.is_sharded(before):
        shards = [_grad_sharded.local_shard(t)[0] for t in before]
        dsq = _grad_sharded.global_squared_diffs([params[i] for i in present.tolist()], shards)
    else:
        after = [params[i].detach() for i in present.tolist()]
        # sync point: logging steps with update_ratio only
        dsq = squared_norms(foreach_sub(after, before)).to("cpu").numpy()
    return ratio_metrics(len(params), snapshots, dsq, group_names, gid)


def ratio_metrics(n: int, snapshots: Sequence[Snapshot], dsq_part: np.ndarray, group_names: Sequence[str],
                  gid: np.ndarray) -> dict[str, float]:
    """``param/update_ratio*`` of ``n`` parameters from the squared norms of the weight changes ``dsq_part`` of the
    snapshots' parameters (in the snapshots' order) and the squared weight norms the snapshots hold."""
    present = np.concatenate([s[0] for s in snapshots])
    have, dsq, wsq = np.zeros(n, dtype=bool), np.zeros(n), np.zeros(n)
    have[present], dsq[present], wsq[present] = True, dsq_part, np.concatenate([s[2] for s in snapshots])
    total = wsq[have].sum()
    metrics = {"param/update_ratio_total": float(np.sqrt(dsq[have].sum() / total)) if total > 0 else 0.0}
    num, den = group_norms("x", group_names, gid, have, dsq), group_norms("x", group_names, gid, have, wsq)
    for key, value in num.items():
        metrics[f"param/update_ratio/{key[2:]}"] = value / den[key] if den[key] > 0 else 0.0
    return metrics
