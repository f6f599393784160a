"""The one door monitors log through: each value prepared once, handed to every writer of every trainer logger.

Works the same whether the trainer holds a :class:`~lightning_monitor.MultiLogger`, a plain list
``[TensorBoardLogger(...), WandbLogger(...)]`` or a scalar-only logger such as ``CSVLogger`` (scalars only, and
one warning that media are skipped). Monitors never branch on backend types; only global rank 0 writes. Each write
goes through :func:`lightning_monitor._writers.deliver`, so a backend that fails costs that value or that backend,
never the run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from functools import partial
from typing import Any, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.loggers import Logger

from lightning_monitor._media import HistogramData, prepare_images
from lightning_monitor._writers import Writer, deliver, guard_lightning_calls, writer_for
from lightning_monitor.multi_logger import MultiLogger

# writers of plain loggers, made once per logger (their warn-once state lives as long as the logger)
_plain: "weakref.WeakKeyDictionary[Logger, Writer]" = weakref.WeakKeyDictionary()
# scalars kept for RunSummary, per trainer: (which keys, key -> [(step, value)]); rank 0 only
Recorded = dict[str, list[tuple[int, float]]]
_recorders: "weakref.WeakKeyDictionary[pl.Trainer, tuple[Callable[[str], bool], Recorded]]" = (
    weakref.WeakKeyDictionary()
)


def writers(trainer: "pl.Trainer") -> list[Writer]:
    """Every writer of every logger the trainer has, in logger order."""
    out: list[Writer] = []
    fresh: list[Writer] = []
    for logger in trainer.loggers:
        if isinstance(logger, MultiLogger):
            out.extend(logger._monitor_writers)
            continue
        writer = _plain.get(logger)
        if writer is None:
            writer = _plain[logger] = writer_for(logger)
            fresh.append(writer)
        out.append(writer)
    for writer in fresh:
        guard_lightning_calls(writer, out)
    return out


def log_scalars(trainer: "pl.Trainer", metrics: Mapping[str, float], step: int) -> None:
    if not trainer.is_global_zero or not metrics:
        return
    metrics = dict(metrics)
    recorder = _recorders.get(trainer)
    if recorder is not None:
        keep, series = recorder
        for key, value in metrics.items():
            if keep(key):
                series.setdefault(key, []).append((int(step), float(value)))  # plain numbers: no sync
    every = writers(trainer)
    for writer in every:
        deliver(writer, partial(writer.scalars, metrics, step), step, metrics, every)


def record_scalars(trainer: "pl.Trainer", keep: Callable[[str], bool]) -> None:
    """From now on keep every scalar logged for ``trainer`` whose key ``keep`` accepts (RunSummary reads them)."""
    _recorders[trainer] = (keep, {})


def stop_recording(trainer: "pl.Trainer") -> Recorded:
    """What :func:`record_scalars` kept (key -> ``[(step, value)]`` in logging order); recording stops."""
    recorder = _recorders.pop(trainer, None)
    return {} if recorder is None else recorder[1]


def log_summary(
    trainer: "pl.Trainer", values: Mapping[str, Any], step: int, card: Optional[tuple[str, str]] = None
) -> None:
    """An end-of-run summary (numbers and text) and its text ``card`` (key, Markdown) to every writer."""
    if not trainer.is_global_zero:
        return
    every = writers(trainer)
    for writer in every:
        deliver(writer, partial(writer.summary, values, step, card), step, values, every, row=False)


def log_histograms(trainer: "pl.Trainer", histograms: Mapping[str, HistogramData], step: int) -> None:
    """Ready histograms at one step, batched per backend (one wandb row, not one per key)."""
    if not trainer.is_global_zero or not histograms:
        return
    every = writers(trainer)
    for writer in every:
        deliver(writer, partial(writer.histograms, histograms, step), step, histograms, every)


def log_image(
    trainer: "pl.Trainer",
    key: str,
    images: Any,
    step: int,
    caption: Optional[Union[str, Sequence[str]]] = None,
) -> None:
    """One image or a list of them (any layout :func:`~lightning_monitor._media.to_uint8_hwc` reads), converted
    once and handed to every writer."""
    if not trainer.is_global_zero:
        return
    prepared = prepare_images(key, images, caption)
    every = writers(trainer)
    for writer in every:
        deliver(writer, partial(writer.images, prepared, step), step, [key], every)
