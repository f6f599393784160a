"""SpeedMonitor: exact values under a fake clock, FLOPs against FlopCounterMode, Lightning's ThroughputMonitor side by
side, a slow DataLoader, sync counting, DDP with a rank made slower on purpose, and GPU checks."""

from __future__ import annotations

import copy
import inspect
import os
import pickle
import re
import socket
import subprocess
import sys
import textwrap
import time
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from helpers import FakeClock, TinyImageModel, event_files, image_loader, make_trainer, tb_accumulator, tb_scalars
from lightning.pytorch.callbacks import Callback, ThroughputMonitor
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset
from torch.utils.flop_counter import FlopCounterMode

import lightning_monitor
from lightning_monitor import SpeedMonitor
from lightning_monitor._core import clock as _clock
from lightning_monitor._speed import flops as _flops
from lightning_monitor._speed import window as _speed_window
from lightning_monitor._writers import backends as _writers
from lightning_monitor.testing import HostSyncCounter

#: the package's folder: sync sites are named by their path in it (``_grid/draw.py``)
PACKAGE_DIR = os.path.dirname(lightning_monitor.__file__)


class ClockedData(Dataset):
    """Random 1x28x28 images; fetching a sample advances the clock by ``per_sample`` (time spent loading)."""

    def __init__(self, clock: Any, n: int = 64, per_sample: float = 0.0) -> None:
        g = torch.Generator().manual_seed(0)
        self.x, self.y = torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g)
        self.clock, self.per_sample = clock, per_sample

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        if self.clock is not None:
            self.clock.now += self.per_sample
        return self.x[i], self.y[i]


class ClockedModel(TinyImageModel):
    """TinyImageModel whose training/validation steps take a known time on the fake clock."""

    def __init__(self, clock: FakeClock, train_sec: float, val_sec: float = 0.0) -> None:
        super().__init__()
        self.clock, self.train_sec, self.val_sec = clock, train_sec, val_sec

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        self.clock.now += self.train_sec
        return F.nll_loss(self(batch[0]), batch[1])

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.clock.now += self.val_sec


@pytest.fixture(autouse=True)
def _real_clocks() -> Any:
    """Every test leaves the package's clock (``_clock``) real (tests below set fake ones)."""
    yield
    _clock.reset()


def _timed(clock: Any, **kwargs: Any) -> SpeedMonitor:
    """A SpeedMonitor reading ``clock`` instead of ``time.perf_counter``: the package's one clock (``_clock``, restored
    by ``_real_clocks``), so logger writes and the monitors' hooks are timed on it too."""
    monitor = SpeedMonitor(**kwargs)
    _clock.set_clock(clock)
    return monitor


def _logger(tmp_path: Any) -> TensorBoardLogger:
    return TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="", default_hp_metric=False)


def _scalars(logger: TensorBoardLogger, tag: str) -> list[tuple[int, float]]:
    return tb_scalars(logger.log_dir, tag)


def _logged_tags(logger: TensorBoardLogger) -> set[str]:
    return set(tb_accumulator(logger.log_dir).Tags()["scalars"])


# ------------------------------------------------------------------------------------------ exact values
def test_exact_values_under_fake_clock(tmp_path):
    """Batches of 4; loading takes 4 x 0.0625 = 0.25 s, a step 0.25 s: 8 samples/s, half the time waiting."""
    clock = FakeClock()
    loader = DataLoader(ClockedData(clock, n=64, per_sample=0.0625), batch_size=4)
    logger = _logger(tmp_path)
    monitor = _timed(clock, flops_per_batch=1000.0, peak_flops_per_sec=4000.0)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor], max_steps=8, log_every_n_steps=2)
    trainer.fit(ClockedModel(clock, train_sec=0.25), train_dataloaders=loader)

    steps = [1, 3, 5, 7]  # (step + 1) % 2 == 0; step 0 is warm-up and not in any window
    assert _scalars(logger, "throughput/samples_per_sec") == [(s, 8.0) for s in steps]
    assert _scalars(logger, "throughput/batches_per_sec") == [(s, 2.0) for s in steps]
    assert "throughput/device/samples_per_sec" not in _logged_tags(logger)  # one device: the global rate
    assert _scalars(logger, "time/step_sec") == [(s, 0.5) for s in steps]
    assert _scalars(logger, "time/data_wait_share") == [(s, 0.5) for s in steps]
    assert _scalars(logger, "throughput/flops_per_sec") == [(s, 2000.0) for s in steps]
    assert _scalars(logger, "throughput/mfu") == [(s, 0.5) for s in steps]
    # 8 steps in all: after step s, 8 - (s + 1) batches of 0.5 s are left
    assert _scalars(logger, "time/remaining_sec") == [(1, 3.0), (3, 2.0), (5, 1.0), (7, 0.0)]
    assert monitor.flops_source == "1 kFLOP/batch given by `flops_per_batch`; peak 4000 FLOP/s given"
    assert _logged_tags(logger) <= set(SpeedMonitor.LOGGED_KEYS) | {"epoch"}


def test_validation_excluded_and_timed_on_its_own(tmp_path):
    """Validation (4 batches x 0.125 s for 16 samples = 32 samples/s) leaves training numbers untouched."""
    clock = FakeClock()
    train = DataLoader(ClockedData(clock, n=64, per_sample=0.0625), batch_size=4)
    val = DataLoader(ClockedData(None, n=16), batch_size=4)
    logger = _logger(tmp_path)
    monitor = _timed(clock, measure_flops=False)
    trainer = make_trainer(
        tmp_path, logger=logger, callbacks=[monitor], max_steps=8, log_every_n_steps=2, val_check_interval=4
    )
    trainer.fit(ClockedModel(clock, train_sec=0.25, val_sec=0.125), train_dataloaders=train, val_dataloaders=val)

    assert _scalars(logger, "throughput/val_samples_per_sec") == [(3, 32.0), (7, 32.0)]  # Lightning's val steps
    assert _scalars(logger, "throughput/samples_per_sec") == [(s, 8.0) for s in (1, 3, 5, 7)]
    assert _scalars(logger, "time/data_wait_share") == [(s, 0.5) for s in (1, 3, 5, 7)]
    assert "throughput/flops_per_sec" not in _logged_tags(logger)


def test_gradient_accumulation_logs_once_per_optimizer_step(tmp_path):
    clock = FakeClock()
    loader = DataLoader(ClockedData(clock, n=64, per_sample=0.0), batch_size=4)
    logger = _logger(tmp_path)
    monitor = _timed(clock, measure_flops=False, items_fn=lambda b: b[0][0].numel() * len(b[0]))
    trainer = make_trainer(
        tmp_path, logger=logger, callbacks=[monitor], max_steps=6, log_every_n_steps=3, accumulate_grad_batches=2
    )
    trainer.fit(ClockedModel(clock, train_sec=0.5), train_dataloaders=loader)
    # 2 micro-batches per optimizer step; steps 1..2 then 3..5 in the windows of steps 2 and 5
    assert _scalars(logger, "throughput/samples_per_sec") == [(2, 8.0), (5, 8.0)]
    assert _scalars(logger, "throughput/items_per_sec") == [(2, 8.0 * 784), (5, 8.0 * 784)]
    assert _scalars(logger, "time/remaining_sec") == [(2, 3 * 2 * 0.5), (5, 0.0)]


def test_remaining_time_from_max_epochs(tmp_path):
    """2 epochs of 8 batches, 0.5 s each: after global batch k, (16 - k - 1) x 0.5 s are left."""
    clock = FakeClock()
    logger = _logger(tmp_path)
    monitor = _timed(clock, measure_flops=False)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor], max_steps=-1, max_epochs=2,
                           log_every_n_steps=4)
    trainer.fit(ClockedModel(clock, train_sec=0.5), train_dataloaders=DataLoader(ClockedData(None, n=32), batch_size=4))
    assert _scalars(logger, "time/remaining_sec") == [(3, 6.0), (7, 4.0), (11, 2.0), (15, 0.0)]
    assert _scalars(logger, "time/step_sec") == [(s, 0.5) for s in (3, 7, 11, 15)]


# ----------------------------------------------------------------------------------------------- FLOPs
def Net() -> nn.Module:
    """The MNIST example's network: pytorch/examples mnist/main.py Net, as ``examples/mnist/model.py`` has it."""
    sys.path.insert(0, os.path.join(os.path.dirname(__file__), os.pardir, "examples", "mnist"))
    from model import LitNet as ExampleNet

    return ExampleNet()


class LitNet(pl.LightningModule):
    def __init__(self, clock: Any = None, train_sec: float = 0.0) -> None:
        super().__init__()
        self.net, self.clock, self.train_sec = Net(), clock, train_sec

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        if self.clock is not None:
            self.clock.now += self.train_sec
        return F.nll_loss(self.net(batch[0]), batch[1])

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adadelta(self.parameters(), lr=1.0)


def _reference_flops(batch_size: int) -> int:
    """FlopCounterMode's own count of one forward + backward of the Net on a batch of this size."""
    net = Net()
    x, y = torch.randn(batch_size, 1, 28, 28), torch.randint(0, 10, (batch_size,))
    with FlopCounterMode(display=False) as counter:
        F.nll_loss(net(x), y).backward()
    return counter.get_total_flops()


def test_mnist_net_flops_and_mfu(tmp_path):
    clock = FakeClock()
    loader = DataLoader(ClockedData(clock, n=48, per_sample=0.0), batch_size=8)
    logger = _logger(tmp_path)
    monitor = _timed(clock, peak_flops_per_sec=1e12)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor], max_steps=4, log_every_n_steps=2)
    trainer.fit(LitNet(clock, train_sec=0.25), train_dataloaders=loader)

    flops = _reference_flops(8)
    assert flops > 2 * 8 * (9216 * 128 + 128 * 10) * 3  # at least the linear layers' fwd + bwd
    assert monitor._book.cache == {((8, 1, 28, 28), (8,)): flops}
    # measured on step 0 (left out of the windows); each later step takes 0.25 s
    exact = pytest.approx  # TensorBoard stores float32
    assert _scalars(logger, "throughput/flops_per_sec") == [(1, exact(flops / 0.25)), (3, exact(flops / 0.25))]
    assert _scalars(logger, "throughput/mfu") == [(1, exact(flops / 0.25 / 1e12)), (3, exact(flops / 0.25 / 1e12))]
    assert monitor.flops_source.startswith(f"{_flops.format_flops(flops)}/batch measured by FlopCounterMode")
    assert "(8,1,28,28), (8)" in monitor.flops_source and monitor.flops_source.endswith("peak 1e+12 FLOP/s given")


def test_new_batch_shape_is_measured_once_and_cached(tmp_path):
    """48 samples in batches of 20: shapes 20, 20, 8 per epoch; two shapes measured, the cache answers after."""
    logger = _logger(tmp_path)
    monitor = SpeedMonitor()
    loader = DataLoader(ClockedData(None, n=48), batch_size=20)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor], max_steps=6, log_every_n_steps=1)
    trainer.fit(LitNet(), train_dataloaders=loader)
    assert monitor._book.cache == {
        ((20, 1, 28, 28), (20,)): _reference_flops(20),
        ((8, 1, 28, 28), (8,)): _reference_flops(8),
    }
    restored = SpeedMonitor()
    restored.load_state_dict(pickle.loads(pickle.dumps(monitor.state_dict())))
    assert restored._book.cache == monitor._book.cache


def test_measuring_flops_changes_nothing_in_training():
    """The measured step is the real step: parameters (dropout RNG included) end up bit-identical."""

    def train(callbacks: list) -> dict[str, torch.Tensor]:
        pl.seed_everything(3)
        model = LitNet()
        trainer = make_trainer(".", logger=_logger("."), callbacks=callbacks, max_steps=3)
        trainer.fit(model, train_dataloaders=DataLoader(ClockedData(None, n=24), batch_size=8))
        return {k: v.clone() for k, v in model.state_dict().items()}

    plain, monitored = train([]), train([SpeedMonitor()])
    assert all(torch.equal(plain[k], monitored[k]) for k in plain)


# ------------------------------------------------------------------------------------- real-clock runs
class SleepyModel(TinyImageModel):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(0.02)
        return F.nll_loss(self(batch[0]), batch[1])


def test_samples_per_sec_agrees_with_lightning_throughput_monitor(tmp_path):
    n = 4
    logger = _logger(tmp_path)
    ours = SpeedMonitor(measure_flops=False, warmup_steps=0)
    # ThroughputMonitor's rolling window over n + 1 batch ends spans the same n batches as our logging window
    theirs = ThroughputMonitor(batch_size_fn=lambda b: b[0].size(0), window_size=n + 1)
    written: dict[int, float] = {}  # logger-writing seconds so far, when ThroughputMonitor takes its timestamp

    class Written(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            written[trainer.global_step - 1] = _writers.seconds_writing()

    trainer = make_trainer(tmp_path, logger=logger, callbacks=[ours, Written(), theirs], max_steps=12,
                           log_every_n_steps=n)
    trainer.fit(SleepyModel(), train_dataloaders=image_loader(n=96, batch_size=8))
    ours_by_step = dict(_scalars(logger, "throughput/samples_per_sec"))
    theirs_by_step = dict(_scalars(logger, "train/device/samples_per_sec"))  # world size 1: device == global
    assert set(theirs_by_step) == {7, 11} and set(ours_by_step) == {3, 7, 11}  # theirs waits for a full window
    for step, theirs_value in theirs_by_step.items():
        # theirs counts the time spent writing to the logger (it logs every batch), ours leaves it out
        theirs_without_writes = n * 8 / (n * 8 / theirs_value - (written[step] - written[step - n]))
        assert ours_by_step[step] == pytest.approx(theirs_without_writes, rel=0.03), step
        assert 8 / 0.02 > ours_by_step[step]  # a batch of 8 per > 20 ms of sleep


class SlowData(Dataset):
    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> Any:
        time.sleep(0.08)
        return torch.randn(1, 28, 28), i % 10


def test_slow_dataloader_shows_high_data_wait_share(tmp_path):
    logger = _logger(tmp_path)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[SpeedMonitor(measure_flops=False)], max_steps=7,
                           log_every_n_steps=3)
    trainer.fit(TinyImageModel(), train_dataloaders=DataLoader(SlowData(), batch_size=4))
    shares = [v for _, v in _scalars(logger, "time/data_wait_share")]
    step_secs = [v for _, v in _scalars(logger, "time/step_sec")]
    assert len(shares) == 2 and min(shares) > 0.6  # 320 ms of sleep per batch against a tiny model's compute
    for share, step_sec in zip(shares, step_secs, strict=True):  # the mean wait per batch covers at least the sleeping
        assert share * step_sec >= 4 * 0.08 * 0.99


# --------------------------------------------------------------------------------------------- syncs
def test_no_host_sync_on_non_logging_steps(tmp_path):
    counter = HostSyncCounter()
    spans: list = []

    class Start(Callback):
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            spans.append([trainer.global_step, len(counter.calls), None])

    class End(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            spans[-1][2] = len(counter.calls)

    # items counted on the device (a tensor): accumulated without a sync until the logging step
    monitor = SpeedMonitor(items_fn=lambda b: (b[1] >= 0).sum())
    trainer = make_trainer(tmp_path, logger=_logger(tmp_path), callbacks=[Start(), monitor, End()], max_steps=8,
                           log_every_n_steps=4)
    with counter:
        trainer.fit(TinyImageModel(), train_dataloaders=image_loader(n=64, batch_size=8))
    for step, before, after in spans:
        calls = counter.calls[before:after]
        if (step + 1) % 4:
            assert calls == [], f"step {step}: {calls}"
        else:  # the one packed device->host copy (in _dist.gather_packed); numpy after that
            sites = [(name, os.path.relpath(f, PACKAGE_DIR)) for name, f, _ in calls]
            assert sites == [("tolist", "_monitor/dist.py")], f"step {step}"
    assert len(counter.calls) == 2


# ----------------------------------------------------------------------------------------------- DDP
_DDP_SCRIPT = textwrap.dedent(
    """
    import sys, time
    sys.path.insert(0, {tests!r})
    import torch
    from torch.nn import functional as F
    from torch.utils.data import DataLoader
    from lightning.pytorch.loggers import TensorBoardLogger
    from helpers import TinyImageModel, make_trainer, image_data
    from lightning_monitor import SpeedMonitor
    from lightning_monitor._core import clock as _clock

    mode = sys.argv[1]

    class Clock:
        now = 100.0
        def __call__(self):
            return self.now

    clock = Clock()

    class Model(TinyImageModel):
        def training_step(self, batch, batch_idx):
            # rank 1 made slower on purpose, before the backward (where DDP all-reduces the gradients)
            if mode == "fake":
                clock.now += 0.25 * (1 + self.global_rank)
            elif self.global_rank == 1:
                time.sleep(0.1)
            return F.nll_loss(self(batch[0]), batch[1])

    monitor = SpeedMonitor(measure_flops=False)
    # no cyclic garbage collection inside the timed batches: a full collection (~0.25 s here) that falls into one
    # fast-rank batch is a real pause, but not the straggler this test plants
    import gc
    gc.disable()
    if mode == "fake":
        _clock.set_clock(clock)  # the test seam: a clock that only the model moves
    trainer = make_trainer(".", accelerator="cpu", devices=2, strategy="ddp", max_steps=6, log_every_n_steps=3,
                           logger=TensorBoardLogger(".", name="tb", version=""), callbacks=[monitor])
    trainer.fit(Model(), train_dataloaders=DataLoader(image_data(96), batch_size=4))
    """
)


def _run_ddp(tmp_path: Any, mode: str) -> str:
    script = tmp_path / "ddp_speed.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(__file__)))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), PL_DISABLE_FORK="1")
    proc = subprocess.run([sys.executable, str(script), mode], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=110)
    assert proc.returncode == 0, proc.stderr[-3000:]
    files = event_files(tmp_path)
    assert len(files) == 1, files  # rank 0 wrote, rank 1 nothing
    return str(tmp_path / "tb")


@pytest.mark.timeout(120)
def test_ddp_exact_sum_and_straggler_under_fake_clock(tmp_path):
    """Rank 0 takes 0.25 s per batch of 4, rank 1 0.5 s: 16 + 8 samples/s, straggler ratio 2, slowest rank 1."""
    log_dir = _run_ddp(tmp_path, "fake")
    expect = {
        "throughput/samples_per_sec": 24.0,
        "throughput/batches_per_sec": 6.0,
        "throughput/device/samples_per_sec": 12.0,
        "time/step_sec": 0.375,
        "time/data_wait_share": 0.0,
        "time/pre_sync_sec_min": 0.25,
        "time/pre_sync_sec_mean": 0.375,
        "time/pre_sync_sec_max": 0.5,
        "time/pre_sync_sec_max_rank": 1.0,
        "time/straggler_ratio": 2.0,
        "time/remaining_sec": None,
    }
    for key, value in expect.items():
        got = tb_scalars(log_dir, key)
        assert [s for s, _ in got] == [2, 5], key
        if value is not None:
            assert [v for _, v in got] == [value, value], key
    # the slowest rank's 0.5 s x 3 steps left, not time/step_sec's mean 0.375 s: DDP steps at the slowest rank's pace
    assert tb_scalars(log_dir, "time/remaining_sec") == [(2, 1.5), (5, 0.0)]


@pytest.mark.timeout(120)
def test_ddp_real_straggler(tmp_path):
    log_dir = _run_ddp(tmp_path, "sleep")
    (_, ratio), (_, slow_rank), (_, samples), (_, step) = (
        tb_scalars(log_dir, k)[-1]
        for k in ("time/straggler_ratio", "time/pre_sync_sec_max_rank", "throughput/samples_per_sec", "time/step_sec")
    )
    assert slow_rank == 1.0 and ratio > 3.0  # 100 ms of sleep against a few ms on the fast rank
    # ranks run in lockstep (gradient all-reduce), so the sum over ranks is 2 x batch / step time
    assert samples == pytest.approx(2 * 4 / step, rel=0.05)
    assert step > 0.1


# -------------------------------------------------------------------------------------- table, contract
def test_peak_table_and_precision_mapping():
    assert _flops.peak_flops("NVIDIA H100 80GB HBM3", "bf16") == 989.5e12
    assert _flops.peak_flops("NVIDIA H100 PCIe", "fp8") == 1513e12
    assert _flops.peak_flops("NVIDIA A100-SXM4-80GB", "tf32") == 156e12
    assert _flops.peak_flops("Tesla T4", "bf16") is None  # Turing has no bf16 tensor cores
    assert _flops.peak_flops("Some Unknown GPU", "bf16") is None
    assert _flops.compute_dtype("bf16-mixed", tf32=False) == "bf16"
    assert _flops.compute_dtype("16-mixed", tf32=True) == "fp16"
    assert _flops.compute_dtype("32-true", tf32=True) == "tf32"
    assert _flops.compute_dtype("32-true", tf32=False) == "fp32"
    for row in _flops.PEAK_FLOPS.values():  # dense figures are below the sparse ones and ordered by width
        assert row.get("fp16", 0) >= row.get("tf32", 0) and row.get("fp8", float("inf")) >= row.get("bf16", 0)


def test_a_window_adds_up_its_batches_in_order_and_holds_at_most_fold_at_of_them():
    """Batches kept as tuples and added up later give the very sums of adding them one at a time; a long window
    (a logging interval of thousands of batches) is added up every ``FOLD_AT`` batches, not kept whole."""
    rng = np.random.default_rng(0)
    batches = [(64, *rng.random(3).tolist(), 1e6 * rng.random(), 0.1 * rng.random()) for _ in range(2500)]
    window = _speed_window.Window(2)
    expected = [0.0] * len(window.sums)
    for samples, wait, step, pre_sync, flops, hooks_in_wait in batches:
        window.add_batch(samples, wait, step, pre_sync, flops, hooks_in_wait)
        window.add_span((0.0, [0.0, 0.0]), (0.0, [0.0, 0.0]))
        assert len(window.batches) <= _speed_window.FOLD_AT
        expected[_speed_window.BATCHES] += 1
        expected[_speed_window.SAMPLES] += samples
        expected[_speed_window.WALL] += wait + step
        expected[_speed_window.WAIT] += wait - min(hooks_in_wait, wait)
        expected[_speed_window.PRE_SYNC] += wait + pre_sync
        expected[_speed_window.FLOPS] += flops
    assert window.pack() == expected  # exactly: the same additions in the same order


def test_window_values_name_the_global_rank_and_time_what_is_left_at_the_slowest_rank():
    """Rank 0 timed no batch in this window (left out), rank 2 is the straggler: its global rank is logged."""
    rows, cols = np.zeros((3, 8)), [_speed_window.BATCHES, _speed_window.SAMPLES, _speed_window.WALL,
                                     _speed_window.PRE_SYNC]
    rows[1, cols] = [2, 8, 1.0, 0.5]
    rows[2, cols] = [2, 8, 2.0, 1.5]
    got = _speed_window.metrics(rows, items=False, flops=False, peak=None, remaining=4.0)
    assert got["time/pre_sync_sec_max_rank"] == 2.0  # not 1, its row among the ranks that timed a batch
    assert (got["time/pre_sync_sec_min"], got["time/pre_sync_sec_max"], got["time/straggler_ratio"]) == (0.25, 0.75, 3)
    assert got["time/step_sec"] == 0.75  # the mean over ranks of 0.5 s and 1 s per batch
    assert got["time/remaining_sec"] == 4.0 * 1.0  # at the slowest rank's 1 s per batch: DDP steps at its pace
    assert got["throughput/samples_per_sec"] == 8.0 + 4.0
    assert _speed_window.metrics(np.zeros((2, 8)), items=False, flops=False, peak=None, remaining=1.0) == {}


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        (dict(every_n_steps=0), ValueError, "`every_n_steps` must be None or an integer >= 1, got 0"),
        # a wrong type: TypeError (_options)
        (dict(every_n_steps=2.5), TypeError, "`every_n_steps` must be None or an integer >= 1, got 2.5"),
        (dict(flops_per_batch=-1.0), ValueError, "`flops_per_batch` must be None or a number > 0, got -1.0"),
        (dict(peak_flops_per_sec=0.0), ValueError, "`peak_flops_per_sec` must be None or a number > 0, got 0.0"),
        (dict(warmup_steps=-2), ValueError, "`warmup_steps` must be an integer >= 0, got -2"),
        (dict(max_measured_shapes=0), ValueError, "`max_measured_shapes` must be an integer >= 1, got 0"),
    ],
)
def test_bad_arguments(kwargs, error, message):
    with pytest.raises(error, match=re.escape(message)):
        SpeedMonitor(**kwargs)


def test_picklable_after_use(tmp_path):
    monitor = SpeedMonitor()
    trainer = make_trainer(tmp_path, logger=_logger(tmp_path), callbacks=[monitor], max_steps=2)
    trainer.fit(TinyImageModel(), train_dataloaders=image_loader())
    clone = pickle.loads(pickle.dumps(monitor))
    assert clone._book.cache == monitor._book.cache and copy.deepcopy(monitor).flops_source == monitor.flops_source


def test_configurable_from_lightning_cli_yaml(tmp_path):
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(textwrap.dedent(
        """
        trainer:
          logger: false
          callbacks:
            - class_path: lightning_monitor.SpeedMonitor
              init_args:
                every_n_steps: 10
                peak_flops_per_sec: 1.0e+12
                warmup_steps: 2
                batch_size_fn: builtins.len
        """
    ))
    cli = LightningCLI(TinyImageModel, run=False, args=["--config", str(config)])
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, SpeedMonitor)]
    assert (monitor.every_n_steps, monitor.peak_flops_per_sec, monitor.warmup_steps) == (10, 1e12, 2)
    assert monitor.batch_size_fn is len
    assert "clock" not in inspect.signature(SpeedMonitor).parameters  # the test seam is no CLI option


# ----------------------------------------------------------------------------------------------- GPU
class MatmulModel(pl.LightningModule):
    def __init__(self, width: int = 8192, depth: int = 4) -> None:
        super().__init__()
        self.layers = nn.Sequential(*[nn.Linear(width, width, bias=False) for _ in range(depth)])

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return self.layers(batch[0]).float().square().mean()

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=1e-6)


class _DeviceBatches(Dataset):
    """``n`` ready batches already on the GPU (use with ``batch_size=None``), so loading costs nothing."""

    def __init__(self, n: int, rows: int, width: int, dtype: torch.dtype = torch.float32) -> None:
        self.n, self.x = n, torch.randn(rows, width, device="cuda", dtype=dtype)

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> Any:
        return (self.x,)


@pytest.mark.gpu
def test_gpu_mfu_against_dense_peak(tmp_path):
    logger = _logger(tmp_path)
    monitor = SpeedMonitor(warmup_steps=3)
    trainer = make_trainer(tmp_path, accelerator="gpu", precision="bf16-mixed", logger=logger, callbacks=[monitor],
                           max_steps=23, log_every_n_steps=10)
    loader = DataLoader(_DeviceBatches(23, 8192, 8192, torch.bfloat16), batch_size=None)
    trainer.fit(MatmulModel(), train_dataloaders=loader)
    # 2 FLOPs per MAC; 4 forward matmuls, 4 weight-gradient and 3 input-gradient matmuls (the input needs none)
    flops = 2 * 8192**3 * (4 + 4 + 3)
    assert list(monitor._book.cache.values()) == [flops]
    peak = _flops.peak_flops(torch.cuda.get_device_name(), "bf16")
    assert peak is not None and "from table" in monitor.flops_source
    mfu = _scalars(logger, "throughput/mfu")[-1][1]
    print(f"{torch.cuda.get_device_name()}: MFU {mfu:.3f} of {peak / 1e12:g} TFLOP/s bf16 dense")
    assert 0.25 < mfu < 1.0  # large bf16 matmuls reach a good share of the dense peak, never above it


@pytest.mark.gpu
def test_gpu_no_sync_between_logging_steps(tmp_path):
    n = 4

    class Guard(Callback):  # errors on any sync in the span [batch start .. batch end] of non-logging steps
        def on_train_batch_start(self, trainer: Any, *args: Any) -> None:
            if (trainer.global_step + 1) % n:
                torch.cuda.set_sync_debug_mode("error")

    class Unguard(Callback):
        def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
            torch.cuda.set_sync_debug_mode("default")

    class NoSyncModel(MatmulModel):
        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return self.layers(batch[0]).square().mean()

    logger = _logger(tmp_path)
    monitor = SpeedMonitor(items_fn=lambda b: (b[0] > 0).sum())
    trainer = make_trainer(tmp_path, accelerator="gpu", logger=logger, callbacks=[Guard(), monitor, Unguard()],
                           max_steps=8, log_every_n_steps=n)
    loader = DataLoader(_DeviceBatches(8, 64, 256), batch_size=None)
    try:
        trainer.fit(NoSyncModel(width=256, depth=2), train_dataloaders=loader)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert [s for s, _ in _scalars(logger, "throughput/items_per_sec")] == [3, 7]
