"""Faults injected for real (bad values, broken backends, killed processes, signals) and what survives them.

Subprocess jobs run ``tests/reliability_job.py``; each is bounded by a timeout so a hang fails the test.
"""

from __future__ import annotations

import hashlib
import io
import math
import os
import pty
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import warnings

import numpy as np
import psutil
import pytest
import torch
from lightning.pytorch.callbacks import Callback
from PIL import Image

from helpers import free_port, TinyImageModel, event_files, find_runs, image_loader, make_trainer, tb_accumulator, tb_scalars
from lightning_monitor import MultiLogger

JOB = os.path.join(os.path.dirname(__file__), "reliability_job.py")


def run_job(tmp_path, *args, env=None, timeout=150, **popen):
    runs = tmp_path / "runs"
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, JOB, "--runs", str(runs), *args], cwd=tmp_path, env=full_env,
        capture_output=True, text=True, timeout=timeout, **popen,
    )
    return proc, runs / "job" / "version_0"


# ---------------------------------------------------------------------------------------------- bad values
def test_non_finite_scalars_reach_both_backends(tmp_path):
    logger = MultiLogger(save_dir=tmp_path, name="nf")
    logger.log_metrics({"v/nan": float("nan"), "v/inf": torch.tensor(float("inf")), "v/ninf": -np.inf}, step=3)
    logger.finalize("success")
    acc = tb_accumulator(logger.log_dir)
    assert math.isnan(acc.Scalars("v/nan")[0].value)
    assert acc.Scalars("v/inf")[0].value == math.inf and acc.Scalars("v/ninf")[0].value == -math.inf
    (run,) = find_runs(logger.log_dir)
    assert math.isnan(run.series("v/nan")[0][1])
    assert run.series("v/inf") == [(3, math.inf)] and run.series("v/ninf") == [(3, -math.inf)]


def test_half_precision_values_keep_their_value(tmp_path):
    big_bf16 = torch.tensor(1e30, dtype=torch.bfloat16)  # fp16 would overflow this to inf
    fp16 = torch.tensor(60000.0, dtype=torch.float16)
    logger = MultiLogger(save_dir=tmp_path, name="half")
    logger.log_metrics({"v/bf16": big_bf16, "v/fp16": fp16}, step=0)
    logger.log_histogram("v/hist", torch.tensor([1e30, -1e30, 0.0], dtype=torch.bfloat16), step=0, bins=2)
    logger.finalize("success")
    expected = float(big_bf16.float())
    acc = tb_accumulator(logger.log_dir)
    assert acc.Scalars("v/bf16")[0].value == pytest.approx(expected, rel=1e-6)
    assert acc.Scalars("v/fp16")[0].value == 60000.0
    hist = acc.Histograms("v/hist")[0].histogram_value
    assert list(hist.bucket) == [1, 2] and math.isfinite(hist.max) and hist.max == pytest.approx(expected, rel=1e-6)
    (run,) = find_runs(logger.log_dir)
    assert run.series("v/bf16")[0][1] == pytest.approx(expected, rel=1e-6)
    assert run.series("v/fp16") == [(0, 60000.0)]


RAMP = np.arange(12 * 16).reshape(12, 16)  # distinct values so a wrong scaling cannot go unnoticed
IMAGE_CASES = {
    # name: (image as logged, the uint8 picture it must become, computed here independently)
    "uint8_hwc_rgb": (np.stack([RAMP % 256] * 3, axis=2).astype(np.uint8), np.stack([RAMP % 256] * 3, 2)),
    "float01_chw_rgb": (torch.tensor(RAMP / RAMP.max()).expand(3, 12, 16).float(), np.stack([np.round(RAMP / RAMP.max() * 255)] * 3, 2)),
    "normalised_float_grey": (torch.tensor((RAMP - 95.5) / 50.0).float()[None], np.round(RAMP / RAMP.max() * 255)[:, :, None]),
    "int64_0_255_grey": (torch.tensor(RAMP % 200), (RAMP % 200)[:, :, None]),
    "int32_wide_range": (torch.tensor(RAMP * 1000, dtype=torch.int32), np.round(RAMP / RAMP.max() * 255)[:, :, None]),
    "bool_mask": (torch.tensor(RAMP % 2 == 0), ((RAMP % 2 == 0) * 255)[:, :, None]),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_images_become_the_same_picture_in_both(tmp_path, case):
    image, expected = IMAGE_CASES[case]
    expected = np.asarray(expected, dtype=np.uint8)
    expected_rgb = np.repeat(expected, 3, axis=2) if expected.shape[2] == 1 else expected
    logger = MultiLogger(save_dir=tmp_path, name="img")
    logger.log_image("img/x", image, step=1, caption=case)
    logger.finalize("success")
    encoded = tb_accumulator(logger.log_dir).Images("img/x")[0].encoded_image_string
    tb_png = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    assert np.array_equal(tb_png, expected_rgb)
    (run,) = find_runs(logger.log_dir)
    ((_, meta),) = run.series("img/x")
    wandb_png = np.asarray(Image.open(os.path.join(os.path.dirname(run.path), "files", meta["path"])).convert("RGB"))
    assert np.array_equal(wandb_png, expected_rgb) and meta["caption"] == case


def test_unsupported_image_shape_is_named(tmp_path):
    logger = MultiLogger(save_dir=tmp_path, wandb=False)
    with pytest.raises(ValueError, match=r"image 'img/batch' has shape \(4, 3, 8, 8\)"):
        logger.log_image("img/batch", torch.zeros(4, 3, 8, 8), step=0)
    with pytest.raises(ValueError, match=r"image 'img/odd' has shape \(8, 8, 7\)"):
        logger.log_image("img/odd", torch.zeros(8, 8, 7), step=0)


# ---------------------------------------------------------------------------------------------- wandb faults
def _assert_trained_offline(proc, run_dir, steps):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "JOB DONE" in proc.stdout
    assert [s for s, _ in tb_scalars(run_dir, "train/loss")] == list(range(steps))  # TensorBoard kept every step
    (run,) = find_runs(run_dir)
    assert [s for s, _ in run.series("train/loss")] == list(range(steps))


@pytest.mark.timeout(200)
def test_no_api_key_without_a_terminal_runs_offline(tmp_path):
    proc, run_dir = run_job(tmp_path, "--steps", "3", stdin=subprocess.DEVNULL)
    _assert_trained_offline(proc, run_dir, 3)
    messages = [line for line in (proc.stdout + proc.stderr).splitlines() if "wandb is logging offline" in line]
    assert len(messages) == 1 and "no W&B API key" in messages[0] and "wandb sync " in messages[0]


@pytest.mark.timeout(200)
def test_no_api_key_with_a_terminal_never_prompts(tmp_path):
    """On a real terminal wandb would ask for a key; ours must go offline without asking."""
    master, slave = pty.openpty()
    output = []
    reader = threading.Thread(target=lambda: _drain(master, output), daemon=True)
    reader.start()
    try:
        proc = subprocess.run(
            [sys.executable, JOB, "--runs", str(tmp_path / "runs"), "--steps", "3"],
            cwd=tmp_path, stdin=slave, stdout=slave, stderr=slave, timeout=150,
        )
    finally:
        os.close(slave)
    reader.join(timeout=5)
    text = b"".join(output).decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert "JOB DONE" in text and "wandb is logging offline" in text
    assert "API key" not in text.replace("no W&B API key", "")  # no prompt for one
    (run,) = find_runs(tmp_path / "runs")
    assert [s for s, _ in run.series("train/loss")] == [0, 1, 2]


def _drain(fd, out):
    while True:
        try:
            chunk = os.read(fd, 4096)
        except OSError:
            return
        if not chunk:
            return
        out.append(chunk)


@pytest.mark.timeout(200)
def test_unreachable_server_runs_offline(tmp_path):
    env = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{free_port()}"}
    proc, run_dir = run_job(tmp_path, "--steps", "3", env=env)
    _assert_trained_offline(proc, run_dir, 3)
    assert "did not answer (URLError" in proc.stdout + proc.stderr


@pytest.mark.timeout(240)
def test_silent_server_costs_a_bounded_wait_then_offline(tmp_path):
    """A server that accepts connections and never answers: the 2 s HTTP probe before the start says so, and the
    run is offline from the start, under the same id, within a few seconds."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(64)
    held = []
    threading.Thread(target=lambda: [held.append(server.accept()) for _ in iter(int, 1)], daemon=True).start()
    env = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": f"http://127.0.0.1:{server.getsockname()[1]}"}
    started = time.monotonic()
    proc, run_dir = run_job(tmp_path, "--steps", "3", "--wandb-settings", "init_timeout=5", env=env)
    took = time.monotonic() - started
    server.close()
    _assert_trained_offline(proc, run_dir, 3)
    text = proc.stdout + proc.stderr
    assert "did not answer (" in text and "wandb is logging offline" in text
    assert took < 60  # the whole job; the probe itself gives up after 2 s
    (run,) = find_runs(run_dir)
    assert run.run_id.startswith("job-version_0-")


@pytest.fixture
def fresh_wandb_service():
    """A test that kills wandb's service leaves this process's connection to it dead; drop it afterwards so that
    the next test's plain ``WandbLogger`` starts a new service (MultiLogger does that by itself)."""
    yield
    import wandb

    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - the service is dead: there is nothing to tell it
        pass


class KillWandbService(Callback):
    """Kills wandb's service process at step 3, as a crash or an OOM kill would."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            for child in psutil.Process().children(recursive=True):
                if child.name().startswith("wandb"):
                    child.kill()
            time.sleep(0.5)


@pytest.mark.timeout(120)
def test_wandb_service_dying_mid_run(tmp_path, fresh_wandb_service):
    """Kill wandb's service process at step 3: training goes on, TensorBoard keeps every step, one message."""
    logger = MultiLogger(save_dir=tmp_path, name="svc")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=8, log_every_n_steps=1, callbacks=[KillWandbService()])
    with pytest.warns(UserWarning, match="wandb stopped working") as record:
        trainer.fit(TinyImageModel(), image_loader(n=128))
    assert sum("wandb stopped working" in str(w.message) for w in record) == 1
    assert [s for s, _ in tb_scalars(logger.log_dir, "train/loss")] == list(range(8))
    (run,) = find_runs(logger.log_dir, wait_finished=0)  # whatever the dead service wrote still parses
    assert run.exit_code is None


@pytest.mark.timeout(120)
def test_plain_logger_list_gets_the_same_isolation(tmp_path, fresh_wandb_service):
    """A plain ``[TensorBoardLogger, WandbLogger]`` list, wandb's service killed at step 3: Lightning's own
    ``self.log`` and the monitor's values both keep reaching TensorBoard at every step; one warning."""
    from lightning.pytorch.loggers import TensorBoardLogger, WandbLogger

    from lightning_monitor import GradientMonitor

    tb = TensorBoardLogger(tmp_path, name="tb")
    wb = WandbLogger(save_dir=str(tmp_path), mode="offline", project="plain")
    trainer = make_trainer(tmp_path, logger=[tb, wb], max_steps=8, log_every_n_steps=1,
                           callbacks=[KillWandbService(), GradientMonitor(histograms=False)])
    with pytest.warns(UserWarning, match="wandb stopped working") as record:
        trainer.fit(TinyImageModel(), image_loader(n=128))
    assert sum("stopped working" in str(w.message) for w in record) == 1
    assert "TensorBoard keeps logging" in next(str(w.message) for w in record if "stopped" in str(w.message))
    tb.experiment.flush()
    assert [s for s, _ in tb_scalars(tb.log_dir, "train/loss")] == list(range(8))
    assert [s for s, _ in tb_scalars(tb.log_dir, "grad/norm_total")] == list(range(8))
    (run,) = find_runs(str(tmp_path / "wandb"), wait_finished=0)  # whatever the dead service wrote still parses
    assert run.exit_code is None


# ---------------------------------------------------------------------------------------------- TensorBoard faults
@pytest.mark.timeout(200)
def test_full_disk_before_training_is_one_clear_error(tmp_path):
    """RLIMIT_FSIZE=40 bytes: even the event file's header cannot be written. The job fails before the first step
    with an error naming the run directory, not Lightning's 'you tried to log ...'."""
    progress = tmp_path / "progress.txt"
    proc, run_dir = run_job(tmp_path, "--no-wandb", "--fsize-limit", "40", "--progress", str(progress))
    assert proc.returncode != 0
    assert f"TensorBoard cannot write to {run_dir}: File too large" in proc.stderr
    assert "you tried to log" not in proc.stderr
    assert not progress.exists()  # no training step ran


@pytest.mark.timeout(200)
def test_disk_filling_up_mid_run_stops_tensorboard_not_training(tmp_path):
    proc, run_dir = run_job(tmp_path, "--no-wandb", "--steps", "40", "--fsize-limit", "2000", "--flush-secs", "0.01")
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


# ---------------------------------------------------------------------------------------------- crashes, signals
def _start_paced_job(tmp_path, *extra):
    progress = tmp_path / "progress.txt"
    proc = subprocess.Popen(
        [sys.executable, JOB, "--runs", str(tmp_path / "runs"), "--steps", "400", "--sleep", "0.1",
         "--progress", str(progress), *extra],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return proc, progress


def _wait_for_step(proc, progress, step, timeout=120):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = progress.read_text().split() if progress.exists() else []
        if len(lines) >= 2 * (step + 1):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"job did not reach step {step}")


def _steps_logged_before(progress, seconds_before):
    rows = [line.split() for line in progress.read_text().splitlines()]
    return [int(step) for step, t in rows if float(t) <= seconds_before]


@pytest.mark.timeout(240)
def test_kill_9_keeps_what_was_logged_seconds_before(tmp_path):
    proc, progress = _start_paced_job(tmp_path)
    _wait_for_step(proc, progress, 60)
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
    proc, progress = _start_paced_job(tmp_path, "--flush-secs", "600")  # no timed flush comes to the rescue
    _wait_for_step(proc, progress, 10)
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=90)
    last = int(progress.read_text().split()[-2])
    run_dir = tmp_path / "runs" / "job" / "version_0"
    steps = [s for s, _ in tb_scalars(run_dir, "train/loss")]
    # flushed up to the last step (the batch in flight when the signal came may not have logged yet)
    assert steps == list(range(len(steps))) and len(steps) >= last
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
    with pytest.warns(UserWarning, match=r"MultiLogger.finalize\('failed'\): IsADirectoryError"):
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
    with pytest.raises(IsADirectoryError):  # after a successful run the backend's error is raised, not swallowed
        logger.finalize("success")
    (run,) = find_runs(logger.log_dir)  # ... and wandb was finished all the same, with every value
    assert run.exit_code == 0 and run.series("x/value") == [(s, float(s)) for s in range(4)]


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


# ---------------------------------------------------------------------------------------------- degenerate gradients
class _DegenerateModel(TinyImageModel):
    """`unused` never gets a gradient, `empty` has no elements, `poisoned` always gets an all-NaN gradient."""

    def __init__(self):
        super().__init__()
        self.unused = torch.nn.Parameter(torch.ones(3))
        self.empty = torch.nn.Parameter(torch.empty(0))
        self.poisoned = torch.nn.Parameter(torch.ones(4))

    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        return loss + self.empty.sum() + (self.poisoned * float("nan")).sum() * 0  # 0 * NaN keeps the grad NaN


def test_degenerate_gradients_never_break_a_backend(tmp_path):
    from lightning_monitor import GradientMonitor

    logger = MultiLogger(save_dir=tmp_path, name="degenerate")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=4, log_every_n_steps=2,
                           callbacks=[GradientMonitor(nonfinite="warn")])
    with pytest.warns(UserWarning, match="poisoned") as record:
        trainer.fit(_DegenerateModel(), image_loader())
    assert sum("poisoned" in str(w.message) for w in record) == 1  # named once, not at every step
    acc = tb_accumulator(logger.log_dir)
    hists = set(acc.Tags()["histograms"])
    assert "grad/hist/conv.weight" in hists
    assert not {"grad/hist/unused", "grad/hist/empty"} & hists  # no gradient, no elements: nothing to draw
    for tag in hists:  # whatever was drawn is finite and whole
        for event in acc.Histograms(tag):
            value = event.histogram_value
            assert math.isfinite(value.min) and math.isfinite(value.max) and math.isfinite(value.sum)
            assert sum(value.bucket) == value.num
    assert [v for _, v in tb_scalars(logger.log_dir, "grad/nonfinite/poisoned")] == [4.0, 4.0]
    assert all(math.isfinite(v) for _, v in tb_scalars(logger.log_dir, "grad/norm/head"))
    (run,) = find_runs(logger.log_dir)
    assert [v for _, v in run.series("grad/nonfinite/poisoned")] == [4, 4]


# ---------------------------------------------------------------------------------------------- DDP
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
    callbacks = [GradientMonitor(), MemoryMonitor(), SpeedMonitor(), PredictionGridMonitor(num_samples=8), FailOnRankOne()]
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
    from lightning_monitor import _run_lock

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


def test_a_value_a_backend_rejects_costs_that_value_not_the_backend(tmp_path):
    """wandb refuses a media key holding ``../`` (ValueError): that value is skipped with one warning naming the key,
    TensorBoard still takes it, and wandb keeps every later metric. An empty image list is a clear error at once."""
    logger = MultiLogger(save_dir=tmp_path, name="badval")
    logger.log_metrics({"ok/x": 0.0}, step=0)
    with pytest.warns(UserWarning, match=r"wandb rejected notes/\.\./escape at step 1") as record:
        logger.log_text("notes/../escape", "hello", step=1)
        logger.log_text("notes/../escape", "again", step=2)
    assert sum("rejected" in str(w.message) for w in record) == 1
    with pytest.raises(ValueError, match="image 'img/none': an empty list"):
        logger.log_image("img/none", [], step=3)
    for step in range(4, 104):
        logger.log_metrics({"ok/x": float(step)}, step=step)
    logger.finalize("success")
    (run,) = find_runs(logger.log_dir)
    assert [s for s, _ in run.series("ok/x")] == [0, *range(4, 104)]
    assert len(tb_scalars(logger.log_dir, "ok/x")) == 101


# ---------------------------------------------------------------------------------------------- one job per run dir
@pytest.mark.timeout(240)
def test_a_second_job_on_a_version_in_use_fails_at_start_naming_the_first(tmp_path):
    """Two real processes on one version: the second fails before its first step with an error naming the first
    job's host and pid and how to choose another version; the first job's run is untouched."""
    first, progress = _start_paced_job(tmp_path)
    _wait_for_step(first, progress, 3)
    second_progress = tmp_path / "second.txt"
    proc = subprocess.run(
        [sys.executable, JOB, "--runs", str(tmp_path / "runs"), "--version", "0", "--steps", "3",
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
    from lightning_monitor import _run_lock

    first, progress = _start_paced_job(tmp_path)
    _wait_for_step(first, progress, 2)
    run_dir = tmp_path / "runs" / "job" / "version_0"
    assert _run_lock.holder(str(run_dir))["pid"] == first.pid
    first.send_signal(signal.SIGKILL)
    first.communicate(timeout=30)
    assert _run_lock.holder(str(run_dir))["pid"] == first.pid  # left behind
    proc, _ = run_job(tmp_path, "--version", "0", "--steps", "3")
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "JOB DONE" in proc.stdout
    assert _run_lock.holder(str(run_dir)) is None  # released at the end of the restarted job


def test_lock_of_another_host_is_stale_only_without_heartbeat(tmp_path):
    """A lock written by a job on another host blocks while its heartbeat is fresh, and not once it is older than
    STALE_SEC (the file's mtime set back, as a dead host's lock ages)."""
    from lightning_monitor import _run_lock

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
    from lightning_monitor import _run_lock

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


# ---------------------------------------------------------------------------------------------- disk and directory
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
    from lightning_monitor import _disk

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


# ---------------------------------------------------------------------------------------------- tensorboardX
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


# ---------------------------------------------------------------------------------------------- image edge cases
def _read_pictures(logger, key):
    """The picture TensorBoard and wandb hold for ``key`` (first event), as RGB uint8 arrays."""
    encoded = tb_accumulator(logger.log_dir).Images(key)[0].encoded_image_string
    tb_png = np.asarray(Image.open(io.BytesIO(encoded)).convert("RGB"))
    (run,) = find_runs(logger.log_dir)
    meta = run.series(key)[0][1]
    wandb_png = np.asarray(Image.open(os.path.join(os.path.dirname(run.path), "files", meta["path"])).convert("RGB"))
    return tb_png, wandb_png


def test_a_huge_image_is_downscaled_once_with_a_warning(tmp_path):
    """6000 x 4500 px: the longest side over MAX_IMAGE_SIDE (2048) makes a factor of 3; both backends get the mean of
    each 3 x 3 block (computed here with numpy, in float64), and one warning names the key however often it is
    logged."""
    from lightning_monitor import _media

    image = np.random.default_rng(0).integers(0, 256, (6000, 4500, 3), dtype=np.uint8)
    expected = np.round(image.reshape(2000, 3, 1500, 3, 3).astype(np.float64).mean(axis=(1, 3))).astype(np.uint8)
    logger = MultiLogger(save_dir=tmp_path, name="huge")
    with pytest.warns(UserWarning, match=r"image 'img/huge' is 6000 x 4500 px: logged downscaled by 3") as record:
        logger.log_image("img/huge", image, step=0)
        logger.log_image("img/huge", image, step=1)
    assert sum("img/huge" in str(w.message) for w in record) == 1
    assert _media.MAX_IMAGE_SIDE == 2048
    logger.finalize("success")
    tb_png, wandb_png = _read_pictures(logger, "img/huge")
    assert np.array_equal(tb_png, expected) and np.array_equal(wandb_png, expected)


def test_a_float_image_is_downscaled_before_any_full_size_copy():
    """A 4097 x 10 float64 image (factor 3, edge blocks of 2 rows): block means of the float values, then the usual
    [0, 1] -> 0..255 mapping; torch and numpy inputs give the same picture."""
    from lightning_monitor._media import to_uint8_hwc

    values = np.linspace(0, 1, 4097 * 10).reshape(4097, 10)
    padded = np.full((4098, 12), np.nan)
    padded[:4097, :10] = values
    expected = np.round(np.nanmean(padded.reshape(1366, 3, 4, 3), axis=(1, 3)) * 255).astype(np.uint8)
    with pytest.warns(UserWarning, match="downscaled by 3"):
        from_numpy = to_uint8_hwc(values, key="img/float")
    from_torch = to_uint8_hwc(torch.tensor(values)[None], key="img/float")  # CHW tensor, same picture
    assert np.abs(from_numpy[:, :, 0].astype(int) - expected).max() <= 1  # float32 means vs float64 here
    assert np.array_equal(from_numpy, from_torch)


def test_an_ambiguous_3x8x4_tensor_is_channel_first(tmp_path):
    """3 x 8 x 4 fits both CHW and HWC: a torch tensor is read as CHW (as torchvision and wandb read tensors), a
    numpy array as HWC (channel-last when its last dim is 1, 3 or 4, as PIL reads arrays: 3 x 8 px, RGBA)."""
    chw = torch.arange(3 * 8 * 4, dtype=torch.uint8).reshape(3, 8, 4)
    logger = MultiLogger(save_dir=tmp_path, name="chw")
    logger.log_image("img/chw", chw, step=0)
    logger.log_image("img/hwc", chw.numpy(), step=0)
    logger.finalize("success")
    tb_png, wandb_png = _read_pictures(logger, "img/chw")
    expected = chw.permute(1, 2, 0).numpy()
    assert tb_png.shape == (8, 4, 3) and np.array_equal(tb_png, expected) and np.array_equal(wandb_png, expected)
    tb_png, _ = _read_pictures(logger, "img/hwc")
    assert tb_png.shape == (3, 8, 3)  # 3 x 8 px (read back as RGB)


@pytest.mark.parametrize("shape", [(0, 0), (3, 0, 8), (8, 0, 3)], ids=["hw", "chw", "hwc"])
def test_a_zero_size_image_is_an_error_naming_the_key(tmp_path, shape):
    logger = MultiLogger(save_dir=tmp_path, name="empty", wandb=False)
    with pytest.raises(ValueError, match=r"image 'img/empty' has shape .*: an image needs at least one pixel"):
        logger.log_image("img/empty", torch.zeros(shape), step=0)


# ---------------------------------------------------------------------------------------------- smaller items
class _LogsAMonitorKey(TinyImageModel):
    def training_step(self, batch, batch_idx):
        loss = super().training_step(batch, batch_idx)
        self.log("grad/norm_total", 1.0)  # a key GradientMonitor logs too
        return loss


def test_a_model_logging_a_monitor_key_gets_one_warning(tmp_path):
    """The model's self.log on a key GradientMonitor writes: one warning naming the key (not one per step); keys
    Lightning itself logs at one step more than once (``epoch`` with validation) are not flagged."""
    from lightning_monitor import GradientMonitor

    logger = MultiLogger(save_dir=tmp_path, name="clash")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=6, log_every_n_steps=1, val_check_interval=2,
                           limit_val_batches=1, callbacks=[GradientMonitor(histograms=False)])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(_LogsAMonitorKey(), image_loader(n=96), image_loader(n=16))
    clashes = [str(w.message) for w in record if "logged both by a lightning-monitor callback" in str(w.message)]
    assert len(clashes) == 1 and clashes[0].startswith("'grad/norm_total' is logged both")
    assert "exclude_keys" in clashes[0]
    # what the warning says is true: two values at each step
    steps = [s for s, _ in tb_scalars(logger.log_dir, "grad/norm_total")]
    assert steps.count(0) == 2


def test_no_warning_without_a_clash(tmp_path):
    from lightning_monitor import GradientMonitor

    logger = MultiLogger(save_dir=tmp_path, name="noclash", wandb=False)
    trainer = make_trainer(tmp_path, logger=logger, max_steps=4, log_every_n_steps=1, val_check_interval=2,
                           limit_val_batches=1, callbacks=[GradientMonitor(histograms=False)])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(TinyImageModel(), image_loader(n=64), image_loader(n=16))
    assert not [w for w in record if "logged both" in str(w.message)]


def test_logging_after_finalize_continues_the_run_in_both(tmp_path):
    """Documented behaviour: a write after ``finalize`` (what ``test`` after ``fit`` does) reopens both backends on
    the same run: TensorBoard in a new event file of the same directory, wandb as a new segment of the same run;
    the run directory's lock is taken again and released at the next finalize."""
    from lightning_monitor import _run_lock

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


class _BadValuesAt(Callback):
    """At step ``at``: the issue's bad image (an empty list: an error naming the key at once, caught here as a user
    would), an image and a text under a key holding ``../`` (wandb takes the image, rejects the text)."""

    def __init__(self, at):
        self.at, self.errors = at, []

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step - 1 == self.at:
            step = trainer.global_step - 1
            trainer.logger.log_image("img/../bad", np.zeros((4, 4, 3), np.uint8), step=step)
            trainer.logger.log_text("notes/../escape", "hello", step=step)
            try:
                trainer.logger.log_image("img/none", [], step=step)
            except ValueError as err:
                self.errors.append(str(err))


def test_a_bad_image_and_a_bad_key_mid_run_then_100_metrics_all_in_wandb(tmp_path):
    """The issue's scenario in a real fit: at step 3 a bad image and a bad key; the bad value costs that value (one
    warning) and wandb keeps every one of the 104 steps of train/loss, as TensorBoard does."""
    bad = _BadValuesAt(3)
    logger = MultiLogger(save_dir=tmp_path, name="badfit")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=104, log_every_n_steps=1, callbacks=[bad])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(TinyImageModel(), image_loader(n=104 * 16))
    texts = [str(w.message) for w in record]
    assert len([t for t in texts if "wandb rejected notes/../escape at step 3" in t]) == 1
    assert not [t for t in texts if "stopped working" in t]
    assert bad.errors == ["image 'img/none': an empty list; pass one image or a non-empty list"]
    (run,) = find_runs(logger.log_dir)
    assert [s for s, _ in run.series("train/loss")] == list(range(104))
    assert [s for s, _ in tb_scalars(logger.log_dir, "train/loss")] == list(range(104))
    assert [e.step for e in tb_accumulator(logger.log_dir).Images("img/../bad")] == [3]  # TensorBoard took it
