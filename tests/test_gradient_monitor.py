"""GradientMonitor: values read back from TensorBoard and wandb against independent torch computations."""

from __future__ import annotations

import copy
import json
import os
import pickle
import re
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import SPAWN_ABORT_RERUN
from helpers import SyncsPerBatch, TinyImageModel, event_files, find_runs, image_loader, make_trainer, tb_accumulator
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from torch.nn import functional as F

from lightning_monitor import GradientMonitor, MultiLogger
from lightning_monitor._grad.bins import bin_counts
from lightning_monitor._grad.stats import sample_stride, summarize
from lightning_monitor.testing import HostSyncCounter

PARAMS = ["conv.weight", "conv.bias", "head.weight", "head.bias"]


class GradCapture(pl.Callback):
    """Independent record of what the optimizer is about to see: grads and weights per optimizer step."""

    def __init__(self) -> None:
        self.grads: dict[int, dict[str, torch.Tensor]] = {}
        self.before: dict[int, dict[str, torch.Tensor]] = {}
        self.after: dict[int, dict[str, torch.Tensor]] = {}
        self.calls: list[int] = []

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        step = trainer.global_step
        self.calls.append(step)
        self.grads[step] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters() if p.grad is not None}
        self.before[step] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}

    def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
        if self.calls:
            self.after[self.calls[-1]] = {n: p.detach().clone() for n, p in pl_module.named_parameters()}


def _multi_logger() -> MultiLogger:
    # absolute: wandb's service process keeps the cwd of the first test and would resolve "runs" against it
    return MultiLogger(save_dir=os.path.abspath("runs"), name="gm")


def _norm(tensors) -> float:
    return float(torch.linalg.vector_norm(torch.cat([t.reshape(-1).double() for t in tensors])))


def _fit(monitor: GradientMonitor, model: pl.LightningModule | None = None, loader=None, **kwargs):
    torch.manual_seed(0)
    capture = GradCapture()
    kwargs.setdefault("logger", _multi_logger())
    trainer = make_trainer(".", callbacks=[monitor, capture], **kwargs)
    trainer.fit(model or TinyImageModel(), loader or image_loader())
    return trainer, capture


def _acc(root: str = "runs") -> Any:
    """TensorBoard events of the one run under ``root``."""
    (path,) = event_files(root)
    return tb_accumulator(os.path.dirname(path))


def _tb_scalars(acc, tag) -> dict[int, float]:
    return {e.step: e.value for e in acc.Scalars(tag)}


def test_norms_and_histograms_match_torch_in_tensorboard_and_wandb():
    trainer, capture = _fit(GradientMonitor(max_hist_elements=None, per_param_norms=True), max_steps=4)
    acc = _acc()
    (run,) = find_runs("runs")
    logged = [1, 3]
    for step in logged:
        grads = capture.grads[step]
        expected = {
            "grad/norm_total": _norm(grads.values()),
            "grad/norm/conv": _norm([grads["conv.weight"], grads["conv.bias"]]),
            "grad/norm/head": _norm([grads["head.weight"], grads["head.bias"]]),
            **{f"grad/norm_param/{n}": _norm([grads[n]]) for n in PARAMS},
        }
        for key, value in expected.items():
            assert _tb_scalars(acc, key)[step] == pytest.approx(value, rel=1e-5), key
            assert dict(run.series(key))[step] == pytest.approx(value, rel=1e-6), key
        for name in PARAMS:
            g = grads[name].reshape(-1).double()
            ref_counts, ref_edges = torch.histogram(g.float(), bins=64, range=(float(g.min()), float(g.max())))
            tb = next(e for e in acc.Histograms(f"grad/hist/{name}") if e.step == step).histogram_value
            assert sum(tb.bucket) == g.numel()
            np.testing.assert_array_equal(tb.bucket, ref_counts.numpy())
            np.testing.assert_allclose(tb.bucket_limit, ref_edges[1:].numpy(), rtol=1e-5, atol=1e-7)
            assert (tb.min, tb.max, tb.num) == pytest.approx((float(g.min()), float(g.max()), g.numel()), rel=1e-6)
            assert tb.sum == pytest.approx(float(g.sum()), abs=1e-5 * float(g.abs().sum()))  # float32 summation
            assert tb.sum_squares == pytest.approx(float(g.square().sum()), rel=1e-5)
            wb = dict(run.series(f"grad/hist/{name}"))[step]
            assert wb["values"] == ref_counts.long().tolist()
            np.testing.assert_allclose(wb["bins"], ref_edges.numpy(), rtol=1e-5, atol=1e-7)
    assert sorted(_tb_scalars(acc, "grad/norm_total")) == logged
    assert [s for s, _ in run.series("grad/norm_total")] == logged


def test_sampled_histogram_keeps_exact_stats_and_scales_counts():
    g = torch.Generator().manual_seed(0)
    x = torch.randn(1000, 333, generator=g)
    row = summarize([x], [x.double().square().sum()], 32, 10_000, "minmax")[0].numpy()
    stride = sample_stride(x.numel(), 10_000)
    assert stride == 37  # smallest prime >= ceil(333000 / 10000) = 34
    xd = x.double()
    expected = [float(xd.min()), float(xd.max()), float(xd.sum()), float(xd.square().sum()), x.numel()]
    assert row[:5] == pytest.approx(expected, rel=1e-5, abs=0.05)
    assert row[7:].sum() == pytest.approx(x.numel())
    sample = x.reshape(-1)[::stride]
    ref, _ = torch.histogram(sample, bins=32, range=(float(x.min()), float(x.max())))
    np.testing.assert_allclose(row[7:], ref.numpy() * x.numel() / sample.numel(), rtol=1e-6)


def test_bin_counts_edge_cases():
    zero = torch.zeros(10)
    assert bin_counts(zero, zero.min(), zero.max(), 4).tolist() == [10, 0, 0, 0]
    x = torch.tensor([-5.0, 0.1, 0.2, 9.0])  # fixed range [0, 1]: outside values go to the edge bins
    assert bin_counts(x, torch.tensor(0.0), torch.tensor(1.0), 2).tolist() == [3, 1]


def test_gradient_accumulation_logs_once_per_optimizer_step():
    trainer, capture = _fit(GradientMonitor(every_n_steps=1), max_steps=3, accumulate_grad_batches=2)
    assert capture.calls == [0, 1, 2]
    scalars = _tb_scalars(_acc(), "grad/norm_total")
    assert sorted(scalars) == [0, 1, 2]
    for step, value in scalars.items():
        assert value == pytest.approx(_norm(capture.grads[step].values()), rel=1e-5)
    hist_steps = [e.step for e in _acc().Histograms("grad/hist/head.weight")]
    assert hist_steps == [0, 1, 2]


def _reference_grad_norm(model: pl.LightningModule, batch) -> float:
    model = copy.deepcopy(model)
    x, y = batch
    F.nll_loss(model(x), y).backward()
    return _norm([p.grad for p in model.parameters()])


@pytest.mark.parametrize("precision", ["bf16-mixed", "16-mixed"])
def test_amp_logs_unscaled_gradients(precision):
    """bf16 autocast on CPU; fp16 autocast with a GradScaler (``Trainer(precision="16-mixed")`` on CPU silently
    becomes bf16-mixed, so the fp16 case passes Lightning's ``MixedPrecision`` plugin explicitly)."""
    from lightning.pytorch.plugins.precision import MixedPrecision

    torch.manual_seed(0)
    model = TinyImageModel()
    loader = image_loader(n=16, batch_size=16)
    reference = _reference_grad_norm(model, next(iter(loader)))
    amp = dict(precision=precision) if precision == "bf16-mixed" else dict(plugins=[MixedPrecision("16-mixed", "cpu")])
    trainer, capture = _fit(GradientMonitor(every_n_steps=1), model, loader, max_steps=1, **amp)
    if precision == "16-mixed":
        assert trainer.precision_plugin.scaler is not None and trainer.precision_plugin.scaler.get_scale() > 1000
    logged = _tb_scalars(_acc(), "grad/norm_total")[0]
    assert logged == pytest.approx(reference, rel=0.05)  # a scaled gradient would be ~65536x larger


class NaNModel(TinyImageModel):
    """Puts 3 NaN and 1 Inf into ``head.weight``'s gradient at the optimizer steps in ``bad_steps``."""

    def __init__(self, bad_steps=(1,), optimizer: str = "sgd", repair: bool = False) -> None:
        super().__init__()
        self.bad_steps = set(bad_steps)
        self.optimizer_name = optimizer
        self.repair = repair

    def on_before_optimizer_step(self, optimizer) -> None:
        if self.repair:  # runs after the callbacks' hook: keeps the weights finite so later steps are clean
            for p in self.parameters():
                torch.nan_to_num_(p.grad, nan=0.0, posinf=0.0, neginf=0.0)

    def on_after_backward(self) -> None:
        if self.trainer.global_step in self.bad_steps:
            self.head.weight.grad[0, :3] = float("nan")
            self.head.weight.grad[0, 3] = float("inf")

    def configure_optimizers(self):
        if self.optimizer_name == "adamw":
            return torch.optim.AdamW(self.parameters(), lr=0.01, weight_decay=0.1)
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9, weight_decay=0.01)


def test_nonfinite_warn_counts_names_and_keeps_histograms_finite():
    with pytest.warns(UserWarning, match=r"NaN/Inf gradients .*head\.weight"):
        trainer, capture = _fit(GradientMonitor(max_hist_elements=None), NaNModel((0, 3), repair=True), max_steps=6)
    assert trainer.global_step == 6  # training went on
    acc = _acc()
    # steps 1, 3, 5 log; step 0 (not logged) and step 3 (logged) were bad
    assert _tb_scalars(acc, "grad/nonfinite_count") == {1: 0.0, 3: 4.0, 5: 0.0}
    assert _tb_scalars(acc, "grad/nonfinite_steps") == {1: 1.0, 3: 1.0, 5: 0.0}
    assert _tb_scalars(acc, "grad/nonfinite/head.weight") == {1: 0.0, 3: 4.0, 5: 0.0}
    assert np.isnan(_tb_scalars(acc, "grad/norm/head")[3])
    hist = next(e for e in acc.Histograms("grad/hist/head.weight") if e.step == 3).histogram_value
    g = capture.grads[3]["head.weight"].reshape(-1)
    finite = g[torch.isfinite(g)]
    assert hist.num == finite.numel() == sum(hist.bucket) == g.numel() - 4
    assert (hist.min, hist.max) == pytest.approx((float(finite.min()), float(finite.max())))
    (run,) = find_runs("runs")
    assert dict(run.series("grad/nonfinite/head.weight"))[3] == 4
    assert sum(dict(run.series("grad/hist/head.weight"))[3]["values"]) == g.numel() - 4


def test_nonfinite_raise_names_the_parameter():
    with pytest.raises(FloatingPointError, match=r"step 2 .*head\.weight \(4 NaN/Inf\)"):
        _fit(GradientMonitor(nonfinite="raise"), NaNModel(bad_steps=(2,)), max_steps=6)


@pytest.mark.parametrize("optimizer", ["sgd", "adamw"])
@pytest.mark.parametrize("bad_step", [2, 3])  # a non-logging and a logging step
def test_nonfinite_skip_leaves_weights_and_optimizer_state_untouched(optimizer, bad_step):
    model = NaNModel(bad_steps=(bad_step,), optimizer=optimizer)
    states = {}

    class StateCapture(pl.Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx):
            opt = trainer.optimizers[0]
            states[trainer.global_step - 1] = {k: copy.deepcopy(v) for k, v in opt.state[pl_module.head.weight].items()}

    monitor = GradientMonitor(nonfinite="skip")
    trainer = make_trainer(".", logger=TensorBoardLogger("runs"),
                           callbacks=[monitor, capture := GradCapture(), StateCapture()], max_steps=5)
    trainer.fit(model, image_loader())
    for step in range(5):
        before, after = capture.before[step], capture.after[step]
        changed = any(not torch.equal(before[n], after[n]) for n in PARAMS)
        assert changed == (step != bad_step), step
        assert all(torch.isfinite(after[n]).all() for n in PARAMS)
    for key, value in states[bad_step].items():
        torch.testing.assert_close(value, states[bad_step - 1][key], rtol=0, atol=0)  # momentum / Adam moments, step
    steps = _tb_scalars(_acc(), "grad/nonfinite_steps")
    assert steps[3] == 1.0 and 1 not in steps  # logged from the first logging step that saw a NaN/Inf on


def test_no_host_sync_on_non_logging_steps_and_one_per_logging_step():
    counter = HostSyncCounter()
    snap = SyncsPerBatch(counter)
    monitor = GradientMonitor(every_n_steps=3, per_param_norms=True, param_norms=True, param_histograms=True)
    trainer = make_trainer(".", logger=_multi_logger(), callbacks=[monitor, snap], max_steps=7)
    with counter:
        trainer.fit(TinyImageModel(), image_loader(n=112))
    assert snap.per_step == {0: 0, 1: 0, 2: 1, 3: 0, 4: 0, 5: 1, 6: 0}, counter.calls


def test_update_ratio_and_param_norms_match_weights():
    monitor = GradientMonitor(param_norms=True, update_ratio=True, param_histograms=True, histograms=False)
    trainer, capture = _fit(monitor, max_steps=4)
    acc = _acc()
    for step in (1, 3):
        before, after = capture.before[step], capture.after[step]
        for group in ("conv", "head"):
            names = [f"{group}.weight", f"{group}.bias"]
            w = _norm([before[n] for n in names])
            delta = _norm([after[n] - before[n] for n in names])
            assert _tb_scalars(acc, f"param/norm/{group}")[step] == pytest.approx(w, rel=1e-5)
            assert _tb_scalars(acc, f"param/update_ratio/{group}")[step] == pytest.approx(delta / w, rel=1e-4)
        total = _norm([after[n] - before[n] for n in PARAMS]) / _norm(before.values())
        assert _tb_scalars(acc, "param/update_ratio_total")[step] == pytest.approx(total, rel=1e-4)
        hist = next(e for e in acc.Histograms("param/hist/head.weight") if e.step == step).histogram_value
        assert hist.max == pytest.approx(float(before["head.weight"].max()))
    assert "grad/hist/head.weight" not in acc.Tags()["histograms"]


def _documented_keys(doc: str) -> dict[str, str]:
    rows = re.findall(r"^\s*``([^`]+)``\s{2,}(.+?)\s*$", doc, flags=re.M)
    return {k: v for k, v in rows if "/" in k}


def test_logged_keys_match_docstring_and_a_real_run():
    assert _documented_keys(GradientMonitor.__doc__) == GradientMonitor.LOGGED_KEYS
    monitor = GradientMonitor(per_param_norms=True, param_norms=True, update_ratio=True, param_histograms=True)
    _fit(monitor, NaNModel(bad_steps=(1,)), max_steps=2)
    acc = _acc()
    logged = {t for t in acc.Tags()["scalars"] + acc.Tags()["histograms"] if t.startswith(("grad/", "param/"))}
    patterns = {re.sub(r"\\\{\w+\\\}", ".+", re.escape(k)): k for k in GradientMonitor.LOGGED_KEYS}
    used = {next(k for p, k in patterns.items() if re.fullmatch(p, tag)) for tag in logged}
    several = {k for k in GradientMonitor.LOGGED_KEYS if k.startswith("grad/optimizer_")}  # the GAN test logs these
    adam = {k for k in GradientMonitor.LOGGED_KEYS if k.startswith("optim/")}  # test_optimizer_state logs these
    assert used == set(GradientMonitor.LOGGED_KEYS) - several - adam and several and adam


def test_groups_by_depth_and_patterns():
    assert GradientMonitor().group_of("encoder.layers.0.weight") == "encoder"
    assert GradientMonitor(group_depth=3).group_of("encoder.layers.0.weight") == "encoder.layers.0"
    assert GradientMonitor(group_depth=3).group_of("head.bias") == "head"
    assert GradientMonitor().group_of("scale") == "scale"
    assert GradientMonitor(group_depth=0).group_of("head.bias") is None
    monitor = GradientMonitor(group_patterns={"attn": "*.attn.*", "norms": ["*norm*", "*ln*"]})
    assert monitor.group_of("blocks.0.attn.qkv.weight") == "attn"
    assert monitor.group_of("blocks.1.ln_1.weight") == "norms"
    assert monitor.group_of("blocks.1.mlp.weight") == "blocks"


def test_include_exclude_select_histograms():
    monitor = GradientMonitor(include=["head.*", "conv.*"], exclude=["*.bias"], per_param_norms=True)
    _fit(monitor, max_steps=2)
    acc = _acc()
    assert sorted(t for t in acc.Tags()["histograms"]) == ["grad/hist/conv.weight", "grad/hist/head.weight"]
    assert sorted(t for t in acc.Tags()["scalars"] if "norm_param" in t) == [
        "grad/norm_param/conv.weight", "grad/norm_param/head.weight"
    ]
    assert "grad/norm/conv" in acc.Tags()["scalars"]  # group and total norms always cover every parameter


@pytest.mark.parametrize(
    "kwargs, match",
    [
        (dict(every_n_steps=0), "every_n_steps.*got 0"),
        (dict(group_depth=-1), "group_depth.*got -1"),
        (dict(bins=513), "bins.*got 513"),
        (dict(max_hist_elements=0), "max_hist_elements.*got 0"),
        (dict(nonfinite="ignore"), "nonfinite.*'ignore'"),
        (dict(hist_range="wide"), "hist_range.*'wide'"),
        (dict(hist_range=(1.0, -1.0)), r"hist_range.*\(1.0, -1.0\)"),
    ],
)
def test_bad_arguments_are_rejected_with_their_value(kwargs, match):
    with pytest.raises(ValueError, match=match):
        GradientMonitor(**kwargs)


def test_setup_rejects_a_trainer_without_logger():
    with pytest.raises(MisconfigurationException, match="no logger"):
        _fit(GradientMonitor(), logger=False, max_steps=1)


def test_picklable_and_configurable_from_cli_init_args():
    from jsonargparse import ArgumentParser

    parser = ArgumentParser()
    parser.add_argument("--callback", type=pl.Callback)
    config = {
        "class_path": "lightning_monitor.GradientMonitor",
        "init_args": {"every_n_steps": 1, "group_patterns": {"all": "*"}, "hist_range": [-1.0, 1.0], "bins": 8},
    }
    cfg = parser.parse_object({"callback": config})
    monitor = parser.instantiate_classes(cfg).callback
    assert isinstance(monitor, GradientMonitor) and monitor.hist_range == (-1.0, 1.0)
    _fit(pickle.loads(pickle.dumps(monitor)), max_steps=1)
    acc = _acc()
    assert "grad/norm/all" in acc.Tags()["scalars"]
    hist = acc.Histograms("grad/hist/head.weight")[0].histogram_value
    assert len(hist.bucket) == 8 and hist.bucket_limit[-1] == 1.0
    pickle.dumps(monitor)  # after a fit, too


class RankRecorder(Logger):
    """Writes every log_metrics call to ``calls_rank{rank}.jsonl``, on whatever rank it was called."""

    def __init__(self, root: str) -> None:
        super().__init__()
        self.root = root

    @property
    def name(self) -> str:
        return "recorder"

    @property
    def version(self) -> int:
        return 0

    def log_hyperparams(self, params: Any, *args: Any, **kwargs: Any) -> None:
        pass

    def log_metrics(self, metrics: dict[str, float], step: int | None = None) -> None:
        default = torch.distributed.get_rank() if torch.distributed.is_initialized() else 0
        rank = int(os.environ.get("LOCAL_RANK", default))
        with open(os.path.join(self.root, f"calls_rank{rank}.jsonl"), "a") as f:
            f.write(json.dumps({"step": step, "keys": sorted(metrics)}) + "\n")


@pytest.mark.timeout(120)
@SPAWN_ABORT_RERUN
def test_ddp_two_processes_rank_zero_logs_rank_one_nothing(tmp_path):
    root = str(tmp_path)
    trainer = make_trainer(
        root,
        accelerator="cpu",
        devices=2,
        strategy="ddp_spawn",
        max_steps=4,
        logger=[TensorBoardLogger(os.path.join(root, "tb")), RankRecorder(root)],
        callbacks=[GradientMonitor()],
    )
    trainer.fit(TinyImageModel(), image_loader(n=64))
    calls = {}
    for rank in (0, 1):  # Lightning itself calls log_metrics on every rank (its loggers gate with rank_zero_only)
        path = os.path.join(root, f"calls_rank{rank}.jsonl")
        lines = open(path).read().splitlines() if os.path.exists(path) else []
        calls[rank] = [c for c in map(json.loads, lines) if any(k.startswith(("grad/", "param/")) for k in c["keys"])]
    assert {c["step"] for c in calls[0]} == {1, 3}
    assert calls[1] == []
    acc = _acc(os.path.join(root, "tb"))
    assert sorted(_tb_scalars(acc, "grad/norm_total")) == [1, 3]
    assert [e.step for e in acc.Histograms("grad/hist/head.weight")] == [1, 3]


class SyncDebugMode(pl.Callback):
    """Sets ``torch.cuda.set_sync_debug_mode`` in ``on_before_optimizer_step`` (callbacks run in list order)."""

    def __init__(self, mode: Any, every_n_steps: int | None = None) -> None:
        self.mode, self.every_n_steps = mode, every_n_steps

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        logging = self.every_n_steps is not None and (trainer.global_step + 1) % self.every_n_steps == 0
        torch.cuda.set_sync_debug_mode(0 if logging else self.mode)


@pytest.mark.gpu
def test_gpu_no_sync_on_non_logging_steps():
    monitor = GradientMonitor(every_n_steps=4, param_norms=True, per_param_norms=True)
    callbacks = [SyncDebugMode("error", every_n_steps=4), monitor, SyncDebugMode(0)]  # "error" around ours only
    trainer = make_trainer(".", accelerator="gpu", logger=_multi_logger(),
                           callbacks=callbacks, max_steps=8)
    try:
        trainer.fit(TinyImageModel(), image_loader(n=128))
    finally:
        torch.cuda.set_sync_debug_mode(0)
    assert sorted(_tb_scalars(_acc(), "grad/norm_total")) == [3, 7]


def test_batched_small_tensors_match_numpy_histogram():
    # numpy.histogram is the reference _grad_stats bins exactly to (its edges; torch.histogram differs at edges)
    g = torch.Generator().manual_seed(1)
    tensors = [torch.randn(256, generator=g) * (i + 1) for i in range(300)] + [torch.randn(3, 7, generator=g)]
    rows = summarize(tensors, [t.double().square().sum() for t in tensors], 10, None, "minmax").numpy()
    for t, row in zip(tensors, rows, strict=True):
        ref, _ = np.histogram(t.reshape(-1).numpy(), bins=10, range=(float(t.min()), float(t.max())))
        np.testing.assert_array_equal(row[7:], ref)
        assert row[0] == float(t.min()) and row[1] == float(t.max()) and row[4] == t.numel()


class LateModel(TinyImageModel):
    """Builds an extra layer in ``configure_model`` (after the callbacks' ``setup``) and keeps the conv frozen for
    the first two steps, as a fine-tuning schedule would."""

    def configure_model(self) -> None:
        if not hasattr(self, "late"):
            self.late = torch.nn.Linear(10, 10)

    def forward(self, x):
        return F.log_softmax(self.late(super().forward(x)), dim=1)

    def on_train_batch_start(self, batch, batch_idx):
        self.conv.requires_grad_(self.trainer.global_step >= 2)


def test_parameters_made_in_configure_model_and_unfrozen_later_are_watched():
    model = LateModel()
    model.conv.requires_grad_(False)
    _fit(GradientMonitor(every_n_steps=1), model=model, max_steps=4)
    scalars = _tb_scalars(_acc(), "grad/norm/late")
    assert sorted(scalars) == [0, 1, 2, 3]
    assert sorted(_tb_scalars(_acc(), "grad/norm/conv")) == [2, 3]  # once unfrozen


def test_half_precision_gradients_are_normed_without_overflow():
    from lightning_monitor._grad.stats import squared_norms

    grad = torch.full((100,), 3e4, dtype=torch.float16)  # every element finite, norm 3e5 > fp16's 65504
    (sq,) = squared_norms([grad])
    assert torch.isfinite(sq) and float(sq.sqrt()) == pytest.approx(3e5, rel=1e-3)


class Gan(pl.LightningModule):
    """A GAN under manual optimization: a discriminator step, then a generator step, in every batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False
        self.generator = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4))
        self.discriminator = torch.nn.Sequential(torch.nn.Linear(4, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        opt_g, opt_d = self.optimizers()
        (real,) = batch
        fake = self.generator(torch.randn(real.shape[0], 8))
        ones, zeros = torch.ones(real.shape[0], 1), torch.zeros(real.shape[0], 1)
        bce = F.binary_cross_entropy_with_logits
        d_loss = bce(self.discriminator(real), ones) + bce(self.discriminator(fake.detach()), zeros)
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        g_loss = bce(self.discriminator(fake), ones)  # also leaves gradients on the discriminator (stale for it)
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log_dict({"gan/d_loss": d_loss, "gan/g_loss": g_loss})

    def configure_optimizers(self):
        return [torch.optim.Adam(self.generator.parameters(), lr=1e-3),
                torch.optim.Adam(self.discriminator.parameters(), lr=1e-3)]


class OptimizerProbe(pl.Callback):
    """Independent record of each optimizer's own gradients at its step, per training batch it counts itself."""

    def __init__(self) -> None:
        self.batch = -1
        self.grads: dict[tuple[int, int], dict[str, torch.Tensor]] = {}  # (batch, optimizer index) -> name: grad

    def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
        self.batch += 1

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        number = next(k for k, o in enumerate(trainer.optimizers) if o is optimizer)
        own = {id(p) for g in optimizer.param_groups for p in g["params"]}
        self.grads[(self.batch, number)] = {n: p.grad.detach().clone() for n, p in pl_module.named_parameters()
                                            if id(p) in own and p.grad is not None}


@pytest.mark.parametrize("every", [2, 3, 4])
def test_gan_every_optimizer_at_every_logging_step_on_self_logs_axis(every):
    torch.manual_seed(0)
    probe = OptimizerProbe()
    trainer = make_trainer(".", logger=TensorBoardLogger("runs"), callbacks=[GradientMonitor(), probe],
                           max_steps=-1, max_epochs=1, log_every_n_steps=every)
    real = torch.utils.data.TensorDataset(torch.randn(12 * 8, 4) + 2.0)
    trainer.fit(Gan(), torch.utils.data.DataLoader(real, batch_size=8))
    assert trainer.global_step == 24  # two optimizer steps per batch: global_step runs at twice self.log's axis
    acc = _acc()
    logged = sorted(_tb_scalars(acc, "gan/d_loss"))  # self.log's steps
    assert logged == [s for s in range(12) if (s + 1) % every == 0]
    for key in ("grad/norm_total", "grad/optimizer_norm/0", "grad/optimizer_norm/1",
                "grad/norm/generator", "grad/norm/discriminator"):
        assert sorted(_tb_scalars(acc, key)) == logged, key
    # no NaN/Inf in this run: no chart of zeros (the per-optimizer counts appear once one is seen)
    assert not [t for t in acc.Tags()["scalars"] if "nonfinite" in t]
    for step in logged:
        gen, disc = probe.grads[(step, 0)], probe.grads[(step, 1)]
        expected = {
            "grad/norm_total": _norm([*gen.values(), *disc.values()]),
            "grad/optimizer_norm/0": _norm(gen.values()),
            "grad/optimizer_norm/1": _norm(disc.values()),
            "grad/norm/generator": _norm(gen.values()),
            "grad/norm/discriminator": _norm(disc.values()),
        }
        for key, value in expected.items():
            assert _tb_scalars(acc, key)[step] == pytest.approx(value, rel=1e-6), (key, step)
        for name in ("generator.0.weight", "discriminator.2.weight"):
            hist = next(e for e in acc.Histograms(f"grad/hist/{name}") if e.step == step).histogram_value
            grad = (gen | disc)[name]
            assert (hist.min, hist.max, hist.num) == pytest.approx((float(grad.min()), float(grad.max()), grad.numel()))


def test_one_optimizer_under_automatic_optimization_logs_on_self_logs_steps_without_optimizer_keys():
    trainer, capture = _fit(GradientMonitor(), logger=TensorBoardLogger("runs"), max_steps=9, log_every_n_steps=3,
                            accumulate_grad_batches=2)
    acc = _acc()
    logged = sorted(_tb_scalars(acc, "train/loss"))
    assert logged == [2, 5, 8]
    assert sorted(_tb_scalars(acc, "grad/norm_total")) == logged
    for step in logged:
        assert _tb_scalars(acc, "grad/norm_total")[step] == pytest.approx(_norm(capture.grads[step].values()), rel=1e-6)
    assert not [t for t in acc.Tags()["scalars"] if t.startswith("grad/optimizer_")]


class Wrapper(torch.nn.Module):
    def __init__(self, inner: torch.nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x):
        return self.inner(x)


class Regression(pl.LightningModule):
    """A tabular regression held in ``self.net = nn.Sequential(...)`` or ``self.model = Wrapper(inner=...)``,
    next to a loss module without parameters (which must not count as a branch)."""

    def __init__(self, nested: bool) -> None:
        super().__init__()
        net = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.ReLU(), torch.nn.Linear(8, 8), torch.nn.ReLU(),
                                  torch.nn.Linear(8, 1))
        if nested:
            self.model = Wrapper(net)
        else:
            self.net = net
        self.loss_fn = torch.nn.MSELoss()

    def training_step(self, batch, batch_idx):
        x, y = batch
        body = self.model if hasattr(self, "model") else self.net
        return self.loss_fn(body(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("nested, prefix", [(False, "net"), (True, "model.inner")])
def test_default_groups_descend_through_single_child_wrappers(nested, prefix):
    g = torch.Generator().manual_seed(0)
    data = torch.utils.data.TensorDataset(torch.randn(64, 6, generator=g), torch.randn(64, 1, generator=g))
    _fit(GradientMonitor(), Regression(nested), torch.utils.data.DataLoader(data, batch_size=16), max_steps=4,
         logger=TensorBoardLogger("runs"))
    acc = _acc()
    groups = sorted(t for t in acc.Tags()["scalars"] if t.startswith("grad/norm/"))
    assert groups == [f"grad/norm/{prefix}.{k}" for k in (0, 2, 4)]
    for step, total in _tb_scalars(acc, "grad/norm_total").items():
        values = [_tb_scalars(acc, key)[step] for key in groups]
        assert all(v < total * (1 - 1e-6) for v in values)  # none repeats the total
        assert sum(v * v for v in values) == pytest.approx(total * total, rel=1e-5)


def test_wrapper_prefix_and_group_depth_below_it():
    from lightning_monitor._grad.groups import wrapper_prefix

    assert wrapper_prefix(Regression(nested=True)) == "model.inner"
    assert wrapper_prefix(TinyImageModel()) == ""
    leaf = Wrapper(torch.nn.Linear(2, 2))  # a lone layer: its weight and bias are the two groups
    assert wrapper_prefix(leaf) == "inner"
    monitor = GradientMonitor(group_depth=2)
    inner = torch.nn.Sequential(torch.nn.Sequential(torch.nn.Linear(2, 2)), torch.nn.Linear(2, 2))
    monitor._watch(Wrapper(Wrapper(inner)))
    assert monitor._watched.group_names == ["inner.inner.0.0", "inner.inner.1"]  # 2 levels below, or the layer itself
    monitor._watch(leaf)
    assert monitor._watched.group_names == ["inner.weight", "inner.bias"]


class ManyLayers(pl.LightningModule):
    """``layers`` tiny Linear layers in a row: 2 * layers parameter tensors."""

    def __init__(self, layers: int) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(*[torch.nn.Linear(3, 3) for _ in range(layers)])

    def training_step(self, batch, batch_idx):
        (x,) = batch
        return self.net(x).square().mean()

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.01)


@pytest.mark.parametrize("select, expected", [
    ("spread", [0, 14, 28, 42, 57, 71, 85, 99]),  # round(linspace(0, 99, 8)): first and last included
    ("first", list(range(8))),
])
def test_histogram_and_per_parameter_caps_hold_and_warn_once(select, expected):
    model = ManyLayers(50)
    names = [n for n, _ in model.named_parameters()]
    monitor = GradientMonitor(every_n_steps=1, per_param_norms=True, max_histograms=8, max_param_keys=5,
                              param_select=select)
    data = torch.utils.data.TensorDataset(torch.randn(64, 3))
    with pytest.warns(UserWarning) as record:
        _fit(monitor, model, torch.utils.data.DataLoader(data, batch_size=16), max_steps=3,
             logger=TensorBoardLogger("runs"))
    acc = _acc()
    hists = sorted(acc.Tags()["histograms"])
    assert hists == sorted(f"grad/hist/{names[i]}" for i in expected)
    assert all(len(acc.Histograms(t)) == 3 for t in hists)
    per_param = [t for t in acc.Tags()["scalars"] if t.startswith("grad/norm_param/")]
    assert len(per_param) == 5
    caps = [str(w.message) for w in record if "max_histograms" in str(w.message) or "max_param_keys" in str(w.message)]
    assert len(caps) == 3, caps  # one per capped family, not one per logging step
    assert "100 parameters selected for histograms, logging 8" in caps[1] and "max_histograms=8" in caps[1]
    assert "50 groups selected for group norms, logging 5" in caps[0] and "max_param_keys=5" in caps[0]
    assert "100 parameters selected for per-parameter norms, logging 5" in caps[2]
    assert len([t for t in acc.Tags()["scalars"] if t.startswith("grad/norm/")]) == 5


def test_no_cap_warning_when_the_cap_does_not_bite(recwarn):
    _fit(GradientMonitor(max_histograms=4, max_param_keys=4, per_param_norms=True), max_steps=2)
    assert not [w for w in recwarn if "max_" in str(w.message)]
    assert len(_acc().Tags()["histograms"]) == 4


def test_every_monitor_logs_on_self_logs_axis_under_manual_optimization():
    """Under manual optimization with two optimizers global_step runs at twice self.log's axis: SpeedMonitor and
    MemoryMonitor log at self.log's steps too (the shared cadence), not at every other one of them."""
    from lightning_monitor import MemoryMonitor, SpeedMonitor

    torch.manual_seed(0)
    monitors = [GradientMonitor(), SpeedMonitor(warmup_steps=0, measure_flops=False), MemoryMonitor()]
    trainer = make_trainer(".", logger=TensorBoardLogger("runs"), callbacks=monitors, max_steps=-1, max_epochs=1,
                           log_every_n_steps=3)
    real = torch.utils.data.TensorDataset(torch.randn(12 * 8, 4) + 2.0)
    trainer.fit(Gan(), torch.utils.data.DataLoader(real, batch_size=8))
    acc = _acc()
    logged = sorted(_tb_scalars(acc, "gan/d_loss"))
    assert logged == [2, 5, 8, 11]
    for key in ("grad/norm_total", "throughput/samples_per_sec", "time/step_sec", "memory/host/rss_gib"):
        assert sorted(_tb_scalars(acc, key)) == logged, key
    assert _tb_scalars(acc, "throughput/samples_per_sec")  # 8 samples per batch, 3 batches per window
