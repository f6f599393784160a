"""GradientMonitor's ``optimizer_state=True``: Adam-style moments per group, queued on the device.

:func:`queue` reads ``exp_avg`` / ``exp_avg_sq`` (``max_exp_avg_sq`` with ``amsgrad``) and ``step`` of every measured
parameter as the optimizer's state stands before the step (after the previous one), and returns ONE flat device
tensor that :func:`~lightning_monitor._grad.event.measure` packs into its one host transfer. A fixed number of device
ops whatever the number of parameters (``_foreach`` reductions, one ``cat`` each, one ``segment_reduce``). The step
counts stay tensors: bias corrections are computed where the counts lie (no host read), moved to the device once.
:func:`metrics` turns the host rows into ``optim/*`` keys per group (groups summed across optimizers).

Sharded parameters (DTensor: FSDP2, tensor parallel): every rank computes the same columns over its local shards of
the moments and gradients (zeros for a replica that is not the counted one), and the effective steps at the
full tensor's sampled positions (``0, s, 2s, ...`` of the flattened full tensor, the one-process sample) that fall
in its shard, written into their slots of a zero buffer. Everything adds up: the caller's one SUM all-reduce (the
gradients' own, :func:`~lightning_monitor._grad.sharded.global_stats`) gives the full tensors' columns and the very
sample one process takes. Placements with no rectangular shard (``_StridedShard`` of FSDP2 over tensor parallel)
have their sample left out (:attr:`Queued.unsampled` names them).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np
import torch
from torch.distributed.tensor import DTensor, Replicate, Shard
from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

from lightning_monitor._core.compat import foreach_norm
from lightning_monitor._core.lru import Lru
from lightning_monitor._grad import sharded as _grad_sharded
from lightning_monitor._grad.stats import sample_stride

TINY = 1e-16  # a second moment below this counts as collapsed (the square of Adam's default eps)
SAMPLE = 1024  # effective steps sampled per parameter, at a prime stride
COLUMNS = 5  # per parameter: sum m^2, sum v, elements with v < TINY, sum u*g, sum u^2
_LENGTHS: Lru[torch.Tensor] = Lru(8)
_PLANS: Lru[tuple[torch.Tensor, np.ndarray]] = Lru(256)  # sharded: per (shape, placement, rank) sampled positions


@dataclass
class Queued:
    """The device side of one optimizer step's optimizer-state statistics."""

    positions: np.ndarray  # [k] positions in the measured parameters that have Adam-style state
    lengths: np.ndarray  # [k] sampled effective steps per parameter
    packed: torch.Tensor  # [k * COLUMNS + lengths.sum()] float64 on the device
    unsampled: tuple[int, ...] = ()  # positions (in ``positions``) whose sharding leaves them out of the sample


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


def _plain_plan(numel: int, stride: int, device: torch.device) -> tuple[torch.Tensor, np.ndarray]:
    positions = np.arange(0, numel, stride, dtype=np.int64)
    return torch.from_numpy(positions).to(device), np.arange(positions.size, dtype=np.int64)


def _shard_plan(t: torch.Tensor, device: torch.device, counted: bool, stride: int
                ) -> Optional[tuple[torch.Tensor, np.ndarray]]:
    """(indices into this rank's flat local values, their slots in the full tensor's sample) for the sampled
    positions ``0, stride, 2 * stride, ...`` of the flattened full tensor that lie in this rank's shard (none when
    another replica counts them), as indices on ``device``; ``None`` for a placement with no rectangular shard."""
    if not counted:
        return torch.zeros(0, dtype=torch.int64, device=device), np.zeros(0, dtype=np.int64)
    if not isinstance(t, DTensor):
        return _PLANS.get_or_make((t.numel(), stride, device, None), lambda: _plain_plan(t.numel(), stride, device))
    placements = tuple(t.placements)
    if not all(type(p) in (Shard, Replicate) for p in placements):
        return None
    mesh = t.device_mesh
    shape = tuple(t.shape) or (1,)

    def make() -> tuple[torch.Tensor, np.ndarray]:
        local_shape, offset = compute_local_shape_and_global_offset(t.shape, mesh, placements)
        local_shape, offset = tuple(local_shape) or (1,), tuple(offset) or (0,)
        positions = np.arange(0, t.numel(), stride, dtype=np.int64)
        coords = np.unravel_index(positions, shape)
        inside = np.ones(positions.size, dtype=bool)
        for c, o, n in zip(coords, offset, local_shape, strict=True):
            inside &= (c >= o) & (c < o + n)
        mine = np.ravel_multi_index(tuple(c[inside] - o for c, o in zip(coords, offset, strict=True)), local_shape)
        return torch.from_numpy(np.asarray(mine, dtype=np.int64)).to(device), np.flatnonzero(inside)

    key = (shape, placements, tuple(mesh.shape), tuple(mesh.get_coordinate() or ()), stride, device)
    return _PLANS.get_or_make(key, make)


def queue(optimizer: torch.optim.Optimizer, params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor]
          ) -> Optional[Queued]:
    """Queue the statistics of ``params`` (with gradients ``grads``) under ``optimizer``'s state; ``None`` when
    none of them has Adam-style state yet (before the first step, or another optimizer). Sharded (DTensor) state
    gives this rank's addends (see the module's text): the caller sums ``packed`` over the ranks."""
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
    full = [f[2] for f in found]  # the full tensors' shapes: the sample's positions
    strides = [sample_stride(m.numel(), SAMPLE) for m in full]
    sharded = _grad_sharded.is_sharded(full)
    if sharded:  # this rank's shards: a replica that another rank counts adds nothing (empty)
        local = []
        for f, s in zip(found, strides, strict=True):
            m, counted = _grad_sharded.local_shard(f[2])
            parts = [m] + [_grad_sharded.local_shard(t)[0] for t in (f[3], f[4], f[1])]
            plan = _shard_plan(f[2], m.device, counted, s)
            local.append(([t if counted else t.reshape(-1)[:0] for t in parts], plan))
        ms, vs, ds, gs = ([x[0][i] for x in local] for i in range(4))
        plans = [x[1] for x in local]
    else:
        ms, vs, ds, gs = [f[2] for f in found], [f[3] for f in found], [f[4] for f in found], [f[1] for f in found]
        plans = []
    device = ms[0].device
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
    if sharded:
        eff, lengths, unsampled = _sharded_sample(ds, plans, full, strides, (lr_d, eps_d, inv_bc2))
    else:
        picked = [d.reshape(-1)[::s] for d, s in zip(ds, strides, strict=True)]
        lengths = np.array([p.numel() for p in picked], dtype=np.int64)
        eff, unsampled = _effective_steps(picked, lengths, (lr_d, eps_d, inv_bc2)), ()
    packed = torch.cat([rows.reshape(-1), eff])
    return Queued(np.array([f[0] for f in found], dtype=np.int64), lengths, packed, unsampled)


def _effective_steps(picked: list[torch.Tensor], counts: np.ndarray, scalars: tuple[torch.Tensor, ...]
                     ) -> torch.Tensor:
    """``lr / (sqrt(v_hat) + eps)`` of the sampled second moments ``picked`` (``counts`` of them per parameter)."""
    lr_d, eps_d, inv_bc2 = scalars
    device = lr_d.device
    owner = _LENGTHS.get_or_make((b"sample", counts.tobytes(), device),
                                 lambda: _to(torch.from_numpy(np.repeat(np.arange(len(picked)), counts)), device))
    sample = torch.cat(picked).double()
    return lr_d[owner] / ((sample * inv_bc2[owner]).sqrt() + eps_d[owner])


def _sharded_sample(ds: list[torch.Tensor], plans: list[Optional[tuple[torch.Tensor, np.ndarray]]],
                    full: list[torch.Tensor], strides: list[int], scalars: tuple[torch.Tensor, ...]
                    ) -> tuple[torch.Tensor, np.ndarray, tuple[int, ...]]:
    """(this rank's effective steps in their slots of the full sample, zeros elsewhere; the sample's length per
    parameter; positions left out) for local second moments ``ds``."""
    lengths = np.array([0 if plan is None else len(range(0, t.numel(), s))
                        for t, s, plan in zip(full, strides, plans, strict=True)], dtype=np.int64)
    base = np.concatenate([[0], np.cumsum(lengths)[:-1]])
    picked, slots = [], []
    for d, plan, start in zip(ds, plans, base.tolist(), strict=True):
        if plan is None:
            picked.append(d.reshape(-1)[:0])
            continue
        picked.append(d.reshape(-1)[plan[0]])
        slots.append(plan[1] + start)
    counts = np.array([p.numel() for p in picked], dtype=np.int64)
    eff = _effective_steps(picked, counts, scalars)
    where = np.concatenate(slots) if slots else np.zeros(0, dtype=np.int64)
    index = _LENGTHS.get_or_make((b"slots", where.tobytes(), eff.device),
                                 lambda: _to(torch.from_numpy(where), eff.device))
    out = torch.zeros(int(lengths.sum()), dtype=torch.float64, device=eff.device).index_copy_(0, index, eff)
    return out, lengths, tuple(i for i, plan in enumerate(plans) if plan is None)


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
        denom = float(np.sqrt(u_sq * g_sq))
        out[f"optim/exp_avg_norm/{name}"] = float(np.sqrt(m_sq))
        out[f"optim/exp_avg_sq_sqrt_norm/{name}"] = float(np.sqrt(v_sum))
        if steps.size:  # none only when every parameter of the group is left out of the sample (strided shards)
            median, p99 = np.quantile(steps, [0.5, 0.99]).tolist()
            out[f"optim/step_median/{name}"] = median
            out[f"optim/step_p99/{name}"] = p99
        out[f"optim/small_v_share/{name}"] = small / float(numel[at].sum())
        out[f"optim/update_cos/{name}"] = dot / denom if denom > 0 else 0.0
    return out


def warnings(optimizer: torch.optim.Optimizer, queued: Optional[Queued], names: Sequence[str], present: np.ndarray
             ) -> list[tuple[str, str]]:
    """GradientMonitor's warnings (tag, message: each said once a run) about ``optimizer``'s state at a logging step:
    none to read, or parameters left out of the step percentiles (``names[present[j]]``: the name of the ``j``-th
    parameter :func:`queue` got)."""
    if queued is None:
        if not optimizer.state:  # it has not stepped yet
            return []
        return [("optstate:none", f"GradientMonitor: optimizer_state=True, but {type(optimizer).__name__}"
                 " keeps no Adam-style state (exp_avg, exp_avg_sq); no optim/* keys for it.")]
    if not queued.unsampled:
        return []
    left = [names[present[queued.positions[i]]] for i in queued.unsampled]
    more = ", ..." if len(left) > 3 else ""
    return [("optstate:unsampled", (
        f"GradientMonitor: {len(left)} parameter(s) ({', '.join(left[:3])}{more})"
        " are sharded with strided placements (FSDP2 over tensor parallel); their effective steps are"
        " left out of optim/step_median and optim/step_p99 (the other optim/* keys include them)."))]
