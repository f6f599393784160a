"""The disk and the run directory failing: full before training, filling up mid-run (RLIMIT_FSIZE and a real
4 MiB tmpfs), a damaged event file of an earlier run, the run directory deleted, and tensorboardX (which hangs
training on a full disk) refused.

Subprocess jobs run ``tests/reliability_job.py``; each is bounded by a timeout so a hang fails the test."""

from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
import time
import warnings

import numpy as np
import pytest
from helpers import (
    event_files,
    run_reliability_job,
    tb_accumulator,
    tb_scalars,
)

from lightning_monitor import MultiLogger


@pytest.mark.timeout(200)
def test_full_disk_before_training_is_one_clear_error(tmp_path):
    """RLIMIT_FSIZE=40 bytes: even the event file's header cannot be written. The job fails before the first step
    with an error naming the run directory, not Lightning's 'you tried to log ...'."""
    progress = tmp_path / "progress.txt"
    proc, run_dir = run_reliability_job(tmp_path, "--no-wandb", "--fsize-limit", "40", "--progress", str(progress))
    assert proc.returncode != 0
    assert f"TensorBoard cannot write to {run_dir}: File too large" in proc.stderr
    assert "you tried to log" not in proc.stderr
    assert not progress.exists()  # no training step ran


@pytest.mark.timeout(200)
def test_disk_filling_up_mid_run_stops_tensorboard_not_training(tmp_path):
    proc, run_dir = run_reliability_job(tmp_path, "--no-wandb", "--steps", "40", "--fsize-limit", "2000",
                                        "--flush-secs", "0.01")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "JOB DONE" in proc.stdout
    messages = [line for line in proc.stderr.splitlines() if f"TensorBoard cannot write to {run_dir}" in line]
    assert len(messages) == 1 and "File too large" in messages[0] and "training goes on" in messages[0]
    steps = [s for s, _ in tb_scalars(run_dir, "train/loss")]
    assert steps and steps == list(range(len(steps))) and len(steps) < 40  # what fitted is intact and readable


def test_damaged_event_file_is_never_touched(tmp_path):
    run_dir = tmp_path / "dmg" / "version_0"
    run_dir.mkdir(parents=True)
    damaged = run_dir / "events.out.tfevents.1000000000.oldhost.1.0"
    damaged.write_bytes(b"\x00\x13garbage that is not a TFRecord" * 10)
    digest = hashlib.sha256(damaged.read_bytes()).hexdigest()
    logger = MultiLogger(save_dir=tmp_path, name="dmg", version=0, wandb=False)
    for step in range(3):
        logger.log_metrics({"ok/value": float(step)}, step=step)
    logger.finalize("success")
    assert hashlib.sha256(damaged.read_bytes()).hexdigest() == digest
    assert len(event_files(run_dir)) == 2
    assert tb_scalars(run_dir, "ok/value") == [(0, 0.0), (1, 1.0), (2, 2.0)]


@pytest.fixture
def small_disk(tmp_path):
    """A real 4 MiB filesystem (tmpfs), mounted for the test; skipped where mounting is not permitted."""
    mount = tmp_path / "small"
    mount.mkdir()
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=4m", "tmpfs", str(mount)], capture_output=True,
                          text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here ({proc.stderr.strip() or proc.returncode}): needs root")
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=False)


def _fill(path, leave=0):
    """Write zeros into ``path`` until the disk has at most ``leave`` bytes free (all of it when 0)."""
    with open(path, "ab") as f:
        while True:
            free = shutil.disk_usage(os.path.dirname(path)).free
            if leave and free <= leave:
                return
            try:
                f.write(b"\0" * min(65536, max(4096, free - leave) if leave else 65536))
                f.flush()
            except OSError:
                return


def test_a_disk_filling_up_is_told_early_then_truthfully(small_disk, monkeypatch):
    """On a real 4 MiB filesystem: one warning when free space drops under a tenth of the disk (naming the run
    directory), and when the disk is full one warning saying that TensorBoard AND wandb's offline run (stored in the
    same directory) keep nothing more, never that wandb keeps logging. Training-side calls never raise."""
    from lightning_monitor._run import disk as _disk

    monkeypatch.setattr(_disk, "CHECK_EVERY_SEC", 0.0)  # look at every write instead of every 10 s
    logger = MultiLogger(save_dir=small_disk, name="disk", tensorboard={"flush_secs": 0.01})
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(5):
            logger.log_metrics({"x/v": float(step)}, step=step)
        assert not [w for w in record if "disk" in str(w.message)]  # 4 MiB free of 4 MiB: nothing to say
        _fill(str(small_disk / "filler"), leave=300_000)
        for step in range(5, 10):
            logger.log_metrics({"x/v": float(step)}, step=step)
        low = [str(w.message) for w in record if "almost full" in str(w.message)]
        assert len(low) == 1 and logger.log_dir in low[0]
        _fill(str(small_disk / "filler"))
        for step in range(10, 400):
            logger.log_metrics({"x/v": float(step)}, step=step)
            if logger._tb_writer.failed:
                break
        logger.finalize("success")
    texts = [str(w.message) for w in record]
    full = [t for t in texts if "is full;" in t]
    assert len(full) == 1, "\n".join(texts)
    assert f"The disk of the run directory {logger.log_dir} is full" in full[0]
    assert "TensorBoard keeps nothing more" in full[0] and "wandb's offline run lives in that directory" in full[0]
    assert not [t for t in texts if "keeps logging" in t]
    assert logger._tb_writer.failed and logger._wandb_writer.failed


def test_a_deleted_run_directory_is_told_and_never_recreated(tmp_path):
    logger = MultiLogger(save_dir=tmp_path, name="gone")
    for step in range(3):
        logger.log_metrics({"x/v": float(step)}, step=step)
    for _ in range(50):  # like `rm -rf`, again while the backends' writer threads still add files to it
        shutil.rmtree(logger.log_dir, ignore_errors=True)
        if not os.path.exists(logger.log_dir):
            break
        time.sleep(0.05)
    assert not os.path.exists(logger.log_dir)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        for step in range(3, 30):
            logger.log_metrics({"x/v": float(step)}, step=step)
            logger.log_image("img/x", np.zeros((4, 4, 3), np.uint8), step=step)
        logger.finalize("success")
    texts = [str(w.message) for w in record if "deleted" in str(w.message)]
    assert len(texts) == 1 and f"The run directory {logger.log_dir} was deleted" in texts[0]
    assert "wandb's offline run lives in that directory and keeps nothing more" in texts[0]
    assert not os.path.exists(logger.log_dir)  # neither the ledger, nor a writer, nor the lock re-created it


WITHOUT_TENSORBOARD = '''
import importlib.metadata as md, sys
sys.path.insert(0, {tests!r})
real_version = md.version
def version(name):  # what importlib.metadata says when the `tensorboard` distribution is not installed
    if name.lower() == "tensorboard":
        raise md.PackageNotFoundError(name)
    return real_version(name)
md.version = version
class NoTensorBoard:  # and its modules cannot be imported
    def find_spec(self, name, path=None, target=None):
        if name == "tensorboard" or name.startswith("tensorboard."):
            raise ModuleNotFoundError(f"No module named {{name!r}}")
sys.meta_path.insert(0, NoTensorBoard())
from lightning.pytorch.loggers import TensorBoardLogger
from helpers import TinyImageModel, image_loader, make_trainer
from lightning_monitor import GradientMonitor, MultiLogger
if {plain!r}:
    trainer = make_trainer({root!r}, logger=TensorBoardLogger({root!r}), callbacks=[GradientMonitor()], max_steps=2)
    trainer.fit(TinyImageModel(), image_loader())
else:
    MultiLogger(save_dir={root!r}, wandb=False)
'''


@pytest.mark.parametrize("plain", [False, True], ids=["multilogger", "plain-tensorboardlogger"])
def test_tensorboardx_is_refused_with_the_fix(tmp_path, plain):
    """Without the `tensorboard` package Lightning's TensorBoardLogger would write through tensorboardX (which
    hangs training on a full disk): MultiLogger refuses at construction, a monitor with a plain TensorBoardLogger at
    setup (before the first step), both naming `pip install tensorboard`."""
    if plain:
        pytest.importorskip("tensorboardX", reason="Lightning refuses a TensorBoardLogger with neither package")
    code = WITHOUT_TENSORBOARD.format(tests=os.path.dirname(__file__), root=str(tmp_path), plain=plain)
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=150)
    assert proc.returncode != 0
    assert "ModuleNotFoundError" in proc.stderr and "`pip install tensorboard`" in proc.stderr, proc.stderr[-3000:]
    assert "tensorboardX" in proc.stderr
    # no training step ran (Lightning makes the plain logger's writer, an empty event file, before callbacks' setup)
    assert all(not tb_accumulator(os.path.dirname(f)).Tags()["scalars"] for f in event_files(tmp_path))
    assert plain or not event_files(tmp_path)
