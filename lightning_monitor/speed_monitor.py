"""SpeedMonitor: how fast training goes, and what holds it back (data wait, stragglers, MFU)."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from functools import partial
from typing import Any, Optional, Union

import lightning.pytorch as pl
import torch
from lightning.pytorch.trainer.states import TrainerFn
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_monitor._core import clock as _clock
from lightning_monitor._core import options as _options
from lightning_monitor._core.keys import document_keys
from lightning_monitor._monitor import dispatch as _dispatch
from lightning_monitor._monitor import dist as _dist
from lightning_monitor._monitor.base import Monitor
from lightning_monitor._speed import flops as _flops
from lightning_monitor._speed import window as _speed_window
from lightning_monitor._writers import backends as _writers

#: the key of one monitor's part of ``time/monitor_share``; ``{monitor}`` is its :meth:`Monitor.cost_name`
MONITOR_SHARE = "time/monitor_share/{monitor}"


def _teller(trainer: "pl.Trainer") -> Callable[[str], None]:
    """How SpeedMonitor says where its FLOPs come from: a terminal line from global rank 0."""
    return partial(_dispatch.say, trainer, fallback=rank_zero_info)


@document_keys
class SpeedMonitor(Monitor):
    """Throughput, step time, time lost waiting for data, FLOPs/s and MFU with FLOPs measured automatically.

    Per batch only host timestamps and integer counters are kept; at a logging step the window since the previous
    logging step is closed (on CUDA after one ``torch.cuda.synchronize``, so the window ends when the device is
    done), the per-rank numbers are gathered in one packed collective on every rank, and rank 0 writes.

    The window's wall time is the sum of each batch's *step time* (``on_train_batch_start`` ->
    ``on_train_batch_end``) and its *data wait* (end of the previous batch -> start of this one). Validation, epoch
    ends and checkpointing fall outside both, so they never dilute training throughput. Warm-up steps
    (``global_step < warmup_steps``) and the steps whose FLOPs are being measured are left out of the windows.

    **Logger time is not training time.** Host time spent starting and writing to loggers
    (:func:`lightning_monitor._writers.backends.seconds_writing`: our values and Lightning's own ``self.log`` writes,
    through MultiLogger or a plain TensorBoard/wandb logger) is taken out of the span it fell in, so a slow first write
    (a backend starting up) changes no rate, step time, data-wait share or remaining time. Under DDP rank 0 writes
    while the other ranks wait for it at the next all-reduce: every rank's window loses the most any rank wrote.

    **The library's own cost.** Every hook of every monitor is timed on the host (two ``perf_counter`` reads a
    call; :class:`~lightning_monitor._monitor.base.Monitor`); ``time/monitor_share`` is the share of the window's real
    elapsed time (logger writes included) spent inside them, with one key per monitor when the trainer has more
    than one (none for a monitor that turned itself off). A cost is counted where it is spent: the monitors' hook
    time in a validation run inside ``fit`` (PredictionGridMonitor draws there) is charged to the training window
    that holds it, in its share and its elapsed time, never in a rate or step time.

    FLOPs: unless ``flops_per_batch`` is given, the first training batch of every new batch shape runs under
    ``torch.utils.flop_counter.FlopCounterMode`` (forward + backward of the real step; nothing run twice, so no
    parameter, RNG or BatchNorm state is disturbed) and the count is cached per input shape. The peak is
    ``peak_flops_per_sec`` if given (the only way on CPU), else the dense datasheet figure for the GPU
    (``torch.cuda.get_device_name``) at the trainer's precision. The source of both is printed once on rank 0 and
    kept in :attr:`flops_source`.

    Logged keys:

    {logged_keys}

    The pre-sync times are host timestamps (no device sync between logging steps): on a GPU they show a rank
    held back on the host (data loading, Python, host-side preprocessing), not a device that computes slowly.

    Args:
        every_n_steps: Log every this many optimizer steps; ``None`` follows ``Trainer(log_every_n_steps)``.
        flops_per_batch: FLOPs of one training batch (forward + backward); skips the automatic measurement.
        peak_flops_per_sec: Peak FLOP/s of one device; overrides the GPU table (needed for MFU on CPU).
        measure_flops: Measure FLOPs with ``FlopCounterMode`` when ``flops_per_batch`` is not given.
        warmup_steps: Optimizer steps left out of the windows at the start (cudnn autotune, lazy init, compile).
        max_measured_shapes: Distinct batch shapes to measure; later new shapes are scaled per sample.
        batch_size_fn: Samples in a batch; default: leading dimension of the first tensor in the batch.
        items_fn: Items in a batch (tokens, pixels), an ``int`` or a tensor (accumulated on the device, no sync).
        exclude_keys: globs over the keys this monitor logs, left out of every backend (e.g. ``["grad/hist/*"]``
            drops a whole family, ``["memory/host/available_gib"]`` one key).

    Raises:
        TypeError: On an argument of the wrong type (``warmup_steps=1.5``), echoing it.
        ValueError: On a non-positive ``every_n_steps``, FLOPs or peak, or a negative ``warmup_steps``, echoing it.

    Example::

        trainer = Trainer(callbacks=[SpeedMonitor()], log_every_n_steps=50)
    """

    LOGGED_KEYS = {
        "throughput/batches_per_sec": "training batches per second, summed over ranks",
        "throughput/samples_per_sec": "training samples per second, summed over ranks",
        "throughput/device/samples_per_sec": "DDP: training samples per second per device (global / world size)",
        "throughput/items_per_sec": "items (tokens, pixels: ``items_fn``) per second, summed over ranks",
        "throughput/flops_per_sec": "model FLOPs per second (forward + backward), summed over ranks",
        "throughput/mfu": "model FLOPs utilisation: per-device FLOPs/s over the device's dense peak",
        "throughput/val_samples_per_sec": "validation samples per second, summed over ranks, once per validation run"
        " (on the layout's throughput chart beside the training rate)",
        "time/monitor_share": "share of the window's elapsed host time spent inside lightning-monitor's hooks (all"
        " monitors, their logger writes included, and their hooks in a validation run inside fit, charged to the"
        " window that holds it; DDP: the rank where it is largest)",
        MONITOR_SHARE: "the part of ``time/monitor_share`` spent in one monitor's hooks (with more than one monitor),"
        " named after its class less ``Monitor``: ``gradient``, ``memory``, ``speed``, ``prediction_grid``; ``other``"
        " for a Monitor subclass of your own; none for a monitor that turned itself off",
        "time/step_sec": "mean wall time per training batch in the window (data wait included, logger writes left"
        " out)",
        "time/data_wait_share": "share of the window's wall time spent between batches waiting for the next one",
        "time/remaining_sec": "estimated training time left: remaining batches x the slowest rank's time per batch"
        " (DDP steps at its pace; ``time/step_sec`` is the mean over ranks), validation excluded",
        "time/pre_sync_sec_min": "DDP: fastest rank's time per batch before the gradient all-reduce"
        " (data wait + forward)",
        "time/pre_sync_sec_mean": "DDP: mean over ranks of the time per batch before the gradient all-reduce",
        "time/pre_sync_sec_max": "DDP: slowest rank's time per batch before the gradient all-reduce",
        "time/pre_sync_sec_max_rank": "DDP: the global rank with the largest pre-sync time (the straggler)",
        "time/straggler_ratio": "DDP: ``time/pre_sync_sec_max`` / ``time/pre_sync_sec_min`` (1 = balanced)",
    }

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        *,
        flops_per_batch: Optional[float] = None,
        peak_flops_per_sec: Optional[float] = None,
        measure_flops: bool = True,
        warmup_steps: int = 1,
        max_measured_shapes: int = 8,
        batch_size_fn: Optional[Callable[[Any], int]] = None,
        items_fn: Optional[Callable[[Any], Union[int, torch.Tensor]]] = None,
        exclude_keys: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(every_n_steps, exclude_keys)
        flops_per_batch = _options.check_number("flops_per_batch", flops_per_batch, above=0, none_ok=True)
        peak_flops_per_sec = _options.check_number("peak_flops_per_sec", peak_flops_per_sec, above=0, none_ok=True)
        _options.check_bool("measure_flops", measure_flops)
        warmup_steps = _options.check_count("warmup_steps", warmup_steps)
        max_measured_shapes = _options.check_int("max_measured_shapes", max_measured_shapes, low=1)
        self.flops_per_batch = flops_per_batch
        self.peak_flops_per_sec = peak_flops_per_sec
        self.measure_flops = measure_flops
        self.warmup_steps = warmup_steps
        self.max_measured_shapes = max_measured_shapes
        self.batch_size_fn = batch_size_fn
        self.items_fn = items_fn
        self._book = _flops.FlopBook(flops_per_batch, measure_flops, max_measured_shapes)
        self._peak: Optional[float] = None
        self._prev_end: Optional[float] = None
        self._val_start: Optional[float] = None
        self._val_samples = 0
        self._val_hooks: Optional[list[float]] = None  # hook seconds at the start of a validation run inside fit
        # per-batch state, set at batch start
        self._batch_idx = 0
        self._start = self._wait = 0.0
        self._before_backward: Optional[float] = None
        self._exclude = True
        self._batch_flops: Optional[float] = None
        self._first_step: Optional[int] = None  # global_step of this fit's first batch (warm-up counts from it)
        self._window = _speed_window.Window()
        self._monitors: list[Monitor] = []  # every monitor of the trainer (hook time), grouped by ``_cost_keys``
        self._cost_keys: list[str] = []
        # at the end of the previous batch (or the restart of timing): logger-writing and hook seconds so far
        self._prev_costs: tuple[float, list[float]] = (0.0, [])
        self._start_costs: tuple[float, list[float]] = (0.0, [])
        self._wait_costs: tuple[float, list[float]] = (0.0, [])
        self._cost_index: list[int] = []  # column of each of self._monitors in the hook seconds
        self._before_backward_written = 0.0
        self._wait_others = self._wait_hooks = 0.0  # other monitors' hook seconds: at the previous end, in the wait
        self._cost_table: list[float] = [0.0]  # every monitor's hook seconds per column, then their total (setup)
        self._cuda: Optional[torch.device] = None  # the fit's CUDA device (setup), None elsewhere
        self._batch_shapes: tuple = ()  # the shapes of the batch now running's tensors: its FLOP key and its size
        self._samples = 1  # the batch now running's size
        self._settled = False  # its size and FLOPs hold for the next batch of the same shapes

    @property
    def flops_source(self) -> Optional[str]:
        """Where the FLOPs and peak figures come from, e.g. "1.2 GFLOP/batch measured by FlopCounterMode ..."."""
        return self._book.source

    # ----------------------------------------------------------------------------------------------- setup
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        device = trainer.strategy.root_device
        self._cuda = device if device.type == "cuda" else None  # synced once per logging step (a fit's device)
        if self.peak_flops_per_sec is not None:
            self._peak, peak_source = self.peak_flops_per_sec, f"{self.peak_flops_per_sec:g} FLOP/s given"
        elif device.type == "cuda":
            self._peak, peak_source = _flops.cuda_peak(device, trainer.precision)
        else:
            self._peak, peak_source = None, f"none on {device.type} (pass `peak_flops_per_sec` for MFU)"
        book = self._book  # the options as they are now; what it measured in an earlier fit stays
        book.given, book.measure, book.max_shapes = self.flops_per_batch, self.measure_flops, self.max_measured_shapes
        book.peak_source = peak_source
        self._monitors = [c for c in trainer.callbacks if isinstance(c, Monitor)]  # type: ignore[attr-defined]
        keys = [MONITOR_SHARE.format(monitor=m.cost_name()) for m in self._monitors]
        self._cost_keys = sorted(set(keys))
        self._cost_index = [self._cost_keys.index(key) for key in keys]
        # every monitor adds its hook seconds to one table as it spends them: a batch reads the costs in one copy
        self._cost_table = [0.0] * (len(self._cost_keys) + 1)
        for monitor, column in zip(self._monitors, self._cost_index, strict=True):
            monitor.sink_costs_into(self._cost_table, column)

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        for monitor in self._monitors:
            monitor.sink_costs_into(None)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # a new fit (after another fit, an interrupted one or a tuner run) starts a new window and warm-up
        super().on_train_start(trainer, pl_module)
        self._window = _speed_window.Window(len(self._cost_keys))
        self._first_step = None
        self._settled = False

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        # the first batch's wait includes starting the DataLoader workers: that is time spent waiting for data
        self._mark(_clock.now(), self._costs())

    # ----------------------------------------------------------------------------------------- per batch
    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        now, table = _clock.now(), self._cost_table
        costs = (_writers._seconds_writing, table[:-1])  # self._costs(), inline: this runs at every batch
        self._begin_batch(trainer, pl_module, batch, batch_idx)
        step = self._batch_step  # trainer.global_step under automatic optimization (read once, by the base)
        if self._manual or step is None:
            step = trainer.global_step
        if self._first_step is None:
            self._first_step = step  # a resumed fit warms up again too
        # logger writes since the previous batch ended (Lightning writes self.log values there) are no training
        # time; other monitors' hooks there (their batch ends) are training time but no data wait
        prev_end = self._prev_end
        if prev_end is not None:
            self._wait_costs = wait_costs = self._prev_costs  # the batch's costs start where the last one's ended
            self._wait = now - prev_end - (costs[0] - wait_costs[0])
        else:
            self._wait_costs, self._wait = costs, 0.0
        self._wait_hooks = table[-1] - self._hook_seconds - self._wait_others  # other monitors' hooks since then
        self._start, self._start_costs = now, costs
        self._before_backward = None
        self._exclude = step < self._first_step + self.warmup_steps
        shapes = _flops.shape_key(batch)  # once a batch: its size and its FLOP key come from them
        if not (self._settled and self.batch_size_fn is None and shapes == self._batch_shapes):
            # a new shape (or a size only batch_size_fn knows): the last batch's size and FLOPs do not carry over
            self._batch_shapes = shapes
            self._samples = self._batch_size(batch, shapes)
            self._batch_flops = self._book.for_batch(shapes, self._samples, _teller(trainer), self._warn)
            if self._book.measuring is not None:
                self._exclude = True  # FlopCounterMode slows this step down: keep it out of the timing window
            self._settled = self._book.measuring is None  # the FLOPs are known (or not asked for), not measured now

    @override
    def on_before_backward(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", loss: torch.Tensor) -> None:
        if self._before_backward is None:
            self._before_backward = _clock.now()
            self._before_backward_written = _writers._seconds_writing

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        if self._book.measuring is not None:  # the FLOP counter runs for this batch
            self._book.finish(self._batch_step, _teller(trainer))
        # warm-up and measured steps: none; most batches: no call
        log_step = None if self._exclude or self._candidate is None else self._batch_logging_step(trainer)
        if log_step is not None and self._cuda is not None:
            torch.cuda.synchronize(self._cuda)  # sync point: once per logging step (the window ends with the GPU)
        now, table = _clock.now(), self._cost_table
        costs = (_writers._seconds_writing, table[:-1])  # self._costs(), inline: this runs at every batch
        if not self._exclude:
            start, start_written = self._start, self._start_costs[0]
            written = costs[0] - start_written  # logger writes inside the step: no training time
            if self._before_backward is None:
                pre_sync = now - start - written
            else:
                pre_sync = self._before_backward - start - (self._before_backward_written - start_written)
            window = self._window  # window.add_batch(...), inline: this runs at every batch (add_span folds)
            window.batches.append((self._samples, self._wait, now - start - written, pre_sync,
                                   self._batch_flops or 0.0, self._wait_hooks))
            window.add_span(self._wait_costs, costs)
            if self.items_fn is not None:
                self._window.add_items(self.items_fn(batch))
        # self._mark(now, costs), inline: where the next batch's data wait starts
        self._prev_end, self._prev_costs, self._wait_others = now, costs, table[-1] - self._hook_seconds
        self._batch_idx = batch_idx
        if log_step is not None:
            self._log_window(trainer, log_step)
            # the logging's own time (less its logger writes) is wall time of the next window, but no data wait
            after = _clock.now()
            self._mark(after, self._costs())
            written = self._prev_costs[0] - costs[0]
            self._window.sums[_speed_window.WALL] += after - now - written
            self._window.add_span(costs, self._prev_costs)

    # ---------------------------------------------------------------------------------------- validation
    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking:
            self._val_start, self._val_samples = _clock.now(), 0
            # inside fit, the monitors' hook time in validation (the prediction grid draws there) is charged to the
            # training window that contains it: a cost is counted where it is spent
            self._val_hooks = self._costs()[1] if trainer.state.fn == TrainerFn.FITTING else None

    @override
    def on_validation_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int,
        dataloader_idx: int = 0,
    ) -> None:
        if not trainer.sanity_checking and self._val_start is not None:
            self._val_samples += self._batch_size(batch)

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if trainer.sanity_checking or self._val_start is None:
            return
        device = trainer.strategy.root_device
        if device.type == "cuda":
            torch.cuda.synchronize(device)  # sync point: once per validation run
        seconds = _clock.now() - self._val_start
        self._val_start = None
        if self._val_hooks is not None:
            self._window.add_outside([b - a for a, b in zip(self._val_hooks, self._costs()[1], strict=True)])
            self._val_hooks = None
        rows = _dist.gather_packed(trainer, [float(self._val_samples), seconds]).tolist()
        rate = sum(samples / secs for samples, secs in rows if secs > 0)
        step = self._validation_step(trainer)
        self._log_scalars(trainer, {"throughput/val_samples_per_sec": rate}, step)
        # training resumes: validation time is never counted as data wait
        self._mark(_clock.now(), self._costs())

    # ---------------------------------------------------------------------------------------- teardown
    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._book.abort()

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._book.abort()

    @override
    def state_dict(self) -> dict[str, Any]:
        # plain tuples (the batch's torch.Size shapes hash and compare as tuples): any checkpoint loader reads them
        return {"flops_cache": {tuple(map(tuple, key)): flops for key, flops in self._book.cache.items()}}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._book.cache.update(state_dict.get("flops_cache", {}))

    # ------------------------------------------------------------------------------------------ helpers
    def _costs(self) -> tuple[float, list[float]]:
        """Seconds so far spent writing to loggers (this process) and in each monitor class's hooks (since setup)."""
        return _writers._seconds_writing, self._cost_table[:-1]  # seconds_writing(), read without a call

    def _mark(self, now: float, costs: tuple[float, list[float]]) -> None:
        """Where the next batch's data wait starts: the clock and the cost counters then."""
        self._prev_end, self._prev_costs, self._wait_others = now, costs, self._others_hook_seconds()

    def _others_hook_seconds(self) -> float:
        return self._cost_table[-1] - self._hook_seconds

    def _batch_size(self, batch: Any, shapes: Optional[tuple] = None) -> int:
        if self.batch_size_fn is not None:
            return int(self.batch_size_fn(batch))
        shapes = _flops.shape_key(batch) if shapes is None else shapes
        if not shapes or not shapes[0]:
            self._warn("batch_size", "SpeedMonitor cannot infer the batch size (no tensor with a leading"
                            " dimension in the batch); counting 1 sample per batch. Pass `batch_size_fn`.")
            return 1
        return int(shapes[0][0])

    def _log_window(self, trainer: "pl.Trainer", step: int) -> None:
        packed = self._window.pack()
        self._window = _speed_window.Window(len(self._cost_keys))
        # collective on every rank; the one host transfer of this logging step happens inside (one process with the
        # sums on the host: they are the one row, as they are)
        gathered = ([packed] if isinstance(packed, list) and trainer.world_size == 1
                    else _dist.gather_packed(trainer, packed))
        remaining = _speed_window.remaining_batches(trainer, step, self._batch_idx)
        flops = self.flops_per_batch is not None or self.measure_flops
        metrics = _speed_window.metrics(gathered, items=self.items_fn is not None, flops=flops, peak=self._peak,
                                        remaining=remaining, cost_keys=self._cost_keys)
        # no key for a monitor that turned itself off (what it cost before still counts in the total)
        on = {self._cost_keys[c] for m, c in zip(self._monitors, self._cost_index, strict=True) if not m.is_off()}
        for key in set(self._cost_keys) - on:
            metrics.pop(key, None)
        if metrics:  # empty when no rank timed a batch in this window
            self._log_scalars(trainer, metrics, step)
