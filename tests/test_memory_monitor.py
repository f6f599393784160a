"""MemoryMonitor: host memory for real, the CUDA path through canned allocator stats, DDP aggregation, cost."""

from __future__ import annotations

import json
import logging
import os
import pickle
import re
import textwrap
import threading
import time
import warnings
from typing import Any

import psutil
import pytest
import torch
from helpers import (
    TinyImageModel,
    event_files,
    find_runs,
    image_data,
    image_loader,
    make_trainer,
    run_ddp_script,
    steady_heap,
    tb_all_scalars,
)
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader, Dataset

from lightning_monitor import MemoryMonitor, MultiLogger, memory_monitor
from lightning_monitor._memory import sources as _memory
from lightning_monitor.testing import HostSyncCounter

GIB = 2**30
HOST_KEYS = ["memory/host/rss_gib", "memory/host/workers_uss_gib", "memory/host/worker_processes",
             "memory/host/available_gib"]
WORKER_KEYS = ["memory/host/workers_uss_gib", "memory/host/worker_processes"]


# ------------------------------------------------------------------------------------------------ contract


def test_every_key_is_under_memory():
    # (the docstring's table is rendered from LOGGED_KEYS; tests/test_contract.py reads it back for every class)
    assert all(re.fullmatch(r"memory/[a-z_/{}]+", key) for key in MemoryMonitor.LOGGED_KEYS)


@pytest.mark.parametrize(
    "kwargs, error, match",
    [
        ({"every_n_steps": 0}, ValueError, "`every_n_steps` must be None or an integer >= 1, got 0"),
        ({"every_n_steps": 2.5}, TypeError, "got 2.5"),  # a wrong type: TypeError (_options)
        ({"warn_share": 0}, ValueError, "`warn_share` must be a number > 0, got 0"),
        ({"warn_share": "high"}, TypeError, "got 'high'"),
        ({"nvml_interval_sec": -1.0}, ValueError, "`nvml_interval_sec` must be a number > 0, got -1.0"),
    ],
)
def test_bad_arguments_are_echoed(kwargs, error, match):
    with pytest.raises(error, match=re.escape(match)):
        MemoryMonitor(**kwargs)


def test_defaults_and_pickle_without_the_sampler_thread():
    monitor = MemoryMonitor()
    defaults = (monitor.every_n_steps, monitor.warn_share, monitor.nvml, monitor.nvml_interval_sec)
    assert defaults == (None, 0.9, True, 2.0)
    monitor._sampler = _memory.NvmlSampler(lambda: (1.0,), 1000.0)
    monitor._sampler.start()
    try:
        clone = pickle.loads(pickle.dumps(monitor))
    finally:
        monitor._sampler.stop()
    assert clone._sampler is None and clone.warn_share == 0.9


def test_configurable_from_lightningcli_yaml():
    jsonargparse = pytest.importorskip("jsonargparse")
    parser = jsonargparse.ArgumentParser()
    parser.add_argument("--callbacks", type=list[Callback])
    cfg = parser.parse_string(textwrap.dedent("""
        callbacks:
          - class_path: lightning_monitor.MemoryMonitor
            init_args: {every_n_steps: 5, warn_share: 0.8, nvml: false, nvml_interval_sec: 10}
    """))
    (monitor,) = parser.instantiate_classes(cfg).callbacks
    assert isinstance(monitor, MemoryMonitor)
    assert (monitor.every_n_steps, monitor.warn_share, monitor.nvml, monitor.nvml_interval_sec) == (5, 0.8, False, 10.0)


# ------------------------------------------------------------------------------------------------ host, for real


class BallastDataset(Dataset):
    """Image samples; the process that loads the first item also allocates and touches ``mib`` MiB."""

    def __init__(self, mib: int) -> None:
        self.data = image_data(64)
        self.mib = mib
        self.ballast = None

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, i: int) -> Any:
        if self.ballast is None:
            self.ballast = torch.ones(self.mib * 2**18)  # float32: written, so resident
        return self.data[i]


def _cmdline(process: psutil.Process) -> list[str]:
    try:
        return process.cmdline()
    except psutil.Error:  # gone or a zombie: not a live worker
        return []


class HostRecorder(Callback):
    """Placed before MemoryMonitor: measures the same things another way, right before the monitor does."""

    def __init__(self, every: int) -> None:
        self.every, self.seen = every, {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if (step + 1) % self.every == 0:
            me = psutil.Process()
            # forked DataLoader workers keep the parent's command line (wandb's service, say, does not)
            children = [c for c in me.children() if _cmdline(c) == me.cmdline()]
            self.seen[step] = (me.memory_info().rss, sum(c.memory_full_info().uss for c in children),
                               len(children), psutil.virtual_memory().available)


@pytest.mark.parametrize("num_workers", [0, 2])
def test_host_memory_of_process_and_dataloader_workers(tmp_path, num_workers, monkeypatch):
    monkeypatch.setattr(_memory, "WORKERS_READ_EVERY_SEC", 0.0)  # read at every logging step, as the recorder does
    monkeypatch.setattr(_memory, "SYSTEM_READ_EVERY_SEC", 0.0)
    monkeypatch.setattr(memory_monitor, "AVAILABLE_MOVED_SHARE", 0.0)  # available memory logged from the start
    ballast_mib = 64
    loader = DataLoader(BallastDataset(ballast_mib), batch_size=16, num_workers=num_workers,
                        persistent_workers=num_workers > 0)
    recorder = HostRecorder(every=2)
    trainer = make_trainer(tmp_path, max_steps=6, callbacks=[recorder, MemoryMonitor(every_n_steps=2)])
    trainer.fit(TinyImageModel(), loader)

    logged = tb_all_scalars(trainer.logger.log_dir)
    assert not [k for k in logged if k.startswith("memory/cuda") or k.startswith("memory/gpu")]  # CPU run
    assert all(re.fullmatch(r"memory/host/[a-z_]+", k) for k in logged if k.startswith("memory/"))
    if num_workers == 0:  # no workers: no worker keys (they could only read 0)
        assert not set(WORKER_KEYS) & set(logged)
        logged.update({k: [(s, 0.0) for s in (1, 3, 5)] for k in WORKER_KEYS})
    for key in HOST_KEYS:
        assert [s for s, _ in logged[key]] == [1, 3, 5], key
    for (step, rss), (_, workers), (_, n), (_, available) in zip(*(logged[k] for k in HOST_KEYS), strict=True):
        rss_ref, workers_ref, n_ref, available_ref = recorder.seen[step]
        assert rss * GIB == pytest.approx(rss_ref, rel=0.05) and rss > 0.05  # a torch process holds > 50 MiB
        assert available * GIB == pytest.approx(available_ref, rel=0.2)
        if num_workers > 0:  # persistent workers each hold their ballast on top of what they share with the main
            # process
            assert n == n_ref == 2
            assert workers * GIB == pytest.approx(workers_ref, rel=0.05)
            assert workers * GIB > 2 * ballast_mib * 2**20


def test_host_wide_available_memory_is_logged_once_it_moves(tmp_path, monkeypatch):
    """A flat ``memory/host/available_gib`` says nothing: it appears at the first logging step at which the host's
    available memory moved by AVAILABLE_MOVED_SHARE of its total since the fit's first reading, and stays."""
    total = 100 * GIB
    readings = iter([50.0, 50.5, 49.5, 48.0, 48.75, 47.0])  # GiB available at steps 1, 3, 5, 7, 9, 11
    real = _memory.host_memory

    def host_memory(**kwargs: Any) -> Any:
        return real(**kwargs)._replace(available=int(next(readings) * GIB), total=total)

    monkeypatch.setattr(_memory, "host_memory", host_memory)
    trainer = make_trainer(tmp_path, max_steps=12, callbacks=[MemoryMonitor(every_n_steps=2)])
    trainer.fit(TinyImageModel(), image_loader(96))
    logged = tb_all_scalars(trainer.logger.log_dir)
    assert [s for s, _ in logged["memory/host/rss_gib"]] == [1, 3, 5, 7, 9, 11]  # per-process: every logging step
    # 1 % of 100 GiB: 50.5 and 49.5 are within 1 GiB of the first 50.0; 48.0 is not, and from then on it stays
    assert logged["memory/host/available_gib"] == [(7, 48.0), (9, 48.75), (11, 47.0)]
    assert "memory/host/available_moved" not in logged  # the gathered flag is no key


def _workers_uss(tmp_path: Any, ballast_mib: int) -> float:
    """Logged ``memory/host/workers_uss_gib`` (in bytes) at the last logging step of a run with 2 persistent
    workers each holding ``ballast_mib`` MiB."""
    loader = DataLoader(BallastDataset(ballast_mib), batch_size=8, num_workers=2, persistent_workers=True)
    trainer = make_trainer(tmp_path / str(ballast_mib), max_steps=6, callbacks=[MemoryMonitor(every_n_steps=2)])
    trainer.fit(TinyImageModel(), loader)
    return tb_all_scalars(trainer.logger.log_dir)["memory/host/workers_uss_gib"][-1][1] * GIB


def test_workers_unique_memory_is_read_at_most_every_interval(monkeypatch):
    """Reading a worker's USS walks its page map (~10 ms): the same workers are read again only after the interval."""
    import multiprocessing

    monkeypatch.setattr(_memory, "WORKERS_READ_EVERY_SEC", 3600.0)
    monkeypatch.setattr(_memory, "_workers_read", (frozenset(), float("-inf"), 0))
    ctx = multiprocessing.get_context("fork")
    worker = ctx.Process(target=time.sleep, args=(30,))
    worker.start()
    try:
        first = _memory.host_memory()
        when = _memory._workers_read[1]
        again = _memory.host_memory()
        assert (first.workers, first.workers_uss > 0) == (1, True)
        assert _memory._workers_read[1] == when and again.workers_uss == first.workers_uss  # not read again
        monkeypatch.setattr(_memory, "WORKERS_READ_EVERY_SEC", 0.0)
        _memory.host_memory()
        assert _memory._workers_read[1] > when  # read again once the interval passed
    finally:
        worker.terminate()
        worker.join()
    assert _memory.host_memory().workers == 0 and _memory._workers_read[0] == frozenset()  # new set: read at once


def test_system_memory_is_read_at_most_every_interval(monkeypatch):
    """``psutil.virtual_memory`` parses /proc/meminfo (the largest part of a logging step's reading on a small model):
    it is read again only after SYSTEM_READ_EVERY_SEC, the process's RSS at every call."""
    monkeypatch.setattr(_memory, "SYSTEM_READ_EVERY_SEC", 3600.0)
    monkeypatch.setattr(_memory, "_system_read", (float("-inf"), 0, 0))
    with steady_heap():
        first = _memory.host_memory()
        when = _memory._system_read[0]
        assert first.total == psutil.virtual_memory().total and first.available > 0
        ballast = bytearray(64 * 2**20)
        ballast[:: 4096] = b"x" * len(ballast[:: 4096])  # touched: resident
        again = _memory.host_memory()
    assert _memory._system_read[0] == when and again.available == first.available  # not read again
    assert again.rss >= first.rss + 60 * 2**20  # the process's own memory is read every time
    monkeypatch.setattr(_memory, "SYSTEM_READ_EVERY_SEC", 0.0)
    _memory.host_memory()
    assert _memory._system_read[0] > when  # read again once the interval passed
    del ballast


def test_rss_is_this_processs_after_another_owner_closes_the_kept_descriptor(tmp_path):
    """The kept-open /proc/self/statm descriptor closed by someone else, its number reused by another file (seen once
    in CI: every later reading was that file's constant): the next reading opens /proc/self/statm again."""
    _memory._rss()
    fd = _memory._statm[0]
    os.close(fd)
    with open(tmp_path / "other", "w+b") as other:
        other.write(b"1 297643 3 4 5 6 7\n")
        other.flush()
        # the other file on our number (an open takes the lowest free number, which other closed ones may undercut)
        duplicated = other.fileno() != fd
        os.dup2(other.fileno(), fd)
        assert os.pread(fd, 64, 0) == b"1 297643 3 4 5 6 7\n"
        with steady_heap():
            before = _memory._rss()
            assert abs(before - psutil.Process().memory_info().rss) < 8 * 2**20
            ballast = bytearray(64 * 2**20)
            ballast[:: 4096] = b"x" * len(ballast[:: 4096])
            after = _memory._rss()
            assert after >= before + 60 * 2**20
            assert abs(after - psutil.Process().memory_info().rss) < 8 * 2**20
            del ballast
    if duplicated:
        os.close(fd)  # our duplicate (the reader opened its own descriptor again)


def test_workers_memory_counts_what_the_workers_add(tmp_path):
    """2 workers x 192 MiB of ballast add 384 MiB on top of what 2 bare workers hold on their own (their unique
    pages: the interpreter state they touched since the fork), and no copy-on-write page they share with the
    main process (RSS would count the parent's whole torch import in each worker)."""
    ballast_mib = 192
    bare = _workers_uss(tmp_path, 0)
    loaded = _workers_uss(tmp_path, ballast_mib)
    expected = 2 * ballast_mib * 2**20 + bare
    print(f"workers USS: bare {bare / 2**20:.1f} MiB, with ballast {loaded / 2**20:.1f} MiB, expected"
          f" {expected / 2**20:.1f} MiB")
    assert loaded == pytest.approx(expected, rel=0.10)
    assert bare < 0.5 * psutil.Process().memory_info().rss  # each bare worker: far less than the parent it forks


@pytest.mark.slow
def test_same_numbers_in_tensorboard_and_wandb(tmp_path, monkeypatch):
    monkeypatch.setattr(memory_monitor, "AVAILABLE_MOVED_SHARE", 0.0)  # available memory logged from the start
    logger = MultiLogger(save_dir=tmp_path / "runs", name="mem")
    trainer = make_trainer(tmp_path, max_steps=4, logger=logger, callbacks=[MemoryMonitor(every_n_steps=2)])
    trainer.fit(TinyImageModel(), image_loader(64, num_workers=1))
    logged = tb_all_scalars(logger.log_dir)
    (run,) = find_runs(logger.log_dir)
    for key in HOST_KEYS:
        assert run.series(key) == [(s, pytest.approx(v, rel=1e-6)) for s, v in logged[key]] and len(logged[key]) == 2


# ------------------------------------------------------------------------------------------------ CUDA, canned


class FakeCuda:
    """Serves ``torch.cuda.memory_stats()``-shaped dictionaries for an allocator the test drives by hand."""

    def __init__(self, total: int, nvml: tuple[float, float, float] | None = None) -> None:
        self.total, self.nvml = total, nvml
        self.alloc = self.reserved = self.peak_alloc = self.peak_reserved = 0
        self.retries = self.ooms = 0
        self.reads = self.resets = 0

    def use(self, alloc: float, reserved: float | None = None) -> None:
        self.alloc = int(alloc * GIB)
        self.reserved = max(self.reserved, int((reserved if reserved is not None else alloc) * GIB))
        self.peak_alloc = max(self.peak_alloc, self.alloc)
        self.peak_reserved = max(self.peak_reserved, self.reserved)

    def memory_stats(self) -> dict[str, int]:
        self.reads += 1
        return {
            "allocated_bytes.all.current": self.alloc, "allocated_bytes.all.peak": self.peak_alloc,
            "reserved_bytes.all.current": self.reserved, "reserved_bytes.all.peak": self.peak_reserved,
            "active_bytes.all.current": self.alloc, "num_alloc_retries": self.retries, "num_ooms": self.ooms,
        }

    def total_memory(self) -> int:
        return self.total

    def reset_peak(self) -> None:  # what torch.cuda.reset_peak_memory_stats does to the peaks
        self.resets += 1
        self.peak_alloc, self.peak_reserved = self.alloc, self.reserved

    def nvml_sample(self) -> tuple[float, float, float]:
        if self.nvml is None:
            raise RuntimeError("no NVML here")
        return self.nvml


BASE = 1.0  # GiB held between steps (weights, optimizer state)
TRAIN_SPIKES = [2, 5, 3, 15, 1, 2, 14.5, 3]  # GiB peak inside each training step 0..7
VAL_SPIKES = [7, 6]  # one per validation run (end of epoch 0, end of epoch 1)
TEST_SPIKE = 3


class ScriptedModel(TinyImageModel):
    """Each step drives the fake allocator: a spike during the step, back to BASE after it."""

    fake: FakeCuda

    def training_step(self, batch, batch_idx):
        step = self.trainer.global_step
        spike = TRAIN_SPIKES[step]
        self.fake.use(spike, spike + 0.5)
        self.fake.use(BASE)
        if step == 5:
            self.fake.retries += 2
        if step == 6:
            self.fake.ooms += 1
        if step == 7:
            self.fake.retries += 1
        return super().training_step(batch, batch_idx)

    def on_validation_start(self):
        self.val_runs = getattr(self, "val_runs", -1) + 1

    def validation_step(self, batch, batch_idx):
        self.fake.use(VAL_SPIKES[self.val_runs])
        self.fake.use(BASE)
        return super().validation_step(batch, batch_idx)

    def test_step(self, batch, batch_idx):
        self.fake.use(TEST_SPIKE)
        self.fake.use(BASE)


def _fit_scripted(tmp_path, monkeypatch, fake, **monitor_kwargs):
    monkeypatch.setattr(_memory, "cuda_source", lambda trainer: fake)
    model = ScriptedModel()
    model.fake = fake
    monitor = MemoryMonitor(every_n_steps=2, **monitor_kwargs)
    trainer = make_trainer(tmp_path, max_steps=8, callbacks=[monitor])
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(model, image_loader(64), image_loader(32))
        trainer.test(model, image_loader(16))
    ours = [str(w.message) for w in caught if "MemoryMonitor" in str(w.message)]
    return trainer, ours


def test_cuda_peaks_reset_per_window_and_phase_with_share_fragmentation_and_one_warning(tmp_path, monkeypatch, caplog):
    fake = FakeCuda(total=16 * GIB)
    with caplog.at_level(logging.INFO):
        trainer, warned = _fit_scripted(tmp_path, monkeypatch, fake)
    logged = tb_all_scalars(trainer.logger.log_dir)

    def series(name):
        return logged[f"memory/cuda/{name}"]

    steps = [1, 3, 5, 7]  # 4 batches per epoch, 2 epochs, validation after steps 3 and 7
    reserved = [max(s + 0.5 for s in TRAIN_SPIKES[: step + 1]) for step in steps]  # reserved only grows
    window = [max(TRAIN_SPIKES[step - 1: step + 1]) for step in steps]  # 5, 15, 2 (not 15, not val's 7), 14.5
    assert window == [5, 15, 2, 14.5]
    assert series("peak_allocated_gib") == [(s, pytest.approx(w)) for s, w in zip(steps, window, strict=True)]
    assert series("peak_allocated_share") == [(s, pytest.approx(w / 16)) for s, w in zip(steps, window, strict=True)]
    assert series("peak_reserved_gib") == [(s, pytest.approx(r)) for s, r in zip(steps, reserved, strict=True)]
    assert series("peak_reserved_share") == [(s, pytest.approx(r / 16)) for s, r in zip(steps, reserved, strict=True)]
    assert series("allocated_gib") == [(s, pytest.approx(BASE)) for s in steps]
    assert series("reserved_gib") == [(s, pytest.approx(r)) for s, r in zip(steps, reserved, strict=True)]
    assert series("fragmentation") == [(s, pytest.approx(1 - BASE / r)) for s, r in zip(steps, reserved, strict=True)]
    assert series("alloc_retries") == [(1, 0), (3, 0), (5, 2), (7, 1)]
    assert series("ooms") == [(1, 0), (3, 0), (5, 0), (7, 1)]

    # per phase: logged when the phase ends, reset for the next one
    assert series("train_peak_allocated_gib") == [(4, 15), (8, 14.5)]
    assert series("validation_peak_allocated_gib") == [(3, 7), (7, 6)]  # at the step Lightning logs val/* at
    assert series("test_peak_allocated_gib") == [(8, 3)]
    assert series("train_peak_reserved_gib") == [(4, 15.5), (8, 15.5)]

    # one warning each, though the share passed 0.9 twice and retries grew twice
    assert len(warned) == 2, warned
    assert "peak allocated CUDA memory reached 93.8% of the device's memory on rank 0 before step 3" in warned[0]
    assert "retry 2 allocation(s) on rank 0 before step 5" in warned[1]

    # without NVML, no GPU keys and one info line
    assert not [k for k in logged if k.startswith("memory/gpu/")]
    if not _memory.nvml_installed():
        assert sum("NVML not found" in r.getMessage() for r in caplog.records) == 1

    # every logged key is documented
    assert set(k for k in logged if k.startswith("memory/")) <= set(MemoryMonitor.LOGGED_KEYS)


def test_no_warning_below_threshold_and_nvml_means(tmp_path, monkeypatch):
    monkeypatch.setattr(_memory, "nvml_installed", lambda: True)
    fake = FakeCuda(total=64 * GIB, nvml=(40.0, 250.0, 61.0))
    trainer, warned = _fit_scripted(tmp_path, monkeypatch, fake, warn_share=0.95, nvml_interval_sec=3600.0)
    assert [w for w in warned if "peak allocated" in w] == []  # 15 / 64 < 0.95
    logged = tb_all_scalars(trainer.logger.log_dir)
    assert logged["memory/gpu/utilization_percent"] == [(s, 40.0) for s in (1, 3, 5, 7)]
    assert logged["memory/gpu/power_watts"] == [(s, 250.0) for s in (1, 3, 5, 7)]
    assert logged["memory/gpu/temperature_celsius"] == [(s, 61.0) for s in (1, 3, 5, 7)]


def test_nvml_sampler_averages_since_last_take_and_survives_errors():
    values = iter([(10.0, 100.0), (30.0, 300.0), RuntimeError("gone"), (50.0, 500.0)])

    def read():
        value = next(values)
        if isinstance(value, Exception):
            raise value
        return value

    sampler = _memory.NvmlSampler(read, 3600.0)
    assert sampler.take() is None
    sampler.sample()
    sampler.sample()
    assert sampler.take() == (20.0, 200.0)
    assert sampler.take() == (30.0, 300.0)  # nothing new: the latest sample
    sampler.sample()  # raises inside: skipped
    sampler.sample()
    assert sampler.take() == (50.0, 500.0)

    ticks = threading.Event()
    thread_sampler = _memory.NvmlSampler(lambda: (ticks.set(), 1.0)[1:], 0.01)
    thread_sampler.start()
    assert ticks.wait(5.0) and thread_sampler._thread.daemon
    thread_sampler.stop()
    assert thread_sampler._thread is None


# ------------------------------------------------------------------------------------------------ cost


@pytest.mark.filterwarnings("ignore:MemoryMonitor")
def test_no_work_and_no_sync_outside_logging_steps(tmp_path, monkeypatch):
    fake = FakeCuda(total=16 * GIB)
    monkeypatch.setattr(_memory, "cuda_source", lambda trainer: fake)
    host_reads = []
    real_host_memory = _memory.host_memory
    monkeypatch.setattr(_memory, "host_memory", lambda **kw: host_reads.append(1) or real_host_memory(**kw))

    model = ScriptedModel()
    model.fake = fake
    trainer = make_trainer(tmp_path, max_steps=8, callbacks=[MemoryMonitor(every_n_steps=1000)])
    with HostSyncCounter() as counter:
        trainer.fit(model, image_loader(64))
    assert counter.calls == []
    assert host_reads == []
    # allocator reads only at boundaries: train start, and entering + leaving each of the 2 epochs
    assert fake.reads == 1 + 1 + 2 * 2 and fake.resets == fake.reads - 1

    fake2 = FakeCuda(total=16 * GIB)
    monkeypatch.setattr(_memory, "cuda_source", lambda trainer: fake2)
    model.fake = fake2
    trainer = make_trainer(tmp_path / "logging", max_steps=8, callbacks=[MemoryMonitor(every_n_steps=2)])
    with HostSyncCounter() as counter:
        trainer.fit(model, image_loader(64))
    assert counter.calls == []  # one process: plain host numbers, no tensor at all
    assert len(host_reads) == 4 and fake2.reads == 1 + 1 + 2 * 2 + 4


# ------------------------------------------------------------------------------------------------ DDP

DDP_SCRIPT = """
import json, os, sys
sys.path.insert(0, {tests!r})
import psutil, torch
from lightning.pytorch.callbacks import Callback
from helpers import TinyImageModel, image_loader, make_trainer
from lightning_monitor import MemoryMonitor

EXTRA_MIB = 300

class Recorder(Callback):
    def __init__(self):
        self.seen = {{}}
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if (step + 1) % 2 == 0:
            self.seen[step] = psutil.Process().memory_info().rss

class Heavy(TinyImageModel):
    def on_train_start(self):
        if self.global_rank == 1:
            self.ballast = torch.ones(EXTRA_MIB * 2**18)  # written, so resident

recorder = Recorder()
trainer = make_trainer({root!r}, max_steps=4, strategy="ddp", devices=2,
                       callbacks=[recorder, MemoryMonitor(every_n_steps=2)])
trainer.fit(Heavy(), image_loader(64))
with open(os.path.join({root!r}, f"rank{{trainer.global_rank}}.json"), "w") as f:
    json.dump(recorder.seen, f)
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_min_mean_max_and_max_rank_written_by_rank0(tmp_path):
    root = tmp_path / "ddp"
    root.mkdir()
    run_ddp_script(tmp_path, "ddp_memory.py", DDP_SCRIPT.format(tests=os.path.dirname(__file__), root=str(root)))

    files = event_files(root)
    assert len(files) == 1  # rank 0 wrote, rank 1 nothing
    logged = tb_all_scalars(os.path.dirname(files[0]))
    seen = [json.loads((root / f"rank{r}.json").read_text()) for r in (0, 1)]
    for step in (1, 3):
        at = {k: dict(v)[step] for k, v in logged.items() if k.startswith("memory/")}
        rss = [seen[r][str(step)] / GIB for r in (0, 1)]
        assert at["memory/host/rss_gib_max_rank"] == 1
        assert at["memory/host/rss_gib_max"] == pytest.approx(rss[1], abs=0.01)
        assert at["memory/host/rss_gib_min"] == pytest.approx(rss[0], abs=0.01)
        assert at["memory/host/rss_gib"] == pytest.approx(at["memory/host/rss_gib_min"], abs=0.01)  # rank 0's
        assert at["memory/host/rss_gib_mean"] == pytest.approx((at["memory/host/rss_gib_min"]
                                                                + at["memory/host/rss_gib_max"]) / 2, rel=1e-6)
        assert at["memory/host/rss_gib_max"] - at["memory/host/rss_gib_min"] > 0.25
        # no DataLoader workers in this run (rank 1 is a subprocess of rank 0, not a worker): no worker keys
        assert not [k for k in at if k.startswith(("memory/host/workers_", "memory/host/worker_processes"))]
    keys = {k for k in logged if k.startswith("memory/")}
    base = {k for k in MemoryMonitor.LOGGED_KEYS if "{" not in k and k.startswith("memory/host/")} - set(WORKER_KEYS)
    # the host-wide available memory: two ranks on one host read the same number, so it is never aggregated over
    # them (no five charts of one number); rank 0's value only, and only once it moved (test_host_wide_...)
    per_rank = base - {"memory/host/available_gib"}
    aggregates = {f"{k}_{agg}" for k in per_rank for agg in ("min", "mean", "max", "max_rank")}
    assert per_rank | aggregates <= keys <= base | aggregates


# ------------------------------------------------------------------------------------------------ GPU


class PeakRecorder(Callback):
    """Before MemoryMonitor in the callback list: torch's own peak for the window the monitor is about to read."""

    def __init__(self) -> None:
        self.peaks = {}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        step = trainer.global_step - 1
        if (step + 1) % 2 == 0:
            self.peaks[step] = torch.cuda.max_memory_allocated() / GIB


@pytest.mark.gpu
def test_real_cuda_peak_matches_max_memory_allocated(tmp_path):
    recorder = PeakRecorder()
    trainer = make_trainer(tmp_path, accelerator="cuda", max_steps=6,
                           callbacks=[recorder, MemoryMonitor(every_n_steps=2)])
    trainer.fit(TinyImageModel(), image_loader(256, batch_size=32))  # one epoch: windows inside it
    logged = tb_all_scalars(trainer.logger.log_dir)
    assert [s for s, _ in logged["memory/cuda/peak_allocated_gib"]] == [1, 3, 5]
    for step, value in logged["memory/cuda/peak_allocated_gib"]:
        assert value == pytest.approx(recorder.peaks[step], rel=1e-6) and value > 0
    total = torch.cuda.get_device_properties(0).total_memory / GIB
    shares, peaks = logged["memory/cuda/peak_allocated_share"], logged["memory/cuda/peak_allocated_gib"]
    for (_, share), (_, peak) in zip(shares, peaks, strict=True):
        assert share == pytest.approx(peak / total, rel=1e-5)
    assert 0 <= logged["memory/cuda/fragmentation"][-1][1] < 1
