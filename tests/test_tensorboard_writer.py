"""What lightning-monitor writes into TensorBoard's event file, read back record by record: one event per logging
step and kind (not one per key), the logger's prefix, and checksums TensorBoard's own code agrees with."""

from __future__ import annotations

import struct

import pytest
from helpers import TinyImageModel, event_files, image_loader, make_trainer, tb_all_scalars
from lightning.pytorch.loggers import TensorBoardLogger
from tensorboard.compat.proto.event_pb2 import Event
from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c
from torch.nn import functional as F

from lightning_monitor import GradientMonitor, MemoryMonitor, MultiLogger
from lightning_monitor._writers.tb_crc import use_fast_crc


def read_records(path: str) -> list[Event]:
    """Every record of a TFRecord event file, each checksum recomputed with TensorBoard's pure-Python CRC32C."""
    events = []
    with open(path, "rb") as f:
        data = f.read()
    pos = 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        (header_crc,) = struct.unpack("<I", data[pos + 8 : pos + 12])
        body = data[pos + 12 : pos + 12 + length]
        (body_crc,) = struct.unpack("<I", data[pos + 12 + length : pos + 16 + length])
        assert header_crc == masked_crc32c(header) and body_crc == masked_crc32c(body)
        events.append(Event.FromString(body))
        pos += 16 + length
    return events


def _tags(event: Event) -> list[str]:
    return [v.tag for v in event.summary.value]


@pytest.mark.parametrize("prefix", ["", "pre"])
def test_one_event_per_logging_step_with_checksums_tensorboard_accepts(tmp_path, prefix):
    assert use_fast_crc()  # google-crc32c's C extension is a dependency: the writer below uses it
    logger = TensorBoardLogger(tmp_path / "runs", prefix=prefix)
    trainer = make_trainer(tmp_path, logger=logger, max_steps=6, log_every_n_steps=3,
                           callbacks=[GradientMonitor(group_depth=1, per_param_norms=True)])
    trainer.fit(TinyImageModel(), image_loader(96))
    (path,) = event_files(logger.log_dir)
    events = read_records(path)  # every record's checksum equals TensorBoard's own CRC of it
    lead = f"{prefix}-" if prefix else ""
    ours = [e for e in events if any(t.startswith(f"{lead}grad/") for t in _tags(e))]
    by_step: dict[int, list[list[str]]] = {}
    for event in ours:
        by_step.setdefault(event.step, []).append(_tags(event))
    assert sorted(by_step) == [2, 5]  # self.log's logging steps (log_every_n_steps=3)
    for step, groups in by_step.items():
        # one event of scalars and one of histograms (the scalars go out with the other monitors', at the batch end)
        assert len(groups) == 2, step
        hists, scalars = sorted(groups, key=lambda tags: not tags[0].startswith(f"{lead}grad/hist/"))
        assert sorted(scalars) == sorted(
            [f"{lead}grad/norm_total"]  # (no NaN/Inf in this run: no grad/nonfinite_* chart of zeros)
            + [f"{lead}grad/norm/{g}" for g in ("conv", "head")]
            + [f"{lead}grad/norm_param/{n}" for n in ("conv.weight", "conv.bias", "head.weight", "head.bias")]
        ), step
        assert sorted(hists) == sorted(f"{lead}grad/hist/{n}" for n in ("conv.weight", "conv.bias", "head.weight",
                                                                         "head.bias"))
    # ... and TensorBoard reads each value of an event as its own point
    series = tb_all_scalars(logger.log_dir)
    assert [s for s, _ in series[f"{lead}grad/norm_param/head.bias"]] == [2, 5]


def test_multilogger_self_log_is_one_event_per_call(tmp_path):
    logger = MultiLogger(save_dir=tmp_path, wandb=False)
    for step in range(3):
        logger.log_metrics({"a/x": float(step), "a/y": 2.0 * step, "a/z": -1.0}, step=step)
    logger.finalize("success")
    (path,) = event_files(logger.log_dir)
    rows = [(e.step, sorted(_tags(e))) for e in read_records(path) if any(t.startswith("a/") for t in _tags(e))]
    assert rows == [(s, ["a/x", "a/y", "a/z"]) for s in range(3)]
    assert tb_all_scalars(logger.log_dir)["a/y"] == [(0, 0.0), (1, 2.0), (2, 4.0)]


class _OwnLogMetrics(TensorBoardLogger):
    """A user's TensorBoardLogger with its own ``log_metrics``: it must still see every monitor scalar."""

    seen: list[str]

    def log_metrics(self, metrics, step=None):
        self.seen = [*getattr(self, "seen", []), *metrics]
        super().log_metrics({f"own/{k}": v for k, v in metrics.items()}, step)


def test_a_subclass_log_metrics_keeps_its_say(tmp_path):
    logger = _OwnLogMetrics(tmp_path / "runs")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=4, log_every_n_steps=2, callbacks=[GradientMonitor()])
    trainer.fit(TinyImageModel(), image_loader(64))
    assert "grad/norm_total" in logger.seen
    series = tb_all_scalars(logger.log_dir)
    assert [s for s, _ in series["own/grad/norm_total"]] == [1, 3] and "grad/norm_total" not in series


def test_a_value_that_is_not_a_number_costs_that_value_only(tmp_path):
    from lightning_monitor._monitor.dispatch import log_scalars

    logger = TensorBoardLogger(tmp_path / "runs")
    trainer = make_trainer(tmp_path, logger=logger)
    with pytest.warns(UserWarning, match=r"TensorBoard rejected .* at step 3 \(ValueError: not a number: a/text\)"):
        log_scalars(trainer, {"a/x": 1.5, "a/text": "high", "a/y": 2.0}, 3)
    log_scalars(trainer, {"a/x": 2.5}, 4)  # the backend keeps logging
    logger.experiment.flush()
    series = tb_all_scalars(logger.log_dir)
    assert series["a/x"] == [(3, 1.5), (4, 2.5)] and series["a/y"] == [(3, 2.0)] and "a/text" not in series


def test_repeated_keys_reuse_one_event_and_write_each_steps_values(tmp_path):
    """The same keys again fill the last event's values in place: every write still lands as its own step with its
    own values; other keys, another order or a value that is not a number take the full path."""
    from lightning_monitor._monitor.dispatch import log_scalars

    logger = TensorBoardLogger(tmp_path / "runs")
    trainer = make_trainer(tmp_path, logger=logger)
    log_scalars(trainer, {"a/x": 1.5, "a/y": 2.0}, 1)
    log_scalars(trainer, {"a/x": 2.5, "a/y": 3.0}, 2)  # reused
    log_scalars(trainer, {"a/y": 4.0, "a/x": 3.5}, 3)  # another order: built anew
    log_scalars(trainer, {"a/y": 5.0, "a/x": 4.5}, 4)  # reused
    with pytest.warns(UserWarning, match=r"TensorBoard rejected .* at step 5 \(ValueError: not a number: a/x\)"):
        log_scalars(trainer, {"a/y": 6.0, "a/x": "high"}, 5)  # the same keys, a value that is not a number
    log_scalars(trainer, {"a/y": 7.0, "a/x": 6.5}, 6)
    log_scalars(trainer, {"a/x": 7.5}, 7)  # fewer keys
    logger.experiment.flush()
    series = tb_all_scalars(logger.log_dir)
    assert series["a/x"] == [(1, 1.5), (2, 2.5), (3, 3.5), (4, 4.5), (6, 6.5), (7, 7.5)]
    assert series["a/y"] == [(1, 2.0), (2, 3.0), (3, 4.0), (4, 5.0), (5, 6.0), (6, 7.0)]


class _Silent(TinyImageModel):
    """Logs nothing: Lightning calls no logger at its logging steps."""

    def training_step(self, batch, batch_idx):
        x, y = batch
        return F.nll_loss(self(x), y)


class _RaisesAt(TinyImageModel):
    def __init__(self, at: int) -> None:
        super().__init__()
        self.at = at

    def training_step(self, batch, batch_idx):
        if self.global_step == self.at:
            raise RuntimeError(f"boom at step {self.at}")
        return super().training_step(batch, batch_idx)


def _scalar_events(path: str) -> list[tuple[int, list[str]]]:
    return [(e.step, sorted(_tags(e))) for e in read_records(path) if e.summary.value
            and e.summary.value[0].WhichOneof("value") == "simple_value"]


@pytest.mark.parametrize("kind", ["plain", "multi"])
def test_the_monitors_scalars_follow_lightnings_own_event_of_the_step(tmp_path, kind):
    """At a logging step the monitors' scalars are put on TensorBoard's queue right after the model's ``self.log``
    event of that step (whose put woke the writer thread: ours then wakes nothing), for a plain TensorBoardLogger and
    for MultiLogger; every logging step has both, the model's first."""
    logger = (TensorBoardLogger(tmp_path / "runs") if kind == "plain"
              else MultiLogger(save_dir=tmp_path / "runs", name="order", wandb=False))
    trainer = make_trainer(tmp_path, logger=logger, max_steps=6, log_every_n_steps=2,
                           callbacks=[GradientMonitor(histograms=False), MemoryMonitor()])
    trainer.fit(TinyImageModel(), image_loader(96))
    (path,) = event_files(logger.log_dir)
    # (a plain TensorBoardLogger writes each self.log key as its own event, MultiLogger all of them as one)
    rows = [(step, "model" if "train/loss" in tags else "monitors")
            for step, tags in _scalar_events(path) if "train/loss" in tags or "grad/norm_total" in tags]
    assert rows == [(s, who) for s in (1, 3, 5) for who in ("model", "monitors")]


def test_the_monitors_scalars_are_written_when_the_model_logs_nothing(tmp_path):
    """No ``self.log``: Lightning writes nothing at its logging steps, and the monitors' scalars of each one are
    written at the next hook of a monitor (the last step's at the end of the fit)."""
    logger = TensorBoardLogger(tmp_path / "runs")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=6, log_every_n_steps=2,
                           callbacks=[GradientMonitor(histograms=False), MemoryMonitor()])
    trainer.fit(_Silent(), image_loader(96))
    series = tb_all_scalars(logger.log_dir)
    assert "train/loss" not in series
    for key in ("grad/norm_total", "memory/host/rss_gib"):
        assert [s for s, _ in series[key]] == [1, 3, 5], key


def test_the_last_logging_steps_scalars_are_written_before_a_failed_fit_finalizes(tmp_path):
    """The batch after a logging step raises: the scalars of that logging step are in the file (written when the
    monitors hear of the exception, before Lightning finalizes the loggers), for a model that logs nothing too."""
    logger = TensorBoardLogger(tmp_path / "runs")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=10, log_every_n_steps=2,
                           callbacks=[GradientMonitor(histograms=False)])
    with pytest.raises(RuntimeError, match="boom at step 4"):
        trainer.fit(_RaisesAt(4), image_loader(96))
    assert [s for s, _ in tb_all_scalars(logger.log_dir)["grad/norm_total"]] == [1, 3]


@pytest.mark.parametrize("kind", ["plain", "multi"])
def test_steps_stay_in_order_when_a_callback_logs_first_at_the_next_batch(tmp_path, kind):
    """The model logs nothing; LearningRateMonitor (before the monitors in the list) logs the next step's learning
    rate at the next batch's start, before any monitor's hook: the monitors' scalars of the step before go first."""
    from lightning.pytorch.callbacks import LearningRateMonitor

    logger = (TensorBoardLogger(tmp_path / "runs") if kind == "plain"
              else MultiLogger(save_dir=tmp_path / "runs", name="order", wandb=False))
    trainer = make_trainer(tmp_path, logger=logger, max_steps=5, log_every_n_steps=1,
                           callbacks=[LearningRateMonitor(logging_interval="step"), GradientMonitor(histograms=False)])
    trainer.fit(_Silent(), image_loader(96))
    (path,) = event_files(logger.log_dir)
    steps = [step for step, tags in _scalar_events(path) if "grad/norm_total" in tags or "lr-SGD" in tags]
    assert steps == sorted(steps) and steps.count(0) == 2 and steps.count(4) == 2, steps
