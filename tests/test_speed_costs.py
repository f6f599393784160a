"""SpeedMonitor's windows hold training time only: a slow logger write (a backend starting up, one slow flush) is left
out of every window, alone and under DDP; and the library's own cost (time/monitor_share) is exact under a fake
clock."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import textwrap
from types import SimpleNamespace
from typing import Any, Optional

import numpy as np
import pytest
import torch
from helpers import event_files, free_port, make_trainer, tb_accumulator, tb_scalars
from lightning.pytorch.loggers import TensorBoardLogger
from test_speed_monitor import ClockedData, ClockedModel, FakeClock, _real_clocks  # noqa: F401 - fixture used
from torch.utils.data import DataLoader
from typing_extensions import override

from lightning_monitor import SpeedMonitor
from lightning_monitor._core import clock as _clock
from lightning_monitor._monitor.base import Monitor
from lightning_monitor._writers import backends as _writers
from lightning_monitor.speed_monitor import MONITOR_SHARE

STEADY = {  # batches of 4: loading 4 x 0.0625 s, a step 0.25 s
    "throughput/samples_per_sec": 8.0,
    "throughput/batches_per_sec": 2.0,
    "time/step_sec": 0.5,
    "time/data_wait_share": 0.5,
}


class SlowWriteLogger(TensorBoardLogger):
    """A real TensorBoardLogger whose first ``log_metrics`` call that ``which`` picks takes 2 s on the fake clock (a
    backend starting up at its first write): ``"first"``, the first with that key, or ``"step N"`` the first at N."""

    def __init__(self, clock: FakeClock, which: str, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.clock, self.which, self.slow_steps = clock, which, []

    @override
    def log_metrics(self, metrics: dict[str, float], step: Optional[int] = None) -> None:
        picked = self.which == "first" or self.which in metrics or self.which == f"step {step}"
        if not self.slow_steps and picked:
            self.clock.now += 2.0
            self.slow_steps.append(step)
        super().log_metrics(metrics, step)


class LoggingModel(ClockedModel):
    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = super().training_step(batch, batch_idx)
        self.log("train/loss", loss)
        return loss


@pytest.mark.parametrize("which", ["first", "train/loss", "step 3"])
def test_a_slow_logger_write_lands_in_no_window(tmp_path, which):
    """One write (the first: SpeedMonitor's own; Lightning's first ``self.log`` write; one in the middle of the run)
    takes 2 s: every window still reads the steady values exactly, and the remaining time counts 0.5 s a batch."""
    clock = FakeClock()
    logger = SlowWriteLogger(clock, which, save_dir=str(tmp_path), name="tb", version="", default_hp_metric=False)
    monitor = SpeedMonitor(measure_flops=False)
    _clock.set_clock(clock)  # the package's one clock: windows, hooks and logger writes (restored by _real_clocks)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor], max_steps=8, log_every_n_steps=2)
    trainer.fit(LoggingModel(clock, train_sec=0.25),
                train_dataloaders=DataLoader(ClockedData(clock, n=64, per_sample=0.0625), batch_size=4))

    assert len(logger.slow_steps) == 1 and 1 <= logger.slow_steps[0] <= 7  # it happened, inside the run
    for key, value in STEADY.items():
        assert tb_scalars(logger.log_dir, key) == [(s, value) for s in (1, 3, 5, 7)], key
    assert tb_scalars(logger.log_dir, "time/remaining_sec") == [(1, 3.0), (3, 2.0), (5, 1.0), (7, 0.0)]
    assert _writers.seconds_writing() >= 2.0


def test_without_the_correction_the_window_would_be_off(tmp_path, monkeypatch):
    """The same run with no logger-writing time seen: the 2 s then stay in a window (what the correction removes)."""
    clock = FakeClock()
    logger = SlowWriteLogger(clock, "first", save_dir=str(tmp_path), name="tb", version="", default_hp_metric=False)
    monitor = SpeedMonitor(measure_flops=False)
    _clock.set_clock(clock)
    # the correction's input switched off (was: writes timed on the real clock, so the fake 2 s were not seen as
    # writing; with one clock for everything, no writing time at all is seen instead)
    from lightning_monitor import speed_monitor

    monkeypatch.setattr(speed_monitor, "_writers", SimpleNamespace(_seconds_writing=0.0))  # what SpeedMonitor reads
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor], max_steps=8, log_every_n_steps=2)
    trainer.fit(LoggingModel(clock, train_sec=0.25),
                train_dataloaders=DataLoader(ClockedData(clock, n=64, per_sample=0.0625), batch_size=4))
    samples = dict(tb_scalars(logger.log_dir, "throughput/samples_per_sec"))
    assert samples[3] < 0.6 * STEADY["throughput/samples_per_sec"]  # 16 samples in 2 s + 2 s: 4 samples/s


class Probe(Monitor):
    """A monitor whose every training batch end costs 0.125 s on the fake clock (and logs nothing)."""

    def __init__(self, clock: FakeClock) -> None:
        super().__init__(None)
        self.clock = clock

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.clock.now += 0.125


class ValidationProbe(Monitor):
    """A monitor that draws in validation, as PredictionGridMonitor does: 0.5 s on the fake clock at the end of each
    validation run; ``off_after``: it turns itself off after that many runs."""

    def __init__(self, clock: FakeClock, off_after: Optional[int] = None) -> None:
        super().__init__(None)
        self.clock, self.off_after, self.runs = clock, off_after, 0

    @override
    def on_validation_epoch_end(self, trainer: Any, pl_module: Any) -> None:
        if not self.is_off():
            self.clock.now += 0.5
            self.runs += 1

    @override
    def is_off(self) -> bool:
        return self.off_after is not None and self.runs >= self.off_after


@pytest.mark.parametrize("off_after", [None, 1])
def test_a_cost_spent_in_validation_counts_in_the_training_window_that_holds_it(tmp_path, off_after):
    """Batches of 0.5 s (0.25 s loading, 0.25 s step), a window of 2 batches; a validation run after batch 3 (and
    7) where ValidationProbe spends 0.5 s: the window after it (step 5) holds that cost, 0.5 / (1.0 + 0.5), the
    others nothing; rates and step times never see it. A monitor that turned itself off has no key from then on
    (its cost until then still counts in the total)."""
    clock = FakeClock()
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="", default_hp_metric=False)
    monitor = SpeedMonitor(measure_flops=False)
    _clock.set_clock(clock)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor, ValidationProbe(clock, off_after)],
                           max_steps=8, log_every_n_steps=2, val_check_interval=4)
    trainer.fit(ClockedModel(clock, train_sec=0.25, val_sec=1.0),
                train_dataloaders=DataLoader(ClockedData(clock, n=64, per_sample=0.0625), batch_size=4),
                val_dataloaders=DataLoader(ClockedData(None, n=8), batch_size=4))
    third = float(np.float32(1 / 3))
    assert tb_scalars(logger.log_dir, "time/monitor_share") == [(1, 0.0), (3, 0.0), (5, third), (7, 0.0)]
    other = tb_scalars(logger.log_dir, "time/monitor_share/other")
    assert other == ([(1, 0.0), (3, 0.0), (5, third), (7, 0.0)] if off_after is None else [(1, 0.0), (3, 0.0)])
    assert tb_scalars(logger.log_dir, "time/step_sec") == [(s, 0.5) for s in (1, 3, 5, 7)]  # no rate sees it


def test_monitor_share_is_the_hook_time_over_the_elapsed_time(tmp_path):
    """Each batch: 0.25 s loading, 0.25 s step, 0.125 s in Probe's hook: 0.125 / 0.625 = 0.2 of the time."""
    clock = FakeClock()
    logger = TensorBoardLogger(save_dir=str(tmp_path), name="tb", version="", default_hp_metric=False)
    monitor = SpeedMonitor(measure_flops=False)
    _clock.set_clock(clock)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor, Probe(clock)], max_steps=8,
                           log_every_n_steps=2)
    trainer.fit(ClockedModel(clock, train_sec=0.25),
                train_dataloaders=DataLoader(ClockedData(clock, n=64, per_sample=0.0625), batch_size=4))
    steps = (1, 3, 5, 7)
    # Probe's hook runs after SpeedMonitor's batch end, in the span before the next batch: the monitors' time (in
    # the wall time: it slows training), not data wait
    fifth = float(np.float32(0.2))  # as TensorBoard stores it
    assert tb_scalars(logger.log_dir, "time/monitor_share") == [(s, fifth) for s in steps]
    assert tb_scalars(logger.log_dir, "time/monitor_share/other") == [(s, fifth) for s in steps]
    # a Monitor of the user's own ("other") logs under the one documented pattern, like the library's monitors
    assert MONITOR_SHARE in SpeedMonitor.LOGGED_KEYS and MONITOR_SHARE.format(monitor=Probe.cost_name()) == (
        "time/monitor_share/other")
    assert tb_scalars(logger.log_dir, "time/monitor_share/speed") == [(s, 0.0) for s in steps]
    assert tb_scalars(logger.log_dir, "time/step_sec") == [(s, 0.625) for s in steps]
    assert tb_scalars(logger.log_dir, "time/data_wait_share") == [(s, 2 * fifth) for s in steps]  # 0.25 of 0.625 s


def test_hooks_are_timed_once_through_super_calls():
    clock = FakeClock()
    _clock.set_clock(clock)  # restored by _real_clocks

    class Inner(Monitor):
        @override
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            clock.now += 1.0
            super().on_train_start(trainer, pl_module)

    class Outer(Inner):
        @override
        def on_train_start(self, trainer: Any, pl_module: Any) -> None:
            clock.now += 0.5
            super().on_train_start(trainer, pl_module)

    probe = Outer(None)
    probe.on_train_start(SimpleNamespace(callbacks=[probe]), None)
    assert probe.hook_seconds() == 1.5 and Outer.cost_name() == "other"
    assert SpeedMonitor.cost_name() == "speed"


# ----------------------------------------------------------------------------------------------- DDP
_DDP_SCRIPT = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import torch
    import torch.distributed as dist
    from torch.nn import functional as F
    from torch.utils.data import DataLoader
    from lightning.pytorch.loggers import TensorBoardLogger
    from lightning.pytorch.utilities import rank_zero_only
    from helpers import TinyImageModel, make_trainer, image_data
    from lightning_monitor import SpeedMonitor
    from lightning_monitor._core import clock as _clock

    slow = sys.argv[1] == "slow"

    class Clock:
        now = 100.0
        def __call__(self):
            return self.now

    clock = Clock()

    class SlowFirstWrite(TensorBoardLogger):
        @rank_zero_only  # as TensorBoardLogger's own: Lightning calls it on every rank, rank 0 writes
        def log_metrics(self, metrics, step=None):
            global slow
            if slow:
                clock.now += 2.0  # the backend starting at its first write, on rank 0 (the only rank that writes)
                slow = False
            super().log_metrics(metrics, step)

    class Model(TinyImageModel):
        def training_step(self, batch, batch_idx):
            clock.now += 0.25
            loss = F.nll_loss(self(batch[0]), batch[1])
            self.log("train/loss", loss)
            return loss

        def on_after_backward(self):
            # DDP's gradient all-reduce: a rank that got there first waits for the other (the fake clocks meet)
            t = torch.tensor([clock.now], dtype=torch.float64)
            dist.all_reduce(t, op=dist.ReduceOp.MAX)
            clock.now = float(t)

    monitor = SpeedMonitor(measure_flops=False)
    _clock.set_clock(clock)
    trainer = make_trainer(".", accelerator="cpu", devices=2, strategy="ddp", max_steps=7, log_every_n_steps=2,
                           logger=SlowFirstWrite(".", name="tb", version="", default_hp_metric=False),
                           callbacks=[monitor])
    trainer.fit(Model(), train_dataloaders=DataLoader(image_data(96), batch_size=4))
    """
)


@pytest.mark.timeout(150)
def test_ddp_slow_first_write_on_rank_0_lands_in_no_window(tmp_path):
    """Rank 0 spends 2 s in its first write while rank 1 waits at the next all-reduce: both ranks' windows leave
    the 2 s out (8 + 8 samples/s at 0.25 s per batch of 4 on each rank), in every window."""
    script = tmp_path / "ddp_slow_write.py"
    script.write_text(_DDP_SCRIPT.format(tests=os.path.dirname(__file__)))
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(free_port()), PL_DISABLE_FORK="1")
    runs = {}
    for mode in ("slow", "steady"):
        run_dir = tmp_path / mode
        run_dir.mkdir()
        env["MASTER_PORT"] = str(free_port())
        proc = subprocess.run([sys.executable, str(script), mode], cwd=run_dir, env=env, capture_output=True,
                              text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr[-3000:]
        assert len(event_files(run_dir)) == 1  # rank 0 wrote, rank 1 nothing
        tags = tb_accumulator(str(run_dir / "tb")).Tags()["scalars"]
        runs[mode] = {k: tb_scalars(str(run_dir / "tb"), k) for k in tags if k.startswith(("throughput/", "time/"))}
    slow, steady = runs["slow"], runs["steady"]
    assert slow["throughput/samples_per_sec"] == [(s, 32.0) for s in (1, 3, 5)]  # 2 ranks x 4 / 0.25 s
    assert slow["time/step_sec"] == [(s, 0.25) for s in (1, 3, 5)]
    assert slow["time/remaining_sec"] == [(1, 1.25), (3, 0.75), (5, 0.25)]
    for key in ("throughput/samples_per_sec", "throughput/device/samples_per_sec", "time/step_sec",
                "time/data_wait_share", "time/remaining_sec", "time/pre_sync_sec_max", "time/straggler_ratio"):
        assert slow[key] == steady[key], key


# ------------------------------------------------------------------------------------------ progress bar
_BAR_JOB = textwrap.dedent(
    """
    import sys
    sys.path.insert(0, {tests!r})
    import lightning.pytorch as pl
    from helpers import TinyImageModel, image_loader
    from lightning_monitor import MultiLogger, SpeedMonitor

    trainer = pl.Trainer(accelerator="cpu", max_steps=6, log_every_n_steps=2, enable_progress_bar=True,
                         enable_model_summary=False, enable_checkpointing=False, num_sanity_val_steps=0,
                         logger=MultiLogger(save_dir="runs", name="bar"), callbacks=[SpeedMonitor()])
    trainer.fit(TinyImageModel(), image_loader(64, batch_size=8))
    """
)


@pytest.mark.timeout(150)
def test_start_up_messages_never_land_inside_a_progress_bar_line(tmp_path):
    """A real job with the progress bar on, wandb offline and its banner not silenced, stdout and stderr in one
    unbuffered stream: wandb's start-up banner comes before the first bar update, and no message (wandb's, the
    offline notice, SpeedMonitor's FLOPs line, printed during the first batch) is glued to a bar line."""
    script = tmp_path / "bar_job.py"
    script.write_text(_BAR_JOB.format(tests=os.path.dirname(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "WANDB_SILENT"}
    env["PYTHONUNBUFFERED"] = "1"
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=140)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    # Lightning draws its bar with rich when rich is installed ("Epoch 0/..."), with tqdm otherwise ("Epoch 0: ...")
    first_bar = min(out.index(m) for m in ("Epoch 0:", "Epoch 0/") if m in out)
    # the wandb run starts before the first bar: its banner, or (where the terminal is kept quiet and wandb's banner
    # is not shown) our one offline line
    started = max(out.find("wandb: Tracking run"), out.find("wandb is logging offline"))
    assert -1 < started < first_bar, out[:first_bar]
    assert "SpeedMonitor: " in out and "wandb sync" in out
    for chunk in re.split(r"[\r\n]", out):  # a bar update starts with \r; a message after it is glued to the bar
        for marker in ("wandb:", "SpeedMonitor:", "wandb is logging offline"):
            if marker in chunk:
                assert chunk.startswith(marker), repr(chunk)
