"""GradientMonitor's ``optimizer_state=True``: Adam-style moments per group, queued on the device.

:func:`queue` reads ``exp_avg`` / ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``) and ``step`` of every measured
parameter as the optimizer's state stands before the step (after the previous one), and returns ONE flat device
tensor that :func:`~lightning_monitor._grad.event.measure` packs into its one host transfer. A fixed number of device
ops whatever the number of parameters (``_foreach`` reductions, one ``cat`` each, one ``segment_reduce``). The step
counts stay tensors: bias corrections are computed where the counts lie (no host read), moved to the device once.
:func:`metrics` turns the host rows into ``optim/*`` keys per group (groups summed across optimizers).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch

from lightning_monitor._core.compat import foreach_norm
from lightning_monitor._core.lru import Lru
from lightning_monitor._grad.stats import sample_stride

TINY = 1e-16  # a second moment below this counts as collapsed (the square of Adam's default eps)
SAMPLE = 1024  # effective steps sampled per parameter, at a prime stride
COLUMNS = 5  # per parameter: sum m^2, sum v, elements with v < TINY, sum u*g, sum u^2
_LENGTHS: Lru[torch.Tensor] = Lru(8)


@dataclass
class Queued:
    """The device side of one optimizer step's optimizer-state statistics."""

    positions: np.ndarray  # [k] positions in the measured parameters that have Adam-style state
    lengths: np.ndarray  # [k] sampled effective steps per parameter
    packed: torch.Tensor  # [k * COLUMNS + lengths.sum()] float64 on the device


def _moments(state: dict[str, Any], amsgrad: bool) -> Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor, Any]]:
    m, v, step = state.get("exp_avg"), state.get("exp_avg_sq"), state.get("step")
    if not isinstance(m, torch.Tensor) or not isinstance(v, torch.Tensor) or step is None or m.numel() == 0:
        return None
    d = state.get("max_exp_avg_sq") if amsgrad else v  # amsgrad: the denominator uses the running maximum
    return m, v, d if isinstance(d, torch.Tensor) else v, step


def _to(t: torch.Tensor, device: torch.device) -> torch.Tensor:
    if t.device == device:
        return t
    if t.device.type == "cpu" and device.type == "cuda":
        return t.pin_memory().to(device, non_blocking=True)  # a pinned copy: no wait on the device's queue
    return t.to(device)


def queue(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
          ) -> Optional[Queued]:
    """Queue the statistics of ``params`` (with gradients ``grads``) under ``optimizer``'s state; ``None`` when
    none of them has Adam-style state yet (before the first step, or another optimizer)."""
    group_of = {id(p): g for g in optimizer.param_groups for p in g["params"]}
    found: list[tuple[int, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, Any, dict[str, Any]]] = []
    for j, (p, g) in enumerate(zip(params, grads, strict=True)):
        hyper = group_of.get(id(p))
        state = optimizer.state.get(p)
        if hyper is None or not state or "betas" not in hyper or "eps" not in hyper:
            continue
        got = _moments(state, bool(hyper.get("amsgrad", False)))
        if got is not None:
            found.append((j, g, *got, hyper))
    if not found:
        return None
    device = found[0][2].device
    ms, vs, ds = [f[2] for f in found], [f[3] for f in found], [f[4] for f in found]
    gs = [f[1] for f in found]
    # step counts as they lie (Adam: CPU tensors; capturable/fused: on the device): no host read of them
    steps = torch.stack([torch.as_tensor(f[5]).to(torch.float64) for f in found])
    host = _to(torch.tensor([[float(f[6]["lr"]), float(f[6]["eps"]), float(f[6]["betas"][0]), float(f[6]["betas"][1])]
                             for f in found], dtype=torch.float64), steps.device)
    lr, eps, b1, b2 = host.unbind(1)
    bc1, bc2 = 1 - b1**steps, 1 - b2**steps
    scalars = _to(torch.stack([eps * bc2.sqrt(), bc2.sqrt() / bc1, lr, eps, 1 / bc2]), device)
    c, k, lr_d, eps_d, inv_bc2 = scalars.unbind(0)
    numels = np.array([m.numel() for m in ms], dtype=np.int64)
    lengths_d = _LENGTHS.get_or_make((numels.tobytes(), device), lambda: _to(torch.from_numpy(numels), device))
    # u = m_hat / (sqrt(v_hat) + eps) = k * m / (sqrt(v) + c) per parameter, c = eps * sqrt(bc2), k = sqrt(bc2) / bc1
    n = int(numels.sum())
    denom = torch.cat([d.reshape(-1) for d in ds]).float().sqrt_()
    denom += torch.repeat_interleave(c.float(), lengths_d, output_size=n)
    w = torch.cat([m.reshape(-1) for m in ms]).float().div_(denom)
    del denom
    g = torch.cat([t.reshape(-1) for t in gs]).float()
    small = torch.cat([v.reshape(-1) for v in vs]) < TINY
    # u . g summed in float64: it cancels (a cosine near 0 would lose its digits in a float32 sum)
    dot = torch.segment_reduce((w * g).double(), "sum", lengths=lengths_d)
    del g
    per_elem = torch.stack([w * w, small.float()], dim=1)  # non-negative: float32 sums hold 1e-6
    del w, small
    sums = torch.segment_reduce(per_elem, "sum", lengths=lengths_d, axis=0).double()  # [k, 2]
    del per_elem
    m_sq = torch.stack(foreach_norm(ms, 2, dtype=torch.float32)).double() ** 2
    v_sum = torch.stack(foreach_norm(vs, 1, dtype=torch.float32)).double()  # v >= 0: its L1 norm is its sum
    rows = torch.stack([m_sq, v_sum, sums[:, 1], dot * k, sums[:, 0] * k * k], dim=1)
    strides = [sample_stride(int(e), SAMPLE) for e in numels.tolist()]
    picked = [d.reshape(-1)[::s] for d, s in zip(ds, strides, strict=True)]
    lengths = np.array([p.numel() for p in picked], dtype=np.int64)
    owner = _LENGTHS.get_or_make((b"sample", lengths.tobytes(), device),
                                 lambda: _to(torch.from_numpy(np.repeat(np.arange(len(picked)), lengths)), device))
    sample = torch.cat(picked).double()
    eff = lr_d[owner] / ((sample * inv_bc2[owner]).sqrt() + eps_d[owner])  # lr / (sqrt(v_hat) + eps)
    packed = torch.cat([rows.reshape(-1), eff])
    return Queued(np.array([f[0] for f in found], dtype=np.int64), lengths, packed)


def unpack(host: np.ndarray, lengths: np.ndarray) -> tuple[np.ndarray, list[np.ndarray]]:
    """``([k, COLUMNS] rows, k sampled effective steps)`` from the host copy of :attr:`Queued.packed`."""
    k = lengths.size
    rows = host[: k * COLUMNS].reshape(k, COLUMNS)
    return rows, np.split(host[k * COLUMNS :], np.cumsum(lengths)[:-1])


def metrics(group_names: Sequence[str], gid: np.ndarray, parts: Sequence[tuple[np.ndarray, np.ndarray, list[np.ndarray],
            np.ndarray, np.ndarray]]) -> dict[str, float]:
    """``optim/*/{group}`` from ``(parameters, rows, samples, squared gradient norms, element counts)`` of each
    optimizer step measured in a logging batch (parameters: indices with group ids in ``gid``, -1 for none)."""
    if not parts:
        return {}
    params = np.concatenate([p[0] for p in parts])
    rows = np.concatenate([p[1] for p in parts])
    samples = [s for p in parts for s in p[2]]
    gsq = np.concatenate([p[3] for p in parts])
    numel = np.concatenate([p[4] for p in parts]).astype(np.float64)
    groups = gid[params]
    out: dict[str, float] = {}
    for g in sorted(set(groups[groups >= 0].tolist())):
        at = np.flatnonzero(groups == g)
        m_sq, v_sum, small, dot, u_sq = rows[at].sum(axis=0).tolist()
        g_sq = float(gsq[at].sum())
        name = group_names[g]
        steps = np.concatenate([samples[i] for i in at.tolist()])
        median, p99 = np.quantile(steps, [0.5, 0.99]).tolist()
        denom = float(np.sqrt(u_sq * g_sq))
        out[f"optim/exp_avg_norm/{name}"] = float(np.sqrt(m_sq))
        out[f"optim/exp_avg_sq_sqrt_norm/{name}"] = float(np.sqrt(v_sum))
        out[f"optim/step_median/{name}"] = median
        out[f"optim/step_p99/{name}"] = p99
        out[f"optim/small_v_share/{name}"] = small / float(numel[at].sum())
        out[f"optim/update_cos/{name}"] = dot / denom if denom > 0 else 0.0
    return out
