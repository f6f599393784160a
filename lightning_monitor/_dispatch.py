"""The one door callbacks use to log: scalars, histograms, images and text to every logger the trainer has.

Works the same whether the trainer holds a :class:`~lightning_monitor.MultiLogger`, a plain list
``[TensorBoardLogger(...), WandbLogger(...)]`` or a scalar-only logger such as ``CSVLogger`` (scalars only, and
one warning that media are skipped). Callbacks never branch on backend types; only global rank 0 writes.
"""

from __future__ import annotations

from typing import Any, Mapping, Optional, Sequence, Union

import lightning.pytorch as pl
from lightning.pytorch.utilities import rank_zero_warn

from lightning_monitor._backends import log_histograms_to, log_images_to
from lightning_monitor._media import HistogramData, make_histogram, prepare_images

_warned: set[tuple[str, str]] = set()


def log_scalars(trainer: "pl.Trainer", metrics: Mapping[str, Any], step: int) -> None:
    if not trainer.is_global_zero or not metrics:
        return
    for logger in trainer.loggers:
        logger.log_metrics(dict(metrics), step=step)


def log_histogram(
    trainer: "pl.Trainer",
    key: str,
    values: Any,
    step: int,
    edges: Optional[Sequence[float]] = None,
    bins: int = 64,
    stats: Optional[dict[str, float]] = None,
) -> None:
    """``values`` are raw values, or counts with their ``edges``, or a ready :class:`HistogramData`."""
    if not trainer.is_global_zero:
        return
    hist = values if isinstance(values, HistogramData) else make_histogram(values, edges, bins, key, stats)
    log_histograms(trainer, {key: hist}, step)


def log_histograms(trainer: "pl.Trainer", histograms: Mapping[str, HistogramData], step: int) -> None:
    """Several ready :class:`HistogramData` at one step, batched per backend (one wandb row, not one per key)."""
    if not trainer.is_global_zero or not histograms:
        return
    for logger in trainer.loggers:
        if not log_histograms_to(logger, histograms, step):
            _warn_once(logger, "histograms")


def log_image(
    trainer: "pl.Trainer",
    key: str,
    images: Any,
    step: int,
    caption: Optional[Union[str, Sequence[str]]] = None,
) -> None:
    if not trainer.is_global_zero:
        return
    arrays, captions = prepare_images(key, images, caption)
    for logger in trainer.loggers:
        if not log_images_to(logger, key, arrays, step, captions):
            _warn_once(logger, "images")


def _warn_once(logger: Any, kind: str) -> None:
    tag = (type(logger).__name__, kind)
    if tag not in _warned:
        _warned.add(tag)
        rank_zero_warn(
            f"{type(logger).__name__} cannot show {kind}; lightning-monitor logs only scalars to it."
            " Use MultiLogger, TensorBoardLogger or WandbLogger to see them."
        )
