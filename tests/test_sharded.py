"""Sharded training on 2 CPU processes (gloo): ModelParallelStrategy with FSDP2 (``fully_shard`` in
``configure_model``), each run a subprocess under a timeout, checked through the files it wrote."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time

import numpy as np
import psutil
import pytest
from helpers import flat_shard_trainer, tb_images, tb_scalars

from lightning_monitor._grid import draw as _draw

SHARDED_JOB = '''
import json, os, sys
sys.path.insert(0, {tests!r})
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard
from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module
from torch.distributed.tensor import DTensor
from torch.nn import functional as F
from torch.utils.data import DataLoader, IterableDataset
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.strategies import ModelParallelStrategy
from helpers import TinyImageModel, image_data, image_loader, make_trainer
from lightning_monitor import ActivationMonitor, PredictionGridMonitor

N = {num_samples}
MODE = {mode!r}


class ShardedNet(TinyImageModel):
    """TinyImageModel with FSDP2: each layer and the root sharded over the 2 ranks."""

    allow_zero_length_dataloader_with_multiple_devices = True

    def configure_model(self):
        fully_shard(self.conv)
        fully_shard(self.head)
        fully_shard(self)

    def forward(self, x):
        out = super().forward(x)
        if len(x) == N:  # a grid forward on the N fixed samples: which rank, at which step, what it predicted
            with open(f"grid_forward_rank{{self.global_rank}}.jsonl", "a") as f:
                f.write(json.dumps([self.trainer.global_step, out.argmax(1).tolist()]) + "\\n")
        return out

    def validation_step(self, batch, batch_idx):
        if MODE == "full":
            super().validation_step(batch, batch_idx)
        # MODE "rank1_empty": rank 1 has no validation batches, so no sharded forward may run per batch


class TensorParallelNet(TinyImageModel):
    """An MLP classifier whose output layer is split column-wise over the 2 ranks (tensor parallel): its output is
    a DTensor sharded over the classes, which its own steps gather with ``full_tensor()``."""

    def __init__(self):
        super().__init__()
        self.hidden, self.out = nn.Linear(28 * 28, 32), nn.Linear(32, 10)

    def configure_model(self):
        parallelize_module(self.out, self.device_mesh["tensor_parallel"], ColwiseParallel(use_local_output=False))

    def forward(self, x):
        out = self.out(torch.relu(self.hidden(x.flatten(1))))
        if len(x) == N and self._trainer is not None:
            with open(f"grid_forward_rank{{self.global_rank}}.jsonl", "a") as f:
                full = out.full_tensor() if isinstance(out, DTensor) else out
                f.write(json.dumps([self.trainer.global_step, full.argmax(1).tolist(), type(out).__name__]) + "\\n")
        return out

    def training_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        return F.cross_entropy(out.full_tensor() if isinstance(out, DTensor) else out, y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        out = self(x)
        self.log("val/loss", F.cross_entropy(out.full_tensor() if isinstance(out, DTensor) else out, y))


class RankZeroOnly(IterableDataset):
    """Validation samples on rank 0 only: rank 1's loader yields nothing."""

    def __iter__(self):
        if int(os.environ.get("LOCAL_RANK", "0")) == 0:
            data = image_data(40, seed=1)
            for i in range(0, 40, 8):
                yield data.tensors[0][i : i + 8], data.tensors[1][i : i + 8]


class Unsharded(Callback):
    """At the end of training: the full weights (gathered on every rank), loaded into a plain unsharded copy on
    rank 0, which predicts the grid's fixed samples."""

    def on_train_end(self, trainer, pl_module):
        state = {{k: v.full_tensor() if isinstance(v, DTensor) else v for k, v in pl_module.state_dict().items()}}
        if trainer.is_global_zero:
            copy = TensorParallelNet() if MODE == "tp" else TinyImageModel()
            copy.load_state_dict(state)
            copy.eval()
            grid = next(c for c in trainer.callbacks if isinstance(c, PredictionGridMonitor))
            with torch.no_grad():
                predicted = copy(grid._images).argmax(1)
            with open("unsharded.json", "w") as f:
                json.dump({{"predicted": predicted.tolist(), "labels": grid._labels.tolist(),
                           "accuracy": (predicted == grid._labels).float().mean().item()}}, f)


if __name__ == "__main__":
    torch.manual_seed(0)
    tp = MODE == "tp"
    strategy = ModelParallelStrategy(data_parallel_size=1 if tp else 2, tensor_parallel_size=2 if tp else 1)
    full = MODE in ("full", "tp")
    monitor = PredictionGridMonitor(num_samples=N, every_n_steps=None if full else 3)
    # "full": 64 samples split by Lightning's DistributedSampler, 2 steps an epoch, 2 epochs; "rank1_empty": no
    # sampler (each rank reads all 64), 4 steps, one epoch
    trainer = make_trainer({root!r}, strategy=strategy, devices=2, max_epochs=2 if full else 1, max_steps=-1,
                           log_every_n_steps=2,
                           logger=TensorBoardLogger({root!r}, name="tb", version=0),
                           callbacks=[monitor, Unsharded(), *([ActivationMonitor()] if tp else [])],
                           use_distributed_sampler=full)
    val = image_loader(n=40, batch_size=8, seed=1) if full else DataLoader(RankZeroOnly(), batch_size=None)
    trainer.fit(TensorParallelNet() if tp else ShardedNet(), image_loader(n=64, batch_size=16), val)
    os.write(1, ("RANK %d DONE\\n" % trainer.global_rank).encode())  # one write: the ranks share stdout
'''


def _run(tmp_path, mode: str, num_samples: int = 10):
    script = tmp_path / f"sharded_{mode}.py"
    script.write_text(SHARDED_JOB.format(tests=os.path.dirname(__file__), root=str(tmp_path), mode=mode,
                                         num_samples=num_samples))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("LOCAL_RANK", "NODE_RANK", "WORLD_SIZE"))}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=170)
    time.sleep(1)
    orphans = [p for p in psutil.process_iter(["cmdline"]) if str(script) in " ".join(p.info["cmdline"] or [])]
    assert proc.returncode == 0, proc.stderr[-4000:]
    assert "RANK 0 DONE" in proc.stdout and "RANK 1 DONE" in proc.stdout and not orphans
    return proc


def _forwards(tmp_path, rank: int) -> list[tuple[int, list[int]]]:
    """(trainer.global_step, predicted classes) of every forward of the grid's fixed samples on ``rank``."""
    lines = (tmp_path / f"grid_forward_rank{rank}.jsonl").read_text().splitlines()
    return [tuple(json.loads(line)[:2]) for line in lines]


def _tiles_shape(n: int) -> tuple[int, int, int]:
    tile_w = 66
    tile_h = tile_w + _draw.band_px(tile_w)
    width, height = _draw.grid_size(n, _draw.columns(n, tile_w, tile_h, 2), tile_w, tile_h, 2)
    return height, width, 3


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fsdp2_grid_every_rank_runs_the_model_rank_zero_draws(tmp_path):
    """Two epochs of 2 steps: a grid after each validation, from a forward on both ranks (FSDP2 needs them both) on
    the same fixed samples; its accuracy is the one an unsharded copy of the final weights gets on them."""
    _run(tmp_path, "full")
    log_dir = tmp_path / "tb" / "version_0"
    grids = tb_images(log_dir, "predictions/grid")
    assert [s for s, _ in grids] == [1, 3]  # the steps Lightning logs each validation's val/loss at
    assert all(g.shape == _tiles_shape(10) for _, g in grids)  # 10 tiles in the default layout
    rank0, rank1 = _forwards(tmp_path, 0), _forwards(tmp_path, 1)
    assert [s for s, _ in rank0] == [s for s, _ in rank1] == [2, 4]  # every rank, once per validation
    assert [p for _, p in rank0] == [p for _, p in rank1]  # the same samples on both ranks: the same predictions
    unsharded = json.loads((tmp_path / "unsharded.json").read_text())
    assert rank0[-1][1] == unsharded["predicted"]
    accuracy = tb_scalars(log_dir, "predictions/accuracy")
    assert [s for s, _ in accuracy] == [1, 3] and accuracy[-1][1] == pytest.approx(unsharded["accuracy"])
    assert len(list(tmp_path.glob("tb/version_0/events.out.tfevents.*"))) == 1  # rank 0 alone wrote


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_fsdp2_grid_with_a_rank_that_has_no_validation_batches(tmp_path):
    """Rank 1's validation loader yields nothing: the samples come from rank 0 (broadcast once), so rank 1 still
    joins every grid forward and nothing hangs: a training grid (every 3 steps) and the grid after validation."""
    _run(tmp_path, "rank1_empty")
    log_dir = tmp_path / "tb" / "version_0"
    rank0, rank1 = _forwards(tmp_path, 0), _forwards(tmp_path, 1)
    # the training grid after the batch of step 2 (3 updates), the validation grid at the end (4 updates)
    assert [s for s, _ in rank0] == [s for s, _ in rank1] == [3, 4]
    assert [p for _, p in rank0] == [p for _, p in rank1]
    grids = tb_images(log_dir, "predictions/grid")
    assert [s for s, _ in grids] == [2, 3] and all(g.shape == _tiles_shape(10) for _, g in grids)
    unsharded = json.loads((tmp_path / "unsharded.json").read_text())
    assert tb_scalars(log_dir, "predictions/accuracy")[-1][1] == pytest.approx(unsharded["accuracy"])


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_fsdp1_and_deepspeed_are_refused_in_setup_naming_what_works(strategy):
    """Their wrapper owns the module's forward (flat, sharded parameters): refused before any training step."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_monitor import PredictionGridMonitor

    with pytest.raises(MisconfigurationException, match=rf"{strategy} wraps .*use ModelParallelStrategy with FSDP2"):
        PredictionGridMonitor().setup(flat_shard_trainer(strategy), None, "fit")


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_tensor_parallel_grid_gathers_a_dtensor_output(tmp_path):
    """Tensor parallel (the output layer split over 2 ranks): the module returns a DTensor sharded over the classes;
    the grid gathers it on every rank and draws the unsharded model's predictions."""
    _run(tmp_path, "tp")
    log_dir = tmp_path / "tb" / "version_0"
    kinds = [json.loads(line)[2] for line in (tmp_path / "grid_forward_rank0.jsonl").read_text().splitlines()]
    assert kinds == ["DTensor", "DTensor"]  # what the grid was handed, at each of the 2 validations
    rank0, rank1 = _forwards(tmp_path, 0), _forwards(tmp_path, 1)
    assert [s for s, _ in rank0] == [s for s, _ in rank1] == [4, 8]  # both ranks, at each validation
    unsharded = json.loads((tmp_path / "unsharded.json").read_text())
    assert rank0[-1][1] == unsharded["predicted"]
    accuracy = tb_scalars(log_dir, "predictions/accuracy")
    assert [s for s, _ in accuracy] == [3, 7] and accuracy[-1][1] == pytest.approx(unsharded["accuracy"])
    assert [s for s, _ in tb_images(log_dir, "predictions/grid")] == [3, 7]
    # ActivationMonitor in the same fit: the layer split over the ranks returns a DTensor, read as each rank's part
    for module in ("hidden", "out"):
        rms = tb_scalars(log_dir, f"act/rms/{module}")
        assert [s for s, _ in rms] == [1, 3, 5, 7] and all(np.isfinite(v) and v > 0 for _, v in rms), module
