"""GradientMonitor(optimizer_state=True): Adam-style state per group against values computed from optimizer.state."""

from __future__ import annotations

import os
import re

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import SPAWN_ABORT_RERUN
from helpers import (
    SyncsPerBatch,
    TinyImageModel,
    event_files,
    image_loader,
    make_trainer,
    one_process_and_ddp,
    rank_strided_loader,
    tb_accumulator,
)
from torch.utils.data import DataLoader

from lightning_monitor import GradientMonitor
from lightning_monitor._grad.optstate import SAMPLE
from lightning_monitor._grad.stats import sample_stride
from lightning_monitor.testing import HostSyncCounter

GROUPS = {"conv": ["conv.weight", "conv.bias"], "head": ["head.weight", "head.bias"]}


class AdamModel(TinyImageModel):
    def __init__(self, kind: str = "adam", **opt: float) -> None:
        super().__init__()
        self.kind, self.opt = kind, opt

    def configure_optimizers(self) -> torch.optim.Optimizer:
        cls = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}[self.kind]
        return cls(self.parameters(), lr=1e-3, **self.opt)


class StateCapture(pl.Callback):
    """The optimizer state, hyperparameters and gradients as the step begins (what the monitor measures)."""

    def __init__(self) -> None:
        self.seen: dict[int, tuple[dict, dict, dict]] = {}

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        names = {id(p): n for n, p in pl_module.named_parameters()}
        state = {names[id(p)]: {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v)
                                for k, v in s.items()}
                 for p, s in optimizer.state.items()}
        hyper = {names[id(p)]: dict(g) for g in optimizer.param_groups for p in g["params"]}
        grads = {n: p.grad.detach().cpu().clone() for n, p in pl_module.named_parameters()}
        self.seen[trainer.global_step] = (state, hyper, grads)


def _expected(state: dict, hyper: dict, grads: dict, names: list[str]) -> dict[str, float]:
    m = torch.cat([state[n]["exp_avg"].reshape(-1).double() for n in names])
    v = torch.cat([state[n]["exp_avg_sq"].reshape(-1).double() for n in names])
    d_parts, u_parts = [], []
    for n in names:
        h, s = hyper[n], state[n]
        t = float(s["step"])
        b1, b2 = h["betas"]
        d = (s["max_exp_avg_sq"] if h["amsgrad"] else s["exp_avg_sq"]).reshape(-1).double()
        denom = (d / (1 - b2**t)).sqrt() + h["eps"]
        d_parts.append((h["lr"] / denom)[:: sample_stride(denom.numel(), SAMPLE)])  # the monitor's sample
        u_parts.append(s["exp_avg"].reshape(-1).double() / (1 - b1**t) / denom)
    eff, u = torch.cat(d_parts).numpy(), torch.cat(u_parts)
    g = torch.cat([grads[n].reshape(-1).double() for n in names])
    return {
        "exp_avg_norm": float(m.norm()),
        "exp_avg_sq_sqrt_norm": float(v.sqrt().norm()),
        "step_median": float(np.quantile(eff, 0.5)),
        "step_p99": float(np.quantile(eff, 0.99)),
        "small_v_share": float((v < 1e-16).double().mean()),
        "update_cos": float(torch.dot(u, g) / (u.norm() * g.norm())),
    }


def _scalars(root: str) -> dict[str, dict[int, float]]:
    (path,) = event_files(root)
    acc = tb_accumulator(os.path.dirname(path))
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


@pytest.mark.parametrize("kind, opt", [
    ("adam", {}),
    ("adamw", {}),
    ("adam", {"weight_decay": 0.1}),
    ("adamw", {"weight_decay": 0.1}),
    ("adam", {"amsgrad": True}),
    ("adamw", {"amsgrad": True, "weight_decay": 0.05}),
])
def test_optimizer_state_matches_the_optimizers_own_state(tmp_path, kind, opt, accelerator="cpu"):
    torch.manual_seed(0)
    capture = StateCapture()
    root = str(tmp_path / "tb")
    from lightning.pytorch.loggers import TensorBoardLogger

    trainer = make_trainer(tmp_path, accelerator=accelerator, logger=TensorBoardLogger(root), max_steps=6,
                           callbacks=[GradientMonitor(optimizer_state=True, histograms=False), capture])
    trainer.fit(AdamModel(kind, **opt), image_loader())
    scalars = _scalars(root)
    optim = {k for k in scalars if k.startswith("optim/")}
    assert {re.sub(r"/[^/]+$", "", k) for k in optim} == {f"optim/{c}" for c in (
        "exp_avg_norm", "exp_avg_sq_sqrt_norm", "step_median", "step_p99", "small_v_share", "update_cos")}
    for key in optim:
        assert sorted(scalars[key]) == [1, 3, 5]  # the state after steps 0, 2 and 4
    for step in (1, 3, 5):
        state, hyper, grads = capture.seen[step]
        for group, names in GROUPS.items():
            for stat, value in _expected(state, hyper, grads, names).items():
                got = scalars[f"optim/{stat}/{group}"][step]
                assert got == pytest.approx(value, rel=1e-5, abs=1e-9), (group, stat, step)


def test_small_second_moments_and_no_state_for_sgd(tmp_path):
    class Frozen(AdamModel):
        def training_step(self, batch, batch_idx):
            loss = super().training_step(batch, batch_idx)
            return loss + 0.0 * self.conv.bias.sum()  # conv.bias gets zero gradients: v stays 0

        def on_after_backward(self) -> None:
            self.conv.bias.grad.zero_()

    from lightning.pytorch.loggers import TensorBoardLogger

    root = str(tmp_path / "tb")
    trainer = make_trainer(tmp_path, logger=TensorBoardLogger(root), max_steps=4,
                           callbacks=[GradientMonitor(optimizer_state=True, histograms=False,
                                                      group_patterns={"bias": "conv.bias"})])
    trainer.fit(Frozen(), image_loader())
    scalars = _scalars(root)
    assert scalars["optim/small_v_share/bias"][3] == 1.0
    assert scalars["optim/small_v_share/head"][3] < 0.5
    sgd_root = str(tmp_path / "sgd")
    trainer = make_trainer(tmp_path, logger=TensorBoardLogger(sgd_root), max_steps=4,
                           callbacks=[GradientMonitor(optimizer_state=True, histograms=False)])
    class Momentum(TinyImageModel):
        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.01, momentum=0.9)

    with pytest.warns(UserWarning, match="SGD keeps no Adam-style state"):
        trainer.fit(Momentum(), image_loader())  # no optim/* keys, no error
    assert not any(k.startswith("optim/") for k in _scalars(sgd_root))


class Sharded(AdamModel):
    def train_dataloader(self) -> DataLoader:
        return rank_strided_loader(self.trainer)


@pytest.mark.timeout(170)
@SPAWN_ABORT_RERUN
def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    runs = one_process_and_ddp(tmp_path, lambda: Sharded("adamw", weight_decay=0.1),
                               lambda: GradientMonitor(optimizer_state=True, histograms=False), "optim/")
    assert sorted(runs["ddp"]) == sorted(runs["one"]) and len(runs["one"]) == 12
    for key, values in runs["one"].items():
        assert sorted(values) == [1, 3]
        for step, value in values.items():
            assert runs["ddp"][key][step] == pytest.approx(value, rel=1e-4, abs=1e-7), (key, step)


def test_optimizer_state_adds_no_host_sync(tmp_path):
    """The optimizer state rides the gradients' one packed transfer: nothing between logging steps, one at each."""
    from lightning.pytorch.loggers import TensorBoardLogger

    counter = HostSyncCounter()
    snap = SyncsPerBatch(counter)
    monitor = GradientMonitor(every_n_steps=3, optimizer_state=True, per_param_norms=True)
    trainer = make_trainer(tmp_path, logger=TensorBoardLogger(str(tmp_path / "tb")), callbacks=[monitor, snap],
                           max_steps=7)
    with counter:
        trainer.fit(AdamModel("adam", amsgrad=True), image_loader(n=112))
    assert snap.per_step == {0: 0, 1: 0, 2: 1, 3: 0, 4: 0, 5: 1, 6: 0}, counter.calls


@pytest.mark.gpu
@pytest.mark.parametrize("kind, opt", [("adam", {}), ("adamw", {"amsgrad": True, "weight_decay": 0.05})])
def test_gpu_optimizer_state_matches_the_optimizers_own_state(tmp_path, kind, opt):
    """On CUDA: the step counts' pinned copy, segment_reduce and repeat_interleave on the device."""
    test_optimizer_state_matches_the_optimizers_own_state(tmp_path, kind, opt, accelerator="gpu")
