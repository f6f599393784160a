"""Lightning's generic logger checks (its tests_pytorch/loggers/test_all.py) for MultiLogger, against the real
TensorBoard and wandb backends, read back from their files instead of mocks."""

from __future__ import annotations

import os
import pickle

import pytest
import torch
from conftest import SPAWN_ABORT_RERUN
from helpers import event_files, find_runs, tb_accumulator
from lightning.pytorch import Callback, Trainer
from lightning.pytorch.demos.boring_classes import BoringModel
from lightning.pytorch.loggers.logger import DummyExperiment

from lightning_monitor import MultiLogger


class _MetricModel(BoringModel):
    def training_step(self, batch, batch_idx):
        loss = self.step(batch)
        self.log("train_some_val", loss)
        return {"loss": loss}

    def on_validation_epoch_end(self):
        self.log_dict({"early_stop_on": torch.tensor(1), "val_loss": torch.tensor(0.5)})

    def on_test_epoch_end(self):
        self.log("test_loss", torch.tensor(2))


class _RecordingMultiLogger(MultiLogger):
    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.history = []

    def log_metrics(self, metrics, step=None):
        super().log_metrics(metrics, step)
        self.history.append((step, sorted(metrics)))


EXPECTED = [
    (0, ["epoch", "train_some_val"]),
    (0, ["early_stop_on", "epoch", "val_loss"]),
    (1, ["epoch", "test_loss"]),
]


def test_fit_then_test_metric_sequence(tmp_path):
    logger = _RecordingMultiLogger(save_dir=tmp_path)
    trainer = Trainer(max_epochs=1, logger=logger, limit_train_batches=1, limit_val_batches=1, log_every_n_steps=1,
                      default_root_dir=tmp_path, enable_progress_bar=False, enable_model_summary=False)
    trainer.fit(_MetricModel())
    trainer.test()
    assert logger.history == EXPECTED
    # ... and that is what the backends hold
    acc = tb_accumulator(logger.log_dir)
    tb = sorted((e.step, tag) for tag in acc.Tags()["scalars"] for e in acc.Scalars(tag))
    assert tb == sorted((step, key) for step, keys in EXPECTED for key in keys)
    runs = find_runs(logger.log_dir)  # fit, then test resuming the same run
    assert {r.run_id for r in runs} == {logger.run_id}
    rows = [row for run in runs for row in run.history]
    wandb_rows = [(row["trainer/global_step"], sorted(k for k in row if not k.startswith(("_", "trainer/"))))
                  for row in rows]
    assert wandb_rows == EXPECTED


def test_pickle_logger_and_trainer(tmp_path):
    logger = MultiLogger(save_dir=tmp_path)
    _ = logger.experiment
    logger.log_metrics({"a": 1})
    logger.save()
    pickle.dumps(logger)
    trainer = Trainer(max_epochs=1, logger=logger, default_root_dir=tmp_path)
    trainer2 = pickle.loads(pickle.dumps(trainer))
    trainer2.logger.log_metrics({"acc": 1.0})
    assert trainer2.logger.name == logger.name
    assert trainer2.logger.save_dir == logger.save_dir
    assert trainer2.logger.log_dir == logger.log_dir
    trainer2.logger.finalize("success")
    logger.finalize("success")
    assert {"a", "acc"} <= set(tb_accumulator(logger.log_dir).Tags()["scalars"])
    runs = find_runs(logger.log_dir)
    assert {r.run_id for r in runs} == {logger.run_id}  # the copy resumed the same wandb run
    assert {k for r in runs for k in r.keys()} >= {"a", "acc"}


class _LazyInitExperimentCheck(Callback):
    def setup(self, trainer, pl_module, stage=None):
        if trainer.global_rank == 0:
            assert trainer.logger.experiment is not None


class _RankZeroLoggerCheck(Callback):
    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
        is_dummy = isinstance(trainer.logger.experiment, DummyExperiment)
        if trainer.is_global_zero:
            assert not is_dummy
        else:
            assert is_dummy
            assert pl_module.logger.experiment.something(foo="bar") is None


@pytest.mark.timeout(180)
@SPAWN_ABORT_RERUN
def test_ddp_spawn_experiment_only_on_rank_zero(tmp_path):
    logger = MultiLogger(save_dir=tmp_path / "runs")
    trainer = Trainer(logger=logger, default_root_dir=tmp_path, strategy="ddp_spawn", accelerator="cpu", devices=2,
                      max_steps=1, log_every_n_steps=1, callbacks=[_LazyInitExperimentCheck(), _RankZeroLoggerCheck()],
                      enable_progress_bar=False, enable_model_summary=False, enable_checkpointing=False)
    trainer.fit(_MetricModel())
    assert os.listdir(tmp_path / "runs" / "lightning_logs") == ["version_0"]
    assert len(event_files(tmp_path / "runs")) == 1
    (run,) = find_runs(tmp_path / "runs")  # one wandb run, from rank 0
    assert run.series("train_some_val")[0][0] == 0


def test_prefix(tmp_path):
    logger = MultiLogger(save_dir=tmp_path, prefix="tmp")
    logger.log_metrics({"test": 1.0}, step=0)
    logger.finalize("success")
    assert [(e.step, e.value) for e in tb_accumulator(logger.log_dir).Scalars("tmp-test")] == [(0, 1.0)]
    (run,) = find_runs(logger.log_dir)
    assert run.series("tmp-test") == [(0, 1.0)]


def test_default_name(tmp_path):
    assert MultiLogger(save_dir=tmp_path).name == "lightning_logs"
