"""Global gradient numbers on sharded (DTensor) parameters: the statistics module on 2 gloo processes against the
full tensors, then GradientMonitor under FSDP2 (ModelParallelStrategy) against the same model under DDP."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import psutil
import pytest
from helpers import flat_shard_trainer, free_port

JOB_TIMEOUT = 150


def full_tensors() -> list:
    """The full tensors the 2-rank job shards; the test compares against them."""
    import torch

    g = torch.Generator().manual_seed(0)
    uneven = torch.randn(5, 3, generator=g)  # rows 3 + 2
    tiny = torch.randn(1, generator=g)  # rank 1's shard is empty
    poisoned = torch.randn(6, 4, generator=g)
    poisoned[4, 1] = float("nan")  # on rank 1's shard only
    poisoned[5, 0] = float("inf")
    replicated = torch.randn(7, generator=g)
    constant = torch.full((4,), 0.25)
    plain = torch.randn(3, 2, generator=g)
    big = torch.randn(300, 70, generator=g)
    return [uneven, tiny, poisoned, replicated, constant, plain, big]

STATS_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import DTensor, Partial, Replicate, Shard, distribute_tensor
    from lightning_monitor._grad import sharded as _grad_sharded
    from lightning_monitor._grad.sharded import global_stats

    from test_sharded_gradients import full_tensors

    PLACEMENT = [Shard(0), Shard(0), Shard(0), Replicate(), Shard(0), None, Shard(1)]

    def run(rank, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        mesh = init_device_mesh("cpu", (2,))
        tensors = [t if p is None else distribute_tensor(t, mesh, [p])
                   for t, p in zip(full_tensors(), PLACEMENT)]
        calls = []
        original = dist.all_reduce
        def counting(tensor, op=dist.ReduceOp.SUM, **kwargs):
            calls.append((str(op), tensor.numel()))
            return original(tensor, op=op, **kwargs)
        dist.all_reduce = counting
        result = {{}}
        for name, kwargs in {{"minmax": dict(hist_range="minmax"), "symmetric": dict(hist_range="symmetric"),
                              "fixed": dict(hist_range=(-1.0, 1.5)),
                              "sampled": dict(hist_range="minmax", max_elements=1000)}}.items():
            calls.clear()
            stats = global_stats(tensors, params=tensors, grad_hist=range(len(tensors)), param_hist=[0, 6],
                                 bins=16, max_elements=kwargs.get("max_elements"), hist_range=kwargs["hist_range"],
                                 extra_max=[torch.tensor([float(rank), 3.0 - rank])])
            result[name] = dict(sq=stats.sq.tolist(), wsq=stats.wsq.tolist(), nonfinite=stats.nonfinite.tolist(),
                                grad_rows=stats.grad_rows.tolist(), param_rows=stats.param_rows.tolist(),
                                extra_max=stats.extra_max.tolist(), calls=list(calls))
        calls.clear()
        clean = [t for k, t in enumerate(tensors) if k != 2]
        result["clean_sq"] = global_stats(clean, grad_hist=range(6), bins=16).sq.tolist()
        result["clean_calls"] = list(calls)
        result["norms_only_sq"] = global_stats(clean, bins=16).sq.tolist()  # no histogram at all
        # unreduced summands (Partial): each rank holds half of the full tensor's values
        partial = DTensor.from_local(full_tensors()[6] * 0.5, mesh, [Partial()])
        stats = global_stats([partial], grad_hist=[0], bins=16)
        result["partial"] = dict(sq=stats.sq.tolist(), rows=stats.grad_rows.tolist())
        calls.clear()
        before = [_grad_sharded.local_shard(t)[0] * 0.5 for t in tensors]
        result["update"] = _grad_sharded.global_squared_diffs(tensors, before).tolist()
        result["update_calls"] = list(calls)
        with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=({out!r}, {port}), nprocs=2, join=True)
        print("DONE", flush=True)
    """
)


def run_job(script_path, text: str, cwd, timeout: int = JOB_TIMEOUT, extra_args: tuple | list = (),
            env_extra: dict | None = None) -> subprocess.CompletedProcess:
    """Run ``text`` as a script under a timeout; assert it exited 0 and left no process behind."""
    script_path.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_API", "LOCAL_RANK", "NODE_RANK",
                                                                        "MASTER_", "WORLD_SIZE", "RANK"))}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.path.dirname(__file__)])
    env.update(env_extra or {})
    proc = subprocess.run([sys.executable, str(script_path), *map(str, extra_args)], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)
    orphans = [p for p in psutil.process_iter(["cmdline"]) if str(script_path) in " ".join(p.info["cmdline"] or [])]
    assert not orphans, f"processes left behind: {orphans}"
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-4000:]
    return proc


def _reference(full: list[np.ndarray], bins: int, hist_range) -> list[np.ndarray]:
    """Rows ``[min, max, sum, sum_squares, num, lo, hi, counts...]`` of the finite elements, by numpy."""
    rows = []
    for t in full:
        x = t.reshape(-1).astype(np.float64)
        x = x[np.isfinite(x)]
        lo, hi = float(x.min()), float(x.max())
        if hist_range == "symmetric":
            lo, hi = -max(abs(lo), abs(hi)), max(abs(lo), abs(hi))
        elif isinstance(hist_range, tuple):
            lo, hi = hist_range
        clipped = np.clip(x, lo, hi)  # outside the range: the edge bins
        counts = np.histogram(clipped, bins, range=(lo, hi))[0] if hi > lo else np.eye(bins)[0] * x.size
        rows.append(np.array([x.min(), x.max(), x.sum(), (x**2).sum(), x.size, lo, hi, *counts]))
    return rows


@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_global_stats_equal_the_full_tensors(tmp_path):
    """Uneven shards, an empty shard, a replicated DTensor, a plain tensor, NaN/Inf on one rank's shard: every
    rank gets the full tensors' norms, counts and exact numpy histograms, with 2 all-reduces (MAX then SUM)."""
    run_job(tmp_path / "stats.py", STATS_SCRIPT.format(out=str(tmp_path), port=free_port()), tmp_path)
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    assert ranks[0] == ranks[1]  # every rank holds the same global numbers
    result = ranks[0]
    full = [t.numpy() for t in full_tensors()]
    sq = np.array([float((t.astype(np.float64) ** 2).sum()) for t in full])
    for name, hist_range in (("minmax", "minmax"), ("symmetric", "symmetric"), ("fixed", (-1.0, 1.5))):
        got = result[name]
        finite = np.isfinite(sq)
        np.testing.assert_allclose(np.array(got["sq"])[finite], sq[finite], rtol=1e-6)
        assert not np.isfinite(got["sq"][2])  # the poisoned tensor's norm is NaN on every rank
        assert got["nonfinite"] == [0, 0, 2, 0, 0, 0, 0]
        np.testing.assert_allclose(got["wsq"][:2], sq[:2], rtol=1e-6)
        reference = _reference(full, 16, hist_range)
        for row, ref in zip(got["grad_rows"], reference, strict=True):
            np.testing.assert_array_equal(row[7:], ref[7:])  # exact counts, bin for bin
            assert row[:2] == list(ref[:2]) and row[4:7] == list(ref[4:7])  # min, max, num, lo, hi exact
            np.testing.assert_allclose(row[2:4], ref[2:4], rtol=1e-6, atol=1e-9)  # float32 sums, as unsharded
        for row, k in zip(got["param_rows"], [0, 6], strict=True):
            np.testing.assert_array_equal(row[7:], reference[k][7:])
        assert got["extra_max"] == [1.0, 3.0]
        # MAX of (max, -min) per histogram (7 gradients, 2 weights) + 2 extras; SUM of norms, weight norms, then sum,
        # element count and 16 bins per histogram; the NaN/Inf in one gradient adds a MAX and a SUM for it alone
        calls = [(op.split(".")[-1], n) for op, n in got["calls"]]
        assert calls == [("MAX", 2 * 9 + 2), ("SUM", 2 * 7 + 9 * 18), ("MAX", 2), ("SUM", 1 + 19)]
    # a step without NaN/Inf: exactly 2 all-reduces (MAX of max/-min, SUM of norms, sums, counts, bins)
    assert [(op.split(".")[-1], n) for op, n in result["clean_calls"]] == [("MAX", 2 * 6), ("SUM", 6 + 6 * 18)]
    assert result["norms_only_sq"] == result["clean_sq"]
    np.testing.assert_allclose(result["partial"]["sq"], sq[6:7], rtol=1e-6)
    np.testing.assert_array_equal(result["partial"]["rows"][0][7:], _reference(full, 16, "minmax")[6][7:])
    np.testing.assert_allclose(result["clean_sq"], np.delete(sq, 2), rtol=1e-6)
    sampled = result["sampled"]  # the big tensor is binned from a stride sample on each rank, scaled back
    row = np.array(sampled["grad_rows"][6])
    assert row[4] == full[6].size and abs(row[7:].sum() - full[6].size) < 1e-6 * full[6].size
    exact = _reference(full, 16, "minmax")[6][7:]
    assert np.abs(row[7:] - exact).max() < 0.25 * exact.max()
    want = np.array([float(((0.5 * t.astype(np.float64)) ** 2).sum()) for t in full])
    np.testing.assert_allclose(np.array(result["update"])[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)
    assert [op.split(".")[-1] for op, _ in result["update_calls"]] == ["SUM"]


FIT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from lightning.pytorch.callbacks import Callback
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from torch.distributed.tensor import DTensor
    from helpers import TinyImageModel, image_loader, make_trainer
    from lightning_monitor import GradientMonitor, MemoryMonitor, MultiLogger, SpeedMonitor

    POLICY = sys.argv[4]
    POISON_STEPS = (5,) if POLICY == "warn" else (4, 5)  # skip: a non-logging step too (per-step, all ranks)

    class Sharded(TinyImageModel):
        def configure_model(self):
            fully_shard(self.conv)
            fully_shard(self.head)
            fully_shard(self)

    class Poison(Callback):
        # one NaN in head.weight[7, 5]: on rank 1's shard under FSDP2 (rows 5..9), in every replica under DDP
        def on_before_optimizer_step(self, trainer, pl_module, optimizer):
            if trainer.global_step not in POISON_STEPS:
                return
            grad = pl_module.head.weight.grad
            if isinstance(grad, DTensor):
                if trainer.global_rank == 1:
                    grad.to_local()[2, 5] = float("nan")
            else:
                grad[7, 5] = float("nan")

    if __name__ == "__main__":
        kind, runs, accelerator = sys.argv[1], sys.argv[2], sys.argv[3]
        torch.manual_seed(0)
        model = Sharded() if kind == "fsdp2" else TinyImageModel()
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp2" else "ddp"
        monitor = GradientMonitor(per_param_norms=True, param_norms=True, update_ratio=True, param_histograms=True,
                                  max_hist_elements=None, bins=32, nonfinite=POLICY)
        trainer = make_trainer(runs, logger=MultiLogger(save_dir=runs, name=kind, wandb=False), strategy=strategy,
                               accelerator=accelerator, devices=2, max_steps=6, log_every_n_steps=2,
                               callbacks=[Poison(), monitor, MemoryMonitor(), SpeedMonitor(peak_flops_per_sec=1e12)])
        trainer.fit(model, image_loader(n=192, batch_size=32))
        os.write(1, f"RANK {trainer.global_rank} DONE\\n".encode())  # one write: ranks share stdout
    """
)


def _fit(tmp_path, kind: str, accelerator: str = "cpu", policy: str = "warn"):
    """One 2-process fit (``ddp`` or ``fsdp2``); the TensorBoard scalars and histograms rank 0 wrote."""
    from helpers import event_files, tb_accumulator, tb_all_scalars

    runs = tmp_path / "runs"
    proc = run_job(tmp_path / f"fit_{kind}.py", FIT_SCRIPT, tmp_path, extra_args=[kind, str(runs), accelerator, policy])
    assert "RANK 0 DONE" in proc.stdout and "RANK 1 DONE" in proc.stdout, proc.stdout[-1500:] + proc.stderr[-3000:]
    files = event_files(runs / kind)
    assert len(files) == 1, files  # one writer: rank 0
    acc = tb_accumulator(os.path.dirname(files[0]))
    scalars = tb_all_scalars(os.path.dirname(files[0]))
    hists = {tag: [(e.step, list(e.histogram_value.bucket_limit), list(e.histogram_value.bucket))
                   for e in acc.Histograms(tag)] for tag in acc.Tags()["histograms"]}
    return scalars, hists


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_fsdp2_logs_the_numbers_of_the_unsharded_run(tmp_path):
    """The same model, seed and data under DDP and under FSDP2 (ModelParallelStrategy + fully_shard, 2 gloo
    processes): every key, norms within 1e-5 relative, identical exact histograms (gradients and weights), the
    NaN count of a gradient poisoned on one shard, all under the original parameter names. MemoryMonitor and
    SpeedMonitor in the same runs: their keys, sane host values, and the FLOPs of the whole model."""
    _compare_ddp_and_fsdp2(tmp_path, "cpu")


def _compare_ddp_and_fsdp2(tmp_path, accelerator: str) -> None:
    ddp_scalars, ddp_hists = _fit(tmp_path, "ddp", accelerator)
    fsdp_scalars, fsdp_hists = _fit(tmp_path, "fsdp2", accelerator)
    grad_keys = {k for k in ddp_scalars if k.startswith(("grad/", "param/"))}
    assert grad_keys == {k for k in fsdp_scalars if k.startswith(("grad/", "param/"))}
    assert {"grad/norm_total", "grad/norm/conv", "grad/norm_param/head.weight", "param/norm/head",
            "param/update_ratio_total", "grad/nonfinite_count", "grad/nonfinite/head.weight"} <= grad_keys
    for key in sorted(grad_keys):
        ddp, fsdp = ddp_scalars[key], fsdp_scalars[key]
        # NaN/Inf keys from the first logging step that saw one on (the poisoned step 5)
        assert [s for s, _ in ddp] == [s for s, _ in fsdp] == ([5] if "nonfinite" in key else [1, 3, 5]), key
        for (_, a), (_, b) in zip(ddp, fsdp, strict=True):
            if np.isfinite(a) or np.isfinite(b):
                assert b == pytest.approx(a, rel=1e-5, abs=1e-12), (key, a, b)
            else:
                assert np.isnan(a) == np.isnan(b), (key, a, b)
    assert ddp_scalars["grad/nonfinite_count"][-1][1] == fsdp_scalars["grad/nonfinite_count"][-1][1] == 1.0
    assert fsdp_scalars["grad/nonfinite/head.weight"][-1][1] == 1.0
    assert set(ddp_hists) == set(fsdp_hists) == {f"{a}/hist/{n}" for a in ("grad", "param") for n in
                                                  ("conv.weight", "conv.bias", "head.weight", "head.bias")}
    for key in ddp_hists:
        for (s1, edges1, counts1), (s2, edges2, counts2) in zip(ddp_hists[key], fsdp_hists[key], strict=True):
            assert s1 == s2
            assert counts1 == counts2, key  # exact counts, bin for bin (finite elements of the poisoned one)
            # the ranges agree as closely as the gradients do (DDP's all-reduce and FSDP2's reduce-scatter
            # round differently): within 1e-5 of the span
            span = edges1[-2] - edges1[0]
            np.testing.assert_allclose(edges1[:-1], edges2[:-1], rtol=0, atol=1e-5 * span)

    _check_memory_and_speed(ddp_scalars, fsdp_scalars)


def _flops_of_one_rank_batch() -> int:
    """FlopCounterMode over forward + backward of the unsharded model on one rank's batch (16 samples)."""
    import torch
    from helpers import TinyImageModel
    from torch.nn import functional as F
    from torch.utils.flop_counter import FlopCounterMode

    model = TinyImageModel()
    x, y = torch.randn(16, 1, 28, 28), torch.randint(0, 10, (16,))
    with FlopCounterMode(display=False) as counter:
        F.nll_loss(model(x), y).backward()
    return int(counter.get_total_flops())


def _check_memory_and_speed(ddp: dict, fsdp: dict) -> None:
    speed_memory = {k for k in ddp if k.startswith(("memory/", "throughput/", "time/"))}
    assert speed_memory == {k for k in fsdp if k.startswith(("memory/", "throughput/", "time/"))}
    assert {"memory/host/rss_gib_max", "memory/host/rss_gib_max_rank", "throughput/flops_per_sec",
            "throughput/mfu", "time/straggler_ratio"} <= speed_memory
    for scalars in (ddp, fsdp):
        assert all(0.05 < v < 64 for _, v in scalars["memory/host/rss_gib_max"])
        assert all(v in (0.0, 1.0) for _, v in scalars["memory/host/rss_gib_max_rank"])
        # FLOPs per (global) batch: flops_per_sec / batches_per_sec over the same window, whatever the timing. The
        # whole model on both ranks' samples: 2 x the unsharded model on one rank's batch, under FSDP2 as under DDP
        per_batch = [f / b for (_, f), (_, b) in zip(scalars["throughput/flops_per_sec"],
                                                     scalars["throughput/batches_per_sec"], strict=True)]
        assert per_batch == pytest.approx([2 * _flops_of_one_rank_batch()] * len(per_batch), rel=1e-6)


@pytest.mark.parametrize("strategy", ["FSDPStrategy", "DeepSpeedStrategy"])
def test_fsdp1_and_deepspeed_are_refused_in_setup_naming_what_works(strategy):
    """Flat gradient shards (FSDP1, DeepSpeed ZeRO) have no per-parameter global view: a clear error in setup."""
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_monitor import GradientMonitor

    with pytest.raises(MisconfigurationException, match=rf"under {strategy}.*use ModelParallelStrategy with"):
        GradientMonitor().setup(flat_shard_trainer(strategy), None, "fit")


# ---------------------------------------------------------------------------------------------- CUDA (not run here)
def _two_gpus() -> bool:
    import torch

    return torch.cuda.device_count() >= 2


@pytest.mark.gpu
@pytest.mark.skipif(not _two_gpus(), reason="needs 2 CUDA devices")
@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_fsdp2_on_two_gpus_logs_the_numbers_of_ddp(tmp_path):
    """The CPU equality test on 2 GPUs (NCCL): DDP vs ModelParallelStrategy + fully_shard."""
    _compare_ddp_and_fsdp2(tmp_path, "cuda")


def _refused_on_cuda(tmp_path, strategy: str) -> None:
    from helpers import TinyImageModel, image_loader, make_trainer
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    from lightning_monitor import GradientMonitor, MultiLogger

    trainer = make_trainer(tmp_path, accelerator="cuda", devices=1, strategy=strategy, max_steps=2,
                           logger=MultiLogger(save_dir=tmp_path, wandb=False), callbacks=[GradientMonitor()])
    with pytest.raises(MisconfigurationException, match="use ModelParallelStrategy with"):
        trainer.fit(TinyImageModel(), image_loader(n=32))
    assert trainer.global_step == 0  # refused in setup, before any step


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_fsdp1_on_cuda_is_refused_in_setup(tmp_path):
    """Lightning's FSDPStrategy (FSDP1) for real on a GPU: flat gradient shards, refused naming what works."""
    _refused_on_cuda(tmp_path, "fsdp")


@pytest.mark.gpu
@pytest.mark.timeout(120)
def test_deepspeed_on_cuda_is_refused_in_setup(tmp_path):
    pytest.importorskip("deepspeed")
    _refused_on_cuda(tmp_path, "deepspeed_stage_2")


TP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    import lightning.pytorch as pl
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch import nn
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module
    from torch.nn import functional as F
    from helpers import image_loader, make_trainer
    from lightning_monitor import GradientMonitor, MultiLogger

    class TensorParallelMLP(pl.LightningModule):
        # hidden: column-wise (weight and bias Shard(0)); out: row-wise (weight Shard(1), bias Replicate)
        def __init__(self):
            super().__init__()
            self.hidden = nn.Linear(784, 32)
            self.out = nn.Linear(32, 10)

        def configure_model(self):
            if self.device_mesh is not None:
                parallelize_module(self, self.device_mesh["tensor_parallel"],
                                   {"hidden": ColwiseParallel(), "out": RowwiseParallel()})

        def training_step(self, batch, batch_idx):
            x, y = batch
            return F.nll_loss(F.log_softmax(self.out(F.relu(self.hidden(x.flatten(1)))), dim=1), y)

        def configure_optimizers(self):
            return torch.optim.SGD(self.parameters(), lr=0.05)

    if __name__ == "__main__":
        kind, runs = sys.argv[1], sys.argv[2]
        torch.manual_seed(0)
        tp = kind == "tp"
        strategy = ModelParallelStrategy(data_parallel_size=1, tensor_parallel_size=2)
        options = dict(strategy=strategy, devices=2) if tp else dict()
        monitor = GradientMonitor(per_param_norms=True, param_norms=True, update_ratio=True, max_hist_elements=None)
        trainer = make_trainer(runs, logger=MultiLogger(save_dir=runs, name=kind, wandb=False), max_steps=4,
                               log_every_n_steps=2, callbacks=[monitor], use_distributed_sampler=False, **options)
        trainer.fit(TensorParallelMLP(), image_loader(n=64, batch_size=16))
        os.write(1, f"RANK {trainer.global_rank} DONE\\n".encode())  # one write: ranks share stdout
    """
)


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_tensor_parallel_logs_the_numbers_of_one_process(tmp_path):
    """Tensor parallel on 2 ranks (both read the same batches, in order): column-wise shards, row-wise shards and
    a replicated bias (counted once) give the numbers of the same model trained in one process."""
    from helpers import event_files, tb_accumulator, tb_all_scalars

    runs = tmp_path / "runs"
    logged = {}
    for kind in ("single", "tp"):
        proc = run_job(tmp_path / f"{kind}.py", TP_SCRIPT, tmp_path, extra_args=[kind, str(runs)])
        assert "RANK 0 DONE" in proc.stdout
        (path,) = event_files(runs / kind)
        acc = tb_accumulator(os.path.dirname(path))
        tags = acc.Tags()
        logged[kind] = (tb_all_scalars(os.path.dirname(path)),
                        {t: [list(e.histogram_value.bucket) for e in acc.Histograms(t)] for t in tags["histograms"]})
    (single, single_hists), (tp, tp_hists) = logged["single"], logged["tp"]
    assert set(single) == set(tp) and "grad/norm_param/out.bias" in tp and "param/update_ratio/out" in tp
    for key in single:
        assert [s for s, _ in single[key]] == [s for s, _ in tp[key]], key
        assert [v for _, v in tp[key]] == pytest.approx([v for _, v in single[key]], rel=1e-5), key
    assert set(single_hists) == set(tp_hists) == {f"grad/hist/{n}" for n in
                                                  ("hidden.weight", "hidden.bias", "out.weight", "out.bias")}
    assert tp_hists == single_hists  # exact counts


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_fsdp2_skip_policy_agrees_across_ranks(tmp_path):
    """``nonfinite="skip"`` with a NaN on rank 1's shard only, at a non-logging step (4) and a logging step (5):
    every rank drops the step (one all-reduce per step), so FSDP2 trains and logs exactly as DDP does."""
    ddp, _ = _fit(tmp_path, "ddp", policy="skip")
    fsdp, _ = _fit(tmp_path, "fsdp2", policy="skip")
    # logged from the first logging step that saw a NaN/Inf on (before: zeros at steps 1 and 3)
    assert fsdp["grad/nonfinite_steps"] == ddp["grad/nonfinite_steps"] == [(5, 2.0)]
    for key in ("grad/norm_total", "param/norm_total", "param/update_ratio_total", "train/loss"):
        assert [v for _, v in fsdp[key]] == pytest.approx([v for _, v in ddp[key]], rel=1e-5, nan_ok=True), key
    assert fsdp["param/update_ratio_total"][-1][1] == 0.0  # step 5 skipped on every shard: no weight moved
