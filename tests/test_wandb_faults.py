"""wandb failing for real: no API key (with and without a terminal), an unreachable or silent server, a web server
that is no W&B server, its service process killed mid-run (MultiLogger and a plain logger list) or before the run is
finished: training goes on, offline or without wandb, and ``fit`` returns.

Subprocess jobs run ``tests/reliability_job.py``; each is bounded by a timeout so a hang fails the test."""

from __future__ import annotations

import os
import pty
import socket
import subprocess
import sys
import threading
import time
import warnings

import psutil
import pytest
from helpers import (
    RELIABILITY_JOB,
    TinyImageModel,
    find_runs,
    free_port,
    image_loader,
    json_server,
    make_trainer,
    run_reliability_job,
    tb_scalars,
)
from lightning.pytorch.callbacks import Callback

from lightning_monitor import MultiLogger


def _assert_trained_offline(proc, run_dir, steps):
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "JOB DONE" in proc.stdout
    assert [s for s, _ in tb_scalars(run_dir, "train/loss")] == list(range(steps))  # TensorBoard kept every step
    (run,) = find_runs(run_dir)
    assert [s for s, _ in run.series("train/loss")] == list(range(steps))


@pytest.mark.timeout(200)
def test_no_api_key_without_a_terminal_runs_offline(tmp_path):
    proc, run_dir = run_reliability_job(tmp_path, "--steps", "3", stdin=subprocess.DEVNULL)
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
            [sys.executable, RELIABILITY_JOB, "--runs", str(tmp_path / "runs"), "--steps", "3"],
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
    proc, run_dir = run_reliability_job(tmp_path, "--steps", "3", env=env)
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
    proc, run_dir = run_reliability_job(tmp_path, "--steps", "3", "--wandb-settings", "init_timeout=5", env=env)
    took = time.monotonic() - started
    server.close()
    _assert_trained_offline(proc, run_dir, 3)
    text = proc.stdout + proc.stderr
    assert "did not answer (" in text and "wandb is logging offline" in text
    assert took < 60  # the whole job; the probe itself gives up after 2 s
    (run,) = find_runs(run_dir)
    assert run.run_id.startswith("job-version_0-")


def _lines(proc, text):
    return [line for line in (proc.stdout + proc.stderr).splitlines() if text in line]


@pytest.mark.timeout(200)
def test_a_web_server_that_is_not_wandb_runs_offline(tmp_path):
    """A reverse proxy answering ``200 {}`` to every request, a key set and ``WANDB_BASE_URL`` pointing at it: the
    probe asks what only a W&B server answers, gets ``{}``, and the run is offline from the start (no prompt, stdin
    closed), said in one line with the reason; wandb never sends the server anything else; the job exits 0."""
    with json_server() as (url, seen):
        env = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": url}
        proc, run_dir = run_reliability_job(tmp_path, "--steps", "3", env=env, stdin=subprocess.DEVNULL)
    _assert_trained_offline(proc, run_dir, 3)
    (line,) = _lines(proc, "wandb is logging offline")
    assert f"{url} answers, but not as a W&B server (POST /graphql: HTTP 200, no serverInfo" in line
    assert "wandb sync " in line
    assert seen == [("POST", "/graphql")]  # the probe only
    assert "Traceback" not in proc.stderr and not _lines(proc, "could not finish")


@pytest.mark.timeout(240)
def test_a_server_that_passes_the_probe_and_breaks_wandb_at_finish(tmp_path):
    """The issue's case, with the probe let through: wandb starts online against the ``200 {}`` server, its service
    crashes while finishing (``HandleAbandonedError``). ``fit`` returns, the process exits 0, TensorBoard has every
    step, and one warning names the local files with the ``wandb sync`` command."""
    with json_server() as (url, _):
        env = {"WANDB_API_KEY": "k" * 40, "WANDB_BASE_URL": url}
        proc, run_dir = run_reliability_job(tmp_path, "--steps", "3", "--skip-wandb-probe", env=env,
                                            stdin=subprocess.DEVNULL)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "JOB DONE TrainerStatus.FINISHED" in proc.stdout
    assert [s for s, _ in tb_scalars(run_dir, "train/loss")] == [0, 1, 2]
    (warning,) = _lines(proc, "could not finish")
    assert "MultiLogger.finalize('success'): wandb could not finish (" in warning
    assert f"TensorBoard has every value in {run_dir}" in warning
    local = warning.split("wandb sync ")[1].rstrip("`.")
    assert os.path.isdir(local) and local.startswith(str(run_dir / "wandb" / "run-"))
    assert "Traceback" not in proc.stderr  # nor wandb's teardown of its dead service at exit


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


def kill_wandb_service():
    """Kill wandb's service processes (this process's children), as a crash or an OOM kill would."""
    for child in psutil.Process().children(recursive=True):
        if child.name().startswith("wandb"):
            child.kill()
    time.sleep(0.5)


class KillWandbService(Callback):
    """Kills wandb's service process at step 3."""

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
        if trainer.global_step == 3:
            kill_wandb_service()


class KillWandbServiceAtTeardown(Callback):
    """Kills wandb's service process after the fit's last write, before Lightning finalizes the logger."""

    def teardown(self, trainer, pl_module, stage):
        if stage == "fit":
            kill_wandb_service()


@pytest.mark.timeout(150)
def test_wandb_service_dying_before_finalize(tmp_path, fresh_wandb_service):
    """wandb's service killed after the last step: its run cannot be finished. ``fit`` returns, one warning names
    TensorBoard's run directory (every step there) and wandb's local copy with the ``wandb sync`` command; a later
    ``test`` on the same logger starts a new wandb service and logs a new segment without a word."""
    logger = MultiLogger(save_dir=tmp_path, name="fin")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=8, log_every_n_steps=1,
                           callbacks=[KillWandbServiceAtTeardown()])
    model = TinyImageModel()
    with pytest.warns(UserWarning, match="could not finish") as record:
        trainer.fit(model, image_loader(n=128))  # returns
    (warning,) = [str(w.message) for w in record if "could not finish" in str(w.message)]
    assert warning.startswith("MultiLogger.finalize('success'): wandb could not finish (")
    assert f"TensorBoard has every value in {os.path.abspath(logger.log_dir)}" in warning
    local = warning.split("wandb sync ")[1].rstrip("`.")
    assert os.path.isdir(local) and os.path.basename(local).startswith("offline-run-")
    assert [s for s, _ in tb_scalars(logger.log_dir, "train/loss")] == list(range(8))
    (run,) = find_runs(logger.log_dir, wait_finished=0)  # whatever the dead service wrote still parses
    assert run.exit_code is None

    with warnings.catch_warnings(record=True) as later:
        warnings.simplefilter("always")
        trainer.test(model, image_loader(n=16, seed=2))
    assert not [w for w in later if "wandb" in str(w.message)], [str(w.message) for w in later]
    second = [r for r in find_runs(logger.log_dir, wait_finished=0) if r.exit_code == 0]
    assert len(second) == 1 and [s for s, _ in second[0].series("test/loss")] == [8]


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
