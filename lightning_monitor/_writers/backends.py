"""The writer every backend has (scalars-only here; TensorBoard's and wandb's in
:mod:`~lightning_monitor._writers.dashboards`) and the one guard every write goes through.

A monitor's value takes one path: the dispatch layer prepares it once (a
:class:`~lightning_monitor._writers.media.HistogramData` or :class:`~lightning_monitor._writers.media.Images`) and hands
the same object to each writer through :func:`deliver`. Writers are chosen once per logger:
:class:`~lightning_monitor.MultiLogger` brings its own (the :class:`Backend` contract), a plain ``TensorBoardLogger`` /
``WandbLogger`` gets one of the dashboards' classes, and any other Lightning logger gets the scalar-only :class:`Writer`
(:mod:`~lightning_monitor._writers.plain` picks them and guards Lightning's own calls on those loggers).

Failure isolation is the same for all of them. A value a backend rejects (``ValueError``, ``TypeError``,
``KeyError``, ``IndexError``: a bad key, a picture it cannot encode) is skipped with one warning naming the key, and
the backend keeps logging; :data:`MAX_VALUE_ERRORS` such errors in a row, or any other error (service gone, disk
gone), turn that backend off with one warning saying what still logs. Training never stops for either. Each
writer counts the points it did not keep (:attr:`Writer.dropped`: the values rejected, every value of a write
after it was turned off), which HealthMonitor's ``dropped_points`` rule reads.
"""

from __future__ import annotations

import abc
from collections.abc import Callable, Collection, Iterable, Mapping, Sequence
from typing import Any, Optional

from lightning.pytorch.loggers import Logger
from lightning.pytorch.utilities import rank_zero_warn

from lightning_monitor._core import clock as _clock
from lightning_monitor._core.warn import WarnOnce
from lightning_monitor._writers.media import HistogramData, Images

#: value-level errors in a row (no successful write between them) after which a backend is taken as broken
MAX_VALUE_ERRORS = 3
_VALUE_ERRORS = (ValueError, TypeError, KeyError, IndexError)


class Writer:
    """Scalars through ``Logger.log_metrics``; media are skipped with one warning (e.g. ``CSVLogger``).

    Subclasses override the operations their backend supports, and :meth:`start` / :meth:`end` when writes need
    a lazy start or bookkeeping (MultiLogger's run state).
    """

    #: a dashboard the user looks at (named in the warning when another backend stops); ``False`` for an in-memory
    #: consumer of the values such as RunSummary's
    dashboard = True

    def __init__(self, logger: Logger, name: Optional[str] = None) -> None:
        self.logger = logger
        self.name = name or type(logger).__name__
        self.failed = False
        self.value_errors = 0  # value-level errors since the last successful write
        #: points (one value at one step) of rows this backend did not keep: values it rejected, and every value
        #: written to it after it was turned off (counted by :func:`deliver`; HealthMonitor's ``dropped_points``)
        self.dropped = 0
        self.refused: Optional[int] = None  # set by a write that kept some values and refused these many
        self.warn = WarnOnce()

    # -------------------------------------------------------------------- lifecycle hooks for subclasses
    def start(self, step: Optional[int], row: bool) -> bool:
        """Called before each write at ``step`` (``row``: the write adds a point); ``False`` skips the write.

        Errors raised here are not caught by :func:`deliver`: MultiLogger uses it to fail before training when the
        run directory cannot be written.
        """
        return True

    def end(self, step: Optional[int], row: bool) -> None:
        """Called after each successful write, inside the guard."""

    def failure_message(self, err: BaseException, still_logging: Sequence[str]) -> str:
        keeps = f"{' and '.join(still_logging)} keep{'s' if len(still_logging) == 1 else ''} logging"
        return (
            f"{self.name} stopped working ({type(err).__name__}: {err}); lightning-monitor writes nothing more to it"
            f" and training goes on; {keeps if still_logging else 'nothing else is logging'}."
        )

    # -------------------------------------------------------------------- operations
    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        _call(self.logger, "log_metrics", dict(metrics), step=step)

    def hyperparams(self, params: Any, metrics: Optional[Mapping[str, float]] = None) -> None:
        """Hyperparameters (``metrics``: the backend's own hyperparameter metrics, where it has them)."""
        _call(self.logger, "log_hyperparams", params)

    def finish(self, status: str) -> None:
        """The run ended with ``status`` (a writer that owns its backend flushes and closes it; a plain logger's
        writer leaves that to Lightning, which finalizes the logger itself)."""

    def histograms(self, histograms: Mapping[str, HistogramData], step: Optional[int]) -> None:
        self._unsupported("histograms")

    def images(self, images: Images, step: Optional[int]) -> None:
        self._unsupported("images")

    def text(self, key: str, text: str, step: Optional[int]) -> None:
        self._unsupported("text")

    def summary(self, values: Mapping[str, Any], step: Optional[int], card: Optional[tuple[str, str]],
                headline: Collection[str] = ()) -> None:
        """An end-of-run summary (RunSummary): its numbers as scalars at ``step`` (a scalar-only logger, e.g. a CSV
        file, has no other place for them); its text values and its ``card`` (key, Markdown) where the backend
        shows text. ``headline``: the numbers worth a chart (a dashboard writer charts those only)."""
        _call(self.logger, "log_metrics", _numbers(values), step=step)

    def alert(self, title: str, text: str) -> None:
        """An alert worth a notification (HealthMonitor's): only wandb has one (``run.alert``, online); every other
        backend shows the alert in its scalars and text, and ignores this."""

    def _unsupported(self, kind: str) -> None:
        self.warn(  # one warning for every kind of media (histograms, images, text): not one per kind
            "media",
            f"{self.name} cannot show {kind} (or any other media); lightning-monitor logs only scalars to it."
            " Use MultiLogger, TensorBoardLogger or WandbLogger to see them.",
        )


class ScalarSink(Writer):
    """An in-memory consumer of the logged scalars, with no logger behind it (RunSummary's :class:`Recorder`,
    HealthMonitor's writer): a subclass says what :meth:`scalars` keeps. Not a dashboard: hyperparameters, media, text
    and summaries are not its business."""

    dashboard = False

    def __init__(self, name: str) -> None:
        super().__init__(None, name)  # type: ignore[arg-type]  # no logger behind it: every operation is its own

    def hyperparams(self, params: Any, metrics: Optional[Mapping[str, float]] = None) -> None:
        pass

    def histograms(self, histograms: Mapping[str, HistogramData], step: Optional[int]) -> None:
        pass

    def images(self, images: Images, step: Optional[int]) -> None:
        pass

    def text(self, key: str, text: str, step: Optional[int]) -> None:
        pass

    def summary(self, values: Mapping[str, Any], step: Optional[int], card: Optional[tuple[str, str]],
                headline: Collection[str] = ()) -> None:
        pass


class Recorder(ScalarSink):
    """RunSummary's consumer of the logged scalars: ``series`` keeps ``key -> [(step, value)]``, in logging order, of
    every key ``keep`` accepts."""

    def __init__(self, keep: Callable[[str], bool], name: str = "RunSummary") -> None:
        super().__init__(name)
        self.keep = keep
        self.series: dict[str, list[tuple[int, float]]] = {}

    def scalars(self, metrics: Mapping[str, float], step: Optional[int]) -> None:
        for key, value in metrics.items():
            if self.keep(key):
                self.series.setdefault(key, []).append((int(step or 0), float(value)))  # plain numbers: no sync


def _numbers(values: Mapping[str, Any]) -> dict[str, float]:
    """The numeric entries of ``values`` (text and flags left out)."""
    return {k: v for k, v in values.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _call(logger: Logger, method: str, *args: Any, **kwargs: Any) -> Any:
    """``logger.method(...)`` as its class defines it, past the instance wrapper of :func:`guard_lightning_calls`
    (a write already inside :func:`deliver` never enters the guard a second time)."""
    return getattr(type(logger), method)(logger, *args, **kwargs)


def deliver(
    writer: Writer,
    write: Callable[[], Any],
    step: Optional[int],
    keys: Iterable[str],
    others: Sequence[Writer] = (),
    row: bool = True,
) -> None:
    """Run ``write`` (one operation of ``writer``) inside the failure guard described in the module docstring.

    ``keys`` name what is written (for the warning when the backend rejects it); ``others`` are the writers that
    keep logging if this one stops (for the warning's wording); ``row``: the write adds points (a row of values at
    ``step``), which :attr:`Writer.dropped` counts when the backend does not keep them. The host time spent here is
    added to :func:`seconds_writing`.
    """
    global _seconds_writing
    began = _clock.now()  # the package's one host clock (tests fake it there)
    try:
        # start() runs outside the guard: a run directory that cannot be written fails before training, as documented
        if writer.failed or not writer.start(step, row):
            if row and writer.failed:
                writer.dropped += _points(keys)  # a backend turned off keeps nothing more
            return
        try:
            write()
            writer.end(step, row)
            writer.value_errors = 0
        except Exception as err:  # noqa: BLE001 - a backend never ends the user's run
            writer.value_errors += 1
            refused, writer.refused = writer.refused, None
            if row:
                writer.dropped += _points(keys) if refused is None else refused
            # a value error caused by an OSError (Lightning's TensorBoardLogger wraps a failed write in ValueError)
            # is the disk failing, not the value
            if isinstance(err, _VALUE_ERRORS) and os_error(err) is None and writer.value_errors < MAX_VALUE_ERRORS:
                names = ", ".join(sorted(keys)[:5]) or "a value"
                writer.warn(
                    f"value:{names}",
                    f"{writer.name} rejected {names} at step {step} ({type(err).__name__}: {err}); that value is"
                    " skipped and everything else keeps logging.",
                )
                return
            writer.failed = True
            still = [w.name for w in others if w is not writer and not w.failed and w.dashboard]
            rank_zero_warn(writer.failure_message(err, still))
    finally:
        _seconds_writing += _clock.now() - began


def _points(keys: Iterable[str]) -> int:
    """How many values a write names (``keys``: a mapping of values or a list of keys)."""
    return len(keys) if isinstance(keys, Collection) else sum(1 for _ in keys)


def seconds_writing() -> float:
    """Host seconds this process has spent inside :func:`deliver` (starting and writing to backends): SpeedMonitor
    leaves them out of its timing windows."""
    return _seconds_writing


_seconds_writing = 0.0

#: the monitors' scalars of the last training batch's end, not written yet (:func:`defer`): (their step, a callable
#: that writes them)
_pending: Optional[tuple[Optional[int], Callable[[], None]]] = None


def defer(write: Callable[[], None], step: Optional[int]) -> None:
    """Write the monitors' scalars of a training batch's end (at ``step``) with Lightning's own write of that step
    (its ``log_metrics`` on the trainer's loggers, which follows the batch's end), or at the next hook of any monitor,
    whichever comes first (:func:`write_pending`); a logger write of a later step writes them first
    (:func:`around_model_write`), so every backend gets the steps in order.

    TensorBoard's event writer wakes its thread for each event put on its queue when the thread sleeps: a futex wake
    across CPUs, ~45 us inside a fit here, as much as the rest of the event's write. Lightning's write of the step
    wakes it anyway; an event put right after, while the thread waits for the interpreter lock, wakes nothing."""
    global _pending
    write_pending()  # never two: the one before is written first (steps stay in order)
    _pending = (step, write)


def write_pending() -> None:
    """Write what :func:`defer` holds, if anything (a global read when nothing is held)."""
    global _pending
    pending, _pending = _pending, None
    if pending is not None:
        pending[1]()


def around_model_write(step: Optional[int], write: Callable[[], Any]) -> None:
    """Lightning's own write of ``step`` (a logger's ``log_metrics``: the model's ``self.log`` values), with what
    :func:`defer` holds around it: the monitors' scalars of an earlier step before it (a callback that logs at the
    next batch's start when the model logged nothing at the last logging step), those of this step right after it."""
    pending = _pending
    if pending is not None and (step is None or pending[0] is None or pending[0] < step):
        write_pending()
    try:
        write()
    finally:
        write_pending()


def os_error(err: Optional[BaseException]) -> Optional[OSError]:
    """The first ``OSError`` in ``err``'s chain of causes (a disk or a directory failing), else ``None``."""
    while err is not None:
        if isinstance(err, OSError):
            return err
        err = err.__cause__ or err.__context__
    return None


class Backend(abc.ABC):
    """The contract of an object that brings its own writers to the dispatch layer, instead of getting one made for
    it by :func:`~lightning_monitor._writers.plain.writer_for`: :class:`~lightning_monitor.MultiLogger` (a logger:
    its TensorBoard and wandb writers) and :class:`~lightning_monitor.RunSummary` (a callback: an in-memory consumer
    of the logged scalars). The dispatch layer asks the trainer's loggers and callbacks for it, on global rank 0
    only."""

    @abc.abstractmethod
    def monitor_writers(self) -> Sequence[Writer]:
        """The writers that get every value the monitors log, now (may take the run directory's lock)."""
