"""One job per run directory: a second job on a version in use fails at start naming the first; a lock left by
kill -9, a reused pid or a dead host (no heartbeat) is stale.

Subprocess jobs run ``tests/reliability_job.py``; each is bounded by a timeout so a hang fails the test."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
from helpers import (
    RELIABILITY_JOB,
    event_files,
    find_runs,
    run_reliability_job,
    start_paced_job,
    tb_scalars,
    wait_for_step,
)

from lightning_monitor import MultiLogger


@pytest.mark.timeout(240)
def test_a_second_job_on_a_version_in_use_fails_at_start_naming_the_first(tmp_path):
    """Two real processes on one version: the second fails before its first step with an error naming the first
    job's host and pid and how to choose another version; the first job's run is untouched."""
    first, progress = start_paced_job(tmp_path)
    wait_for_step(first, progress, 3)
    second_progress = tmp_path / "second.txt"
    proc = subprocess.run(
        [sys.executable, RELIABILITY_JOB, "--runs", str(tmp_path / "runs"), "--version", "0", "--steps", "3",
         "--progress", str(second_progress)],
        cwd=tmp_path, capture_output=True, text=True, timeout=150,
    )
    first.send_signal(signal.SIGINT)
    first.communicate(timeout=90)
    assert proc.returncode != 0
    assert "RunDirectoryInUseError" in proc.stderr
    assert f"host {socket.gethostname()}, pid {first.pid}" in proc.stderr and "another `version=`" in proc.stderr
    assert not second_progress.exists()  # failed before its first training step
    run_dir = tmp_path / "runs" / "job" / "version_0"
    assert len(event_files(run_dir)) == 1  # the second job opened no event file
    steps = [s for s, _ in tb_scalars(run_dir, "train/loss")]
    assert steps == list(range(len(steps))) and len(steps) >= 4
    (run,) = find_runs(run_dir)
    assert [s for s, _ in run.series("train/loss")] == steps  # no second segment in the wandb run


@pytest.mark.timeout(240)
def test_a_killed_jobs_lock_does_not_block_its_restart(tmp_path):
    """kill -9 leaves the lock file behind; the restart on the same version sees its pid gone and takes over."""
    from lightning_monitor._run import lock as _run_lock

    first, progress = start_paced_job(tmp_path)
    wait_for_step(first, progress, 2)
    run_dir = tmp_path / "runs" / "job" / "version_0"
    assert _run_lock.holder(str(run_dir))["pid"] == first.pid
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert _run_lock.holder(str(run_dir))["pid"] == first.pid  # left behind
    proc, _ = run_reliability_job(tmp_path, "--version", "0", "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "JOB DONE" in proc.stdout
    assert _run_lock.holder(str(run_dir)) is None  # released at the end of the restarted job


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    """A lock written by a job on another host blocks while its heartbeat is fresh, and not once it is older than
    STALE_SEC (the file's mtime set back, as a dead host's lock ages)."""
    from lightning_monitor._run import lock as _run_lock

    run_dir = tmp_path / "lk" / "version_0"
    run_dir.mkdir(parents=True)
    lock = run_dir / _run_lock.LOCK_NAME
    lock.write_text('{"host": "node-17.cluster", "pid": 4242, "started": 1.0, "since": "earlier"}')
    logger = MultiLogger(save_dir=tmp_path, name="lk", version=0)
    with pytest.raises(_run_lock.RunDirectoryInUseError, match=r"host node-17\.cluster, pid 4242"):
        logger.log_metrics({"x/v": 1.0}, step=0)
    old = time.time() - _run_lock.STALE_SEC - 10
    os.utime(lock, (old, old))
    logger.log_metrics({"x/v": 1.0}, step=0)
    assert _run_lock.holder(logger.log_dir)["pid"] == os.getpid()
    logger.finalize("success")
    assert not lock.exists()
    assert tb_scalars(logger.log_dir, "x/v") == [(0, 1.0)]


def test_a_reused_pid_does_not_hold_the_lock(tmp_path):
    """A lock naming a pid that now belongs to a process started after the lock (pid reuse) is stale."""
    from lightning_monitor._run import lock as _run_lock

    run_dir = tmp_path / "pid" / "version_0"
    run_dir.mkdir(parents=True)
    parent = os.getppid()  # alive, started before this test: recorded as started earlier than it did -> reused
    (run_dir / _run_lock.LOCK_NAME).write_text(
        f'{{"host": "{socket.gethostname()}", "pid": {parent}, "started": 1.0, "since": "long ago"}}')
    logger = MultiLogger(save_dir=tmp_path, name="pid", version=0, wandb=False)
    logger.log_metrics({"x/v": 1.0}, step=0)
    logger.finalize("success")
    (run_dir / _run_lock.LOCK_NAME).write_text(
        f'{{"host": "{socket.gethostname()}", "pid": {parent}, "started": {psutil.Process(parent).create_time()},'
        ' "since": "now"}')
    with pytest.raises(_run_lock.RunDirectoryInUseError, match=f"pid {parent}"):
        MultiLogger(save_dir=tmp_path, name="pid", version=0, wandb=False).log_metrics({"x/v": 2.0}, step=1)
