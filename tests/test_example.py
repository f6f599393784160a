"""The MNIST example: LitNet, MNISTDataModule, the LightningCLI entry point and the configs, run for real."""

from __future__ import annotations

import glob
import os
import re
import socket
import subprocess
import sys

import pytest
import torch
import yaml
from helpers import event_files, find_runs, tb_accumulator

import lightning_monitor

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(REPO, "examples", "mnist")
MAIN = os.path.join(EXAMPLE, "main.py")
FIXTURE = os.path.join(REPO, "tests", "data")
sys.path.insert(0, EXAMPLE)

from datamodule import MNISTDataModule, MNISTDataNotFoundError  # noqa: E402
from main import main  # noqa: E402
from model import LitNet  # noqa: E402


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch):
    """In-process ``main(args)`` calls must not see pytest's own command line."""
    monkeypatch.setattr(sys, "argv", [MAIN])


def run_cli(args: list[str], tmp_path, timeout: float) -> subprocess.CompletedProcess:
    """``python examples/mnist/main.py ARGS`` from the repository root (as the README runs it), writing to tmp."""
    cmd = [sys.executable, MAIN, *args,
           "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
           "--trainer.default_root_dir", str(tmp_path),
           "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def run_dirs(root) -> list[str]:
    return sorted(glob.glob(os.path.join(str(root), "runs", "*", "*")))


# ---------------------------------------------------------------------------------------------- model and data
def test_litnet_is_pytorch_examples_net():
    model = LitNet()
    shapes = {name: tuple(p.shape) for name, p in model.named_parameters()}
    assert shapes == {
        "conv1.weight": (32, 1, 3, 3), "conv1.bias": (32,),
        "conv2.weight": (64, 32, 3, 3), "conv2.bias": (64,),
        "fc1.weight": (128, 9216), "fc1.bias": (128,),
        "fc2.weight": (10, 128), "fc2.bias": (10,),
    }
    assert sum(p.numel() for p in model.parameters()) == 1_199_882  # pytorch/examples' Net
    assert (model.dropout1.p, model.dropout2.p) == (0.25, 0.5)
    model.eval()
    out = model(torch.randn(3, 1, 28, 28))
    assert out.shape == (3, 10)
    torch.testing.assert_close(out.exp().sum(dim=1), torch.ones(3))  # log-probabilities

    config = model.configure_optimizers()
    optimizer, scheduler = config["optimizer"], config["lr_scheduler"]["scheduler"]
    assert isinstance(optimizer, torch.optim.Adadelta) and optimizer.defaults["lr"] == 1.0
    assert isinstance(scheduler, torch.optim.lr_scheduler.StepLR)
    assert (scheduler.step_size, scheduler.gamma, config["lr_scheduler"]["interval"]) == (1, 0.7, "epoch")
    assert set(LitNet.LOGGED_KEYS) == {f"{s}/{m}" for s in ("train", "val", "test") for m in ("loss", "acc")}
    for key in LitNet.LOGGED_KEYS:
        assert f"``{key}``" in LitNet.__doc__


@pytest.mark.parametrize("kwargs", [{"lr": 0}, {"gamma": 0}, {"gamma": 1.5}])
def test_litnet_rejects_bad_arguments(kwargs):
    value = next(iter(kwargs.values()))
    with pytest.raises(ValueError, match=re.escape(str(value))):
        LitNet(**kwargs)


def test_datamodule_reads_the_fixture_with_a_fixed_split():
    dm = MNISTDataModule(data_dir=FIXTURE, download=False, val_split=64, num_workers=0)
    dm.prepare_data()
    dm.setup("fit")
    dm.setup("test")
    assert (len(dm.train_set), len(dm.val_set), len(dm.test_set)) == (576, 64, 256)

    again = MNISTDataModule(data_dir=FIXTURE, download=False, val_split=64)
    again.setup("fit")
    assert list(again.val_set.indices) == list(dm.val_set.indices)  # same seed, same split
    assert not set(dm.val_set.indices) & set(dm.train_set.indices)

    x, y = next(iter(dm.train_dataloader()))
    assert x.shape == (64, 1, 28, 28) and y.shape == (64,) and y.dtype == torch.int64
    x, _ = next(iter(dm.test_dataloader()))
    assert x.shape == (256, 1, 28, 28)  # test batch 1000 holds the whole fixture
    # normalised with MNIST's mean/std: background pixels (0) map to -0.1307 / 0.3081
    torch.testing.assert_close(x.min(), torch.tensor(-0.1307 / 0.3081))
    assert -0.3 < x.mean().item() < 0.3

    fraction = MNISTDataModule(data_dir=FIXTURE, download=False, val_split=0.25)
    fraction.setup("fit")
    assert (len(fraction.train_set), len(fraction.val_set)) == (480, 160)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"batch_size": 0}, "`batch_size` must be >= 1, got 0"),
     ({"num_workers": -1}, "`num_workers` must be >= 0, got -1"),
     ({"val_split": 1.5}, "got 1.5"),
     ({"val_split": 0}, "got 0")],
)
def test_datamodule_rejects_bad_arguments(kwargs, match):
    with pytest.raises(ValueError, match=re.escape(match)):
        MNISTDataModule(**kwargs)


def test_val_split_larger_than_the_data_is_a_clear_error():
    dm = MNISTDataModule(data_dir=FIXTURE, download=False, val_split=5000)
    with pytest.raises(ValueError, match="has 640 images"):
        dm.setup("fit")


# ---------------------------------------------------------------------------------------------- missing data
def _assert_says_how_to_run_offline(message: str) -> None:
    assert "configs/smoke.yaml" in message
    assert "--data.data_dir" in message and "--data.download" in message


def test_missing_data_without_download_names_the_offline_config(tmp_path):
    with pytest.raises(SystemExit) as exit_info:  # `sys.exit(message)`: the message on stderr, exit status 1
        main(["fit", "--config", os.path.join(REPO, "configs", "smoke.yaml"), "--data.data_dir",
              str(tmp_path / "empty"), "--data.download", "false", "--trainer.logger.init_args.save_dir",
              str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"])
    message = exit_info.value.code
    assert isinstance(message, str) and message.startswith("error: MNIST is not under")
    assert "`download` is off" in message
    _assert_says_how_to_run_offline(message)
    assert run_dirs(tmp_path) == []  # failed before any run directory was made


def test_failed_download_names_the_offline_config(tmp_path, monkeypatch):
    # Real torchvision download code, against a port nothing listens on: fails at once, with or without internet.
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    from torchvision.datasets import MNIST

    monkeypatch.setattr(MNIST, "mirrors", [f"http://127.0.0.1:{port}/"])
    dm = MNISTDataModule(data_dir=str(tmp_path / "empty"), download=True)
    with pytest.raises(MNISTDataNotFoundError, match="downloading it failed") as err:
        dm.prepare_data()
    _assert_says_how_to_run_offline(str(err.value))

    with pytest.raises(SystemExit) as exit_info:  # the entry point turns it into a message and exit status 1
        main(["fit", "--config", os.path.join(REPO, "configs", "smoke.yaml"), "--data.data_dir",
              str(tmp_path / "empty"), "--data.download", "true", "--trainer.logger.init_args.save_dir",
              str(tmp_path / "runs"), "--trainer.enable_progress_bar", "false"])
    assert "downloading it failed" in str(exit_info.value.code)
    _assert_says_how_to_run_offline(str(exit_info.value.code))


# ---------------------------------------------------------------------------------------------- configs
@pytest.mark.parametrize("name", ["mnist", "smoke", "ddp"])
def test_config_parses_with_every_monitor(name, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["fit", "--config", os.path.join(REPO, "configs", f"{name}.yaml"), "--print_config"])
    assert exit_info.value.code in (0, None)
    config = yaml.safe_load(capsys.readouterr().out)
    assert config["trainer"]["logger"]["class_path"] == "lightning_monitor.MultiLogger"
    callbacks = {c["class_path"] for c in config["trainer"]["callbacks"]}
    # every public callback of the package (all but the logger) is in every config
    assert callbacks == {f"lightning_monitor.{c}" for c in lightning_monitor.__all__ if c != "MultiLogger"}
    if name == "mnist":
        assert config["trainer"]["max_epochs"] == 14 and config["data"]["download"] is True
    else:
        assert config["data"]["data_dir"] == "tests/data" and config["data"]["download"] is False
        assert config["trainer"]["accelerator"] == "cpu"
        assert config["trainer"]["logger"]["init_args"]["wandb"] == {"mode": "offline"}


# ---------------------------------------------------------------------------------------------- end to end
@pytest.mark.slow
@pytest.mark.timeout(180)
def test_smoke_config_runs_end_to_end(tmp_path):
    proc = run_cli(["fit", "--config", "configs/smoke.yaml"], tmp_path, timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]

    (run_dir,) = run_dirs(tmp_path)
    assert run_dir == str(tmp_path / "runs" / "mnist-smoke" / "version_0")
    assert event_files(run_dir)
    saved = yaml.safe_load(open(os.path.join(run_dir, "config.yaml")))
    assert saved["data"]["data_dir"] == "tests/data" and saved["trainer"]["max_epochs"] == 2
    assert not os.path.exists(tmp_path / "runs" / "config.yaml")  # not in save_dir (Lightning's default)
    assert glob.glob(os.path.join(run_dir, "checkpoints", "*.ckpt"))  # checkpoints inside the run too

    acc = tb_accumulator(run_dir)
    tags = set(acc.Tags()["scalars"])
    assert set(LitNet.LOGGED_KEYS) <= tags
    train_steps = [e.step for e in acc.Scalars("train/loss")]
    assert train_steps == list(range(1, 18, 2))  # 2 epochs x 9 batches, logged every 2nd step
    (test_acc,) = acc.Scalars("test/acc")
    assert test_acc.step == 18 and test_acc.value > 0.5  # 18 steps on 576 digits already beat chance (0.1)

    runs = find_runs(run_dir)
    assert runs and {r.run_id for r in runs} == {runs[0].run_id}  # one wandb run (fit, then test resumes it)
    wandb_train = [(step, value) for r in runs for step, value in r.series("train/loss")]
    assert [s for s, _ in wandb_train] == train_steps  # the same steps in both dashboards
    tb_values = [e.value for e in acc.Scalars("train/loss")]
    assert [v for _, v in wandb_train] == pytest.approx(tb_values, rel=1e-6)
    assert any(r.series("test/acc") for r in runs)


def test_config_lands_in_each_run_directory_run_after_run(tmp_path):
    quick = ["fit", "--config", os.path.join(REPO, "configs", "smoke.yaml"),
             "--data.data_dir", FIXTURE, "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"),
             "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1", "--trainer.enable_progress_bar",
             "false", "--trainer.enable_checkpointing", "false", "--trainer.logger.init_args.wandb", "false",
             "--test_after_fit", "false"]
    main(quick)
    main(quick)
    runs = run_dirs(tmp_path)
    assert [os.path.basename(r) for r in runs] == ["version_0", "version_1"]
    for run in runs:
        assert os.path.isfile(os.path.join(run, "config.yaml"))
    assert not os.path.exists(tmp_path / "runs" / "config.yaml")

    # Same version again: Lightning's rule holds, inside the run directory: refuse to overwrite an earlier config.
    with pytest.raises(RuntimeError, match=r"version_0.config\.yaml to NOT exist"):
        main([*quick, "--trainer.logger.init_args.version", "0"])
    # ... but a later `test` on the trained run is a later segment of it: the fit's config stays, the test runs
    with open(os.path.join(runs[0], "config.yaml")) as f:
        before = f.read()
    test = ["test", "--config", os.path.join(REPO, "configs", "smoke.yaml"), "--data.data_dir", FIXTURE,
            "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.logger.init_args.version", "0",
            "--trainer.limit_test_batches", "1", "--trainer.enable_progress_bar", "false",
            "--trainer.logger.init_args.wandb", "false"]
    main(test)
    with open(os.path.join(runs[0], "config.yaml")) as f:
        assert f.read() == before
    assert tb_accumulator(runs[0]).Scalars("test/acc")


def test_without_a_run_directory_the_config_goes_where_lightning_puts_it(tmp_path):
    main(["fit", "--config", os.path.join(REPO, "configs", "smoke.yaml"), "--data.data_dir", FIXTURE,
          "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path / "root"),
          "--trainer.callbacks", "[]", "--trainer.max_steps", "1", "--trainer.limit_val_batches", "1",
          "--trainer.enable_progress_bar", "false", "--trainer.enable_checkpointing", "false",
          "--test_after_fit", "false"])
    assert os.path.isfile(tmp_path / "root" / "config.yaml")  # trainer.default_root_dir, as Lightning does


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_config_runs_two_processes_and_rank_one_writes_nothing(tmp_path):
    proc = subprocess.Popen(
        [sys.executable, MAIN, "fit", "--config", "configs/ddp.yaml",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.default_root_dir",
         str(tmp_path), "--trainer.enable_progress_bar", "false"],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )
    try:
        output, _ = proc.communicate(timeout=170)
    finally:
        proc.kill()
    assert proc.returncode == 0, output[-3000:]
    assert "Initializing distributed: GLOBAL_RANK: 1, MEMBER: 2/2" in output  # really two processes

    assert os.listdir(tmp_path) == ["runs"]  # no stray lightning_logs/ or wandb/ from either rank
    (run_dir,) = run_dirs(tmp_path)
    assert os.path.isfile(os.path.join(run_dir, "config.yaml"))
    # Event files are named events.out.tfevents.<time>.<host>.<pid>.<n>: every one is rank 0's (the launcher).
    pids = {os.path.basename(f).split(".")[-2] for f in event_files(tmp_path)}
    assert pids == {str(proc.pid)}
    runs = find_runs(str(tmp_path))
    assert runs and {r.run_id for r in runs} == {runs[0].run_id}
    steps = [s for r in runs for s, _ in r.series("train/loss")]
    assert steps == sorted(steps) and len(steps) == len(set(steps))  # one writer: no step logged twice
    acc = tb_accumulator(run_dir)
    assert [e.step for e in acc.Scalars("train/loss")] == steps
