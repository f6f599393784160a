"""HealthMonitor in real fits: each fault injected into training is read back where the alert went (TensorBoard,
the offline wandb run, alerts.jsonl, the terminal, RunSummary) at the first logging step at or after the fault;
replay prints the live run's alerts; a fault-free MNIST run raises none; stop and raise; no host sync added."""

from __future__ import annotations

import json
import math
import mmap
import os
from typing import Any

import pytest
import torch
from helpers import (
    FakeClock,
    OnFakeClock,
    TimedSamples,
    TinyImageModel,
    find_runs,
    image_loader,
    make_trainer,
    steady_heap,
    tb_accumulator,
    tb_scalars,
)
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger
from torch.nn import functional as F
from torch.utils.data import DataLoader

from lightning_monitor import (
    GradientMonitor,
    HealthMonitor,
    MemoryMonitor,
    MultiLogger,
    RunSummary,
    SpeedMonitor,
)
from lightning_monitor._core import clock as _clock
from lightning_monitor.command import main as command
from lightning_monitor.health_monitor import HealthAlertError
from lightning_monitor.testing import CALLBACK_FILES, HostSyncCounter, SyncsPerStep

pytestmark = pytest.mark.timeout(240)
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class Faulty(TinyImageModel):
    """TinyImageModel whose training loss is multiplied by ``factor`` at step ``at`` (``nan``: a NaN loss), and which
    logs ``custom/score`` (0 before step 10, 5 from it) and a constant ``val/score``."""

    def __init__(self, at: int = -1, factor: float = 1.0) -> None:
        super().__init__()
        self.at, self.factor = at, factor

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.nll_loss(self(x), y)
        if self.global_step == self.at:
            loss = loss * self.factor
        self.log("train/loss", loss)
        self.log("custom/score", 0.0 if self.global_step < 10 else 5.0)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/score", 1.0)


def _fit(model: Any, callbacks: list[Any], logger: Any, steps: int, every: int = 2, data: Any = None,
         **kwargs: Any) -> Any:
    trainer = make_trainer(".", logger=logger, callbacks=callbacks, max_steps=steps, log_every_n_steps=every,
                           limit_val_batches=kwargs.pop("limit_val_batches", 0), **kwargs)
    trainer.fit(model, data if data is not None else image_loader(64), image_loader(32))
    return trainer


def _jsonl(log_dir: str) -> list[dict[str, Any]]:
    with open(os.path.join(log_dir, "alerts.jsonl"), encoding="utf-8") as f:
        return [json.loads(line) for line in f]


def _replayed(run_dir: str, capsys: Any, *extra: str) -> list[str]:
    capsys.readouterr()
    assert command(["replay", str(run_dir), *extra]) == 0
    return capsys.readouterr().out.splitlines()


def test_nan_loss_alerts_at_the_first_logging_step_everywhere_and_replay_agrees(capsys):
    logger = MultiLogger(save_dir="runs", name="nan")
    health, summary = HealthMonitor(), RunSummary(print_table=False)
    trainer = _fit(Faulty(at=4, factor=math.nan), [GradientMonitor(), health, summary], logger, steps=10)
    # logging steps 1, 3, 5, 7, 9: the NaN of step 4 is seen at step 5, in the loss and in the gradients
    assert [(a.step, a.rule, a.key) for a in health.alerts] == [
        (5, "nonfinite_loss", "train/loss"), (5, "nonfinite_grad", "grad/nonfinite_steps")]
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "ALERT" in line] == [a.line() for a in health.alerts]  # one line each, once
    assert out[out.index(health.alerts[0].line())] == (
        "lightning-monitor: ALERT nonfinite_loss at step 5: the training loss is NaN/Inf (train/loss = nan)")

    log_dir = logger.log_dir
    assert tb_scalars(log_dir, "health/alerts") == [(5, 2.0), (7, 2.0), (9, 2.0)]
    assert tb_scalars(log_dir, "health/nonfinite_loss") == [(5, 1.0), (7, 1.0), (9, 1.0)]
    (card,) = tb_accumulator(log_dir).Tensors("health/alert_text/text_summary")
    assert card.step == 5 and "**nonfinite_loss** at step 5" in card.tensor_proto.string_val[0].decode()
    (run,) = find_runs("runs")
    assert run.exit_code == 0
    assert run.series("health/alerts") == [(5, 2), (7, 2), (9, 2)]
    assert run.series("health/nonfinite_grad") == [(5, 1), (7, 1), (9, 1)]
    assert [step for step, _ in run.series("health/alert_text")] == [5]

    records = _jsonl(log_dir)
    assert [{k: r[k] for k in ("step", "rule", "key", "value", "threshold")} for r in records] == [
        {"step": 5, "rule": "nonfinite_loss", "key": "train/loss", "value": "nan", "threshold": None},
        {"step": 5, "rule": "nonfinite_grad", "key": "grad/nonfinite_steps", "value": 2.0, "threshold": 0.0}]
    assert [r["message"] for r in records] == [a.message for a in health.alerts]
    assert all(isinstance(r["time"], float) for r in records)

    assert summary.summary["summary/alerts"] == 2
    assert summary.summary["summary/alert_count/nonfinite_loss"] == 1
    assert summary.summary["summary/alert_first_step/nonfinite_grad"] == 5
    assert trainer.loggers == [logger]  # the in-memory logger is gone after the fit

    assert _replayed(log_dir, capsys) == [a.line() for a in health.alerts] + ["2 alerts"]


def test_loss_times_fifty_for_one_batch_is_a_spike(capsys):
    logger = MultiLogger(save_dir="runs", name="spike", wandb=False)
    health = HealthMonitor()
    _fit(Faulty(at=29, factor=50.0), [GradientMonitor(), health], logger, steps=40)
    first = {}
    for alert in health.alerts:
        first.setdefault(alert.rule, alert.step)
    assert min(a.step for a in health.alerts) == 29  # nothing before the fault
    assert first["loss_spike"] == 29 and first["grad_spike"] == 29  # 50x the loss: 50x the gradients
    (spike,) = [a for a in health.alerts if a.rule == "loss_spike" and a.step == 29]
    assert spike.value == pytest.approx(tb_scalars(logger.log_dir, "train/loss")[14][1])
    assert "robust z-score" in spike.message
    assert _replayed(logger.log_dir, capsys)[:-1] == [a.line() for a in health.alerts]


class _ClockedModel(OnFakeClock, Faulty):
    """A training step takes 10 ms on the clock."""


def test_a_dataset_that_sleeps_makes_the_run_input_bound():
    clock = FakeClock()
    _clock.set_clock(clock)  # restored by conftest
    g = torch.Generator().manual_seed(0)
    data = TimedSamples(clock, torch.randn(64, 1, 28, 28, generator=g), torch.randint(0, 10, (64,), generator=g),
                        per_sample=0.005)  # 16 x 5 ms = 80 ms waiting for each batch of a 10 ms step
    logger = TensorBoardLogger("runs", name="slow", default_hp_metric=False)
    health = HealthMonitor()
    _fit(_ClockedModel(clock), [SpeedMonitor(), health], logger, steps=20, data=DataLoader(data, batch_size=16))
    waits = tb_scalars(logger.log_dir, "time/data_wait_share")
    assert len(waits) >= 4 and all(v > 0.8 for _, v in waits), waits
    # three windows in a row above 0.5: the third one's logging step, and nothing else
    assert [(a.step, a.rule) for a in health.alerts] == [(waits[2][0], "input_bound")]
    assert _jsonl(logger.log_dir)[0]["rule"] == "input_bound"  # a plain TensorBoardLogger: its log_dir


class _Leak(Callback):
    """Keeps 8 MiB of host memory more after every training batch: fresh pages of its own (an anonymous mapping,
    written through), so the process's RSS grows by them whatever freed memory earlier tests left in the heap."""

    def __init__(self) -> None:
        self.kept: list[mmap.mmap] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        block = mmap.mmap(-1, 8 << 20)
        block.write(b"x" * (8 << 20))
        self.kept.append(block)


def test_a_callback_leaking_host_memory_is_a_leak(tmp_path, capsys):
    logger = MultiLogger(save_dir="runs", name="leak", wandb=False)
    health = HealthMonitor(leak_gib=0.05, leak_window=8)
    leak = _Leak()
    with steady_heap():  # earlier tests' garbage freed before, not inside the window (RSS would fall as it grows)
        _fit(Faulty(), [MemoryMonitor(), leak, health], logger, steps=40)
    rss = tb_scalars(logger.log_dir, "memory/host/rss_gib")
    assert rss[-1][1] - rss[0][1] > 0.25  # it really leaked: 40 x 8 MiB
    leaks = [a for a in health.alerts if a.rule == "host_memory_leak"]
    assert leaks and leaks[0].step == rss[7][0]  # as soon as the window of 8 logging steps is full
    assert "memory/host/rss_gib rose by" in leaks[0].message
    assert [(a.step, a.rule) for a in health.alerts] == [(a.step, a.rule) for a in leaks]
    options = tmp_path / "health.yaml"  # replay with the live run's options
    options.write_text("leak_gib: 0.05\nleak_window: 8\n")
    assert _replayed(logger.log_dir, capsys, "--rules", str(options))[:-1] == [a.line() for a in health.alerts]
    assert _replayed(logger.log_dir, capsys) == ["0 alerts"]  # the default threshold, 0.5 GiB, is not reached
    for block in leak.kept:
        block.close()


def test_user_rules_on_the_models_own_keys(tmp_path, capsys):
    rules = [{"key": "custom/score", "rule": "above", "threshold": 1.0, "patience": 2, "name": "score_high"},
             {"key": "val/score", "rule": "not_improving", "patience": 2, "action": "warn"}]
    # the CSV logger gets the health keys too (a scalar-only logger), the alerts file goes to its log_dir
    csv = CSVLogger("runs", name="csv")
    health = HealthMonitor(rules=rules, defaults=False)
    _fit(Faulty(), [health], [csv, TensorBoardLogger("runs", name="tb")], steps=20, val_check_interval=4,
         limit_val_batches=1, data=image_loader(64 * 4))
    # custom/score is 5 from step 10: logging steps 11 and 13; val/score is the same at steps 3, 7, 11
    assert [(a.step, a.rule) for a in health.alerts] == [(11, "val_score_not_improving"), (13, "score_high")]
    assert [r["rule"] for r in _jsonl(csv.log_dir)] == ["val_score_not_improving", "score_high"]
    with open(os.path.join(csv.log_dir, "metrics.csv"), encoding="utf-8") as f:
        header = f.readline()
    assert "health/alerts" in header and "health/score_high" in header
    rules_file = tmp_path / "rules.yaml"
    rules_file.write_text("defaults: false\nrules:\n"
                          "  - {key: custom/score, rule: above, threshold: 1.0, patience: 2, name: score_high}\n"
                          "  - {key: val/score, rule: not_improving, patience: 2}\n")
    tb_dir = os.path.join("runs", "tb", "version_0")
    assert _replayed(tb_dir, capsys, "--rules", str(rules_file)) == [a.line() for a in health.alerts] + ["2 alerts"]
    rules_file.write_text("defaults: false\nrules:\n  - {key: custom/score, rule: above, threshold: 9.0}\n")
    assert _replayed(tb_dir, capsys, "--rules", str(rules_file)) == ["0 alerts"]  # tuned without training again


def _mnist_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    """The 640 MNIST training digits of tests/data, normalised as the example does, as two tensors."""
    import sys

    sys.path.insert(0, os.path.join(REPO, "examples", "mnist"))
    from datamodule import MNISTDataModule

    dm = MNISTDataModule(data_dir=os.path.join(REPO, "tests", "data"), download=False, num_workers=0, val_split=64)
    dm.setup("fit")
    x, y = zip(*[dm.train_set[i] for i in range(len(dm.train_set))], strict=True)
    return torch.stack(x), torch.tensor(y)


@pytest.mark.timeout(300)
def test_a_fault_free_mnist_run_raises_no_alert():
    """Every default rule on, every monitor: 300 steps on real digits. The speed rules read a fake clock (a 10 ms
    step, 0.1 ms a sample to load): the test judges the rules, not this machine's load."""
    clock = FakeClock()
    _clock.set_clock(clock)  # restored by conftest
    x, y = _mnist_tensors()
    data = DataLoader(TimedSamples(clock, x, y, per_sample=0.0001), batch_size=16, shuffle=True,
                      generator=torch.Generator().manual_seed(0))
    logger = MultiLogger(save_dir="runs", name="mnist", wandb=False)
    health = HealthMonitor()
    trainer = _fit(_ClockedModel(clock), [GradientMonitor(), MemoryMonitor(), SpeedMonitor(), health], logger,
                   steps=300, every=5, data=data)
    assert trainer.global_step == 300
    assert health.alerts == []
    assert not os.path.exists(os.path.join(logger.log_dir, "alerts.jsonl"))
    tags = tb_accumulator(logger.log_dir).Tags()
    assert not [t for t in tags["scalars"] + tags["tensors"] if t.startswith("health/")]
    judged = health._engine.states  # every rule whose monitor ran was judged, and stayed quiet
    assert all(not s.firing for s in judged.values())
    assert len(tb_scalars(logger.log_dir, "train/loss")) == 60


def test_stop_ends_the_fit_cleanly_and_raise_raises():
    logger = MultiLogger(save_dir="runs", name="stop", wandb=False)
    health = HealthMonitor(actions={"nonfinite_loss": "stop"})
    trainer = _fit(Faulty(at=4, factor=math.nan), [health], logger, steps=20)
    # judged when Lightning hands the loggers step 5's values (the end of batch 5): the fit ends after that batch
    assert trainer.should_stop and trainer.global_step == 6
    assert tb_scalars(logger.log_dir, "train/loss")[-1][0] == 5  # the alerting logging step is the last one
    assert tb_scalars(logger.log_dir, "health/nonfinite_loss") == [(5, 1.0)]
    assert [(r["step"], r["action"]) for r in _jsonl(logger.log_dir)] == [(5, "stop")]

    raising = HealthMonitor(actions={"nonfinite_loss": "raise"})
    with pytest.raises(HealthAlertError, match="nonfinite_loss at step 5: the training loss is NaN/Inf"):
        _fit(Faulty(at=4, factor=math.nan), [raising], MultiLogger(save_dir="runs", name="raise", wandb=False),
             steps=20)


class Silent(TinyImageModel):
    """Logs nothing with ``self.log``: Lightning hands the loggers no values at its logging steps."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        return F.nll_loss(self(x), y)


def test_stop_without_model_values_ends_the_fit_one_batch_later():
    """With no self.log value at a logging step Lightning calls no logger there: the monitors' values of step 1 are
    judged at the next batch's start, and the fit ends after that batch."""
    logger = MultiLogger(save_dir="runs", name="silent", wandb=False)
    health = HealthMonitor(rules=[{"key": "grad/norm_total", "rule": "above", "threshold": 0.0, "action": "stop"}])
    trainer = _fit(Silent(), [GradientMonitor(), health], logger, steps=20)
    assert trainer.should_stop and trainer.global_step == 3
    assert [(r["step"], r["action"]) for r in _jsonl(logger.log_dir)] == [(1, "stop")]


def test_no_host_sync_added():
    counter = HostSyncCounter(owners=CALLBACK_FILES, default_owner="logging layer")
    steps = SyncsPerStep(counter)
    health = HealthMonitor()
    callbacks = [steps, GradientMonitor(), SpeedMonitor(), health]
    with counter:
        _fit(Faulty(at=4, factor=math.nan), callbacks, MultiLogger(save_dir="runs", name="syncs", wandb=False),
             steps=12, every=4)
    assert health.alerts  # the alert path ran
    owners = [owner for calls in steps.per_step.values() for *_, owner in calls]
    assert "HealthMonitor" not in owners and "logging layer" not in owners
    quiet = {s: calls for s, calls in steps.per_step.items() if (s + 1) % 4}
    assert quiet == {s: [] for s in quiet}
