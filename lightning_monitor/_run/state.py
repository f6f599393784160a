"""Run state of a MultiLogger: the step ledger beside the run, the wandb runs open in this process, the exit flush."""

from __future__ import annotations

import atexit
import os
import weakref
from collections.abc import Callable
from typing import Any, Optional

from lightning_monitor._core.compat import experiment_if_made

#: file beside the run that says which wandb ``_step`` holds which trainer step
LEDGER_NAME = "logged-steps.tsv"


class StepLedger:
    """What was logged at which step, kept in the run directory (``logged-steps.tsv``) for a restarted job.

    A job restarted from a checkpoint at step ``s`` must not show what its dead predecessor logged after that
    checkpoint (at steps ``>= s``) a second time, in either backend, while a job that merely continues a run
    (``test`` after ``fit``, in this process or a new one) must drop nothing. The ledger tells the two apart: the
    earlier process logged *past* ``s`` only in the first case. wandb can rewind a run to a ``_step``
    (``resume_from="id?_step=k"``, recorded in the offline run file too and applied when it is synced), but only we
    know which ``_step`` holds which trainer step. Lines: ``<_step>\t<trainer step>`` for each wandb history row,
    ``step\t<trainer step>`` each time a larger step is logged (TensorBoard too), ``rewind\t<k>`` when a restart
    cut the wandb run back to ``_step`` k.
    """

    def __init__(self, log_dir: str, on_fault: Optional[Callable[[OSError], None]] = None) -> None:
        self.path = os.path.join(log_dir, LEDGER_NAME)
        self._last_step: Optional[int] = None
        self.on_fault = on_fault  # told when the ledger cannot be written (run directory deleted, disk full)

    def _read(self) -> tuple[list[tuple[int, int]], int]:
        """``(rows, last step)``: ``(_step, trainer step)`` of every row the wandb run still holds (rows after a
        rewind point dropped), and the largest trainer step logged to any backend (-1 when none)."""
        rows, last, _ = self._read_all()
        return rows, last

    def _read_all(self) -> tuple[list[tuple[int, int]], int, int]:
        """:meth:`_read` and the run's first step: the first ``step`` line, the step its first segment started at
        (-1 when none; later segments only add larger steps)."""
        rows: list[tuple[int, int]] = []
        last = first = -1
        try:
            with open(self.path) as f:
                lines = f.read().splitlines()
        except OSError:
            return rows, last, first
        for line in lines:
            parts = line.split("\t")
            if len(parts) != 2:
                continue  # a line cut short by a kill
            try:
                if parts[0] == "rewind":
                    cut = int(parts[1])
                    rows = [row for row in rows if row[0] <= cut]
                elif parts[0] == "step":
                    last = max(last, int(parts[1]))
                    first = int(parts[1]) if first < 0 else first
                else:
                    rows.append((int(parts[0]), int(parts[1])))
                    last = max(last, rows[-1][1])
            except ValueError:
                continue
        return rows, last, first

    def last_step(self) -> int:
        """The largest trainer step logged to this run so far (by any process); -1 when nothing was."""
        if self._last_step is None:
            self._last_step = self._read()[1]
        return self._last_step

    def rewind_point(self, first_step: Optional[int]) -> Optional[int]:
        """The ``_step`` a run starting at trainer step ``first_step`` continues after; ``None`` for a new run.

        A restart (something was logged past ``first_step``) drops the rows at steps ``>= first_step``; a
        continuation keeps every row. A job starting at step 0 never drops anything: a fresh trainer that tests or
        validates a checkpoint logs at step 0 too."""
        rows, last = self._read()
        if not rows:
            return None
        if first_step is not None and self.is_restart(first_step, last):
            later = [w for w, t in rows if t >= first_step]
            if later:
                return max(0, min(later) - 1)
        return max(w for w, _ in rows)

    def next_wandb_step(self) -> int:
        """The ``_step`` after every history row the wandb run holds (0 for a new run)."""
        rows, _ = self._read()
        return max((w for w, _ in rows), default=-1) + 1

    def is_restart(self, first_step: Optional[int], last: Optional[int] = None) -> bool:
        """Whether a job whose first value is at ``first_step`` restarts the run from an earlier checkpoint."""
        last = self.last_step() if last is None else last
        return first_step is not None and 0 < first_step < last

    def started_over(self, first_step: int) -> Optional[int]:
        """The largest step the run holds when a job whose first value is at ``first_step`` starts it over from
        scratch (a notebook cell run again on the same version), else ``None``.

        Such a job starts below that step, and at or before the step the run's first segment started at: a fresh
        trainer logs its first value where the first one did (step 0, or ``log_every_n_steps - 1``). A restart from
        a checkpoint starts after it (:meth:`is_restart`). A job that logs one step only (``test`` or ``validate``
        with a fresh trainer, at step 0) starts below it too: the caller tells a fit by its steps moving on."""
        _, last, first = self._read_all()
        return last if 0 <= first_step < last and first_step <= first else None

    def record(self, wandb_step: int, trainer_step: Optional[int]) -> None:
        self._append(f"{wandb_step}\t{-1 if trainer_step is None else int(trainer_step)}\n")
        if trainer_step is not None:
            self._last_step = max(self.last_step(), int(trainer_step))

    def record_step(self, trainer_step: int) -> None:
        """Note that ``trainer_step`` was logged (one line each time the largest step grows)."""
        if int(trainer_step) > self.last_step():
            self._last_step = int(trainer_step)
            self._append(f"step\t{int(trainer_step)}\n")

    def record_rewind(self, wandb_step: int) -> None:
        self._append(f"rewind\t{wandb_step}\n")

    def _append(self, line: str) -> None:
        try:  # never makes the directory: a run directory deleted during the run stays deleted
            with open(self.path, "a") as f:
                f.write(line)
        except OSError as err:
            if self.on_fault is not None:
                self.on_fault(err)  # MultiLogger says what each backend still keeps (_disk.what_is_kept)


class LiveRun:
    """A wandb run this process has open, with the ``_step`` its next history row will get."""

    def __init__(self, run: Any, ledger: StepLedger, next_step: int) -> None:
        self.run, self.ledger, self.next_step = run, ledger, next_step


#: run id -> the wandb run this process has open for it (an unpickled copy of a MultiLogger shares it)
live_runs: dict[str, LiveRun] = {}

_open_writers: "weakref.WeakSet[Any]" = weakref.WeakSet()


def flush_at_exit(writer: Any) -> None:
    """At a normal interpreter exit without ``finalize``, flush what ``writer.tb`` (a TensorBoardLogger) still
    holds in memory: its writer thread is a daemon and would drop it. wandb finishes its own runs at exit."""
    _open_writers.add(writer)


@atexit.register
def _flush_open_writers() -> None:
    for writer in list(_open_writers):
        experiment = experiment_if_made(writer.tb)
        if experiment is not None:
            try:
                experiment.flush()
            except Exception:  # noqa: BLE001 - nothing left to tell at exit
                pass
