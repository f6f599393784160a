"""StallMonitor: the watchdog's limits (fake time), a starved input pipeline and a rank asleep under 2-process DDP
(real fits: the dumps, the alert in alerts.jsonl and both backends, the run finishing), a clean run with a slow first
step and a slow validation raising nothing, no host sync, ``action="exit"`` and LightningCLI YAML."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time

import pytest
from helpers import (
    TinyImageModel,
    callback_from_cli_yaml,
    find_runs,
    image_data,
    make_trainer,
    run_ddp_script,
    tb_accumulator,
    tb_scalars,
)
from torch.utils.data import DataLoader, Dataset

from lightning_monitor import MultiLogger, RunSummary, StallMonitor
from lightning_monitor._stall.watch import Watch
from lightning_monitor.testing import CALLBACK_FILES, HostSyncCounter, SyncsPerStep

TESTS = os.path.dirname(os.path.abspath(__file__))


# ------------------------------------------------------------------------------------------ the limits, fake time


def _watch(**options: float) -> Watch:
    defaults = dict(timeout=None, min_timeout=120.0, step_factor=10.0, first_step_timeout=600.0,
                    slow_phase_timeout=600.0)
    defaults.update(options)
    return Watch(**defaults)  # type: ignore[arg-type]


def test_first_step_then_the_derived_timeout_then_the_slow_phases():
    watch = _watch(min_timeout=2.0, first_step_timeout=50.0, slow_phase_timeout=30.0)
    watch.start(0.0)
    watch.progress(0.0, "forward/backward", 0)
    assert watch.check(49.0) is None  # the first step (compile, first batches) may take 50 s
    watch.step_ended(49.0, 1)
    assert watch.limit(watch.mark) == 50.0  # no step time yet: still the first-step allowance
    for i, t in enumerate((49.5, 50.0, 50.5, 51.0)):  # steps of 0.5 s: 10 x p95 = 5 s
        watch.progress(t - 0.25, "forward/backward", i + 1)
        watch.step_ended(t, i + 2)
    assert watch.base_limit() == 5.0
    assert watch.check(56.0) is None
    stall = watch.check(56.1)
    assert stall is not None and stall.mark.phase == "waiting for data" and stall.limit == 5.0
    assert abs(stall.seconds - 5.1) < 1e-9
    assert watch.check(80.0) is None  # once per mark
    ended = watch.progress(81.0, "forward/backward", 5)
    assert ended is stall and watch.stall is None
    watch.progress(82.0, "validation", 5)
    assert watch.check(111.0) is None and watch.check(112.5) is not None  # validation: 30 s
    watch.progress(113.0, "checkpoint save", 5)
    assert watch.limit(watch.mark) == 30.0
    watch.progress(114.0, "optimizer step", 5)
    assert watch.limit(watch.mark) == 5.0


def test_floor_and_absolute_timeout():
    watch = _watch()
    watch.start(0.0)
    for i in range(1, 30):
        watch.step_ended(i * 0.01, i)
    assert watch.base_limit() == 120.0  # 10 x 10 ms is below the floor
    absolute = _watch(timeout=3.0, first_step_timeout=5.0)
    absolute.start(0.0)
    assert absolute.limit(absolute.mark) == 5.0
    absolute.step_ended(1.0, 1)
    assert absolute.limit(absolute.mark) == 3.0


def test_options_are_checked():
    with pytest.raises(ValueError, match="timeout"):
        StallMonitor(timeout=0)
    with pytest.raises(ValueError, match="action"):
        StallMonitor(action="kill")
    with pytest.raises(ValueError, match="exit_code"):
        StallMonitor(exit_code=0)
    with pytest.raises(ValueError, match="dirname"):
        StallMonitor(dirname="a/b")


def test_lightning_cli_builds_it_from_yaml(tmp_path):
    monitor = callback_from_cli_yaml(tmp_path, StallMonitor, (
        "        min_timeout: 300\n"
        "        first_step_timeout: 1200.5\n"
        "        action: exit\n"
        "        exit_code: 3\n"
    ))
    assert (monitor.timeout, monitor.min_timeout, monitor.first_step_timeout) == (None, 300, 1200.5)
    assert (monitor.action, monitor.exit_code) == ("exit", 3)


# ------------------------------------------------------------------------------------------ real fits, one process


class SleepyData(Dataset):
    """The tests' images; item ``slow`` sleeps ``seconds`` first (a wedged read)."""

    def __init__(self, n: int, slow: int, seconds: float) -> None:
        self.data, self.slow, self.seconds = image_data(n, 0), slow, seconds

    def __len__(self) -> int:
        return len(self.data)

    def __getitem__(self, index: int):
        if index == self.slow:
            time.sleep(self.seconds)
        return self.data[index]


@pytest.mark.timeout(120)
def test_a_dataset_that_sleeps_is_a_stall_waiting_for_data(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    logger = MultiLogger(save_dir="runs", name="data")
    stall = StallMonitor(timeout=1.5, first_step_timeout=30.0)
    trainer = make_trainer(".", logger=logger, callbacks=[stall, RunSummary(print_table=False)], max_steps=8,
                           limit_val_batches=0)
    # batch 4 (step 4) holds item 64: its read sleeps 4 s, in the main process (no workers)
    trainer.fit(TinyImageModel(), DataLoader(SleepyData(128, 64, 4.0), batch_size=16))
    assert trainer.global_step == 8
    run_dir = logger.log_dir
    (dump,) = glob.glob(os.path.join(run_dir, "stalls", "*.txt"))
    assert os.path.basename(dump) == "rank0-step4.txt"
    text = open(dump, encoding="utf-8").read()
    assert "phase: waiting for data" in text and "step: 4" in text and "rank: 0" in text
    training = text.split("(training thread)")[1].split("--- thread")[0]
    assert "in __getitem__" in training and "time.sleep(self.seconds)" in training, training
    assert "lightning-monitor-stall-watchdog" in text  # every thread, the watchdog's own included
    (record,) = [json.loads(line) for line in open(os.path.join(run_dir, "alerts.jsonl"), encoding="utf-8")]
    assert record["rule"] == "stalled" and record["step"] == 4 and record["key"] == "health/stalled"
    assert record["threshold"] == 1.5 and record["value"] >= 1.5 and record["action"] == "warn"
    assert set(record) == {"step", "time", "rule", "key", "value", "threshold", "message", "action"}
    assert "in waiting for data" in record["message"] and "__getitem__" in record["message"]
    out = capsys.readouterr().out.splitlines()
    assert sum(line.startswith("lightning-monitor: ALERT stalled at step 4: no progress for") for line in out) == 1
    resumed = [line for line in out if line.startswith("lightning-monitor: progress resumed")]
    assert len(resumed) == 1 and "in waiting for data (step 4)" in resumed[0], out
    # the keys through the loggers once progress resumed: 1 at the stalled step, 0 at the next batch
    assert tb_scalars(run_dir, "health/stalled") == [(4, 1.0), (5, 0.0)]
    (seconds,) = tb_scalars(run_dir, "health/stall_sec")
    assert seconds[0] == 4 and 3.5 < seconds[1] < 6
    assert tb_scalars(run_dir, "health/stall_phase") == [(4, 1.0)]
    assert "health/alert_text" in {t.removesuffix("/text_summary") for t in tb_accumulator(run_dir).Tags()["tensors"]}
    (run,) = find_runs("runs")
    assert run.series("health/stalled") == [(4, 1), (5, 0)]
    summary = json.load(open(os.path.join(run_dir, "summary.json"), encoding="utf-8"))
    values = {k: v["value"] if isinstance(v, dict) else v for k, v in summary.items()}
    assert values["summary/stalls"] == 1 and values["summary/stall_longest_step"] == 4
    assert values["summary/stall_longest_phase"] == "waiting for data"
    assert values["summary/alert_count/stalled"] == 1


class SlowStart(TinyImageModel):
    """A first step of 3 s (a compile, a cold cache) and validation batches of 2.5 s each."""

    def training_step(self, batch, batch_idx):
        if self.global_step == 0:
            time.sleep(3.0)
        return super().training_step(batch, batch_idx)

    def validation_step(self, batch, batch_idx):
        time.sleep(2.5)
        return super().validation_step(batch, batch_idx)


@pytest.mark.timeout(120)
def test_a_clean_run_with_a_slow_first_step_and_a_slow_validation_raises_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    logger = MultiLogger(save_dir="runs", name="clean")
    counter = HostSyncCounter(owners=CALLBACK_FILES)
    steps = SyncsPerStep(counter)
    # derived timeout: 10 x p95 of steps of a few ms, floored at 1 s; first step 6 s, validation 5 s
    stall = StallMonitor(min_timeout=1.0, first_step_timeout=6.0, slow_phase_timeout=5.0)
    trainer = make_trainer(".", logger=logger, callbacks=[steps, stall], max_steps=12, val_check_interval=6,
                           limit_val_batches=1)
    with counter:
        trainer.fit(SlowStart(), DataLoader(image_data(256, 0), batch_size=16),
                    DataLoader(image_data(32, 1), batch_size=16))
    assert trainer.global_step == 12
    base = stall._watch.base_limit()
    assert base is not None and 1.0 <= base < 2.0  # the first step and each validation batch were longer
    assert not os.path.exists(os.path.join(logger.log_dir, "stalls"))
    assert not os.path.exists(os.path.join(logger.log_dir, "alerts.jsonl"))
    assert stall.stalls == []
    assert "lightning-monitor: ALERT" not in capsys.readouterr().out
    assert not any(tag.startswith("health/") for tag in tb_accumulator(logger.log_dir).Tags()["scalars"])
    # the watchdog adds no host sync: none of lightning_monitor's calls in any step is StallMonitor's
    assert sorted(steps.per_step) == list(range(12))
    assert not [call for calls in steps.per_step.values() for call in calls if call[-1] == "StallMonitor"]
    assert all(calls == [] for calls in steps.per_step.values()), steps.per_step  # nor anyone's, alone


EXIT_JOB = '''
import os, sys, time
sys.path.insert(0, {tests!r})
from helpers import TinyImageModel, image_loader, make_trainer
from lightning_monitor import MultiLogger, StallMonitor

class Hang(TinyImageModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3:
            time.sleep(60)
        return super().training_step(batch, batch_idx)

if __name__ == "__main__":
    trainer = make_trainer(".", logger=MultiLogger(save_dir="runs", name="exit", wandb=False),
                           callbacks=[StallMonitor(timeout=1.0, action="exit")], max_steps=8, limit_val_batches=0)
    trainer.fit(Hang(), image_loader(n=256))
    print("FINISHED")
'''


@pytest.mark.timeout(120)
def test_action_exit_ends_the_process_after_the_dump(tmp_path):
    script = tmp_path / "exit_job.py"
    script.write_text(EXIT_JOB.format(tests=TESTS))
    began = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=100)
    assert proc.returncode == 75, proc.stderr[-3000:]
    assert time.monotonic() - began < 45  # well before the 60 s sleep ends
    assert "FINISHED" not in proc.stdout
    assert "lightning-monitor: ALERT stalled at step 3" in proc.stdout, proc.stdout
    assert glob.glob(str(tmp_path / "runs" / "exit" / "version_0" / "stalls" / "rank0-step3.txt"))
    (record,) = [json.loads(line) for line in open(tmp_path / "runs" / "exit" / "version_0" / "alerts.jsonl")]
    assert record["action"] == "exit", record
    assert "the training thread is at training_step (exit_job.py:10)" in record["message"], record


# ------------------------------------------------------------------------------------------ 2-process DDP

DDP_JOB = '''
import os, sys, time
from datetime import timedelta
sys.path.insert(0, {tests!r})
from lightning.pytorch.strategies import DDPStrategy
from helpers import TinyImageModel, image_loader, make_trainer
from lightning_monitor import MultiLogger, RunSummary, StallMonitor

class Asleep(TinyImageModel):
    def training_step(self, batch, batch_idx):
        if self.global_step == 3 and self.global_rank == 1:
            time.sleep(9)  # rank 1 hangs in its own code; rank 0 waits for it in the gradient all-reduce
        return super().training_step(batch, batch_idx)

if __name__ == "__main__":
    logger = MultiLogger(save_dir="runs", name="ddp")
    trainer = make_trainer(".", logger=logger, strategy=DDPStrategy(timeout=timedelta(seconds=60)), devices=2,
                           max_steps=8, log_every_n_steps=2, limit_val_batches=0,
                           callbacks=[StallMonitor(timeout=3.0), RunSummary(print_table=False)])
    began = time.time()
    trainer.fit(Asleep(), image_loader(n=256))
    os.write(1, ("RANK %d STEP %d BEGAN %.3f\\n" % (trainer.global_rank, trainer.global_step, began)).encode())
'''


@pytest.mark.timeout(200)
def test_a_rank_asleep_under_ddp_is_dumped_on_both_ranks_and_the_run_finishes(tmp_path):
    proc = run_ddp_script(tmp_path, "stall_ddp.py", DDP_JOB.format(tests=TESTS))
    out = proc.stdout
    assert "RANK 0 STEP 8" in out and "RANK 1 STEP 8" in out, out + proc.stderr[-3000:]
    run_dir = tmp_path / "runs" / "ddp" / "version_0"
    # rank 0 in the run directory; rank 1 there when its logger names the same directory, else in save_dir/stalls
    # (a logger on a rank other than 0 may number its version on its own: here it does not know version_0)
    found = glob.glob(str(run_dir / "stalls" / "*")) + glob.glob(str(tmp_path / "runs" / "stalls" / "*"))
    dumps = {os.path.basename(p): open(p, encoding="utf-8").read() for p in found}
    assert os.path.exists(run_dir / "stalls" / "rank0-step3.txt")
    assert sorted(dumps) == ["rank0-step3.txt", "rank1-step3.txt"], (dumps.keys(), proc.stderr[-3000:])
    for rank, text in ((0, dumps["rank0-step3.txt"]), (1, dumps["rank1-step3.txt"])):
        header = dict(line.split(": ", 1) for line in text.split("\n\n")[0].splitlines()[1:])
        assert header["rank"] == str(rank) and header["step"] == "3" and header["phase"] == "forward/backward"
        # written within the timeout plus a few seconds (the watchdog looks once a second)
        assert 3.0 <= float(header["seconds_since_progress"]) < 6.0, header
    sleeping = dumps["rank1-step3.txt"].split("(training thread)")[1].split("--- thread")[0]
    assert "in training_step" in sleeping and "time.sleep(9)" in sleeping, sleeping
    waiting = dumps["rank0-step3.txt"].split("(training thread)")[1].split("--- thread")[0]
    # rank 0's training thread is inside the backward pass, where DDP's reducer waits for rank 1's gradients
    assert "in _engine_run_backward" in waiting and "in training_step" not in waiting, waiting
    lines = out.splitlines()
    assert sum(line.startswith("lightning-monitor: ALERT stalled at step 3") for line in lines) == 1, out
    assert sum(line.startswith("lightning-monitor: progress resumed") for line in lines) == 1, out
    (record,) = [json.loads(line) for line in open(run_dir / "alerts.jsonl", encoding="utf-8")]
    assert (record["rule"], record["step"], record["action"]) == ("stalled", 3, "warn")
    assert "forward/backward" in record["message"]
    assert tb_scalars(run_dir, "health/stalled") == [(3, 1.0), (4, 0.0)]
    (run,) = find_runs(str(tmp_path / "runs"))
    assert run.exit_code == 0 and run.series("health/stalled") == [(3, 1), (4, 0)]
    # the run finished with every step logged: the model's loss at every logging step
    assert [s for s, _ in tb_scalars(run_dir, "train/loss")] == [1, 3, 5, 7]
