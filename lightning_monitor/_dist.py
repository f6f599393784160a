"""Cross-rank aggregation: one packed collective per logging step, run on every rank."""

from __future__ import annotations

from typing import Sequence

import lightning.pytorch as pl
import torch


def gather_packed(trainer: "pl.Trainer", values: torch.Tensor) -> torch.Tensor:
    """All-gather a 1-D tensor of per-rank values; returns ``[world_size, n]`` float64 on the host.

    Must be called on every rank (it is a collective whenever ``world_size > 1``). The one ``.cpu()`` at the end
    is the only host transfer.
    """
    packed = values.detach().reshape(-1).to(device=trainer.strategy.root_device, dtype=torch.float64)
    if trainer.world_size > 1:
        gathered = trainer.strategy.all_gather(packed).reshape(trainer.world_size, -1)
    else:
        gathered = packed.unsqueeze(0)
    return gathered.cpu()  # sync point: once per logging step


def rank_stats(gathered: torch.Tensor, keys: Sequence[str]) -> dict[str, float]:
    """``{key_min, key_mean, key_max, key_max_rank}`` for each column of a ``[world_size, n]`` tensor."""
    out: dict[str, float] = {}
    lo, mean, hi = gathered.min(dim=0).values, gathered.mean(dim=0), gathered.max(dim=0)
    for i, key in enumerate(keys):
        out[f"{key}_min"] = float(lo[i])
        out[f"{key}_mean"] = float(mean[i])
        out[f"{key}_max"] = float(hi.values[i])
        out[f"{key}_max_rank"] = int(hi.indices[i])
    return out
