"""Monitor: the base of every monitor callback (its cadence, its run-scoped warnings, its ``setup`` checks)."""

from __future__ import annotations

import fnmatch
from collections.abc import Mapping, Sequence
from typing import Any, ClassVar, Optional, Union

import lightning.pytorch as pl
from lightning.pytorch.callbacks import Callback
from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from typing_extensions import override

from lightning_monitor import _cadence, _dispatch
from lightning_monitor._media import HistogramData
from lightning_monitor._validate import check_every_n_steps
from lightning_monitor._warn import WarnOnce

_SHARDED = (FSDPStrategy, DeepSpeedStrategy, ModelParallelStrategy)


class Monitor(Callback):
    """Base of the monitors: when to log and at which step, warn-once per run, the trainer checks of ``setup``.

    The step rule is Lightning's own ``self.log`` rule (:mod:`lightning_monitor._cadence`): the batch's step is read
    at ``on_train_batch_start``, and :meth:`_batch_logging_step` says at the batch's end whether it made a logging
    step. A subclass that overrides ``setup``, ``on_train_start`` or ``on_train_batch_start`` calls ``super()``.
    """

    #: Every key the monitor logs, ``key -> meaning``: the one source of its docstring table, the README table and
    #: the contract test (:func:`lightning_monitor._keys.document_keys`).
    LOGGED_KEYS: ClassVar[dict[str, str]] = {}
    #: Why the monitor cannot run under a strategy that shards the model (``"needs full gradients on every rank"``);
    #: empty when it can.
    SHARDED_UNSUPPORTED: ClassVar[str] = ""

    def __init__(self, every_n_steps: Optional[int], exclude_keys: Optional[Sequence[str]] = None) -> None:
        super().__init__()
        check_every_n_steps(every_n_steps)
        if isinstance(exclude_keys, str) or not all(isinstance(p, str) for p in exclude_keys or ()):
            raise ValueError(f"`exclude_keys` must be a list of key patterns (globs), got {exclude_keys!r}")
        self.every_n_steps = every_n_steps
        self.exclude_keys = list(exclude_keys or ())
        self._warn = WarnOnce()  # self._warn(tag, message): once per run (cleared in setup)
        self._batch_step: Optional[int] = None  # trainer.global_step at the start of this fit's last training batch

    def _needs_logger(self) -> bool:
        """Whether the monitor has nothing to do without a logger (``setup`` then raises)."""
        return True

    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        name = type(self).__name__
        if not trainer.loggers and self._needs_logger():
            raise MisconfigurationException(
                f"{name} needs a logger, but the Trainer has no logger: pass e.g. Trainer(logger=MultiLogger())"
            )
        if self.SHARDED_UNSUPPORTED and isinstance(trainer.strategy, _SHARDED):
            raise MisconfigurationException(
                f"{name} {self.SHARDED_UNSUPPORTED}, which {type(trainer.strategy).__name__} shards;"
                " use DDP or a single device"
            )
        self._warn.clear()
        self._batch_step = None

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._batch_step = None  # no training batch of this fit yet

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._batch_step = trainer.global_step

    # ------------------------------------------------------------------------------------------ logging
    def _keeps(self, key: str) -> bool:
        """Whether ``key`` is logged: not matched by any ``exclude_keys`` pattern."""
        return not any(fnmatch.fnmatchcase(key, pattern) for pattern in self.exclude_keys)

    def _log_scalars(self, trainer: "pl.Trainer", metrics: Mapping[str, float], step: int) -> None:
        _dispatch.log_scalars(trainer, {k: v for k, v in metrics.items() if self._keeps(k)}, step)

    def _log_histograms(self, trainer: "pl.Trainer", histograms: Mapping[str, HistogramData], step: int) -> None:
        _dispatch.log_histograms(trainer, {k: v for k, v in histograms.items() if self._keeps(k)}, step)

    def _log_image(
        self, trainer: "pl.Trainer", key: str, image: Any, step: int, caption: Optional[Union[str, Sequence[str]]]
    ) -> None:
        if self._keeps(key):
            _dispatch.log_image(trainer, key, image, step, caption=caption)

    # ------------------------------------------------------------------------------------------ cadence
    def _logs_at(self, trainer: "pl.Trainer", step: int) -> bool:
        """Whether the optimizer step that starts at ``trainer.global_step == step`` is a logging step."""
        return _cadence.is_logging_step(step, _cadence.logging_interval(trainer, self.every_n_steps))

    def _batch_logging_step(self, trainer: "pl.Trainer") -> Optional[int]:
        """At a training batch's end: the step to log at if the batch made a logging step, else ``None``."""
        return _cadence.batch_logging_step(trainer, self._batch_step, self.every_n_steps)

    def _validation_step(self, trainer: "pl.Trainer") -> int:
        """The step of values measured in a validation run (the step Lightning's own ``self.log`` gives them)."""
        return _cadence.validation_step(trainer, self._batch_step)
