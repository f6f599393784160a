"""ActivationMonitor: values read back from TensorBoard against an independent forward-hook computation."""

from __future__ import annotations

import os
import pickle
import re

import lightning.pytorch as pl
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
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from lightning_monitor import ActivationMonitor
from lightning_monitor.testing import HostSyncCounter


class Net(pl.LightningModule):
    """conv -> relu -> linear (bias -100 possible) -> relu -> head; ``ckpt`` runs the middle under checkpointing."""

    def __init__(self, dead: bool = False, ckpt: bool = False) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 4, 3, stride=2)
        self.act = nn.ReLU()
        self.hidden = nn.Linear(4 * 13 * 13, 32)
        self.relu = nn.ReLU()
        self.head = nn.Linear(32, 10)
        self.ckpt = ckpt
        if dead:
            with torch.no_grad():
                self.hidden.bias.fill_(-100.0)

    def middle(self, x: torch.Tensor) -> torch.Tensor:
        return self.relu(self.hidden(x))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.flatten(self.act(self.conv(x)), 1)
        x = checkpoint(self.middle, x, use_reentrant=False) if self.ckpt else self.middle(x)
        return F.log_softmax(self.head(x), dim=1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.nll_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)


class Reference(pl.Callback):
    """Independent record: the outputs of the watched modules in the forward of every training batch."""

    def __init__(self, names: list[str]) -> None:
        self.names = names
        self.outputs: dict[int, dict[str, list[torch.Tensor]]] = {}
        self._handles: list = []
        self.calls: dict[str, int] = {}

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        step = trainer.global_step
        self.outputs.setdefault(step, {n: [] for n in self.names})  # micro-batches of one step add up
        modules = dict(pl_module.named_modules())
        for n in self.names:
            self._handles.append(modules[n].register_forward_hook(
                lambda m, i, o, n=n, step=step: self.outputs[step][n].append(o.detach().clone())
                if torch.is_grad_enabled() and not self._backward else None))
        self._backward = False

    def on_before_backward(self, trainer, pl_module, loss) -> None:
        self._backward = True

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []


def _expected(outs: list[torch.Tensor], dim: int) -> dict[str, float]:
    x = torch.cat([o.double().movedim(dim, -1).reshape(-1, o.shape[dim]) for o in outs])
    alive = (x != 0).any(dim=0)
    return {"rms": float(x.square().mean().sqrt()), "mean": float(x.mean()), "max_abs": float(x.abs().max()),
            "dead_share": float(1 - alive.double().mean())}


def _scalars(root: str) -> dict[str, dict[int, float]]:
    (path,) = event_files(root)
    acc = tb_accumulator(os.path.dirname(path))
    return {t: {e.step: e.value for e in acc.Scalars(t)} for t in acc.Tags()["scalars"]}


def _fit(tmp_path, monitor, model, *, max_steps=4, loader=None, extra=(), **kwargs):
    torch.manual_seed(0)
    root = str(tmp_path / "tb")
    trainer = make_trainer(tmp_path, logger=TensorBoardLogger(root), max_steps=max_steps,
                           callbacks=[monitor, *extra], **kwargs)
    trainer.fit(model, loader or image_loader())
    return _scalars(root)


WATCHED = {"conv": 1, "act": 1, "hidden": 1, "relu": 1, "head": 1}


@pytest.mark.parametrize("ckpt", [False, True])
def test_values_equal_an_independent_forward_hook_computation(tmp_path, ckpt, accelerator="cpu"):
    ref = Reference(list(WATCHED))
    monitor = ActivationMonitor(types=["Conv2d", "Linear", "ReLU"])
    scalars = _fit(tmp_path, monitor, Net(ckpt=ckpt), extra=[ref], accelerator=accelerator)
    for step in (1, 3):  # log_every_n_steps=2
        for name in WATCHED:
            outs = ref.outputs[step][name]
            assert len(outs) == 1  # checkpointing: the recompute in the backward was not recorded either
            dim = 1 if name in ("conv", "act") else -1
            for stat, value in _expected(outs, dim).items():
                assert scalars[f"act/{stat}/{name}"][step] == pytest.approx(value, rel=1e-5, abs=1e-7), (name, stat)
    assert {k for k in scalars if k.startswith("act/")} == {f"act/{s}/{n}" for s in
                                                          ("rms", "mean", "max_abs", "dead_share") for n in WATCHED}
    assert all(sorted(v) == [1, 3] for k, v in scalars.items() if k.startswith("act/"))


@pytest.mark.gpu
def test_gpu_values_equal_an_independent_forward_hook_computation(tmp_path):
    test_values_equal_an_independent_forward_hook_computation(tmp_path, ckpt=True, accelerator="gpu")


def test_checkpointed_recompute_is_not_counted_twice(tmp_path):
    class Counting(ActivationMonitor):
        calls = 0

        def _hook(self, tap):
            inner = super()._hook(tap)

            def hook(module, inputs, output):
                Counting.calls += self._counting
                inner(module, inputs, output)
            return hook

    _fit(tmp_path, Counting(include=["hidden"]), Net(ckpt=True))
    assert Counting.calls == 2  # 2 logging batches, the forward once each (the recompute ran, not counted)


def test_dead_relu_reports_a_dead_share_of_one(tmp_path):
    scalars = _fit(tmp_path, ActivationMonitor(include=["relu", "hidden"]), Net(dead=True), max_steps=2)
    assert scalars["act/dead_share/relu"][1] == 1.0
    assert scalars["act/rms/relu"][1] == 0.0
    assert scalars["act/dead_share/hidden"][1] == 0.0  # -100 and below: not zero


def test_default_watches_leaf_modules_with_parameters_capped(tmp_path):
    assert set(k.split("/")[2] for k in _fit(tmp_path, ActivationMonitor(), Net(), max_steps=2)
               if k.startswith("act/")) == {"conv", "hidden", "head"}
    with pytest.warns(UserWarning, match="max_modules=2"):
        scalars = _fit(tmp_path / "cap", ActivationMonitor(max_modules=2, exclude=["nothing"]), Net(), max_steps=2)
    assert set(k.split("/")[2] for k in scalars if k.startswith("act/")) == {"conv", "head"}  # first and last


def test_hooks_run_on_logging_batches_only_and_are_removed(tmp_path):
    seen: list[int] = []

    class Probe(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            seen.append(sum(len(m._forward_hooks) for m in pl_module.modules()))

    class Counting(ActivationMonitor):
        calls: list[int] = []

        def _hook(self, tap):
            inner = super()._hook(tap)

            def hook(module, inputs, output):
                Counting.calls.append(self._step)
                inner(module, inputs, output)
            return hook

    _fit(tmp_path, Counting(every_n_steps=3), Net(), max_steps=7, extra=[Probe()])
    assert Counting.calls == [2, 2, 2, 5, 5, 5]  # conv, hidden, head at the logging steps 2 and 5 only
    assert seen == [0] * 7  # removed at every batch's end


def test_no_host_sync_between_logging_steps_and_one_at_each(tmp_path):
    counter = HostSyncCounter()
    snap = SyncsPerBatch(counter)
    with counter:
        _fit(tmp_path, ActivationMonitor(every_n_steps=3, types=["Linear", "ReLU", "Conv2d"]), Net(), max_steps=7,
             loader=image_loader(n=112), extra=[snap])
    assert snap.per_step == {0: 0, 1: 0, 2: 1, 3: 0, 4: 0, 5: 1, 6: 0}, counter.calls


def test_gradient_accumulation_counts_every_micro_batch_of_the_logging_step(tmp_path):
    ref = Reference(["hidden"])
    scalars = _fit(tmp_path, ActivationMonitor(include=["hidden"]), Net(), max_steps=2, extra=[ref],
                   accumulate_grad_batches=2)
    assert sorted(scalars["act/rms/hidden"]) == [1]
    outs = ref.outputs[1]["hidden"]
    assert len(outs) == 2  # both micro-batches of optimizer step 1
    for stat, value in _expected(outs, -1).items():
        assert scalars[f"act/{stat}/hidden"][1] == pytest.approx(value, rel=1e-5, abs=1e-7), stat


def test_compiled_module_is_skipped_with_one_warning(tmp_path):
    class Compiled(Net):
        def __init__(self) -> None:
            super().__init__()
            self.hidden = torch.compile(self.hidden, backend="aot_eager")

    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    with pytest.warns(UserWarning, match="torch.compile region \\(hidden\\)"):
        scalars = _fit(tmp_path, ActivationMonitor(every_n_steps=1), Compiled(), max_steps=6)
    assert counters["stats"]["unique_graphs"] == 1  # compiled once: no recompile at the logging steps
    assert {k.split("/")[2] for k in scalars if k.startswith("act/")} == {"conv", "head"}


def test_bad_arguments_are_rejected_with_their_value():
    with pytest.raises(TypeError, match="`types` must be a list of strings, got 'Linear'"):
        ActivationMonitor(types="Linear")
    with pytest.raises((TypeError, ValueError), match="max_modules"):
        ActivationMonitor(max_modules=-1)


def test_logged_keys_match_the_docstring_and_picklable_after_a_fit(tmp_path):
    rows = re.findall(r"^\s*``([^`]+)``\s{2,}(.+?)\s*$", ActivationMonitor.__doc__, flags=re.M)
    assert {k: v for k, v in rows if "/" in k} == ActivationMonitor.LOGGED_KEYS
    monitor = ActivationMonitor()
    _fit(tmp_path, monitor, TinyImageModel(), max_steps=2)
    assert type(pickle.loads(pickle.dumps(monitor))) is ActivationMonitor


class Sharded(Net):
    def train_dataloader(self) -> DataLoader:
        return rank_strided_loader(self.trainer)


@pytest.mark.timeout(170)
@SPAWN_ABORT_RERUN
def test_ddp_two_processes_equal_one_process_on_the_same_global_batch(tmp_path):
    runs = one_process_and_ddp(tmp_path, Sharded, lambda: ActivationMonitor(types=["Conv2d", "Linear", "ReLU"]), "act/")
    assert sorted(runs["ddp"]) == sorted(runs["one"]) and len(runs["one"]) == 20
    for key, values in runs["one"].items():
        assert sorted(values) == [1, 3]
        for step, value in values.items():
            assert runs["ddp"][key][step] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, step)


def test_dashboard_layout_puts_a_family_on_one_chart():
    from lightning_monitor._writers.layout import charts

    tags = ["act/rms/conv", "act/rms/head", "act/dead_share/conv", "optim/update_cos/head", "train/loss"]
    got = {title: (category, members) for category, title, _, members in charts(tags)}
    assert got["activation RMS per module"] == ("activations", ("act/rms/conv", "act/rms/head"))
    assert got["dead unit share per module"] == ("activations", ("act/dead_share/conv",))
    assert got["update/gradient cosine per group"] == ("gradients", ("optim/update_cos/head",))
