"""Plain Lightning loggers (a ``TensorBoardLogger``, a ``WandbLogger``, any other): the writer each gets
(:func:`writer_for`), and Lightning's own calls on them (``self.log``, hyperparameters) routed through the same failure
guard as ours while a stage runs (:func:`guard_lightning_calls`, undone by :func:`unguard_lightning_calls`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from functools import partial
from typing import Any

from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from lightning_monitor._core.compat import tensorboard_installed
from lightning_monitor._writers.backends import Writer, _call, around_model_write, deliver
from lightning_monitor._writers.dashboards import TensorBoardWriter, WandbWriter


class _GuardedCall:
    """A plain logger's own ``log_metrics`` / ``log_hyperparams``, run through :func:`deliver` so that
    Lightning's ``self.log`` path gets the same isolation as our values. Picklable (no closure)."""

    def __init__(self, writer: Writer, method: str, others: list[Writer]) -> None:
        self.writer, self.method, self.others = writer, method, others

    def __call__(self, *args: Any, **kwargs: Any) -> None:
        values = args[0] if args else kwargs.get("metrics", kwargs.get("params", {}))
        keys = list(values) if isinstance(values, Mapping) else [self.method]
        write = partial(_call, self.writer.logger, self.method, *args, **kwargs)
        step = kwargs.get("step", args[1] if len(args) > 1 else None)
        if isinstance(self.writer, TensorBoardWriter) and self.method == "log_metrics" and isinstance(values, Mapping):
            # the model's own self.log values belong in the run's layout too (train/loss beside val/loss)
            numbers = [k for k, v in values.items() if not isinstance(v, Mapping)]
            write = partial(_then, write, partial(self.writer.note_logger_keys, numbers, step))
        guarded = partial(deliver, self.writer, write, step, keys, self.others, row=self.method == "log_metrics")
        if self.method == "log_metrics":
            around_model_write(step, guarded)  # the monitors' deferred scalars around it (backends.defer)
        else:
            guarded()


def _then(first: Callable[[], Any], second: Callable[[], Any]) -> None:
    first()
    second()


def check_not_tensorboardx(who: str) -> None:
    """Refuse the writer Lightning's ``TensorBoardLogger`` picks when the ``tensorboard`` package is missing:
    tensorboardX, whose writer thread dies on a full disk and then blocks every later write (training hangs).

    Raises:
        ModuleNotFoundError: ``tensorboard`` is not installed, with the ``pip install`` line.
    """
    if not tensorboard_installed():
        raise ModuleNotFoundError(
            f"{who} needs the `tensorboard` package: without it Lightning's TensorBoardLogger writes through"
            " tensorboardX, whose writer blocks training forever once the disk is full. Install it:"
            " `pip install tensorboard`"
        )


def writer_for(logger: Logger) -> Writer:
    """The writer of a plain Lightning logger (a :class:`Backend` brings its own)."""
    if isinstance(logger, TensorBoardLogger):
        check_not_tensorboardx("lightning-monitor with a TensorBoardLogger")  # in Monitor.setup: before training
        return TensorBoardWriter(logger)
    if isinstance(logger, WandbLogger):
        return WandbWriter(logger)
    return Writer(logger)


def guard_lightning_calls(writer: Writer, others: list[Writer]) -> None:
    """Route Lightning's own calls on a plain TensorBoard/wandb logger (``self.log``, hyperparameters) through
    :func:`deliver` too, by wrapping the two methods on that logger instance."""
    if type(writer) is Writer:
        return  # other loggers are the user's own business
    for method in _GUARDED:
        setattr(writer.logger, method, _GuardedCall(writer, method, others))


def unguard_lightning_calls(writer: Writer) -> None:
    """Undo :func:`guard_lightning_calls`: the logger's methods are its class's own again (at a fit's teardown; the
    next fit's setup guards them again)."""
    for method in _GUARDED:
        if isinstance(vars(writer.logger).get(method), _GuardedCall):
            delattr(writer.logger, method)


#: the methods of a plain TensorBoard/wandb logger that Lightning's own writes go through
_GUARDED = ("log_metrics", "log_hyperparams")
