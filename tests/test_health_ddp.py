"""HealthMonitor under DDP on 2 CPU processes (gloo): a ``stop`` rule ends both ranks at the same step, every backend
finalized, the alert written once (rank 0), with no hang."""

from __future__ import annotations

import json
import os

import pytest
from helpers import find_runs, run_ddp_script, tb_scalars

DDP_JOB = '''
import math, os, sys
from datetime import timedelta
sys.path.insert(0, {tests!r})
import torch
from torch.nn import functional as F
from lightning.pytorch.strategies import DDPStrategy
from helpers import TinyImageModel, image_loader, make_trainer
from lightning_monitor import GradientMonitor, HealthMonitor, MultiLogger, SpeedMonitor

class NanAt4(TinyImageModel):
    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.nll_loss(self(x), y)
        if self.global_step == 4:
            loss = loss * math.nan  # on every rank
        self.log("train/loss", loss)
        return loss

if __name__ == "__main__":
    logger = MultiLogger(save_dir="runs", name="ddp")
    # the straggler rule is left out: on a loaded 2-core machine one process of two may well lag for 3 windows
    health = HealthMonitor(actions={{"nonfinite_loss": "stop"}}, disable=["straggler"])
    trainer = make_trainer(".", logger=logger, strategy=DDPStrategy(timeout=timedelta(seconds=30)), devices=2,
                           max_steps=20, log_every_n_steps=2, limit_val_batches=0,
                           callbacks=[GradientMonitor(), SpeedMonitor(), health])
    trainer.fit(NanAt4(), image_loader(n=256))
    line = "RANK %d STEP %d STOP %s ALERTS %d LOGGERS %d\\n" % (
        trainer.global_rank, trainer.global_step, trainer.should_stop, len(health.alerts), len(trainer.loggers))
    os.write(1, line.encode())  # one write: the ranks share stdout
'''


@pytest.mark.timeout(200)
def test_stop_under_ddp_ends_both_ranks_at_the_same_step(tmp_path):
    proc = run_ddp_script(tmp_path, "health_ddp.py", DDP_JOB.format(tests=os.path.dirname(__file__)))
    # rank 0 judged step 5 when Lightning handed the loggers its values (the end of batch 5, every rank) and
    # broadcast its decision there: both ranks stop after batch 5, the alerting logging step
    assert "RANK 0 STEP 6 STOP True ALERTS 2 LOGGERS 1" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    assert "RANK 1 STEP 6 STOP True ALERTS 0 LOGGERS 1" in proc.stdout, proc.stdout + proc.stderr[-3000:]
    lines = proc.stdout.splitlines()
    assert lines.count("lightning-monitor: ALERT nonfinite_loss at step 5: the training loss is"
                       " NaN/Inf (train/loss = nan)") == 1, lines  # one terminal line, from rank 0
    assert sum(line.startswith("lightning-monitor: HealthMonitor stops the fit") for line in lines) == 1, lines
    run_dir = tmp_path / "runs" / "ddp" / "version_0"
    with open(run_dir / "alerts.jsonl", encoding="utf-8") as f:
        records = [json.loads(line) for line in f]
    assert [(r["step"], r["rule"], r["action"]) for r in records] == [
        (5, "nonfinite_loss", "stop"), (5, "nonfinite_grad", "warn")]
    assert tb_scalars(run_dir, "health/alerts")[0] == (5, 2.0)
    (run,) = find_runs(run_dir)
    assert run.exit_code == 0  # finalized
    assert run.series("health/nonfinite_loss")[0] == (5, 1)
    assert max(step for step, _ in run.series("train/loss")) == 5  # nothing trained past the alerting step
