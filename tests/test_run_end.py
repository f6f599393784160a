"""How a run ends and what survives: kill -9, an exit without ``finalize``, Ctrl-C and SIGTERM, a training
exception while a backend fails, one backend failing to finalize, logging after ``finalize``, two fits in one
process.

Subprocess jobs run ``tests/reliability_job.py``; each is bounded by a timeout so a hang fails the test."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest
from helpers import (
    TinyImageModel,
    event_files,
    find_runs,
    image_loader,
    make_trainer,
    start_paced_job,
    tb_accumulator,
    tb_scalars,
    wait_for_step,
)
from lightning.pytorch.callbacks import Callback

from lightning_monitor import MultiLogger


def _steps_logged_before(progress, seconds_before):
    rows = [line.split() for line in progress.read_text().splitlines()]
    return [int(step) for step, t in rows if float(t) <= seconds_before]


@pytest.mark.timeout(240)
def test_kill_9_keeps_what_was_logged_seconds_before(tmp_path):
    proc, progress = start_paced_job(tmp_path)
    wait_for_step(proc, progress, 60)
    killed_at = time.time()
    proc.send_signal(signal.SIGKILL)
    proc.communicate(timeout=30)
    time.sleep(3)  # wandb's service, orphaned, writes what it had received
    expected = _steps_logged_before(progress, killed_at - 3.0)
    assert len(expected) >= 10
    run_dir = tmp_path / "runs" / "job" / "version_0"
    tb_steps = [s for s, _ in tb_scalars(run_dir, "train/loss")]
    assert tb_steps[: len(expected)] == expected
    (run,) = find_runs(run_dir, wait_finished=0)  # parses although the run never finished
    wandb_steps = [s for s, _ in run.series("train/loss")]
    assert wandb_steps[: len(expected)] == expected


def test_normal_exit_without_finalize_loses_nothing(tmp_path):
    code = (
        "from lightning_monitor import MultiLogger\n"
        f"logger = MultiLogger(save_dir={str(tmp_path)!r}, name='exit', tensorboard={{'flush_secs': 600}})\n"
        "for step in range(25):\n    logger.log_metrics({'x/value': float(step)}, step=step)\n"
    )
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    run_dir = tmp_path / "exit" / "version_0"
    assert [s for s, _ in tb_scalars(run_dir, "x/value")] == list(range(25))
    (run,) = find_runs(run_dir)
    assert [s for s, _ in run.series("x/value")] == list(range(25))


@pytest.mark.timeout(240)
@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["ctrl-c", "sigterm"])
def test_interrupt_flushes_both_and_marks_the_run_failed(tmp_path, sig):
    # no timed flush comes to the rescue; the signal comes while the job holds after step 10 (a Ctrl-C in a slow
    # step), and the job takes Ctrl-C even when this process ignores SIGINT (a shell's background job does)
    proc, progress = start_paced_job(tmp_path, "--flush-secs", "600", "--hold-at", "10", "--hold", "5")
    wait_for_step(proc, progress, 10)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    last = int(progress.read_text().split()[-2])
    run_dir = tmp_path / "runs" / "job" / "version_0"
    steps = [s for s, _ in tb_scalars(run_dir, "train/loss")]
    # flushed up to the last step (the batch in flight when the signal came may not have logged yet)
    assert steps == list(range(len(steps))) and len(steps) >= last
    tags = tb_accumulator(run_dir).Tags()["tensors"]
    assert "run/status/text_summary" in tags, (tags, err[-3000:])  # the job's own account, if it ever fails again
    status = tb_accumulator(run_dir).Tensors("run/status/text_summary")
    assert [t.tensor_proto.string_val[0] for t in status] == [b"failed"]
    (run,) = find_runs(run_dir)
    assert run.exit_code == 1  # wandb marks the run failed, not finished
    assert [s for s, _ in run.series("train/loss")] == steps
    if sig == signal.SIGTERM:
        assert proc.returncode == 0  # Lightning's own choice on SIGTERM; the run is still marked failed


def _break_the_event_file(log_dir):
    """TensorBoard's writer reopens its event file by path for every write: move the file aside and put a directory
    in its place, and every later write fails with IsADirectoryError (an OSError root cannot bypass)."""
    for path in event_files(log_dir):
        os.rename(path, path + ".moved")
        os.mkdir(path)


class _FailAfterBreakingTensorBoard(Callback):
    """At step ``at``: break TensorBoard's event file, then raise in the training loop."""

    def __init__(self, logger, at):
        self.logger, self.at = logger, at

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == self.at:
            _break_the_event_file(self.logger.log_dir)
            raise RuntimeError(f"boom at step {self.at}")


def test_training_exception_is_not_masked_by_a_failing_backend(tmp_path):
    """Training raises while TensorBoard's final flush fails: the training error is what fit raises, and wandb is
    still finished (marked failed) although TensorBoard's finalize failed first."""
    logger = MultiLogger(save_dir=tmp_path, name="mask")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=10, log_every_n_steps=1,
                           callbacks=[_FailAfterBreakingTensorBoard(logger, at=3)])
    with pytest.warns(UserWarning, match=r"MultiLogger.finalize\('failed'\): TensorBoard could not finish \(IsADir"):
        with pytest.raises(RuntimeError, match="boom at step 3"):
            trainer.fit(TinyImageModel(), image_loader(n=256))
    (run,) = find_runs(logger.log_dir)
    # step 3 raised before Lightning logged its loss
    assert run.exit_code == 1 and [s for s, _ in run.series("train/loss")] == [0, 1, 2]


def test_one_backend_failing_to_finalize_does_not_stop_the_other(tmp_path):
    logger = MultiLogger(save_dir=tmp_path, name="fin")
    for step in range(3):
        logger.log_metrics({"x/value": float(step)}, step=step)
    _break_the_event_file(logger.log_dir)
    logger.log_metrics({"x/value": 3.0}, step=3)  # queued for TensorBoard's writer thread, which will fail
    with pytest.warns(UserWarning, match="could not finish") as record:  # never raised: fit must return
        logger.finalize("success")
    (warning,) = [str(w.message) for w in record if "could not finish" in str(w.message)]
    assert warning.startswith("MultiLogger.finalize('success'): TensorBoard could not finish (IsADirectoryError")
    assert f"TensorBoard's files are in {os.path.abspath(logger.log_dir)}, perhaps without their last" in warning
    (run,) = find_runs(logger.log_dir)  # ... and wandb was finished all the same, with every value
    assert run.exit_code == 0 and run.series("x/value") == [(s, float(s)) for s in range(4)]


def test_logging_after_finalize_continues_the_run_in_both(tmp_path):
    """Documented behaviour: a write after ``finalize`` (what ``test`` after ``fit`` does) reopens both backends on
    the same run: TensorBoard in a new event file of the same directory, wandb as a new segment of the same run;
    the run directory's lock is taken again and released at the next finalize."""
    from lightning_monitor._run import lock as _run_lock

    logger = MultiLogger(save_dir=tmp_path, name="after")
    logger.log_metrics({"x/v": 0.0}, step=0)
    logger.finalize("success")
    assert _run_lock.holder(logger.log_dir) is None
    logger.log_metrics({"x/v": 1.0}, step=1)
    assert _run_lock.holder(logger.log_dir)["pid"] == os.getpid()
    logger.finalize("success")
    assert _run_lock.holder(logger.log_dir) is None
    assert tb_scalars(logger.log_dir, "x/v") == [(0, 0.0), (1, 1.0)] and len(event_files(logger.log_dir)) == 2
    runs = find_runs(logger.log_dir)
    assert len(runs) == 2 and len({r.run_id for r in runs}) == 1  # two segments of one wandb run
    assert sorted(p for r in runs for p in r.series("x/v")) == [(0, 0.0), (1, 1.0)]


def test_two_fits_two_runs_and_no_environment_leak(tmp_path):
    before = dict(os.environ)
    loggers = []
    for _ in range(2):
        logger = MultiLogger(save_dir=tmp_path, name="twice")
        make_trainer(tmp_path, logger=logger, max_steps=2, log_every_n_steps=1).fit(TinyImageModel(), image_loader())
        loggers.append(logger)
    assert dict(os.environ) == before
    runs = find_runs(tmp_path / "twice")
    assert sorted(r.run_id for r in runs) == sorted(lg.run_id for lg in loggers)
    assert loggers[0].run_id != loggers[1].run_id
    assert all(len(r.series("train/loss")) == 2 for r in runs)
