"""Memory readers for :class:`~lightning_monitor.MemoryMonitor`: the CUDA allocator seam, host RSS, NVML sampling.

Everything here is a host-side read: ``torch.cuda.memory_stats`` copies the caching allocator's counters (no
device synchronisation), psutil reads ``/proc``, NVML is queried from a daemon thread, never from the step loop.
Tests replace :func:`cuda_source` with a function returning an object of the same shape that serves canned
``torch.cuda.memory_stats()`` dictionaries.
"""

from __future__ import annotations

import importlib.util
import multiprocessing
import os
import sys
import threading
import time
from collections.abc import Callable
from typing import Any, NamedTuple, Optional

import psutil
import torch

GIB = float(2**30)


class CudaMemorySource:
    """The CUDA caching allocator of one device, read on the host."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def memory_stats(self) -> dict[str, Any]:
        """``torch.cuda.memory_stats``: flat ``{"allocated_bytes.all.current": ..., "num_ooms": ...}``."""
        return torch.cuda.memory_stats(self.device)

    def total_memory(self) -> int:
        return int(torch.cuda.get_device_properties(self.device).total_memory)

    def reset_peak(self) -> None:
        """Resets the allocator's peak counters: ``torch.cuda.max_memory_allocated`` restarts from "now"."""
        torch.cuda.reset_peak_memory_stats(self.device)

    def nvml_sample(self) -> tuple[float, float, float]:
        """GPU utilisation (percent), power (watts), temperature (Celsius) through NVML (``pynvml``)."""
        return (
            float(torch.cuda.utilization(self.device)),
            float(torch.cuda.power_draw(self.device)) / 1000.0,  # NVML reports milliwatts
            float(torch.cuda.temperature(self.device)),
        )


def cuda_source(trainer: Any) -> Optional[CudaMemorySource]:
    """The allocator of the trainer's device on this rank, or ``None`` when it is not a CUDA device (the seam)."""
    device = trainer.strategy.root_device
    return CudaMemorySource(device) if device.type == "cuda" else None


def nvml_installed() -> bool:
    return importlib.util.find_spec("pynvml") is not None


class HostMemory(NamedTuple):
    rss: int  # bytes, this process
    workers_uss: int  # bytes, unique set size summed over live multiprocessing children (DataLoader workers)
    workers: int  # how many of them
    available: int  # bytes, system-wide available memory
    total: int = 0  # bytes, the system's physical memory


_process: Optional[psutil.Process] = None
#: Linux: ``/proc/self/statm`` kept open (with the pid that opened it and the file's identity): one ``pread`` reads
#: this process's RSS in ~3 us, where ``psutil.Process.memory_info`` opens, reads and closes the file (~23 us, a tenth
#: of a small model's logging step); ``None`` until the first read, a descriptor of -1 where it cannot be opened
#: (psutil then)
_statm: Optional[tuple[int, int, tuple[int, int]]] = None
_PAGE = os.sysconf("SC_PAGE_SIZE") if hasattr(os, "sysconf") else 4096


def _rss() -> int:
    """This process's resident set size in bytes."""
    global _statm, _process
    pid = os.getpid()
    if sys.platform.startswith("linux"):
        if _statm is not None and _statm[0] >= 0 and _statm[1] == pid and _identity(_statm[0]) != _statm[2]:
            # someone else closed our descriptor (and its number may now be another file's): open the file again
            _statm = None
        if _statm is None or _statm[1] != pid:  # first read, or a new process after fork
            try:
                fd = os.open("/proc/self/statm", os.O_RDONLY | os.O_CLOEXEC)
                _statm = (fd, pid, _identity(fd))
            except OSError:
                _statm = (-1, pid, (0, 0))  # no /proc here: psutil from now on, not an open that fails every read
        if _statm[0] >= 0:
            try:
                return int(os.pread(_statm[0], 128, 0).split()[1]) * _PAGE  # fields: size resident shared ...
            except (OSError, ValueError, IndexError):
                pass
    if _process is None or _process.pid != pid:  # a new process after fork/spawn
        _process = psutil.Process()
    return int(_process.memory_info().rss)
def _identity(fd: int) -> tuple[int, int]:
    """(device, inode) of the file open on ``fd``; (0, 0) when nothing is (one ``fstat``: ~0.5 us)."""
    try:
        st = os.fstat(fd)
    except OSError:
        return (0, 0)
    return (st.st_dev, st.st_ino)


#: seconds between two reads of the workers' unique set size: each read walks a worker's page map, ~10 ms a worker
#: with torch loaded (measured: 32 ms for 2 workers); in between, the last reading of the same workers is reported
WORKERS_READ_EVERY_SEC = 10.0
_workers_read: tuple[frozenset[int], float, int] = (frozenset(), float("-inf"), 0)  # (pids, when, bytes)
#: seconds between two reads of the system's memory (``psutil.virtual_memory`` parses ``/proc/meminfo``: ~0.1 ms
#: inside a training step, the largest part of a logging step's memory reading); in between, the last reading. The
#: host-wide value is logged only once it moved by 1 % of the total, so a reading up to a second old loses nothing
SYSTEM_READ_EVERY_SEC = 1.0
_system_read: tuple[float, int, int] = (float("-inf"), 0, 0)  # (when, available bytes, total bytes)


def host_memory(workers: bool = True) -> HostMemory:
    """RSS of this process, what its DataLoader workers add (their unique set size), and the system's available
    memory; ``workers=False``: no DataLoader workers are looked for (0 of them; listing the children costs ~5 us).

    DataLoader workers are the processes this process started through :mod:`multiprocessing` (torch starts
    them with ``multiprocessing_context.Process``). Processes started any other way, such as the other ranks
    Lightning's ``strategy="ddp"`` launches with ``subprocess``, are not counted. A forked worker's RSS counts
    the copy-on-write pages it still shares with the main process (two workers with a 200 MiB ballast each read
    1.23 GiB of RSS where they add 0.41 GiB); its USS (``psutil``'s ``memory_full_info().uss``: pages no other
    process maps) is the memory the system would get back if it exited, the memory the workers add. Reading it
    walks the worker's page map (``/proc/<pid>/smaps_rollup``, ~10 ms a worker), so it is read at most every
    :data:`WORKERS_READ_EVERY_SEC` seconds while the same workers live, and the last reading reported in between.
    The system's available memory is read at most every :data:`SYSTEM_READ_EVERY_SEC` seconds.
    """
    pids: frozenset[int] = frozenset()
    workers_uss = 0
    if workers:
        pids, workers_uss = _workers_memory()
    global _system_read
    when, available, total = _system_read
    now = time.monotonic()
    if now - when >= SYSTEM_READ_EVERY_SEC:
        system = psutil.virtual_memory()
        available, total = system.available, system.total
        _system_read = (now, available, total)
    return HostMemory(_rss(), workers_uss, len(pids), available, total)


def _workers_memory() -> tuple[frozenset[int], int]:
    """The live multiprocessing children and their summed unique set size (bytes; the last reading while the same
    children live, for up to :data:`WORKERS_READ_EVERY_SEC` seconds)."""
    global _workers_read
    pids = frozenset(child.pid for child in multiprocessing.active_children() if child.pid is not None)
    seen, when, workers_uss = _workers_read
    if pids != seen or time.monotonic() - when >= WORKERS_READ_EVERY_SEC:
        workers_uss = 0
        for pid in pids:
            try:
                workers_uss += psutil.Process(pid).memory_full_info().uss
            except (psutil.NoSuchProcess, psutil.AccessDenied, psutil.ZombieProcess, ValueError):
                continue  # a worker that exits between the listing and the read
        _workers_read = (pids, time.monotonic(), workers_uss)
    return pids, workers_uss


class NvmlSampler:
    """Calls ``read()`` every ``interval_sec`` seconds on a daemon thread; :meth:`take` returns the mean since last.

    ``read`` returns a tuple of floats; a read that raises is skipped. The step loop only ever calls
    :meth:`take`, which takes a lock and averages a few numbers.
    """

    def __init__(self, read: Callable[[], tuple[float, ...]], interval_sec: float) -> None:
        self._read = read
        self.interval_sec = interval_sec
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._sums: Optional[list[float]] = None
        self._count = 0
        self._last: Optional[tuple[float, ...]] = None
        self._thread: Optional[threading.Thread] = None

    def sample(self) -> None:
        try:
            values = tuple(float(v) for v in self._read())
        except Exception:  # NVML hiccups (a GPU lost, a driver reload) must never reach training
            return
        with self._lock:
            sums = self._sums
            self._sums = list(values) if sums is None else [s + v for s, v in zip(sums, values, strict=True)]
            self._count += 1
            self._last = values

    def take(self) -> Optional[tuple[float, ...]]:
        """Mean of the samples since the previous call, else the latest sample, else ``None``."""
        with self._lock:
            if self._count and self._sums is not None:
                mean = tuple(s / self._count for s in self._sums)
                self._sums, self._count = None, 0
                return mean
            return self._last

    def start(self) -> None:
        self.sample()
        self._stop.clear()
        self._thread = threading.Thread(target=self._run, name="lightning-monitor-nvml", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
            self._thread = None

    def _run(self) -> None:
        while not self._stop.wait(self.interval_sec):
            self.sample()
