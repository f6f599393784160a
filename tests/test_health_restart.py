"""HealthMonitor's rules go on across a restart from a checkpoint: a streak begun before it completes after it, and
a rule firing before it is the same episode after it (no second alert); the alert count goes on."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from helpers import TinyImageModel, image_loader, make_trainer
from torch.nn import functional as F

from lightning_monitor import HealthMonitor, MultiLogger

pytestmark = pytest.mark.timeout(150)


class Signals(TinyImageModel):
    """Logs ``sig/hot`` (1 from step 2 on, else 0) and ``sig/always`` (always 1)."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.nll_loss(self(x), y)
        self.log("sig/hot", 1.0 if self.global_step >= 2 else 0.0)
        self.log("sig/always", 1.0)
        return loss


_RULES: dict[str, Any] = {"defaults": False, "rules": [
    {"key": "sig/hot", "rule": "above", "threshold": 0.5, "patience": 3, "name": "hot"},
    {"key": "sig/always", "rule": "above", "threshold": 0.5, "name": "always"}]}


def _health() -> HealthMonitor:
    return HealthMonitor(**_RULES)


class Forgetful(HealthMonitor):
    """HealthMonitor before its state was kept in checkpoints."""

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        pass


def _fit(tmp_path: Any, health: HealthMonitor, steps: int, ckpt_path: Any = None) -> Any:
    trainer = make_trainer(tmp_path, logger=MultiLogger(save_dir=tmp_path, name="restart", version=0, wandb=False),
                           callbacks=[health], max_steps=steps, log_every_n_steps=2)
    trainer.fit(Signals(), image_loader(n=256), ckpt_path=ckpt_path)
    return trainer


def test_rule_state_goes_on_after_a_restart_from_a_checkpoint(tmp_path):
    first = _health()
    trainer = _fit(tmp_path, first, steps=6)  # logging steps 1, 3, 5: `hot` held at 3 and 5 (2 of 3)
    assert [(a.step, a.rule) for a in first.alerts] == [(1, "always")]
    ckpt = tmp_path / "at6.ckpt"
    trainer.save_checkpoint(ckpt)

    resumed = _health()
    _fit(tmp_path, resumed, steps=12, ckpt_path=ckpt)  # logging steps 7, 9, 11
    # `hot`'s third evaluation in a row is step 7; `always` is still the episode that began at step 1
    assert [(a.step, a.rule) for a in resumed.alerts] == [(7, "hot")]
    assert resumed._engine.alert_count == 2  # health/alerts goes on counting

    forgetful = Forgetful(**_RULES)  # the same restart without the rules' state: a new streak, a second episode
    _fit(tmp_path / "forgetful", forgetful, steps=12, ckpt_path=ckpt)
    assert [(a.step, a.rule) for a in forgetful.alerts] == [(7, "always"), (11, "hot")]
