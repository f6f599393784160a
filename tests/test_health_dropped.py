"""HealthMonitor's ``dropped_points`` rule in real fits: a value TensorBoard really refuses, and wandb's service
really dying mid-run, each alert once per episode (alerts.jsonl, the terminal, the other backend) with the backend
and the count; a run whose backends keep every point raises nothing."""

from __future__ import annotations

import json
import os
import time
from typing import Any

import psutil
import pytest
from helpers import TinyImageModel, image_loader, make_trainer, tb_scalars
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_monitor import GradientMonitor, HealthMonitor, MultiLogger

pytestmark = pytest.mark.timeout(150)


def _jsonl(log_dir: str) -> list[dict[str, Any]]:
    path = os.path.join(log_dir, "alerts.jsonl")
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f]


class LogsText(Callback):
    """A user's callback logging a value TensorBoard cannot chart (text) to the trainer's logger at some steps."""

    def __init__(self, steps: tuple[int, ...]) -> None:
        self.steps = steps

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step in self.steps:
            trainer.logger.log_metrics({"note": "warm-up done"}, step=trainer.global_step)


def test_a_value_tensorboard_refuses_alerts_once_per_episode(tmp_path, capsys):
    tb = TensorBoardLogger(tmp_path, name="tb")
    health = HealthMonitor()
    trainer = make_trainer(tmp_path, logger=tb, max_steps=10, log_every_n_steps=2,
                           callbacks=[LogsText((2, 7)), GradientMonitor(), health])
    with pytest.warns(UserWarning, match="TensorBoard rejected note at step 2"):
        trainer.fit(TinyImageModel(), image_loader(n=160))
    # logging steps 1, 3, 5, 7, 9: the refusal of step 2 is seen at step 3; step 5 saw none (the episode ended);
    # the one of step 7 (before that batch's values) at step 7
    assert [(a.step, a.rule, a.key, a.value) for a in health.alerts] == [
        (3, "dropped_points", "run/dropped_points", 1.0), (7, "dropped_points", "run/dropped_points", 1.0)]
    assert health.alerts[0].message == (
        "a backend dropped or refused logged points (TensorBoard: 1 since the last logging step, 1 in this fit;"
        " its warning above says which)")
    assert "2 in this fit" in health.alerts[1].message
    records = _jsonl(tb.log_dir)
    assert [(r["step"], r["rule"], r["value"], r["action"]) for r in records] == [
        (3, "dropped_points", 1.0, "warn"), (7, "dropped_points", 1.0, "warn")]
    out = capsys.readouterr().out.splitlines()
    assert [line for line in out if "ALERT" in line] == [a.line() for a in health.alerts]
    tb.experiment.flush()
    assert tb_scalars(tb.log_dir, "health/dropped_points") == [(3, 1.0), (5, 0.0), (7, 1.0), (9, 0.0)]
    assert [s for s, _ in tb_scalars(tb.log_dir, "train/loss")] == [1, 3, 5, 7, 9]  # everything else kept


def test_backends_keeping_every_point_raise_nothing(tmp_path):
    logger = MultiLogger(save_dir=tmp_path, name="clean")
    health = HealthMonitor()
    trainer = make_trainer(tmp_path, logger=logger, max_steps=10, log_every_n_steps=2,
                           callbacks=[GradientMonitor(), health])
    trainer.fit(TinyImageModel(), image_loader(n=160))
    assert health.alerts == [] and _jsonl(logger.log_dir) == []
    assert health._drops == {"TensorBoard": 0, "wandb": 0}  # both counted, both kept everything


class KillWandbService(Callback):
    """Kills wandb's service processes (this process's children) at step 3, as a crash or an OOM kill would."""

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == 3:
            for child in psutil.Process().children(recursive=True):
                if child.name().startswith("wandb"):
                    child.kill()
            time.sleep(0.5)


@pytest.fixture
def fresh_wandb_service():
    """Drop this process's connection to the killed service, so that a later test starts a new one."""
    yield
    import wandb

    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - the service is dead: there is nothing to tell it
        pass


def test_a_backend_that_stopped_alerts_once_with_its_name(tmp_path, capsys, fresh_wandb_service):
    logger = MultiLogger(save_dir=tmp_path, name="svc")
    health = HealthMonitor()
    trainer = make_trainer(tmp_path, logger=logger, max_steps=8, log_every_n_steps=1,
                           callbacks=[KillWandbService(), health])
    with pytest.warns(UserWarning, match="wandb stopped working"):
        trainer.fit(TinyImageModel(), image_loader(n=128))
    # every later write to wandb is dropped: one episode, from the step wandb stopped to the end
    (alert,) = health.alerts
    assert alert.rule == "dropped_points" and 2 <= alert.step <= 4, alert  # killed after batch 2 (step 2)
    assert alert.message.startswith("a backend dropped or refused logged points (wandb: ")
    (record,) = _jsonl(logger.log_dir)
    assert (record["step"], record["rule"], record["message"]) == (alert.step, alert.rule, alert.message)
    assert alert.line() in capsys.readouterr().out.splitlines()
    assert health._drops["TensorBoard"] == 0 and health._drops["wandb"] > 8  # a row per step and key group
    firing = tb_scalars(logger.log_dir, "health/dropped_points")
    assert firing[0] == (alert.step, 1.0) and all(v == 1.0 for _, v in firing)
    assert [s for s, _ in tb_scalars(logger.log_dir, "train/loss")] == list(range(8))


def test_the_guard_counts_each_value_a_backend_did_not_keep(tmp_path):
    """One value refused in a write of two (the number is kept), then every value after the backend stopped; a
    write that adds no point (hyperparameters) is not counted."""
    from functools import partial

    from lightning_monitor._writers.backends import deliver
    from lightning_monitor._writers.dashboards import TensorBoardWriter

    writer = TensorBoardWriter(TensorBoardLogger(tmp_path, name="tb"))
    values = {"a/x": 1.0, "a/text": "hi"}
    with pytest.warns(UserWarning, match="rejected"):
        deliver(writer, partial(writer.scalars, values, 3), 3, values)
    assert writer.dropped == 1 and not writer.failed
    deliver(writer, partial(writer.scalars, {"a/x": 2.0}, 4), 4, {"a/x": 2.0})
    assert writer.dropped == 1
    writer.failed = True  # as the guard leaves a backend that broke
    deliver(writer, partial(writer.scalars, {"a/x": 3.0, "a/y": 1.0}, 5), 5, {"a/x": 3.0, "a/y": 1.0})
    deliver(writer, partial(writer.hyperparams, {"lr": 0.1}), None, ["hyperparameters"], row=False)
    assert writer.dropped == 3
