"""The one door monitors log through: each value prepared once, handed to every writer of every trainer logger.

Works the same whether the trainer holds a :class:`~lightning_monitor.MultiLogger`, a plain list
``[TensorBoardLogger(...), WandbLogger(...)]`` or a scalar-only logger such as ``CSVLogger`` (scalars only, and
one warning that media are skipped). Monitors never branch on backend types; only global rank 0 writes. Each write
goes through :func:`lightning_monitor._writers.backends.deliver`, so a backend that fails costs that value or that
backend, never the run.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Collection, Mapping, Sequence
from functools import partial
from typing import Any, Optional, Protocol, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import RichProgressBar, TQDMProgressBar
from lightning.pytorch.loggers import Logger

from lightning_monitor._core import clock as _clock
from lightning_monitor._writers.backends import Backend, Writer, defer, deliver, write_pending
from lightning_monitor._writers.media import HistogramData, prepare_images
from lightning_monitor._writers.plain import guard_lightning_calls, unguard_lightning_calls, writer_for

# writers of plain loggers, made once per logger (their warn-once state lives as long as the logger)
_plain: "weakref.WeakKeyDictionary[Logger, Writer]" = weakref.WeakKeyDictionary()


def writers(trainer: "pl.Trainer") -> list[Writer]:
    """Every writer of every logger the trainer has, in logger order, then those of callbacks that consume the
    logged values (a :class:`~lightning_monitor._writers.backends.Backend` such as RunSummary)."""
    out: list[Writer] = []
    fresh: list[Writer] = []
    for logger in trainer.loggers:
        if isinstance(logger, Backend):
            out.extend(logger.monitor_writers())
            continue
        writer = _plain.get(logger)
        if writer is None:
            writer = _plain[logger] = writer_for(logger)
            fresh.append(writer)
        out.append(writer)
    for writer in fresh:
        guard_lightning_calls(writer, out)
    for callback in trainer.callbacks:  # type: ignore[attr-defined]
        if isinstance(callback, Backend):
            out.extend(callback.monitor_writers())
    return out


def dropped_points(trainer: "pl.Trainer") -> dict[str, int]:
    """Points each dashboard backend of the trainer did not keep so far (values it rejected, writes after it was
    turned off), by backend name: counters the failure guard keeps, no sync. Global rank 0 (the rank that writes)."""
    out: dict[str, int] = {}
    for writer in writers(trainer):
        if writer.dashboard:
            out[writer.name] = out.get(writer.name, 0) + writer.dropped
    return out


def release(trainer: "pl.Trainer") -> None:
    """The fit is over: what is held or deferred is written, the trainer's plain loggers get their own methods back
    (no wrapper left on them), and the next fit (or ``test``) guards them again."""
    release_scalars()
    for logger in trainer.loggers:
        writer = _plain.pop(logger, None)
        if writer is not None:
            unguard_lightning_calls(writer)


class Payer(Protocol):
    def charge_seconds(self, seconds: float) -> None: ...


class _Held:
    """Scalars the monitors logged at one step while a training batch ends, written together by
    :func:`release_scalars`."""

    def __init__(self, trainer: "pl.Trainer", step: int) -> None:
        self.trainer = trainer
        self.step = step
        self.metrics: dict[str, float] = {}
        self.payers: list[tuple[Payer, int]] = []  # who logged how many of them: the write's time is theirs


# while the monitors' training-batch ends run (hold_scalars .. release_scalars; one trainer at a time runs them in a
# process): whether scalars are held, and what is
_holding = False
_held: Optional[_Held] = None


def hold_scalars() -> None:
    """From now until :func:`release_scalars`, scalars are gathered, not written: every monitor's values of a training
    batch's end become one write per backend (one TensorBoard event, one wandb row) instead of one per monitor
    (about 0.1 ms each, cold, on a small model's step). A flag: nothing is made until a value comes."""
    global _holding
    _holding = True


def release_scalars(later: bool = False) -> None:
    """Write what :func:`hold_scalars` gathered; the time it takes is charged to the monitors that logged it, in
    proportion to their number of values. ``later``: with Lightning's own write of the step, or at the next hook of
    any monitor, whichever comes first (:func:`lightning_monitor._writers.backends.defer`)."""
    global _holding, _held
    held, _holding, _held = _held, False, None
    if later:
        if held is not None:
            defer(partial(_write_held, held), held.step)
        return
    write_pending()  # an earlier step's first
    if held is not None:
        _write_held(held)


def _write_held(held: _Held) -> None:
    began = _clock.now()
    _write_scalars(held.trainer, held.metrics, held.step)
    spent = _clock.now() - began
    total = sum(n for _, n in held.payers) or 1
    for payer, n in held.payers:
        payer.charge_seconds(spent * n / total)


def log_scalars(trainer: "pl.Trainer", metrics: Mapping[str, float], step: int, payer: Optional[Payer] = None) -> None:
    """Scalars at ``step`` to every writer: now, or with the others of the same step while they are held
    (:func:`hold_scalars`; ``payer`` is then charged its part of the write's time)."""
    global _held
    if not trainer.is_global_zero or not metrics:
        return
    if not _holding or payer is None:
        _write_scalars(trainer, dict(metrics), step)
        return
    held = _held
    if held is not None and (held.step != step or held.trainer is not trainer):  # never within one batch end
        _write_held(held)
        held = None
    if held is None:
        held = _held = _Held(trainer, step)
    held.metrics.update(metrics)
    held.payers.append((payer, len(metrics)))


def _write_scalars(trainer: "pl.Trainer", metrics: dict[str, float], step: int) -> None:
    every = writers(trainer)
    for writer in every:
        deliver(writer, partial(writer.scalars, metrics, step), step, metrics, every)


def log_summary(
    trainer: "pl.Trainer", values: Mapping[str, Any], step: int, card: Optional[tuple[str, str]] = None,
    headline: Collection[str] = (),
) -> None:
    """An end-of-run summary (numbers and text), its text ``card`` (key, Markdown) and which of its numbers are the
    ``headline`` (a dashboard that charts scalars gets those only) to every writer."""
    if not trainer.is_global_zero:
        return
    every = writers(trainer)
    for writer in every:
        deliver(writer, partial(writer.summary, values, step, card, frozenset(headline)), step, values, every,
                row=False)


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
    """One image or a list of them (any layout :func:`~lightning_monitor._writers.media.to_uint8_hwc` reads), converted
    once and handed to every writer."""
    if not trainer.is_global_zero:
        return
    prepared = prepare_images(key, images, caption)
    every = writers(trainer)
    for writer in every:
        deliver(writer, partial(writer.images, prepared, step), step, [key], every)


def log_text(trainer: "pl.Trainer", key: str, text: str, step: int) -> None:
    """A piece of text (Markdown) at ``step`` to every writer: TensorBoard's text tab, a one-cell wandb table; a
    scalar-only logger says once that it shows no text."""
    if not trainer.is_global_zero:
        return
    every = writers(trainer)
    for writer in every:
        deliver(writer, partial(writer.text, key, text, step), step, [key], every)


def log_alert(trainer: "pl.Trainer", title: str, text: str) -> None:
    """An alert worth a notification to every writer that has one (wandb's ``run.alert``, when the run is online);
    the others ignore it (the alert is also in their scalars and text)."""
    if not trainer.is_global_zero:
        return
    every = writers(trainer)
    for writer in every:
        deliver(writer, partial(writer.alert, title, text), None, [title], every, row=False)


def _print(line: str) -> None:
    print(line, flush=True)


def say(trainer: "pl.Trainer", line: str, fallback: Callable[[str], Any] = _print) -> None:
    """``line`` on the terminal, on its own line: through the progress bar when one is shown (between two of its
    updates, never inside a bar line; Lightning shows it on global rank 0 only), else through ``fallback`` (printed;
    Lightning's ``rank_zero_info`` for a line only rank 0 should say)."""
    bar = trainer.progress_bar_callback
    if isinstance(bar, (TQDMProgressBar, RichProgressBar)) and bar.is_enabled:
        bar.print(line)
    else:
        fallback(line)
