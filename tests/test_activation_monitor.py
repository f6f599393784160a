"""ActivationMonitor: values read back from TensorBoard against an independent forward-hook computation."""

from __future__ import annotations

import os
import pickle
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
from lightning.pytorch.loggers import TensorBoardLogger
from torch import nn
from torch.nn import functional as F
from torch.utils.checkpoint import checkpoint
from torch.utils.data import DataLoader

from lightning_monitor import ActivationMonitor
from lightning_monitor._act import hist as _hist
from lightning_monitor._act import tap as _tap
from lightning_monitor._grad import bins as _grad_bins
from lightning_monitor._grad.event import histograms as _grad_histograms
from lightning_monitor._grad.stats import STAT_COLUMNS, sample_stride
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


def _histograms(tmp_path) -> dict[str, dict[int, object]]:
    """``{tag: {step: HistogramProto}}`` of every histogram :func:`_fit` wrote under ``tmp_path``."""
    (path,) = event_files(str(tmp_path / "tb"))
    acc = tb_accumulator(os.path.dirname(path))
    return {t: {e.step: e.histogram_value for e in acc.Histograms(t)} for t in acc.Tags()["histograms"]}


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


@pytest.mark.parametrize("histograms", [False, True])
def test_no_host_sync_between_logging_steps_and_one_at_each(tmp_path, histograms):
    counter = HostSyncCounter()
    snap = SyncsPerBatch(counter)
    with counter:
        _fit(tmp_path, ActivationMonitor(every_n_steps=3, types=["Linear", "ReLU", "Conv2d"], histograms=histograms,
                                         max_hist_elements=None if histograms else 16384),
             Net(), max_steps=7, loader=image_loader(n=112), extra=[snap])
    assert snap.per_step == {0: 0, 1: 0, 2: 1, 3: 0, 4: 0, 5: 1, 6: 0}, counter.calls
    assert bool(_histograms(tmp_path)) == histograms


def test_histograms_equal_numpy_over_the_logging_steps_outputs(tmp_path, accelerator="cpu"):
    ref = Reference(list(WATCHED))
    monitor = ActivationMonitor(types=["Conv2d", "Linear", "ReLU"], histograms=True, max_hist_elements=None)
    _fit(tmp_path, monitor, Net(), extra=[ref], accelerator=accelerator)
    hists = _histograms(tmp_path)
    assert set(hists) == {f"act/hist/{name}" for name in WATCHED}
    for name in WATCHED:
        assert sorted(hists[f"act/hist/{name}"]) == [1, 3]
        for step in (1, 3):
            x = torch.cat([o.reshape(-1) for o in ref.outputs[step][name]]).double().cpu().numpy()
            counts, edges = np.histogram(x, bins=64, range=(x.min(), x.max()))
            tb = hists[f"act/hist/{name}"][step]
            np.testing.assert_array_equal(tb.bucket, counts, err_msg=f"{name} {step}")
            np.testing.assert_allclose(tb.bucket_limit, edges[1:], rtol=1e-12, atol=0)
            assert (tb.min, tb.max, tb.num) == (x.min(), x.max(), x.size)
            assert tb.sum == pytest.approx(float(x.sum()), rel=1e-5, abs=1e-5)
            assert tb.sum_squares == pytest.approx(float(np.square(x).sum()), rel=1e-5)


@pytest.mark.gpu
def test_gpu_histograms_equal_numpy_over_the_logging_steps_outputs(tmp_path):
    test_histograms_equal_numpy_over_the_logging_steps_outputs(tmp_path, accelerator="gpu")


def test_sampled_histograms_count_every_element_over_the_samples_range(tmp_path):
    ref = Reference(["conv", "hidden"])
    _fit(tmp_path, ActivationMonitor(include=["conv", "hidden"], histograms=True, bins=16, max_hist_elements=100),
         Net(), extra=[ref], max_steps=2)
    hists = _histograms(tmp_path)
    for name in ("conv", "hidden"):
        (out,) = ref.outputs[1][name]
        flat = out.reshape(-1).double().numpy()
        stride = sample_stride(flat.size, 100)
        assert stride > 1
        sample = flat[::stride]
        counts, edges = np.histogram(sample, bins=16, range=(sample.min(), sample.max()))
        tb = hists[f"act/hist/{name}"][1]
        assert sum(tb.bucket) == pytest.approx(flat.size) and tb.num == flat.size  # scaled to the element count
        np.testing.assert_allclose(tb.bucket, counts * (flat.size / sample.size), rtol=1e-12)
        np.testing.assert_allclose(tb.bucket_limit, edges[1:], rtol=1e-12, atol=0)
        assert flat.min() <= tb.min == sample.min() and tb.max == sample.max() <= flat.max()


def test_histograms_off_by_default_run_no_histogram_work(tmp_path, monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("histogram work (and its all-reduce) with histograms=False")

    monkeypatch.setattr(_hist, "ranges", refuse)
    monkeypatch.setattr(_grad_bins, "scaled_counts", refuse)
    scalars = _fit(tmp_path, ActivationMonitor(), Net(), max_steps=2)
    assert "act/rms/hidden" in scalars and not _histograms(tmp_path)


def _tap_histograms(outputs: list[torch.Tensor], bins: int = 8) -> dict:
    """The ``act/hist`` values one process logs for a ``nn.Identity`` whose calls returned ``outputs``."""
    tap = _tap.Tap(stride=lambda numel: 1)
    for out in outputs:
        tap.add(nn.Identity(), out)
    units = [tap.units]
    lo, hi = _hist.ranges([tap], torch.device("cpu"))
    counts = _grad_bins.scaled_counts(*_hist.pieces([tap]), lo, hi, bins)
    gathered = torch.cat([_tap.pack([tap], units, torch.device("cpu")), lo, hi, counts.reshape(-1)]).numpy()[None, :]
    rows = _hist.rows(gathered[:, _tap.pack_width(units) :], _tap.totals(gathered, units), bins)
    assert rows.shape == (1, STAT_COLUMNS + bins)  # the layout of _grad.stats.summarize's rows
    return _grad_histograms("act/hist", ["m"], np.arange(1), rows, bins)


def test_a_constant_output_is_centred_and_nan_or_inf_leave_that_histogram_out():
    (const,) = _tap_histograms([torch.full((4, 3), 2.5), torch.full((2, 3), 2.5)]).values()
    assert const.num == 18 and const.counts.sum() == 18 and const.counts[4] == 18
    assert (const.edges[0], const.edges[-1]) == (2.0, 3.0)
    for bad in (float("nan"), float("inf"), -float("inf")):
        x = torch.arange(12.0).reshape(4, 3)
        x[1, 1] = bad
        assert _tap_histograms([x]) == {}  # no crash, no histogram over a poisoned range
    assert _tap_histograms([torch.full((2, 3), float("nan"))]) == {}  # nothing finite at all
    (two,) = _tap_histograms([torch.arange(6.0).reshape(2, 3), torch.arange(6.0, 12.0).reshape(2, 3)]).values()
    np.testing.assert_array_equal(two.counts, np.histogram(np.arange(12.0), bins=8)[0])


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
    with pytest.raises(TypeError, match=re.escape("`histograms` must be True or False, got 1")):
        ActivationMonitor(histograms=1)
    with pytest.raises(ValueError, match=re.escape("`bins` must be an integer in 1..512, got 513")):
        ActivationMonitor(bins=513)
    with pytest.raises(ValueError, match=re.escape("`max_hist_elements` must be None or an integer >= 1, got 0")):
        ActivationMonitor(max_hist_elements=0)


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
    hists: dict = {}
    runs = one_process_and_ddp(tmp_path, Sharded, lambda: ActivationMonitor(types=["Conv2d", "Linear", "ReLU"],
                                                                            histograms=True), "act/", histograms=hists)
    assert sorted(runs["ddp"]) == sorted(runs["one"]) and len(runs["one"]) == 20
    for key, values in runs["one"].items():
        assert sorted(values) == [1, 3]
        for step, value in values.items():
            assert runs["ddp"][key][step] == pytest.approx(value, rel=1e-5, abs=1e-7), (key, step)
    # histograms: one range from every rank (the MAX all-reduce), counts added over the ranks
    assert sorted(hists["ddp"]) == sorted(hists["one"]) == sorted(f"act/hist/{n}" for n in WATCHED)
    for tag, steps in hists["one"].items():
        assert sorted(steps) == sorted(hists["ddp"][tag]) == [1, 3]
        for step, one in steps.items():
            ddp = hists["ddp"][tag][step]
            assert ddp.num == one.num and sum(ddp.bucket) == sum(one.bucket) == one.num, (tag, step)
            assert (ddp.min, ddp.max) == pytest.approx((one.min, one.max), rel=1e-5, abs=1e-7), (tag, step)
            np.testing.assert_allclose(ddp.bucket_limit, one.bucket_limit, rtol=1e-5, atol=1e-7)
            # equal count for count here; the two runs' weights may differ in the last float bits after a step (another
            # summation order), so a value on an edge could move a bin
            moved = np.abs(np.asarray(ddp.bucket) - np.asarray(one.bucket)).sum()
            assert moved <= 2 + 1e-3 * one.num, (tag, step, moved)


def test_dashboard_layout_puts_a_family_on_one_chart():
    from lightning_monitor._writers.layout import charts

    tags = ["act/rms/conv", "act/rms/head", "act/dead_share/conv", "optim/update_cos/head", "train/loss"]
    got = {title: (category, members) for category, title, _, members in charts(tags)}
    assert got["activation RMS per module"] == ("activations", ("act/rms/conv", "act/rms/head"))
    assert got["dead unit share per module"] == ("activations", ("act/dead_share/conv",))
    assert got["update/gradient cosine per group"] == ("gradients", ("optim/update_cos/head",))
