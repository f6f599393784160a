"""A dashboard that reads at a glance: a run with every monitor, shaped like the smoke run (two epochs, a validation
run each, a logging step every 2), logs no chart of ours with a single point and none that is constant for the whole
run and says nothing new (zero NaN/Inf counts, a host-wide value that did not move)."""

from __future__ import annotations

import pytest
from helpers import TinyImageModel, image_loader, make_trainer, tb_all_scalars

from lightning_monitor import GradientMonitor, MemoryMonitor, MultiLogger, PredictionGridMonitor, SpeedMonitor
from lightning_monitor import memory_monitor as _memory_monitor
from lightning_monitor._writers.layout import AREAS


def test_no_chart_of_ours_with_one_point_or_nothing_new(tmp_path, monkeypatch):
    monkeypatch.setattr(_memory_monitor, "AVAILABLE_MOVED_SHARE", 1.0)  # the host's free memory never moves that far
    logger = MultiLogger(save_dir=tmp_path / "runs", name="glance", wandb=False)
    trainer = make_trainer(tmp_path, logger=logger, max_epochs=2, max_steps=-1, log_every_n_steps=2,
                           callbacks=[GradientMonitor(update_ratio=True), MemoryMonitor(), SpeedMonitor(),
                                      PredictionGridMonitor()])
    model = TinyImageModel()
    trainer.fit(model, image_loader(96), image_loader(32))
    trainer.test(model, image_loader(32))
    logged = tb_all_scalars(logger.log_dir)
    ours = {tag: points for tag, points in logged.items() if tag.startswith(AREAS) and not tag.startswith("summary/")}
    assert {"grad/norm_total", "memory/host/rss_gib", "throughput/samples_per_sec", "time/monitor_share",
            "time/monitor_share/prediction_grid", "predictions/accuracy", "throughput/val_samples_per_sec"} <= set(ours)
    single = sorted(tag for tag, points in ours.items() if len(points) < 2)
    assert not single, single
    # constant all run and nothing new: zero NaN/Inf counts, the host's available memory that did not move
    assert not [tag for tag in ours if "nonfinite" in tag or tag.startswith("memory/host/available_gib")]
    # the grid draws in validation, outside the training batches: its cost still shows, in the window holding it
    assert max(v for _, v in ours["time/monitor_share/prediction_grid"]) > 0


@pytest.mark.parametrize("moved", [False, True])
def test_the_host_wide_value_appears_once_it_moves(tmp_path, monkeypatch, moved):
    """The same rule with the real host memory: a threshold of 0 (any reading moved) logs it at every step."""
    monkeypatch.setattr(_memory_monitor, "AVAILABLE_MOVED_SHARE", 0.0 if moved else 1.0)
    logger = MultiLogger(save_dir=tmp_path / "runs", name="host", wandb=False)
    trainer = make_trainer(tmp_path, logger=logger, max_steps=6, callbacks=[MemoryMonitor()])
    trainer.fit(TinyImageModel(), image_loader(96))
    steps = [s for s, _ in tb_all_scalars(logger.log_dir).get("memory/host/available_gib", [])]
    assert steps == ([1, 3, 5] if moved else [])
