"""``torch.compile`` inside the module (``self.net = torch.compile(nn.Sequential(...))``): GradientMonitor logs the
same keys as for the plain module, without the compiled wrapper's ``_orig_mod`` segment in any group or name."""

from __future__ import annotations

import shutil

import pytest
import torch
from helpers import image_loader, make_trainer, tb_accumulator
from lightning.pytorch import LightningModule
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F

from lightning_monitor import GradientMonitor
from lightning_monitor._grad.groups import model_name


class Classifier(LightningModule):
    def __init__(self, backend: str | None) -> None:
        super().__init__()
        net = nn.Sequential(nn.Flatten(), nn.Linear(28 * 28, 16), nn.ReLU(), nn.Linear(16, 10))
        self.net = net if backend is None else torch.compile(net, backend=backend)
        self.head_scale = nn.Parameter(torch.ones(1))

    def training_step(self, batch, batch_idx):
        x, y = batch
        loss = F.cross_entropy(self.net(x) * self.head_scale, y)
        self.log("train/loss", loss)
        return loss

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _keys(tmp_path, backend: str | None) -> tuple[set[str], set[str]]:
    logger = TensorBoardLogger(str(tmp_path), name=backend or "eager")
    monitor = GradientMonitor(per_param_norms=True, group_depth=2)
    make_trainer(tmp_path, logger=logger, callbacks=[monitor], max_steps=4).fit(Classifier(backend), image_loader(64))
    tags = tb_accumulator(logger.log_dir).Tags()
    return set(tags["scalars"]), set(tags["histograms"])


BACKENDS = ["aot_eager"] + (["inductor"] if shutil.which("cc") else [])


@pytest.mark.slow
@pytest.mark.timeout(240)
@pytest.mark.parametrize("backend", BACKENDS)
def test_compiled_and_plain_modules_log_the_same_keys(tmp_path, backend):
    torch._dynamo.reset()
    plain_scalars, plain_hists = _keys(tmp_path, None)
    compiled_scalars, compiled_hists = _keys(tmp_path, backend)
    assert compiled_scalars == plain_scalars and compiled_hists == plain_hists
    assert {"grad/norm/net.1", "grad/norm/net.3", "grad/norm_param/net.1.weight"} <= compiled_scalars
    assert "grad/hist/net.3.bias" in compiled_hists
    assert not [k for k in compiled_scalars | compiled_hists if "_orig_mod" in k]


def test_model_name_drops_the_compiled_wrapper_wherever_it_sits():
    assert model_name("net._orig_mod.1.weight") == "net.1.weight"
    assert model_name("_orig_mod.encoder._orig_mod.0.bias") == "encoder.0.bias"
    assert model_name("net.orig_mod_x.weight") == "net.orig_mod_x.weight"  # only the exact segment
    assert model_name("") == ""
