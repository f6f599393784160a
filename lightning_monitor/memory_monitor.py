"""MemoryMonitor: how close is training to running out of memory, on which rank, and in which phase."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
from lightning.pytorch.utilities import rank_zero_info
from typing_extensions import override

from lightning_monitor._core import options as _options
from lightning_monitor._core.keys import document_keys
from lightning_monitor._memory import sources as _memory
from lightning_monitor._memory.sources import GIB
from lightning_monitor._monitor import dist as _dist
from lightning_monitor._monitor.base import Monitor

#: host-wide values (the same for every process of one host): logged once per host, never aggregated over the ranks
#: of one host, and only once they have moved in this fit (a flat line says nothing)
HOST_WIDE = ("memory/host/available_gib",)
#: how far (a share of the host's physical memory) the available memory must move from the fit's first reading
#: before ``memory/host/available_gib`` is logged (from that logging step on)
AVAILABLE_MOVED_SHARE = 0.01
_MOVED = "memory/host/available_moved"  # gathered with the values (1: this host's available memory moved), not logged


def _has_workers(trainer: "pl.Trainer") -> bool:
    """Whether any training or validation DataLoader of the run starts worker processes (``num_workers > 0``)."""
    loaders: list[Any] = []
    stack: list[Any] = [trainer.train_dataloader, trainer.val_dataloaders]
    while stack:
        item = stack.pop()
        if isinstance(item, (list, tuple)):
            stack.extend(item)
        elif isinstance(item, dict):
            stack.extend(item.values())
        elif item is not None:
            loaders.append(item)
    return any(getattr(loader, "num_workers", 0) > 0 for loader in loaders)


@document_keys
class MemoryMonitor(Monitor):
    r"""Logs CUDA allocator memory per window and per phase, host memory including DataLoader workers, per rank.

    At each logging step (the trainer's ``log_every_n_steps``, or ``every_n_steps``) it reads, on the host and
    without a device synchronisation, ``torch.cuda.memory_stats`` of this rank's device, the process's RSS, the
    memory its DataLoader workers add (their unique set size, when the run has workers) and the system's available
    memory. Between logging steps it does nothing but
    compare two integers.

    **Peaks are windows.** After each read it calls ``torch.cuda.reset_peak_memory_stats``, so
    ``peak_*`` is the peak since the previous logging step (while training), and ``{phase}_peak_*`` the peak of
    one training epoch, one validation run or one test run, logged when that phase ends. Because the allocator's
    peak counters are reset, your own ``torch.cuda.max_memory_allocated()`` calls see the same windows.
    Validation memory goes to the validation peak, not to the training window it interrupts.

    **Across ranks.** Per-rank keys carry the value of global rank 0. With more than one process, every value
    ``memory/{name}`` also gets ``memory/{name}_min``, ``_mean``, ``_max`` over ranks and ``_max_rank`` (the rank
    holding the max), from one packed all-gather per logging step run on every rank; rank 0 writes. A host-wide
    value (``memory/host/available_gib``) is the same for every rank of a host: it is aggregated over one rank per
    host, and only when the run spans several hosts; it is logged once it has moved (1 % of the host's memory)
    since the fit's first reading. A single
    process logs the per-rank keys only. CUDA keys appear when the trainer's device is a CUDA device; NVML keys
    when ``nvidia-ml-py`` is installed too (otherwise one info line says they are skipped).

    One warning (each, once per run) when the peak allocated memory passes ``warn_share`` of the device's memory
    on any rank, and when the allocator starts retrying allocations (freeing its cache to satisfy one: the
    step before an out-of-memory error).

    {logged_keys}

    Args:
        every_n_steps: log every this many optimizer steps; ``None`` follows the trainer's ``log_every_n_steps``.
        warn_share: warn once when peak allocated CUDA memory reaches this share of the device's memory
            (``0 < warn_share``; above 1 never warns).
        nvml: sample GPU utilisation, power and temperature with NVML (``pip install nvidia-ml-py``) on a
            background thread; without it, or on CPU, the ``memory/gpu/*`` keys are skipped.
        nvml_interval_sec: seconds between two NVML samples.
        exclude_keys: globs over the keys this monitor logs, left out of every backend (e.g. ``["grad/hist/*"]``
            drops a whole family, ``["memory/host/available_gib"]`` one key).

    Raises:
        TypeError: an argument of the wrong type (``every_n_steps=2.5``, ``warn_share="high"``).
        ValueError: an argument out of range.
        MisconfigurationException: in ``setup`` when the trainer has no logger.

    Example::

        trainer = Trainer(logger=MultiLogger(), callbacks=[MemoryMonitor(every_n_steps=50)])
    """

    LOGGED_KEYS = {
        "memory/host/rss_gib": "resident memory of the training process",
        "memory/host/workers_uss_gib": "memory its DataLoader workers add: their unique set size (pages no other"
        " process maps; not RSS, which counts pages shared copy-on-write with the main process), summed, read at most"
        " every 10 s; runs with DataLoader workers only",
        "memory/host/worker_processes": "number of live DataLoader worker processes (runs with DataLoader workers)",
        "memory/host/available_gib": "memory the system can still give to processes (host-wide: rank 0's host; logged"
        " from the first logging step at which it has moved by 1 % of the host's memory since the fit's first"
        " reading: a flat line says nothing)",
        "memory/cuda/allocated_gib": "memory held by tensors now",
        "memory/cuda/reserved_gib": "memory the caching allocator holds from the device now",
        "memory/cuda/peak_allocated_gib": "peak memory held by tensors since the last logging step",
        "memory/cuda/peak_reserved_gib": "peak memory reserved by the allocator since the last logging step",
        "memory/cuda/peak_allocated_share": "peak_allocated_gib as a share of the device's total memory",
        "memory/cuda/peak_reserved_share": "peak_reserved_gib as a share of the device's total memory",
        "memory/cuda/fragmentation": "1 - allocated / reserved now: reserved memory no tensor uses",
        "memory/cuda/alloc_retries": "allocations that needed the cache freed, since the last log",
        "memory/cuda/ooms": "out-of-memory errors the allocator raised, since the last log",
        "memory/cuda/train_peak_allocated_gib": "peak memory held by tensors in the training epoch just ended",
        "memory/cuda/train_peak_reserved_gib": "peak memory reserved in the training epoch just ended",
        "memory/cuda/validation_peak_allocated_gib": "peak memory held by tensors in the validation run just ended",
        "memory/cuda/validation_peak_reserved_gib": "peak memory reserved in the validation run just ended",
        "memory/cuda/test_peak_allocated_gib": "peak memory held by tensors in the test run just ended",
        "memory/cuda/test_peak_reserved_gib": "peak memory reserved in the test run just ended",
        "memory/gpu/utilization_percent": "NVML GPU utilisation, mean of the samples since the last log",
        "memory/gpu/power_watts": "NVML power draw, mean of the samples since the last log",
        "memory/gpu/temperature_celsius": "NVML GPU temperature, mean of the samples since the last log",
        "memory/{name}_min": "(world size > 1) minimum of memory/{name} over ranks",
        "memory/{name}_mean": "(world size > 1) mean of memory/{name} over ranks",
        "memory/{name}_max": "(world size > 1) maximum of memory/{name} over ranks",
        "memory/{name}_max_rank": "(world size > 1) global rank holding memory/{name}_max",
    }

    def __init__(
        self,
        every_n_steps: Optional[int] = None,
        *,
        warn_share: float = 0.9,
        nvml: bool = True,
        nvml_interval_sec: float = 2.0,
        exclude_keys: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(every_n_steps, exclude_keys)
        self.warn_share = _options.check_number("warn_share", warn_share, above=0)  # above 1: never warns
        self.nvml = _options.check_bool("nvml", nvml)
        self.nvml_interval_sec = _options.check_number("nvml_interval_sec", nvml_interval_sec, above=0)
        self._cuda: Optional[_memory.CudaMemorySource] = None
        self._sampler: Optional[_memory.NvmlSampler] = None
        self._total = 0  # device memory in bytes
        self._phase: Optional[str] = None  # the phase the allocator's peak counters are attributed to
        self._outer_phase: Optional[str] = None  # the phase a validation run interrupted
        self._window = [0, 0]  # peak (allocated, reserved) bytes of the training window since the last log
        self._phase_peaks: dict[str, list[int]] = {}
        self._counters = (0, 0)  # (num_alloc_retries, num_ooms) at the last log
        self._nvml_missing = False  # said once; not tried again by later fit/validate/test calls
        self._available_first: Optional[int] = None  # the fit's first reading of the host's available memory
        #: whether the run's DataLoaders start workers (:func:`_has_workers`): read at the first logging step after
        #: the dataloaders may have been made again (a fit's start, each training epoch's and validation's start)
        self._workers: Optional[bool] = None
        self._available_moved = False  # it has moved by AVAILABLE_MOVED_SHARE since: logged from then on

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_sampler"] = None  # a thread does not pickle (ddp_spawn); setup starts a new one
        return state

    # ---------------------------------------------------------------- lifecycle

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._cuda = _memory.cuda_source(trainer)
        if self._cuda is None:
            return
        self._total = self._cuda.total_memory()
        self._counters = self._read_counters(self._cuda.memory_stats())
        if self.nvml and self._sampler is None and not self._nvml_missing:
            self._start_nvml()

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().teardown(trainer, pl_module, stage)
        if self._sampler is not None:
            self._sampler.stop()
            self._sampler = None

    def _start_nvml(self) -> None:
        assert self._cuda is not None
        self._nvml_missing = True
        if not _memory.nvml_installed():
            rank_zero_info("MemoryMonitor: NVML not found (`pip install nvidia-ml-py`); memory/gpu/* keys skipped.")
            return
        try:
            self._cuda.nvml_sample()
        except Exception as err:  # no driver access, MIG, an unsupported board
            rank_zero_info(f"MemoryMonitor: NVML unusable ({err}); memory/gpu/* keys skipped.")
            return
        self._nvml_missing = False
        self._sampler = _memory.NvmlSampler(self._cuda.nvml_sample, self.nvml_interval_sec)
        self._sampler.start()

    # ---------------------------------------------------------------- phases

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        self._available_first, self._available_moved = None, False
        self._workers = None
        if self._cuda is not None:
            self._phase = None
            self._counters = self._read_counters(self._fold())  # drops what sanity checking and setup peaked at
            self._window = [0, 0]

    @override
    def on_train_epoch_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._workers = None  # reload_dataloaders_every_n_epochs may have made new ones
        self._enter("train")

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._leave(trainer, "train")

    @override
    def on_validation_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking:
            self._workers = None
            self._outer_phase = self._phase
            self._enter("validation")

    @override
    def on_validation_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.sanity_checking:
            self._leave(trainer, "validation")
            self._phase = self._outer_phase  # back to the training epoch it interrupted, if any

    @override
    def on_test_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._enter("test")

    @override
    def on_test_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._leave(trainer, "test")

    def _enter(self, phase: str) -> None:
        if self._cuda is not None:
            self._fold()  # what peaked so far belongs to the phase before
            self._phase_peaks[phase] = [0, 0]
        self._phase = phase

    def _leave(self, trainer: "pl.Trainer", phase: str) -> None:
        if self._cuda is None:
            return
        self._fold()
        alloc, reserved = self._phase_peaks.pop(phase, [0, 0])
        values = {
            f"memory/cuda/{phase}_peak_allocated_gib": alloc / GIB,
            f"memory/cuda/{phase}_peak_reserved_gib": reserved / GIB,
        }
        step = self._validation_step(trainer) if phase == "validation" else trainer.global_step
        self._emit(trainer, values, step)  # on every rank: a collective under DDP

    def _fold(self) -> dict[str, Any]:
        """Reads the allocator's stats, credits its peaks to the open window and phase, and resets its peaks."""
        assert self._cuda is not None
        stats = self._cuda.memory_stats()  # host-side copy of the allocator's counters: no device sync
        peak = (int(stats.get("allocated_bytes.all.peak", 0)), int(stats.get("reserved_bytes.all.peak", 0)))
        if self._phase == "train":
            self._window = [max(a, b) for a, b in zip(self._window, peak, strict=True)]
        if self._phase in self._phase_peaks:
            before = self._phase_peaks[self._phase]
            self._phase_peaks[self._phase] = [max(a, b) for a, b in zip(before, peak, strict=True)]
        self._cuda.reset_peak()  # resets torch.cuda.max_memory_allocated/reserved: the next window starts now
        return stats

    @staticmethod
    def _read_counters(stats: dict[str, Any]) -> tuple[int, int]:
        return int(stats.get("num_alloc_retries", 0)), int(stats.get("num_ooms", 0))

    # ---------------------------------------------------------------- steps

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # Only the batch that completed the optimizer step logs, so a window covers whole accumulated steps.
        step = None if self._candidate is None else self._batch_logging_step(trainer)  # most batches: no call
        if step is not None:
            self._log_step(trainer, step)

    def _log_step(self, trainer: "pl.Trainer", step: int) -> None:
        if self._workers is None:
            self._workers = _has_workers(trainer)
        host = _memory.host_memory(workers=self._workers)
        if self._available_first is None:
            self._available_first = host.available
        moved = abs(host.available - self._available_first) >= AVAILABLE_MOVED_SHARE * host.total
        self._available_moved = self._available_moved or moved
        values = {
            "memory/host/rss_gib": host.rss / GIB,
            "memory/host/available_gib": host.available / GIB,
            _MOVED: float(self._available_moved),
        }
        if self._workers:  # without workers these keys can only read 0 (the same set on every rank)
            values["memory/host/workers_uss_gib"] = host.workers_uss / GIB
            values["memory/host/worker_processes"] = float(host.workers)
        if self._cuda is not None:
            stats = self._fold()
            peak_alloc, peak_reserved = self._window
            self._window = [0, 0]
            alloc = int(stats.get("allocated_bytes.all.current", 0))
            reserved = int(stats.get("reserved_bytes.all.current", 0))
            counters = self._read_counters(stats)
            retries, ooms = (now - before for now, before in zip(counters, self._counters, strict=True))
            self._counters = counters
            total = self._total or 1
            values.update({
                "memory/cuda/allocated_gib": alloc / GIB,
                "memory/cuda/reserved_gib": reserved / GIB,
                "memory/cuda/peak_allocated_gib": peak_alloc / GIB,
                "memory/cuda/peak_reserved_gib": peak_reserved / GIB,
                "memory/cuda/peak_allocated_share": peak_alloc / total,
                "memory/cuda/peak_reserved_share": peak_reserved / total,
                "memory/cuda/fragmentation": 1.0 - alloc / reserved if reserved else 0.0,
                "memory/cuda/alloc_retries": float(retries),
                "memory/cuda/ooms": float(ooms),
            })
            # NaN where NVML is off on this rank: packed all the same so every rank gathers the same length.
            sample = self._sampler.take() if self._sampler is not None else None
            util, power, temp = sample if sample is not None else (math.nan,) * 3
            values.update({
                "memory/gpu/utilization_percent": util,
                "memory/gpu/power_watts": power,
                "memory/gpu/temperature_celsius": temp,
            })
        metrics = self._emit(trainer, values, step)
        if self._cuda is not None:
            self._maybe_warn(metrics, step)

    def _emit(self, trainer: "pl.Trainer", values: dict[str, float], step: int) -> dict[str, float]:
        """Logs this rank's values and, with several ranks, their min/mean/max/max_rank; returns what it logged.

        Host-wide values (:data:`HOST_WIDE`) are rank 0's, aggregated only over one rank per host when the run spans
        several hosts, and logged only once the available memory has moved on one of those hosts."""
        metrics = {key: value for key, value in values.items() if not math.isnan(value)}
        shown = bool(values.get(_MOVED, 0.0))
        if trainer.world_size > 1:
            keys = list(values)
            gathered = _dist.gather_packed(trainer, [values[k] for k in keys])
            complete = (~np.isnan(gathered).any(axis=0)).tolist()  # a value missing on any rank is skipped
            per_rank = [i for i, ok in enumerate(complete) if ok and keys[i] not in HOST_WIDE and keys[i] != _MOVED]
            metrics.update(_dist.rank_stats(gathered[:, per_rank], [keys[i] for i in per_rank]))
            host_wide = [i for i, ok in enumerate(complete) if ok and keys[i] in HOST_WIDE]
            if host_wide and trainer.num_nodes > 1:
                # one rank per host (Lightning numbers ranks host by host: global rank = node * devices + local)
                leaders = list(range(0, trainer.world_size, max(1, trainer.world_size // trainer.num_nodes)))
                shown = bool(gathered[leaders, keys.index(_MOVED)].any())
                stats = _dist.rank_stats(gathered[np.ix_(leaders, host_wide)], [keys[i] for i in host_wide])
                metrics.update({k: float(leaders[int(v)]) if k.endswith("_max_rank") else v for k, v in stats.items()})
        metrics.pop(_MOVED, None)
        if not shown:
            metrics = {k: v for k, v in metrics.items() if not k.startswith(HOST_WIDE)}
        self._log_scalars(trainer, metrics, step)
        return metrics

    def _maybe_warn(self, metrics: dict[str, float], step: int) -> None:
        for name, fires in (("peak_allocated_share", lambda v: v >= self.warn_share), ("alloc_retries", bool)):
            key = f"memory/cuda/{name}"
            value = metrics.get(f"{key}_max", metrics.get(key))
            if value is None or not fires(value):
                continue
            rank = int(metrics.get(f"{key}_max_rank", 0))
            if name == "alloc_retries":
                self._warn(
                    name,
                    f"MemoryMonitor: the CUDA caching allocator had to free its cache and retry {int(value)}"
                    f" allocation(s) on rank {rank} before step {step}: memory is nearly full and the next larger"
                    " batch may run out of memory."
                )
            else:
                self._warn(
                    name,
                    f"MemoryMonitor: peak allocated CUDA memory reached {value:.1%} of the device's memory on rank"
                    f" {rank} before step {step} (warn_share={self.warn_share}); a larger batch or sequence may run"
                    " out of memory."
                )
