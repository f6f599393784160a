"""Bad values as the backends hold them: NaN/Inf and half-precision scalars, degenerate gradients, a value one
backend rejects (costing that value only), and the model's own ``self.log`` on a key a monitor logs."""

from __future__ import annotations

import math
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    TinyImageModel,
    find_runs,
    image_loader,
    make_trainer,
    tb_accumulator,
    tb_scalars,
)
from lightning.pytorch.callbacks import Callback

from lightning_monitor import MultiLogger


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
