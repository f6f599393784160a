"""RunSummary's verdicts (docs/verdicts.md): judged on real fits in both directions (a run that has the problem gets
the verdict, one that has not does not), and each rule on canned series; where they are written (the table,
summary.json, the TensorBoard card, wandb's run summary)."""

from __future__ import annotations

import json
import os
import sys
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
)
from lightning.pytorch.callbacks import Callback
from torch.utils.data import DataLoader

from lightning_monitor import GradientMonitor, HealthMonitor, MemoryMonitor, MultiLogger, RunSummary, SpeedMonitor
from lightning_monitor._core import clock as _clock
from lightning_monitor._summary import numbers as _numbers
from lightning_monitor._summary import verdicts as _verdicts

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


class _ClockedModel(OnFakeClock, TinyImageModel):
    """A training step takes 10 ms on the clock."""


class _Leak(Callback):
    """Keeps 8 MiB of host memory more after every training batch (a growing list of tensors)."""

    def __init__(self) -> None:
        self.kept: list[torch.Tensor] = []

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.kept.append(torch.ones(2 << 20))  # 8 MiB, written (so resident)


def _fit(model: Any, callbacks: list[Any], logger: Any, steps: int, data: Any, every: int = 2) -> Any:
    trainer = make_trainer(".", logger=logger, callbacks=callbacks, max_steps=steps, log_every_n_steps=every,
                           limit_val_batches=0)
    trainer.fit(model, data)
    return trainer


def _names(summary: RunSummary) -> list[str]:
    return [v.name for v in summary.verdicts]


def _clocked(per_sample: float, n: int = 64) -> tuple[FakeClock, DataLoader]:
    clock = FakeClock()
    _clock.set_clock(clock)  # restored by conftest
    g = torch.Generator().manual_seed(0)
    data = TimedSamples(clock, torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g),
                        per_sample)
    return clock, DataLoader(data, batch_size=16)


def test_a_dataset_that_sleeps_is_input_bound_and_a_fast_one_is_not(capsys):
    clock, data = _clocked(per_sample=0.005)  # 16 x 5 ms = 80 ms waiting for each batch of a 10 ms step
    slow = RunSummary(use_rich=False)
    logger = MultiLogger(save_dir="runs", name="slow", wandb=False)
    _fit(_ClockedModel(clock), [SpeedMonitor(), slow], logger, steps=20, data=data)
    assert _names(slow) == ["INPUT-BOUND"]
    (verdict,) = slow.verdicts
    assert verdict.numbers["data_wait_share_mean"] == pytest.approx(slow.summary["summary/data_wait_share_mean"])
    assert verdict.numbers["data_wait_share_mean"] > 0.8
    assert "num_workers" in verdict.advice and "pin_memory" in verdict.advice
    slow.print_now()
    out = capsys.readouterr().out
    assert "verdicts" in out and "INPUT-BOUND: waiting for data" in out

    # summary.json: a list of objects; the TensorBoard card; the values in RunSummary.summary (wandb's run summary)
    with open(os.path.join(logger.log_dir, "summary.json"), encoding="utf-8") as f:
        document = json.load(f)
    assert [v["name"] for v in document["verdicts"]] == ["INPUT-BOUND"]
    assert set(document["verdicts"][0]) >= {"name", "evidence", "advice", "numbers"}
    assert document["summary/verdicts"] == {"value": "INPUT-BOUND", "unit": None}
    card = tb_accumulator(logger.log_dir).Tensors("summary/table/text_summary")[0].tensor_proto.string_val[0]
    assert b"| verdicts | INPUT-BOUND: waiting for data" in card

    clock, data = _clocked(per_sample=0.0001)  # 1.6 ms for a batch of a 10 ms step
    fast = RunSummary()
    _fit(_ClockedModel(clock), [SpeedMonitor(), fast], MultiLogger(save_dir="runs", name="fast", wandb=False),
         steps=20, data=data)
    assert 0 < fast.summary["summary/data_wait_share_mean"] < 0.2
    assert _names(fast) == ["HEALTHY"]
    # the threshold is the option's
    clock, data = _clocked(per_sample=0.0001)
    strict = RunSummary(data_wait_share=0.05)
    _fit(_ClockedModel(clock), [SpeedMonitor(), strict], MultiLogger(save_dir="runs", name="strict", wandb=False),
         steps=20, data=data)
    assert _names(strict) == ["INPUT-BOUND"]


def test_a_callback_keeping_a_growing_list_of_tensors_is_memory_creep_in_every_backend():
    leak = _Leak()
    summary = RunSummary()
    logger = MultiLogger(save_dir="runs", name="leak")  # wandb offline
    with steady_heap():  # no earlier test's freed memory for the leak to reuse, none of its garbage freed inside
        _fit(TinyImageModel(), [MemoryMonitor(), leak, summary], logger, steps=40, data=image_loader(64))
    leak.kept.clear()
    assert "MEMORY-CREEP" in _names(summary)
    (creep,) = [v for v in summary.verdicts if v.name == "MEMORY-CREEP"]
    # 8 MiB a step: 8,000 MiB per 1,000 steps (the robust slope; RSS moves by pages and the allocator's arenas)
    assert 5000 < creep.numbers["rss_mib_per_1k_steps"] < 11000, creep
    assert "MiB per 1,000 steps" in creep.evidence
    (run,) = find_runs("runs")
    assert "MEMORY-CREEP" in run.summary["summary/verdicts"]
    assert run.summary["summary/verdict/MEMORY-CREEP"] == creep.line()
    card = tb_accumulator(logger.log_dir).Tensors("summary/table/text_summary")[0].tensor_proto.string_val[0]
    assert b"MEMORY-CREEP: host memory (RSS) rises" in card


def _mnist_loader(clock: FakeClock) -> DataLoader:
    sys.path.insert(0, os.path.join(REPO, "examples", "mnist"))
    from datamodule import MNISTDataModule

    dm = MNISTDataModule(data_dir=os.path.join(REPO, "tests", "data"), download=False, num_workers=0, val_split=64)
    dm.setup("fit")
    x, y = zip(*[dm.train_set[i] for i in range(len(dm.train_set))], strict=True)
    return DataLoader(TimedSamples(clock, torch.stack(x), torch.tensor(y), per_sample=0.0001), batch_size=16,
                      shuffle=True, generator=torch.Generator().manual_seed(0))


def test_a_clean_mnist_run_is_healthy():
    """Every monitor that feeds a verdict, on the committed digits; the speed numbers on the fake clock."""
    clock = FakeClock()
    _clock.set_clock(clock)
    summary = RunSummary()
    _fit(_ClockedModel(clock), [GradientMonitor(), MemoryMonitor(), SpeedMonitor(), HealthMonitor(), summary],
         MultiLogger(save_dir="runs", name="mnist", wandb=False), steps=120, data=_mnist_loader(clock), every=5)
    assert _names(summary) == ["HEALTHY"], [v.line() for v in summary.verdicts]
    assert summary.summary["summary/verdicts"] == "HEALTHY"
    assert "judged: data wait, memory, gradients, monitoring cost" in summary.verdicts[0].evidence


# ------------------------------------------------------------------------------------------------ each rule


def _judge(values: dict[str, Any], series: dict[str, list[tuple[int, float]]] | None = None,
           **thresholds: float) -> list[str]:
    return [v.name for v in _verdicts.judge(values, series or {}, thresholds)]


def test_each_rule_fires_above_its_threshold_and_not_below():
    assert _judge({}) == []  # nothing a verdict reads was logged: no verdict, not HEALTHY
    assert _verdicts.summary_values([]) == {}
    ratios = {"time/straggler_ratio": [(s, 2.0) for s in range(10)],
              "time/pre_sync_sec_max_rank": [(s, 3.0) for s in range(10)]}
    (straggler,) = _verdicts.judge({}, ratios, {})
    assert straggler.name == "STRAGGLER" and straggler.numbers == {"straggler_ratio_p50": 2.0, "rank": 3.0}
    assert straggler.evidence.startswith("rank 3 is the slowest")
    assert _judge({}, ratios, straggler_ratio=2.5) == ["HEALTHY"]
    assert _judge({}, {"memory/cuda/peak_reserved_share_max": [(2, 0.5), (4, 0.95)]}) == ["NEAR-OOM"]
    assert _judge({}, {"memory/cuda/peak_reserved_share": [(2, 0.5), (4, 0.6)]}) == ["HEALTHY"]
    assert _judge({}, {"memory/cuda/alloc_retries": [(2, 0.0), (4, 2.0)]}) == ["NEAR-OOM"]
    assert _judge({"summary/grad_nonfinite_steps": 3}) == ["GRADIENTS-UNHEALTHY"]
    assert _judge({"summary/grad_nonfinite_steps": 0, "summary/alert_count/loss_spike": 1}) == ["GRADIENTS-UNHEALTHY"]
    assert _judge({"summary/grad_nonfinite_steps": 0, "summary/alert_count/input_bound": 1}) == ["HEALTHY"]
    (cost,) = _verdicts.judge({"summary/overhead_share_mean": 0.2}, {}, {})
    assert cost.name == "MONITOR-COST-HIGH" and "cost_budget" in cost.advice and "log_every_n_steps" in cost.advice
    assert _judge({"summary/overhead_share_mean": 0.2}, monitor_share=0.25) == ["HEALTHY"]
    assert _judge({"summary/mfu_p50": 0.05}) == ["LOW-MFU"]
    assert _judge({"summary/mfu_p50": 0.45}) == ["HEALTHY"]
    assert _judge({"summary/data_wait_share_mean": 0.31}) == ["INPUT-BOUND"]
    assert _judge({"summary/data_wait_share_mean": 0.29}) == ["HEALTHY"]


def test_memory_creep_is_a_robust_slope_over_the_run():
    gib = 1 / 1024  # MiB in GiB
    rising = [(s, 2.0 + s * 0.5 * gib) for s in range(0, 1000, 10)]  # 500 MiB per 1,000 steps
    assert _verdicts.creep_slope(rising) * 1024 * 1000 == pytest.approx(500)
    assert _judge({}, {"memory/host/rss_gib": rising}) == ["MEMORY-CREEP"]
    # one jump at the start (the first allocations) then flat: no creep, though the first and last points differ
    jump = [(0, 1.0), (10, 1.5)] + [(s, 1.5 + (s % 20) * 0.001 * gib) for s in range(20, 1000, 10)]
    assert abs(_verdicts.creep_slope(jump)) < 1e-9
    assert _judge({}, {"memory/host/rss_gib": jump}) == ["HEALTHY"]
    # a fast rise that is too small over the run (a short run's warm-up) is not creep either
    short = [(s, 2.0 + s * 2 * gib) for s in range(0, 30, 2)]  # 2,000 MiB per 1,000 steps, 56 MiB over the run
    assert _judge({}, {"memory/host/rss_gib": short}) == ["HEALTHY"]
    assert _judge({}, {"memory/host/rss_gib": short}, creep_min_mib=32.0) == ["MEMORY-CREEP"]
    assert _verdicts.creep_slope(rising[:2]) is None


def test_verdicts_render_in_every_table_and_the_options_are_checked():
    values = _numbers.compute({"time/data_wait_share": [(2, 0.6)]}, status="success", wall_sec=1.0, steps=2)
    values.update(_verdicts.summary_values(_verdicts.judge(values, {}, {})))
    assert values["summary/verdicts"] == "INPUT-BOUND"
    plain = _numbers.plain(values)
    assert "  verdicts" in plain and "INPUT-BOUND: waiting for data 60.0% of training time" in plain
    assert "| verdicts | INPUT-BOUND" in _numbers.markdown(values)
    assert _numbers.unit("summary/verdicts") is None and _numbers.unit("summary/verdict/HEALTHY") is None
    with pytest.raises(ValueError, match=r"^`data_wait_share` must be a number > 0.0 and <= 1.0, got 1.5$"):
        RunSummary(data_wait_share=1.5)
    with pytest.raises(TypeError, match=r"^`creep_min_mib` must be a number > 0.0, got 'big'$"):
        RunSummary(creep_min_mib="big")
    with pytest.raises(ValueError, match=r"^`straggler_ratio` must be a number > 1.0, got 1$"):
        RunSummary(straggler_ratio=1)
    assert RunSummary(low_mfu=0.3).thresholds == {**_verdicts.DEFAULTS, "low_mfu": 0.3}
