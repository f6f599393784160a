"""Cost of one gradient logging event sharded (FSDP2 DTensor shards, 2 gloo processes) vs unsharded, and the
collectives it makes (CPU, one torch thread per process).

Two processes (``torch.multiprocessing``, gloo) hold the same model's gradients, full (what GradientMonitor measures
under DDP: every rank has the full gradient, rank 0 measures) and as ``Shard(0)`` DTensors on a 2-rank mesh (what
``fully_shard`` gives: each rank holds half). Interleaved round-robin in the same processes
(:func:`_common.interleaved`), a barrier before each sample, medians over ``--reps``, rank 0's clock:

* ``unsharded exact`` / ``unsharded sampled``  ``_grad_event.measure`` over the full gradients: norms, NaN/Inf
  counts and a 64-bin histogram of every gradient, over all elements / at most 16384 per tensor (the default).
* ``sharded exact`` / ``sharded sampled``  the same ``_grad_event.measure`` over DTensor gradients (handed to
  ``_grad_sharded.global_stats``): the same numbers for
  the full tensors, with its all-reduces (counted by wrapping ``torch.distributed``'s collectives).
* ``... norms only``  no histograms.
* ``non-logging step``  the per-step NaN/Inf flags (``fast_norms``) over the full gradients / the local shards.

Ratios are to ``unsharded exact`` of the same model in the same run.

Run::

    python benchmarks/sharded_event_cost.py --reps 9
"""

from __future__ import annotations

import argparse
import os
import socket
import sys
import time
from collections.abc import Callable
from typing import Any

sys.path.insert(0, os.path.dirname(__file__))
import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.distributed as dist  # noqa: E402
import torch.multiprocessing as mp  # noqa: E402
from _common import Spread, interleaved, machine, markdown_table, pin  # noqa: E402
from torch import nn  # noqa: E402

_COLLECTIVES = ("all_reduce", "all_gather", "all_gather_into_tensor", "reduce_scatter_tensor", "broadcast",
                "all_to_all_single", "barrier", "gather", "scatter", "reduce")


def _models() -> dict[str, nn.Module]:
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(256, 8, dim_feedforward=1024, batch_first=True)
    return {
        "transformer (6 x d256, 75 tensors)": nn.Sequential(nn.Embedding(1000, 256), nn.TransformerEncoder(layer, 6),
                                                            nn.Linear(256, 1000)),
        "mlp 1024-4096-4096-1024 (6 tensors)": nn.Sequential(nn.Linear(1024, 4096), nn.ReLU(), nn.Linear(4096, 4096),
                                                             nn.ReLU(), nn.Linear(4096, 1024)),
    }


class _CountCollectives:
    """Counts calls of ``torch.distributed`` collectives while active (the module functions, wrapped)."""

    def __init__(self) -> None:
        self.calls: list[str] = []
        self._saved: dict[str, Callable[..., Any]] = {}

    def __enter__(self) -> "_CountCollectives":
        for name in _COLLECTIVES:
            original = getattr(dist, name, None)
            if original is None:
                continue
            self._saved[name] = original

            def wrapped(*args: Any, _name: str = name, _original: Callable[..., Any] = original, **kw: Any) -> Any:
                self.calls.append(_name)
                return _original(*args, **kw)

            setattr(dist, name, wrapped)
        return self

    def __exit__(self, *exc: Any) -> None:
        for name, original in self._saved.items():
            setattr(dist, name, original)


def _events(model: nn.Module, mesh: Any) -> dict[str, Callable[[], Any]]:
    from torch.distributed.tensor import Shard, distribute_tensor

    from lightning_monitor._grad import event as _grad_event
    from lightning_monitor._grad import sharded as _grad_sharded
    from lightning_monitor._grad.norms import fast_norms

    g = torch.Generator().manual_seed(1)
    full = [torch.randn(p.shape, generator=g) * 1e-3 for p in model.parameters()]
    sharded = [distribute_tensor(t, mesh, [Shard(0)]) for t in full]
    local = [_grad_sharded.local_shard(t, reduce_partial=False)[0] for t in sharded]
    present = np.arange(len(full))
    every, none = present.copy(), np.zeros(0, dtype=np.int64)

    def event(grads: list[torch.Tensor], hist: np.ndarray, max_elements: Any) -> Callable[[], Any]:
        spec = _grad_event.MeasureSpec(bins=64, max_elements=max_elements, hist_range="minmax", grad_histograms=True,
                                       param_histograms=False, weights=False)
        return lambda: _grad_event.measure(spec, 0, present, grads, weights=[], hist=hist, pending=[])

    return {  # the one entry, _grad_event.measure, hands DTensor gradients to _grad_sharded
        "unsharded exact": event(full, every, None),
        "unsharded sampled": event(full, every, 16384),
        "unsharded norms only": event(full, none, None),
        "sharded exact": event(sharded, every, None),
        "sharded sampled": event(sharded, every, 16384),
        "sharded norms only": event(sharded, none, None),
        "non-logging step, unsharded": lambda: fast_norms(full).tolist(),
        "non-logging step, sharded": lambda: fast_norms(local).tolist(),
    }


def _run(rank: int, port: int, reps: int, out: Any) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    pin(1)
    dist.init_process_group("gloo", rank=rank, world_size=2)
    from torch.distributed.device_mesh import init_device_mesh

    mesh = init_device_mesh("cpu", (2,))
    results = []
    for model_name, model in _models().items():
        events = _events(model, mesh)
        counts = {}
        for name, fn in events.items():  # warm-up (plans, buffers) and the collective count of one event
            fn()
            with _CountCollectives() as counter:
                fn()
            counts[name] = len(counter.calls)
        times: dict[str, list[float]] = {name: [] for name in events}
        for _, name in interleaved(list(events), reps):
            dist.barrier()
            began = time.perf_counter()
            events[name]()
            times[name].append(time.perf_counter() - began)
        base = Spread(times["unsharded exact"]).median
        for name in events:
            spread = Spread(times[name])
            results.append((model_name, name, spread.fmt(1e3, 2), f"{spread.median / base:.2f}", counts[name]))
    if rank == 0:
        out.put(results)
    dist.barrier()
    dist.destroy_process_group()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--reps", type=int, default=9)
    args = parser.parse_args()
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    ctx = mp.get_context("spawn")
    queue = ctx.SimpleQueue()
    mp.start_processes(_run, args=(port, args.reps, queue), nprocs=2, join=True, start_method="spawn")
    pin(1)
    print(machine())
    print("2 gloo processes, one torch thread each; rank 0's wall time per event, a barrier before each sample\n")
    print(markdown_table(["model", "event", "ms median [IQR]", "x unsharded exact", "collectives"], queue.get()))


if __name__ == "__main__":
    main()
