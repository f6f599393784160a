"""Optimizer state and activation statistics on sharded (DTensor) training, 2 gloo processes: the optimizer state's
device pass on DTensor shards against the same pass on the full tensors, then GradientMonitor(optimizer_state=True)
and ActivationMonitor under FSDP2 (ModelParallelStrategy + fully_shard) against the same fit under DDP."""

from __future__ import annotations

import json
import os
import textwrap

import numpy as np
import pytest
from helpers import free_port
from test_sharded_gradients import JOB_TIMEOUT, run_job

from lightning_monitor._grad.sharded import COLLECTIVES_PER_EVENT

QUEUE_SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    import numpy as np
    import torch
    import torch.distributed as dist
    import torch.multiprocessing as mp
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.tensor import Replicate, Shard, distribute_tensor
    from lightning_monitor._grad import optstate
    from lightning_monitor._grad.sharded import global_stats

    SHAPES = [(5, 3), (1,), (7,), (300, 70), (3, 2), (40, 60)]
    PLACEMENT = [Shard(0), Shard(0), Replicate(), Shard(1), None, Shard(0)]

    def full_state(kind):
        g = torch.Generator().manual_seed(1)
        params = [torch.nn.Parameter(torch.randn(s, generator=g)) for s in SHAPES]
        grads = [[torch.randn(s, generator=g) for s in SHAPES] for _ in range(3)]
        grads[0][5][:3] = 0.0  # rows whose second moment stays 0: collapsed
        return params, grads

    def steps(params, grads, wrap):
        opt = torch.optim.AdamW(params, lr=1e-3, weight_decay=0.1, amsgrad=True)
        for k in range(2):
            for p, gr in zip(params, grads[k]):
                p.grad = wrap(gr, p)
            opt.step()
        for p, gr in zip(params, grads[2]):
            p.grad = wrap(gr, p)
        return opt

    def run(rank, out, port):
        os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        dist.init_process_group("gloo", rank=rank, world_size=2)
        mesh = init_device_mesh("cpu", (2,))
        # the reference: the same steps on the full tensors, on this one process
        params, grads = full_state("adamw")
        opt = steps(params, grads, lambda g, p: g)
        ref = optstate.queue(opt, params, [p.grad for p in params])
        # the same on DTensor shards
        params, grads = full_state("adamw")
        sharded = [p if pl is None else torch.nn.Parameter(distribute_tensor(p.detach(), mesh, [pl]))
                   for p, pl in zip(params, PLACEMENT)]
        wrap = lambda g, p: distribute_tensor(g, mesh, list(p.placements)) if hasattr(p, "placements") else g
        opt = steps(sharded, grads, wrap)
        got = optstate.queue(opt, sharded, [p.grad for p in sharded])
        calls = []
        original = dist.all_reduce
        def counting(tensor, op=dist.ReduceOp.SUM, **kwargs):
            calls.append(str(op))
            return original(tensor, op=op, **kwargs)
        dist.all_reduce = counting
        stats = global_stats([p.grad for p in sharded], extra_sum=got.packed)
        result = dict(ref=ref.packed.tolist(), ref_lengths=ref.lengths.tolist(), got=stats.extra_sum.tolist(),
                      got_lengths=got.lengths.tolist(), unsampled=list(got.unsampled), calls=calls,
                      local=got.packed.tolist())
        with open(os.path.join(out, f"rank{rank}.json"), "w") as f:
            json.dump(result, f)
        dist.destroy_process_group()

    if __name__ == "__main__":
        mp.spawn(run, args=(sys.argv[1], int(sys.argv[2])), nprocs=2, join=True)
    """
)


@pytest.mark.timeout(JOB_TIMEOUT + 30)
def test_sharded_optimizer_state_sums_to_the_full_tensors(tmp_path):
    """AdamW (weight decay, amsgrad) over DTensors sharded unevenly (one rank's shard empty), replicated, sharded on
    dim 1, plain, after two steps: the ranks' addends, summed in the gradients' one SUM all-reduce, equal the
    columns AND the effective-step sample of the same pass over the full tensors on one process."""
    run_job(tmp_path / "optstate_job.py", QUEUE_SCRIPT, tmp_path, extra_args=[tmp_path, free_port()])
    ranks = [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(2)]
    for got in ranks:
        # no collective of its own: the gradients' two (one MAX, one SUM) carry it
        assert got["calls"] == ["RedOpType.MAX", "RedOpType.SUM"] and len(got["calls"]) == COLLECTIVES_PER_EVENT
        assert got["got_lengths"] == got["ref_lengths"] and got["unsampled"] == []
        assert sum(got["ref_lengths"]) > 1000  # (300, 70) sampled at a stride, the others whole
        np.testing.assert_allclose(got["got"], got["ref"], rtol=1e-5, atol=1e-12)
    assert ranks[0]["got"] == ranks[1]["got"]
    assert ranks[0]["local"] != ranks[1]["local"]  # each rank added its own part


FIT_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import torch
    from lightning.pytorch.strategies import ModelParallelStrategy
    from torch.distributed.fsdp import fully_shard
    from helpers import TinyImageModel, image_loader, make_trainer
    from lightning_monitor import ActivationMonitor, GradientMonitor, MultiLogger

    class Adam(TinyImageModel):
        def configure_optimizers(self):
            return torch.optim.AdamW(self.parameters(), lr=1e-3, weight_decay=0.1, amsgrad=True)

    class Sharded(Adam):
        def configure_model(self):
            fully_shard(self.conv)
            fully_shard(self.head)
            fully_shard(self)

    if __name__ == "__main__":
        kind, runs = sys.argv[1], sys.argv[2]
        torch.manual_seed(0)
        model = Sharded() if kind == "fsdp2" else Adam()
        strategy = ModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1) if kind == "fsdp2" else "ddp"
        monitors = [GradientMonitor(optimizer_state=True, histograms=False), ActivationMonitor()]
        trainer = make_trainer(runs, logger=MultiLogger(save_dir=runs, name=kind, wandb=False), strategy=strategy,
                               devices=2, max_steps=6, log_every_n_steps=2, callbacks=monitors)
        trainer.fit(model, image_loader(n=192, batch_size=32))
        os.write(1, f"RANK {trainer.global_rank} DONE\\n".encode())  # one write: ranks share stdout
    """
)


def _fit(tmp_path, kind: str) -> dict:
    from helpers import event_files, tb_all_scalars

    runs = tmp_path / "runs"
    proc = run_job(tmp_path / f"fit_{kind}.py", FIT_SCRIPT, tmp_path, extra_args=[kind, str(runs)])
    assert "RANK 0 DONE" in proc.stdout and "RANK 1 DONE" in proc.stdout, proc.stdout[-1500:] + proc.stderr[-3000:]
    assert "not measured" not in proc.stderr and "left out" not in proc.stderr, proc.stderr[-3000:]
    files = event_files(runs / kind)
    assert len(files) == 1, files  # one writer: rank 0
    return tb_all_scalars(os.path.dirname(files[0]))


@pytest.mark.timeout(2 * JOB_TIMEOUT + 60)
def test_fsdp2_optimizer_state_and_activations_equal_ddp(tmp_path):
    """The same model, seed and data under DDP and under FSDP2 on 2 gloo processes: every optim/* key (AdamW with
    weight decay and amsgrad) and every act/* key, at every logging step, within float rounding of DDP's."""
    ddp, fsdp = _fit(tmp_path, "ddp"), _fit(tmp_path, "fsdp2")
    keys = {k for k in ddp if k.startswith(("optim/", "act/"))}
    assert keys == {k for k in fsdp if k.startswith(("optim/", "act/"))}
    assert {f"optim/{s}/{g}" for s in ("exp_avg_norm", "exp_avg_sq_sqrt_norm", "step_median", "step_p99",
                                      "small_v_share", "update_cos") for g in ("conv", "head")} <= keys
    assert {f"act/{s}/{m}" for s in ("rms", "mean", "max_abs", "dead_share") for m in ("conv", "head")} <= keys
    for key in sorted(keys):
        # optimizer state from the first step that has one (step 1: after one update), activations from step 1 on
        assert [s for s, _ in ddp[key]] == [s for s, _ in fsdp[key]] == [1, 3, 5], key
        for (_, a), (_, b) in zip(ddp[key], fsdp[key], strict=True):
            assert b == pytest.approx(a, rel=1e-4, abs=1e-9), key
