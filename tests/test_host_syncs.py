"""The whole suite together in one real fit: no host sync from lightning_monitor code on non-logging steps.

All four callbacks and MultiLogger (TensorBoard + wandb offline) train TinyImageModel for two epochs with a
validation between them. A counting callback placed first splits the sync-forcing calls that ``HostSyncCounter``
attributes to lightning_monitor code into training-step intervals (batch start -> next batch start, or -> the
validation / the end of training), so every hook of every callback and every logger call of a batch lands in its
step. ``benchmarks/host_syncs.py`` prints the same counts for the peers.
"""

from __future__ import annotations

import os
from collections import Counter

import pytest
from helpers import TinyImageModel, image_loader, make_trainer, tb_accumulator

import lightning_monitor
from lightning_monitor import GradientMonitor, MemoryMonitor, MultiLogger, PredictionGridMonitor, SpeedMonitor
from lightning_monitor.testing import CALLBACK_FILES, HostSyncCounter, SyncsPerStep

#: the package's folder: sync sites are named by their path in it (``_grid/draw.py``)
PACKAGE_DIR = os.path.dirname(lightning_monitor.__file__)

EVERY = 4
BATCHES_PER_EPOCH = 8
MAX_STEPS = 12  # epoch 0: steps 0..7, validation, epoch 1: steps 8..11
@pytest.mark.timeout(120)
def test_whole_suite_makes_no_host_sync_on_non_logging_steps():
    counter = HostSyncCounter(owners=CALLBACK_FILES, default_owner="logging layer")
    steps = SyncsPerStep(counter)
    callbacks = [steps, GradientMonitor(), MemoryMonitor(), SpeedMonitor(),
                 PredictionGridMonitor(num_samples=8, every_n_steps=EVERY)]
    trainer = make_trainer(
        ".", logger=MultiLogger(save_dir="runs", name="suite"), callbacks=callbacks, max_steps=MAX_STEPS,
        log_every_n_steps=EVERY, limit_val_batches=1,
    )
    with counter:
        trainer.fit(TinyImageModel(), image_loader(n=16 * BATCHES_PER_EPOCH), image_loader(n=16))

    assert sorted(steps.per_step) == list(range(MAX_STEPS))
    logging_steps = [s for s in range(MAX_STEPS) if (s + 1) % EVERY == 0]
    assert logging_steps == [3, 7, 11]
    quiet = {s: calls for s, calls in steps.per_step.items() if s not in logging_steps}
    assert quiet == {s: [] for s in quiet}, "host syncs on non-logging steps"

    for step in logging_steps:
        calls = steps.per_step[step]
        per_callback = Counter(owner for *_, owner in calls)
        assert set(per_callback) <= set(CALLBACK_FILES), calls  # MultiLogger / the dispatch layer force none
        assert {"GradientMonitor", "PredictionGridMonitor"} <= set(per_callback), calls
        # one packed transfer per logging step for the gradients; SpeedMonitor's window holds host numbers only (no
        # items_fn tensor to add, one process: nothing to gather) and MemoryMonitor reads host-side allocator stats
        assert per_callback["GradientMonitor"] == 1, calls
        assert per_callback["SpeedMonitor"] == per_callback["MemoryMonitor"] == 0, calls
        grid = [(name, os.path.relpath(f, PACKAGE_DIR)) for name, f, _, owner in calls
                if owner == "PredictionGridMonitor"]
        if step != logging_steps[0]:  # the first grid also takes the fixed samples and prepares their pictures
            # the scores' one device->host copy, then reading the grid make_grid built on the host
            assert grid == [("numpy", "prediction_grid_monitor.py"), ("numpy", "_grid/draw.py")], calls

    # the run really logged at those steps, from every callback
    acc = tb_accumulator(trainer.logger.log_dir)
    scalars = acc.Tags()["scalars"]
    for prefix in ("grad/norm_total", "memory/", "time/step_sec"):
        tag = next(t for t in scalars if t.startswith(prefix))
        assert [e.step for e in acc.Scalars(tag)] == logging_steps, tag
    grid_steps = [e.step for e in acc.Images("predictions/grid")]
    # the logging steps; the validation ending epoch 0 (after step 7) shows the model step 7's grid just drew
    assert grid_steps == [3, 7, 11]
