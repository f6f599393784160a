"""What PredictionGridMonitor reads: its fixed samples from a validation dataloader, and the model's class scores.

Anything it cannot read raises :class:`Unreadable`, whose message says what was expected, what came instead and
which option fixes it (``batch_fn``, ``output_fn``); the monitor turns that into one warning and turns itself off.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, Optional

import numpy as np
import torch
from torch.utils.data import DataLoader, IterableDataset

EXPECTED_BATCH = (
    "validation batches `(images, labels, ...)`: images a tensor [B, C, H, W] with C 1 or 3 (or [B, H, W]),"
    " labels an integer tensor [B] of class ids"
)
BATCH_FIX = (
    "pass `batch_fn=` a function mapping one batch to (images, labels),"
    " e.g. `PredictionGridMonitor(batch_fn=lambda b: (b['image'], b['label']))`"
)
OUTPUT_FIX = (
    "pass `output_fn=` a function mapping the module's output to that,"
    " e.g. `PredictionGridMonitor(output_fn=lambda out: out['logits'])`"
)


class Unreadable(Exception):
    """A batch, an output or a dataloader the grid cannot read; the message names the fix."""


def pick_loader(loaders: Any, index: int) -> Any:
    """The ``index``-th of the trainer's validation dataloaders (a list, a dict or one loader)."""
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        if index >= len(loaders):
            raise Unreadable(f"`dataloader_idx` is {index} but there are {len(loaders)} validation dataloaders")
        return loaders[index]
    return loaders


def take_samples(
    loader: Any, num_samples: int, seed: int, split: Callable[[Any], tuple[torch.Tensor, torch.Tensor]]
) -> tuple[torch.Tensor, torch.Tensor]:
    """``num_samples`` (images, labels) on the CPU: a seeded draw over a map-style set, else its first samples."""
    dataset = getattr(loader, "dataset", None)
    map_style = dataset is not None and not isinstance(dataset, IterableDataset)
    if isinstance(loader, DataLoader) and loader.batch_size is not None and dataset is not None and map_style:
        try:
            size = len(dataset)
        except TypeError:
            size = 0
        if size > 0:  # a seeded draw over the whole set, one collated batch
            order = torch.randperm(size, generator=torch.Generator().manual_seed(seed))
            indices = order[:num_samples].sort().values.tolist()
            return split(loader.collate_fn([dataset[i] for i in indices]))
    images, labels, count = [], [], 0  # an iterable set: its first samples
    for batch in loader:
        x, y = split(batch)
        images.append(x)
        labels.append(y)
        count += len(y)
        if count >= num_samples:
            break
    if not images:
        raise Unreadable("PredictionGridMonitor found no samples in the validation dataloader")
    return torch.cat(images)[:num_samples], torch.cat(labels)[:num_samples]


def split_batch(
    batch: Any, batch_fn: Optional[Callable[[Any], Any]], channels: Optional[int]
) -> tuple[torch.Tensor, torch.Tensor]:
    """One batch to ``(images [B, C, H, W], labels [B] long)`` on the CPU, or :class:`Unreadable`."""
    out = batch_fn(batch) if batch_fn is not None else batch
    got = f"`batch_fn` returned {describe(out)}" if batch_fn is not None else f"got {describe(batch)}"
    problem = f"it expects {EXPECTED_BATCH}; {got}; {BATCH_FIX}"
    if not isinstance(out, (tuple, list)) or len(out) < 2:
        raise Unreadable(problem)
    images, labels = out[0], out[1]
    if isinstance(labels, (list, tuple)) and all(isinstance(v, int) for v in labels):
        labels = torch.as_tensor(labels)
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        raise Unreadable(problem)
    if images.ndim == 3:
        images = images.unsqueeze(1)
    ok_dtype = images.is_floating_point() or images.dtype == torch.uint8
    ok_images = images.ndim == 4 and images.shape[1] in (1, 3) and ok_dtype
    ok_labels = labels.ndim == 1 and not labels.is_floating_point() and len(labels) == len(images)
    if not (ok_images and ok_labels):
        raise Unreadable(problem)
    if channels is not None and channels not in (1, images.shape[1]):
        raise Unreadable(f"`mean`/`std` have {channels} values but the images have {images.shape[1]} channels")
    return images.detach().cpu().clone(), labels.detach().cpu().long().clone()


def check_scores(scores: Any, n: int, from_output_fn: bool) -> torch.Tensor:
    """``scores`` if it is a float ``[n, num_classes >= 2]`` tensor, else :class:`Unreadable` naming ``output_fn``."""
    if isinstance(scores, torch.Tensor) and scores.is_floating_point() and scores.ndim == 2 and scores.shape[0] == n \
            and scores.shape[1] >= 2:
        return scores
    source = "`output_fn` returned" if from_output_fn else "the module's forward returned"
    raise Unreadable(
        f"it needs class scores, log-probabilities or probabilities shaped [{n}, num_classes] for {n} images (an"
        f" image classifier); {source} {describe(scores)}; {OUTPUT_FIX}"
    )


def to_probabilities(scores: np.ndarray) -> np.ndarray:
    """Log-probabilities (all <= 0, each row's logsumexp ~ 0) -> exp; probabilities kept; anything else softmax."""
    with np.errstate(over="ignore", invalid="ignore"):
        top = scores.max(axis=1, keepdims=True)
        logsumexp = (top + np.log(np.exp(scores - top).sum(axis=1, keepdims=True))).ravel()
        if (scores <= 0).all() and (np.abs(logsumexp) < 1e-3).all():
            return np.exp(scores)
        if np.isfinite(scores).all() and (scores >= 0).all() and (np.abs(scores.sum(axis=1) - 1) < 1e-3).all():
            return scores
        shifted = np.exp(scores - top)
        return shifted / shifted.sum(axis=1, keepdims=True)


def describe(obj: Any, depth: int = 0) -> str:
    """A short description of a batch or an output for a message (``Tensor[16, 8] float32``, ``dict with keys``)."""
    if isinstance(obj, torch.Tensor):
        return f"Tensor{list(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, dict):
        return f"dict with keys {list(obj)[:8]}"
    if isinstance(obj, (list, tuple)) and depth == 0:
        inner = ", ".join(describe(v, 1) for v in list(obj)[:4]) + (", ..." if len(obj) > 4 else "")
        return f"{type(obj).__name__} of {len(obj)} ({inner})"
    return type(obj).__name__


def state_problem(images: Any, labels: Any) -> str:
    """What makes a restored ``(images, labels)`` unusable (empty when they are fine)."""
    if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
        return f"images and labels must be tensors, got {type(images).__name__} and {type(labels).__name__}"
    if images.dim() != 4 or images.shape[1] not in (1, 3) or images.shape[0] == 0:
        return f"images of shape {tuple(images.shape)}, expected N x C x H x W with C in 1, 3"
    if labels.dim() != 1 or labels.shape[0] != images.shape[0] or labels.is_floating_point():
        return f"labels of shape {tuple(labels.shape)} and dtype {labels.dtype} for {images.shape[0]} images"
    return ""
