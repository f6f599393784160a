"""Every monitor together under DDP on 2 CPU processes: the job finishes; an exception on one rank, or a run
directory in use, ends the whole job with its error and leaves no process behind."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time

import psutil
import pytest
from helpers import (
    event_files,
    find_runs,
    tb_accumulator,
)

DDP_JOB = '''
import os, sys
from datetime import timedelta
sys.path.insert(0, {tests!r})
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DDPStrategy
from helpers import TinyImageModel, image_loader, make_trainer
from lightning_monitor import GradientMonitor, MemoryMonitor, MultiLogger, PredictionGridMonitor, SpeedMonitor

class FailOnRankOne(Callback):
    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if {fail_at} >= 0 and trainer.global_rank == 1 and trainer.global_step == {fail_at}:
            raise RuntimeError("boom on rank 1")

if __name__ == "__main__":
    logger = MultiLogger(save_dir={runs!r}, name="ddp", version={version!r})
    callbacks = [GradientMonitor(), MemoryMonitor(), SpeedMonitor(), PredictionGridMonitor(num_samples=8),
                 FailOnRankOne()]
    trainer = make_trainer({root!r}, logger=logger, strategy=DDPStrategy(timeout=timedelta(seconds=20)), devices=2,
                           max_steps=8, log_every_n_steps=2, callbacks=callbacks, limit_val_batches=2)
    trainer.fit(TinyImageModel(), image_loader(n=256), image_loader(n=64))
    os.write(1, ("RANK %d DONE\\n" % trainer.global_rank).encode())  # one write: the ranks share stdout
'''


def _ddp_job(tmp_path, fail_at, version=None):
    script = tmp_path / "ddp_job.py"
    script.write_text(DDP_JOB.format(tests=os.path.dirname(__file__), runs=str(tmp_path / "runs"), root=str(tmp_path),
                                     fail_at=fail_at, version=version))
    started = time.monotonic()
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, capture_output=True, text=True, timeout=170)
    elapsed = time.monotonic() - started
    time.sleep(1)
    orphans = [p for p in psutil.process_iter(["cmdline"]) if str(script) in " ".join(p.info["cmdline"] or [])]
    return proc, elapsed, orphans


@pytest.mark.timeout(180)
def test_ddp_all_monitors_together_finish(tmp_path):
    proc, _, orphans = _ddp_job(tmp_path, fail_at=-1)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANK 0 DONE" in proc.stdout and "RANK 1 DONE" in proc.stdout and not orphans
    run_dir = tmp_path / "runs" / "ddp" / "version_0"
    assert len(event_files(tmp_path / "runs")) == 1
    tags = tb_accumulator(run_dir).Tags()
    assert {"grad/norm_total", "memory/host/rss_gib_max_rank", "throughput/samples_per_sec", "time/straggler_ratio",
            "predictions/accuracy"} <= set(tags["scalars"])
    assert "predictions/grid" in tags["images"]
    (run,) = find_runs(run_dir)
    assert [s for s, _ in run.series("grad/norm_total")] == [1, 3, 5, 7]


@pytest.mark.timeout(180)
def test_ddp_exception_on_one_rank_ends_the_job_with_its_error(tmp_path):
    proc, elapsed, orphans = _ddp_job(tmp_path, fail_at=3)
    assert proc.returncode != 0
    assert "RuntimeError: boom on rank 1" in proc.stderr
    assert not orphans  # no rank left behind
    assert elapsed < 120  # ended by the failure, not by a collective waiting out its timeout


@pytest.mark.timeout(180)
def test_ddp_on_a_version_in_use_fails_on_rank_zero_and_ends_every_rank(tmp_path):
    """Under DDP only rank 0 takes the lock: with the run directory held by a live job (this test process), rank 0
    fails at start naming it and the whole job ends (no rank left waiting in a collective); rank 1 never reads the
    lock, so it never reports the directory in use itself."""
    from lightning_monitor._run import lock as _run_lock

    run_dir = tmp_path / "runs" / "ddp" / "version_0"
    run_dir.mkdir(parents=True)
    me = psutil.Process()
    (run_dir / _run_lock.LOCK_NAME).write_text(
        f'{{"host": "{socket.gethostname()}", "pid": {me.pid}, "started": {me.create_time()}, "since": "now"}}')
    proc, elapsed, orphans = _ddp_job(tmp_path, fail_at=-1, version=0)
    assert proc.returncode != 0 and not orphans
    assert proc.stderr.count(f"is in use by another job (host {socket.gethostname()}, pid {me.pid}") == 1
    assert "RANK 1 DONE" not in proc.stdout and elapsed < 150
    assert _run_lock.holder(str(run_dir))["pid"] == me.pid  # the holder's lock is left alone
    assert not event_files(run_dir)
