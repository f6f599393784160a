"""Cross-rank aggregation (one packed collective per logging step, run on every rank) and where the model runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Union

import lightning.pytorch as pl
import numpy as np
import torch
import torch.distributed as dist
from lightning.pytorch.strategies import ModelParallelStrategy


def model_on_every_rank(trainer: "pl.Trainer") -> bool:
    """Whether the model runs on every rank together: Lightning's ``ModelParallelStrategy`` (FSDP2 ``fully_shard``,
    tensor parallel: DTensor parameters), where a forward, or a measurement of the parameters, is a collective."""
    return isinstance(trainer.strategy, ModelParallelStrategy)


def works_on_model_here(trainer: "pl.Trainer") -> bool:
    """Whether this rank takes part in a monitor's work on the model (a measurement, a forward): global rank 0,
    or every rank when the model runs on every rank (:func:`model_on_every_rank`; only rank 0 writes)."""
    return trainer.is_global_zero or model_on_every_rank(trainer)


def world() -> tuple[int, int]:
    """(this process's rank, the world size) of the default process group; ``(0, 1)`` without one."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def all_reduce(pack: torch.Tensor, op: "dist.ReduceOp.RedOpType") -> torch.Tensor:
    """``pack`` reduced in place over the default process group with ``op`` (a collective: every rank, same size,
    same order); itself, untouched, on one process."""
    if world()[1] > 1:
        dist.all_reduce(pack, op=op)
    return pack


def gather_packed(trainer: "pl.Trainer", values: Union[torch.Tensor, Sequence[float]]) -> np.ndarray:
    """All-gather a 1-D tensor (or list) of per-rank values; returns a ``[world_size, n]`` float64 array on the host.

    Must be called on every rank (it is a collective whenever ``world_size > 1``). The one ``.tolist()`` at the
    end is the only host transfer; everything after it is numpy. On one process a list of host values goes
    straight to numpy (no tensor is made for it).
    """
    if trainer.world_size == 1:
        host = values.detach().reshape(-1).tolist() if isinstance(values, torch.Tensor) else values  # sync point
        return np.array(host, dtype=np.float64).reshape(1, -1)
    packed = torch.as_tensor(values, dtype=torch.float64).detach().reshape(-1).to(trainer.strategy.root_device)
    gathered = trainer.strategy.all_gather(packed).reshape(trainer.world_size, -1)
    return np.array(gathered.tolist(), dtype=np.float64).reshape(trainer.world_size, -1)  # sync point


def rank_stats(gathered: np.ndarray, keys: Sequence[str]) -> dict[str, float]:
    """``{key_min, key_mean, key_max, key_max_rank}`` for each column of a ``[world_size, n]`` array."""
    out: dict[str, float] = {}
    for i, key in enumerate(keys):
        column = gathered[:, i]
        out[f"{key}_min"] = float(column.min())
        out[f"{key}_mean"] = float(column.mean())
        out[f"{key}_max"] = float(column.max())
        out[f"{key}_max_rank"] = int(column.argmax())
    return out
