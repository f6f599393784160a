"""SpeedMonitor's timing window: per-batch sums between logging steps, and the values logged from all ranks' sums."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Optional, Union

import lightning.pytorch as pl
import numpy as np
import torch

# columns of the per-rank vector gathered once per logging step; the monitors' hook seconds follow from HOOKS on.
# OUTSIDE: hook seconds spent outside the timed spans but charged to this window (a validation run inside fit: the
# prediction grid draws there), added to the elapsed time the monitors' share is taken of
BATCHES, SAMPLES, ITEMS, WALL, WAIT, PRE_SYNC, FLOPS, WRITTEN, OUTSIDE = range(9)
HOOKS = 9
#: batches a window holds before it adds them up (:attr:`Window.batches`): a bound on its memory between logging steps
FOLD_AT = 1024
#: a reading of the counted costs: seconds spent writing to loggers, and each monitor class's hook seconds
Costs = tuple[float, list[float]]


class Window:
    """Sums over the training batches since the last logging step, on the host (items may stay on the device).

    Times are host seconds with the time spent writing to loggers already taken out (``WRITTEN`` keeps how much);
    ``hooks`` has one column per monitor class: seconds spent in its hooks within the timed spans.
    """

    def __init__(self, monitors: int = 0) -> None:
        self.sums = [0.0] * (HOOKS + monitors)
        #: the batches not yet in ``sums``: one :meth:`add_batch` tuple each, appended by the caller itself at every
        #: batch (a list append runs no Python code: a call run cold after the training step costs about 1.5 us,
        #: and adding up six sums another 4 us), added up when the window is packed or holds :data:`FOLD_AT`
        #: (:meth:`add_span`)
        self.batches: list[tuple[float, float, float, float, float, float]] = []
        self._items: Optional[torch.Tensor] = None  # items_fn's tensors, summed on the device until the logging step
        # the stretch of counted costs not yet in the sums: (the reading it began at, the reading it ended at)
        self._span: Optional[tuple[Costs, Costs]] = None

    def add_batch(self, samples: int, wait: float, step: float, pre_sync: float, flops: float,
                  hooks_in_wait: float = 0.0) -> None:
        """One batch: ``wait`` before it started, ``step`` from its start to its end, ``pre_sync`` up to the backward;
        ``hooks_in_wait``: monitors' hook seconds within ``wait`` (training time, but no wait for data). The same as
        appending the tuple of them to :attr:`batches` (what SpeedMonitor does)."""
        self.batches.append((samples, wait, step, pre_sync, flops, hooks_in_wait))

    def fold(self) -> None:
        """Add up :attr:`batches` into the sums, in the order they came (the same sums as one at a time)."""
        s = self.sums
        for samples, wait, step, pre_sync, flops, hooks_in_wait in self.batches:
            s[BATCHES] += 1
            s[SAMPLES] += samples
            s[WALL] += wait + step
            s[WAIT] += wait - min(hooks_in_wait, wait)
            s[PRE_SYNC] += wait + pre_sync
            s[FLOPS] += flops
        self.batches.clear()

    def add_costs(self, written: float, hooks: Sequence[float]) -> None:
        """Seconds spent writing to loggers (left out of the times above) and in each monitor's hooks."""
        self.sums[WRITTEN] += written
        for i, seconds in enumerate(hooks):
            self.sums[HOOKS + i] += seconds

    def add_span(self, begin: "Costs", end: "Costs") -> None:
        """Count the logger writes and hook seconds between two readings of them (``(written, [per monitor])``).
        Consecutive stretches (each begins at the reading the last one ended at) are added up once, when the next
        stretch does not follow on or the window is packed. Every batch calls it: :attr:`batches` is added up here
        when it holds :data:`FOLD_AT`."""
        if len(self.batches) >= FOLD_AT:
            self.fold()
        span = self._span
        if span is None or begin is not span[1]:
            self._close_span()
            self._span = (begin, end)
        else:
            self._span = (span[0], end)

    def _close_span(self) -> None:
        if self._span is not None:
            (written_a, hooks_a), (written_b, hooks_b) = self._span
            self.add_costs(written_b - written_a, [b - a for a, b in zip(hooks_a, hooks_b, strict=True)])
            self._span = None

    def add_outside(self, hooks: Sequence[float]) -> None:
        """Seconds spent in each monitor's hooks outside the timed spans (a validation run inside fit), charged to
        this window: they count in the monitors' share (and its elapsed time), never in a rate or step time."""
        for i, seconds in enumerate(hooks):
            self.sums[HOOKS + i] += seconds
            self.sums[OUTSIDE] += seconds

    def add_items(self, items: Union[int, torch.Tensor]) -> None:
        if isinstance(items, torch.Tensor):  # stays on the device until the logging step
            items = items.detach().to(torch.float64).reshape(())
            self._items = items if self._items is None else self._items + items
        else:
            self.sums[ITEMS] += items

    def pack(self) -> Union[list[float], torch.Tensor]:
        """This rank's sums to gather (the costs counted so far included): the host list, or one float64 vector on
        the items' device when items were counted on the device."""
        self._close_span()
        self.fold()
        if self._items is None:
            return list(self.sums)
        packed = torch.tensor(self.sums, dtype=torch.float64).to(self._items.device)
        packed[ITEMS] += self._items
        return packed


def metrics(
    gathered: Union[np.ndarray, Sequence[Sequence[float]]],
    *,
    items: bool,
    flops: bool,
    peak: Optional[float],
    remaining: Optional[float],
    cost_keys: Sequence[str] = (),
) -> dict[str, float]:
    """The logged values from a ``[world_size, HOOKS + len(cost_keys)]`` array of every rank's :class:`Window` sums
    (row = global rank).

    Ranks with no timed batch in the window (warm-up, a FLOPs measurement) are left out of the rates and times;
    ``time/pre_sync_sec_max_rank`` is the global rank of the slowest one. ``remaining`` is the number of training
    batches left, timed at the slowest rank's time per batch (DDP steps at the pace of its slowest rank).

    Logger writes: each rank's own are already out of its times; under DDP rank 0 writes while the other ranks wait
    for it at the next gradient all-reduce, so every rank's wall time also loses the most any rank wrote, less what
    it wrote itself. ``cost_keys`` name the hook-seconds columns: each monitor's share of the real elapsed time
    (writes included), at the rank whose monitors cost the largest share; per monitor only with more than one.
    """
    # plain Python over the few ranks' rows: numpy's per-call cost on arrays this small was ~0.1 ms a logging step
    table = gathered.tolist() if isinstance(gathered, np.ndarray) else [list(r) for r in gathered]  # rows: ranks
    world = len(table)
    ranks = [r for r in range(world) if table[r][BATCHES] > 0 and table[r][WALL] > 0]
    if not ranks:
        return {}
    # time another rank spent writing is time this one waited for it (at the all-reduce): not training time either
    most_written = max(row[WRITTEN] for row in table)
    rows, elapsed = [], []
    for r in ranks:
        row = list(table[r])
        # real host seconds of each rank's timed spans, and the hook time charged from outside them (validation)
        elapsed.append(row[WALL] + row[WRITTEN] + (row[OUTSIDE] if cost_keys else 0.0))
        row[WALL] = max(row[WALL] - (most_written - row[WRITTEN]), row[WALL] * 1e-3)
        rows.append(row)

    def rate(col: int) -> float:
        return sum(row[col] / row[WALL] for row in rows)

    step_secs = [row[WALL] / row[BATCHES] for row in rows]
    out: dict[str, float] = {
        "throughput/batches_per_sec": rate(BATCHES),
        "throughput/samples_per_sec": rate(SAMPLES),
        "time/step_sec": sum(step_secs) / len(step_secs),
        "time/data_wait_share": sum(row[WAIT] for row in rows) / sum(row[WALL] for row in rows),
    }
    if world > 1:  # one device: the per-device rate is the global one, nothing to add
        out["throughput/device/samples_per_sec"] = rate(SAMPLES) / world
    if items:
        out["throughput/items_per_sec"] = rate(ITEMS)
    if flops:
        out["throughput/flops_per_sec"] = rate(FLOPS)
        if peak is not None:
            out["throughput/mfu"] = rate(FLOPS) / (world * peak)
    if remaining is not None:
        out["time/remaining_sec"] = remaining * max(step_secs)
    if cost_keys:
        shares = [[row[HOOKS + i] / spent for i in range(len(cost_keys))] for row, spent in zip(rows, elapsed,
                                                                                                strict=True)]
        costly = max(range(len(shares)), key=lambda i: sum(shares[i]))  # the first of equals, as argmax
        out["time/monitor_share"] = sum(shares[costly])
        if len(cost_keys) > 1:  # one monitor: its share is the total
            out.update(zip(cost_keys, shares[costly], strict=True))
    if world > 1:
        pre = [row[PRE_SYNC] / row[BATCHES] for row in rows]
        slowest = max(range(len(pre)), key=pre.__getitem__)
        out.update({
            "time/pre_sync_sec_min": min(pre),
            "time/pre_sync_sec_mean": sum(pre) / len(pre),
            "time/pre_sync_sec_max": pre[slowest],
            "time/pre_sync_sec_max_rank": float(ranks[slowest]),  # the global rank, not the row among those timed
        })
        if min(pre) > 0:
            out["time/straggler_ratio"] = pre[slowest] / min(pre)
    return out


def remaining_batches(trainer: "pl.Trainer", step: int, batch_idx: int) -> Optional[float]:
    """Training batches left after batch ``batch_idx`` (of optimizer step ``step``), from max_steps and/or
    max_epochs; ``None`` when unknown."""
    left: list[float] = []
    accumulate = max(1, int(trainer.accumulate_grad_batches))
    if trainer.max_steps is not None and trainer.max_steps >= 0:
        left.append((trainer.max_steps - (step + 1)) * accumulate)
    per_epoch = trainer.num_training_batches
    if trainer.max_epochs is not None and trainer.max_epochs >= 0 and math.isfinite(per_epoch):
        left.append(trainer.max_epochs * per_epoch - (trainer.current_epoch * per_epoch + batch_idx + 1))
    return float(max(0, min(left))) if left else None
