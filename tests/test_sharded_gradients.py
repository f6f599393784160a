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
from helpers import free_port

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
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from lightning_monitor import _grad_sharded
    from lightning_monitor._grad_sharded import global_stats

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
        result["update"] = _grad_sharded.global_squared_diffs(tensors, [t * 0.5 for t in
                              _grad_sharded.snapshot(tensors)]).tolist()
        result["update_calls"] = list(calls)
        with open(os.path.join(out, f"rank{{rank}}.json"), "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=({out!r}, {port}), nprocs=2, join=True)
        print("DONE", flush=True)
    """
)


def run_job(script_path, text: str, cwd, timeout: int = JOB_TIMEOUT) -> subprocess.CompletedProcess:
    """Run ``text`` as a script under a timeout; assert it left no process behind."""
    script_path.write_text(text)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_API", "LOCAL_RANK", "NODE_RANK",
                                                                        "MASTER_", "WORLD_SIZE", "RANK"))}
    env["PYTHONPATH"] = os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.path.dirname(__file__)])
    proc = subprocess.run([sys.executable, str(script_path)], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=timeout)
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
            np.testing.assert_allclose(row[2:4], ref[2:4], rtol=1e-9, atol=1e-12)
        for row, k in zip(got["param_rows"], [0, 6], strict=True):
            np.testing.assert_array_equal(row[7:], reference[k][7:])
        assert got["extra_max"] == [1.0, 3.0]
        # 2 all-reduces: MAX of (max, -min) per histogram + 2 extras; SUM of norms, weight norms, NaN counts, 3
        # sums and 16 bins per histogram (9 histograms: 7 gradients, 2 weights)
        assert [(op.split(".")[-1], n) for op, n in got["calls"]] == [("MAX", 2 * 9 + 2), ("SUM", 3 * 7 + 9 * 19)]
    sampled = result["sampled"]  # the big tensor is binned from a stride sample on each rank, scaled back
    row = np.array(sampled["grad_rows"][6])
    assert row[4] == full[6].size and abs(row[7:].sum() - full[6].size) < 1e-6 * full[6].size
    exact = _reference(full, 16, "minmax")[6][7:]
    assert np.abs(row[7:] - exact).max() < 0.25 * exact.max()
    want = np.array([float(((0.5 * t.astype(np.float64)) ** 2).sum()) for t in full])
    np.testing.assert_allclose(np.array(result["update"])[np.isfinite(want)], want[np.isfinite(want)], rtol=1e-6)
    assert [op.split(".")[-1] for op, _ in result["update_calls"]] == ["SUM"]
