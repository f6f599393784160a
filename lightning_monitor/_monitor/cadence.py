"""When a monitor logs, and at which step: Lightning's own ``self.log`` rule, shared by every monitor."""

from __future__ import annotations

from typing import Optional

import lightning.pytorch as pl

from lightning_monitor._core.compat import completed_batches, optimizer_steps


def is_logging_step(step: int, every_n_steps: int) -> bool:
    """Whether the optimizer step that starts at ``trainer.global_step == step`` is a logging step.

    The same rule as Lightning's own ``self.log`` (``(step + 1) % n == 0``), so our values land at the same steps
    as the user's loss curve: 49, 99, ... for ``n = 50``.
    """
    return (step + 1) % every_n_steps == 0


def batch_start(trainer: "pl.Trainer", module: "pl.LightningModule") -> tuple[int, bool, Optional[int]]:
    """At a training batch's start: ``(step, manual, candidate)``: the step Lightning's ``self.log`` gives the batch,
    whether ``module`` uses manual optimization, and the step again when it is a logging step of the trainer's
    ``log_every_n_steps`` (:func:`is_logging_step`), else ``None``.

    The step is ``trainer.global_step`` under automatic optimization (batches that accumulate gradients share it).
    Under manual optimization ``self.log`` counts training batches while ``trainer.global_step`` counts every
    ``optimizer.step()`` call (twice per batch in a GAN), so the step is the number of completed batches. One call,
    the rules written out: the monitors' first hook of every batch runs it (a Python call run cold after the
    training step costs about 1 us)."""
    manual = not module.automatic_optimization
    step = completed_batches(trainer) if manual else optimizer_steps(trainer)
    # Trainer(log_every_n_steps=...) is public but set by Lightning's logger connector, not declared on the class
    interval = max(1, int(trainer.log_every_n_steps))  # type: ignore[attr-defined]
    return step, manual, (step if (step + 1) % interval == 0 else None)


def validation_step(trainer: "pl.Trainer", last_batch_step: Optional[int]) -> int:
    """The step of values measured in a validation run: the step Lightning's own ``self.log`` gives them.

    Inside ``fit``, validation runs at the end of the training batch that triggered it, before Lightning counts
    that batch, so its values belong to that batch's step (``last_batch_step``: ``trainer.global_step`` read at the
    batch's start). A standalone ``validate``, or validation before the first training batch, uses
    ``trainer.global_step``.
    """
    from lightning.pytorch.trainer.states import TrainerFn

    if last_batch_step is not None and trainer.state.fn == TrainerFn.FITTING:
        return last_batch_step
    return trainer.global_step
