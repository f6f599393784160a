"""MultiLogger against the real backends: what TensorBoard and wandb wrote, read back from their files."""

from __future__ import annotations

import contextlib
import glob
import io
import json
import os
import subprocess
import sys
import textwrap
import time
import urllib.request
import warnings

import numpy as np
import pytest
import torch
from helpers import (
    TinyImageModel,
    event_files,
    find_runs,
    free_port,
    image_loader,
    make_trainer,
    tb_accumulator,
    tb_scalars,
)
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger, WandbLogger
from PIL import Image
from wandb_reader import synced_series

from lightning_monitor import MultiLogger
from lightning_monitor._monitor import cadence as _cadence
from lightning_monitor._monitor import dispatch as _dispatch
from lightning_monitor._writers.media import make_histogram


def test_tensorboard_and_wandb_round_trip(tmp_path):
    logger = MultiLogger(save_dir=tmp_path / "runs", name="rt")
    image = torch.zeros(3, 20, 30)
    image[0, :10] = 1.0  # top half red
    raws = {}
    for step in (0, 5, 10):
        raws[step] = np.random.default_rng(step).normal(size=1000)
        logger.log_metrics({"a/loss": 1.0 / (step + 1), "a/count": step}, step=step)
        logger.log_histogram("h/raw", raws[step], step=step, bins=16)
        logger.log_histogram("h/counts", [1, 2, 3], edges=[0.0, 1.0, 2.0, 3.0], step=step)
        logger.log_image("img/one", image, step=step, caption=f"step {step}")
    logger.log_text("notes/text", "hello", step=10)
    logger.finalize("success")

    assert os.path.basename(logger.log_dir) == "version_0"
    acc = tb_accumulator(logger.log_dir)
    assert [(e.step, e.value) for e in acc.Scalars("a/loss")] == [
        (0, 1.0), (5, pytest.approx(1 / 6)), (10, pytest.approx(1 / 11))]
    hists = {e.step: e.histogram_value for e in acc.Histograms("h/raw")}
    assert sorted(hists) == [0, 5, 10]
    for step, raw in raws.items():
        counts, edges = np.histogram(raw, bins=16, range=(raw.min(), raw.max()))
        assert list(hists[step].bucket) == counts.tolist()
        assert hists[step].bucket_limit == pytest.approx(edges[1:].tolist())
        assert hists[step].num == 1000 and hists[step].sum == pytest.approx(raw.sum())
    assert [list(e.histogram_value.bucket) for e in acc.Histograms("h/counts")] == [[1, 2, 3]] * 3
    images = acc.Images("img/one")
    assert [e.step for e in images] == [0, 5, 10]
    png = np.asarray(Image.open(io.BytesIO(images[0].encoded_image_string)).convert("RGB"))
    assert png.shape == (20, 30, 3)
    assert tuple(png[0, 0]) == (255, 0, 0) and tuple(png[-1, -1]) == (0, 0, 0)

    (run,) = find_runs(logger.log_dir)
    assert run.run_id == logger.run_id and run.name == "rt/version_0" and run.exit_code == 0
    assert run.series("a/loss") == [(0, 1.0), (5, pytest.approx(1 / 6)), (10, pytest.approx(1 / 11))]
    wandb_hists = run.series("h/raw")
    assert [step for step, _ in wandb_hists] == [0, 5, 10]
    for (step, hist) in wandb_hists:  # the same counts in both dashboards
        assert hist["_type"] == "histogram"
        assert hist["values"] == list(hists[step].bucket)
    images_w = run.series("img/one")
    assert [(s, v["_type"], v["caption"], v["width"], v["height"]) for s, v in images_w] == [
        (s, "image-file", f"step {s}", 30, 20) for s in (0, 5, 10)
    ]
    stored = Image.open(os.path.join(os.path.dirname(run.path), "files", images_w[0][1]["path"])).convert("RGB")
    assert np.array_equal(np.asarray(stored), png)  # the same picture on both sides
    assert [s for s, _ in run.series("notes/text")] == [10]


def test_hyperparams_reach_both(tmp_path):
    logger = MultiLogger(save_dir=tmp_path, name="hp")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=2)
    trainer.fit(TinyImageModel(lr=0.125), image_loader())
    (run,) = find_runs(logger.log_dir)
    assert run.config["lr"] == 0.125
    acc = tb_accumulator(logger.log_dir)
    assert "_hparams_/session_start_info" in acc.summary_metadata


def test_hparams_tab_compares_runs_on_validation_and_test_metrics(tmp_path):
    """HParams read back from the event file: no private keys (LightningCLI's `_instantiator`), and the run's
    validation and test metrics as the metric columns, written when the run ends."""
    from tensorboard.plugins.hparams import plugin_data_pb2

    logger = MultiLogger(save_dir=tmp_path, name="hpm")
    logger.log_hyperparams({"lr": 0.1, "_instantiator": "lightning.pytorch.cli.instantiate_module",
                            "model": {"width": 8, "_class_path": "x.Y"}})
    for step, loss in enumerate((0.5, 0.25)):
        logger.log_metrics({"train/loss": loss, "val/loss": loss / 2, "val_acc": 0.5 + step / 4}, step=step)
    logger.log_metrics({"test/loss": 0.2}, step=2)
    logger.finalize("success")
    acc = tb_accumulator(logger.log_dir)

    def plugin_data(tag):
        content = acc.summary_metadata[tag].plugin_data.content
        return plugin_data_pb2.HParamsPluginData.FromString(content)

    session = plugin_data("_hparams_/session_start_info").session_start_info
    assert set(session.hparams) == {"lr", "model/width"}
    experiment = plugin_data("_hparams_/experiment").experiment
    assert {m.name.tag for m in experiment.metric_infos} == {"val/loss", "val_acc", "test/loss"}
    assert {h.name for h in experiment.hparam_infos} == {"lr", "model/width"}
    assert [e.value for e in acc.Scalars("val_acc")] == [0.5, 0.75]  # the column's values: the scalar series
    (run,) = find_runs(logger.log_dir)
    assert run.config["lr"] == 0.1 and "_instantiator" not in run.config and run.config["model"] == {"width": 8}


def test_dispatch_same_steps_through_trainer(tmp_path):
    """A callback logging through the dispatch layer lands at trainer.global_step on both sides."""

    class Probe(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx):
            step = trainer.global_step
            if _cadence.is_logging_step(step, 2):
                _dispatch.log_scalars(trainer, {"probe/step": float(step)}, step)
                hist = make_histogram(torch.arange(10.0), bins=5, key="probe/hist")
                _dispatch.log_histograms(trainer, {"probe/hist": hist}, step)

    logger = MultiLogger(save_dir=tmp_path, name="steps")
    trainer = make_trainer(tmp_path, logger=logger, max_steps=6, callbacks=[Probe()])
    trainer.fit(TinyImageModel(), image_loader())
    assert tb_scalars(logger.log_dir, "probe/step") == [(1, 1.0), (3, 3.0), (5, 5.0)]
    # Lightning's own self.log("train/loss") lands on the same steps
    assert [s for s, _ in tb_scalars(logger.log_dir, "train/loss")] == [1, 3, 5]
    (run,) = find_runs(logger.log_dir)
    assert run.series("probe/step") == [(1, 1.0), (3, 3.0), (5, 5.0)]
    assert [s for s, _ in run.series("probe/hist")] == [1, 3, 5]


def test_dispatch_to_plain_list_and_csv(tmp_path):
    tb = TensorBoardLogger(tmp_path, name="tb")
    wb = WandbLogger(save_dir=str(tmp_path), mode="offline", project="p")
    csv = CSVLogger(tmp_path, name="csv")
    trainer = make_trainer(tmp_path, logger=[tb, wb, csv], max_steps=1)
    trainer.fit(TinyImageModel(), image_loader())
    with pytest.warns(UserWarning, match="CSVLogger cannot show histograms") as record:
        for step in (3, 4):
            _dispatch.log_scalars(trainer, {"x/value": float(step)}, step)
            _dispatch.log_histograms(trainer, {"x/hist": make_histogram(torch.arange(8.0), bins=4, key="x/hist")}, step)
            _dispatch.log_image(trainer, "x/img", torch.zeros(8, 8), step)
    assert sum("CSVLogger" in str(w.message) for w in record) == 1  # one warning, not one per call or per kind
    tb.experiment.flush()
    wb.experiment.finish()
    csv.save()
    assert tb_scalars(tb.log_dir, "x/value") == [(3, 3.0), (4, 4.0)]
    hists = tb_accumulator(tb.log_dir).Histograms("x/hist")
    assert [list(e.histogram_value.bucket) for e in hists] == [[2, 2, 2, 2]] * 2
    (run,) = find_runs(str(tmp_path / "wandb"))
    assert run.series("x/value") == [(3, 3.0), (4, 4.0)]
    assert [h["values"] for _, h in run.series("x/hist")] == [[2, 2, 2, 2]] * 2
    rows = open(os.path.join(csv.log_dir, "metrics.csv")).read()
    assert "x/value" in rows and "x/hist" not in rows


def test_live_without_flush(tmp_path):
    """With the defaults a scalar is readable from the event file within 5 s, without any flush call."""
    logger = MultiLogger(save_dir=tmp_path, name="live", wandb=False)
    logger.log_metrics({"live/x": 3.0}, step=7)
    deadline = time.monotonic() + 5.0
    found = []
    while time.monotonic() < deadline and not found:
        time.sleep(0.2)
        acc = tb_accumulator(logger.log_dir)
        found = acc.Scalars("live/x") if "live/x" in acc.Tags()["scalars"] else []
    assert [(e.step, e.value) for e in found] == [(7, 3.0)]


@pytest.mark.timeout(120)
def test_real_tensorboard_server_lists_our_data(tmp_path):
    logger = MultiLogger(save_dir=tmp_path / "runs", name="srv", wandb=False)
    for step in range(3):
        logger.log_metrics({"srv/loss": 1.0 - step / 10}, step=step)
        logger.log_histogram("srv/hist", np.arange(100.0), step=step)
        logger.log_image("srv/img", np.full((8, 8), 128, dtype=np.uint8), step=step)
    logger.finalize("success")
    port = free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "runs"), "--host", "127.0.0.1",
         "--port", str(port), "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )
    try:
        def get(path):
            with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as response:
                return json.loads(response.read())

        deadline = time.monotonic() + 60
        tags = {}
        while time.monotonic() < deadline:
            try:
                tags = {p: get(f"/data/plugin/{p}/tags") for p in ("scalars", "histograms", "images")}
                if all(tags.values()):
                    break
            except OSError:
                pass
            time.sleep(0.5)
        run = "srv/version_0"
        assert "srv/loss" in tags["scalars"][run]
        assert "srv/hist" in tags["histograms"][run]
        assert "srv/img" in tags["images"][run]
        points = get(f"/data/plugin/scalars/scalars?run={run}&tag=srv/loss")
        assert [p[1] for p in points] == [0, 1, 2]
    finally:
        proc.terminate()
        proc.wait(timeout=10)


@contextlib.contextmanager
def _started_over_warnings():
    """The messages of the warnings that a fit started a run over (MultiLogger's re-run warning) within the block."""
    told = []
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        yield told
    told.extend(str(w.message) for w in record if "starts again at step" in str(w.message))


@pytest.mark.parametrize("every", [1, 4], ids=["log-every-step", "log-every-4"])
def test_a_fit_started_over_on_the_same_version_warns_once(tmp_path, every):
    """A notebook cell run twice with ``MultiLogger(version=0)``: the second fit starts again where the first one
    started (step 0; step 3 logging every 4 steps, as Lightning's default 50 starts at 49). Said once per fit that
    starts over, with what TensorBoard shows and the way to keep the fits apart; a fit on the same logger object
    again too. From step 3 the restart's purge marker hides the first fit's points; from step 0 there is none (a
    fresh trainer's ``test`` logs there too) and TensorBoard shows both fits' points at the same steps."""
    first = every - 1

    def fit(logger):
        make_trainer(tmp_path, logger=logger, max_steps=8, log_every_n_steps=every).fit(
            TinyImageModel(), image_loader(n=128))

    logger = MultiLogger(save_dir=tmp_path, name="nb", version=0)
    with _started_over_warnings() as told:
        fit(logger)
    assert told == []  # a new run
    fit_steps = list(range(first, 8, every))
    assert [s for s, _ in tb_scalars(logger.log_dir, "train/loss")] == fit_steps
    again = MultiLogger(save_dir=tmp_path, name="nb", version=0)
    with _started_over_warnings() as told:
        fit(again)
    shown = ("TensorBoard will hide the earlier fit's points from step 3 on (wandb keeps both)" if first else
             "TensorBoard will show both fits' points at the same steps, on one line that runs back to step 0"
             " (wandb too)")
    assert told == [
        f"This fit starts again at step {first} in {again.log_dir}, which already holds steps up to 7 from an"
        f" earlier fit: {shown}. To keep the fits apart, log each to its own version: `MultiLogger(version=None)`"
        " takes the next free one, or pass another `version=`."
    ]
    # what TensorBoard shows
    assert [s for s, _ in tb_scalars(again.log_dir, "train/loss")] == (fit_steps if first else fit_steps * 2)
    with _started_over_warnings() as told:
        fit(again)  # the cell that only calls fit, run a third time: the same logger object
    assert len(told) == 1 and told[0].startswith(f"This fit starts again at step {first} in")


def _fit_then_restart_from_step_4(tmp_path, **logger_options):
    """Fit to step 8 with a checkpoint at step 4, then restart from step 4 with the same version, to step 12."""
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt", every_n_train_steps=4, save_top_k=-1)
    logger = MultiLogger(save_dir=tmp_path / "runs", name="res", **logger_options)
    make_trainer(tmp_path, logger=logger, max_steps=8, log_every_n_steps=1, callbacks=[ckpt],
                 enable_checkpointing=True).fit(TinyImageModel(), image_loader(n=128))
    first = tb_scalars(logger.log_dir, "train/loss")
    assert [s for s, _ in first] == list(range(8))

    again = MultiLogger(save_dir=tmp_path / "runs", name="res", version=logger.version, **logger_options)
    with _started_over_warnings() as told:
        make_trainer(tmp_path, logger=again, max_steps=12, log_every_n_steps=1).fit(
            TinyImageModel(), image_loader(n=128), ckpt_path=str(tmp_path / "ckpt" / "epoch=0-step=4.ckpt")
        )
    assert told == []  # a restart from a checkpoint is no fit started over
    assert again.log_dir == logger.log_dir
    assert os.listdir(tmp_path / "runs" / "res") == ["version_0"]
    resumed = tb_scalars(logger.log_dir, "train/loss")
    assert [s for s, _ in resumed] == list(range(12))  # one continuous, strictly increasing series in TensorBoard
    assert resumed[:4] == first[:4]  # before the checkpoint: the first run's points
    runs = find_runs(logger.log_dir)
    assert len(runs) == 2 and {r.run_id for r in runs} == {logger.run_id}  # one wandb run, resumed
    assert [s for s, _ in runs[1].series("train/loss")] == list(range(4, 12))
    return logger, first, resumed, runs


def test_restart_appends_a_segment_that_continues_wandb_steps(tmp_path):
    """By default (generally available wandb only) a restart writes no rewind: the new segment's rows continue
    wandb's own `_step` after every row of the first, so syncing the segments in order appends and drops nothing;
    the points redone after the checkpoint (steps 4..7) appear twice on the trainer/global_step axis."""
    logger, first, resumed, runs = _fit_then_restart_from_step_4(tmp_path)
    assert all(run.rewound_to is None for run in runs)
    steps = [row["_step"] for run in runs for row in run.history]
    assert steps == list(range(len(steps)))  # strictly increasing across both segments, no gap
    synced = synced_series(runs, "train/loss")
    assert [s for s, _ in synced] == [*range(8), *range(4, 12)]  # every point of both jobs
    assert synced[:8] == [(s, pytest.approx(v)) for s, v in first]
    assert synced[8:] == [(s, pytest.approx(v)) for s, v in resumed[4:]]


def test_restart_with_wandb_rewind_opt_in(tmp_path):
    """`wandb_rewind=True` (wandb's rewind, a preview feature) cuts the run back to just before step 4: the dead
    job's rows at steps 4..7 are replaced when synced, and the resumed rows continue `_step` from there."""
    logger, _, resumed, runs = _fit_then_restart_from_step_4(tmp_path, wandb_rewind=True)
    last_kept = max(row["_step"] for row in runs[0].history if row.get("trainer/global_step", 99) < 4)
    assert runs[1].rewound_to == (logger.run_id, last_kept)
    assert [row["_step"] for row in runs[1].history] == list(range(last_kept + 1, last_kept + 1 + len(runs[1].history)))
    synced = synced_series(runs, "train/loss")
    assert [s for s, _ in synced] == list(range(12))
    assert synced == [(s, pytest.approx(v)) for s, v in resumed]  # the same points as TensorBoard shows


DDP_SCRIPT = textwrap.dedent(
    """
    import os, sys
    sys.path.insert(0, {tests!r})
    from helpers import TinyImageModel, image_loader, make_trainer
    from lightning_monitor import MultiLogger

    if __name__ == "__main__":
        logger = MultiLogger(save_dir={runs!r}, name="ddp")
        trainer = make_trainer({root!r}, logger=logger, strategy="ddp", devices=2, max_steps=6)
        trainer.fit(TinyImageModel(), image_loader(n=128))
        os.write(1, ("RANK %d DONE\\n" % trainer.global_rank).encode())  # one write: the ranks share stdout
    """
)


@pytest.mark.timeout(180)
def test_ddp_one_run_written_by_rank_zero(tmp_path):
    script = tmp_path / "ddp_run.py"
    runs = tmp_path / "runs"
    script.write_text(DDP_SCRIPT.format(tests=os.path.dirname(__file__), runs=str(runs), root=str(tmp_path)))
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_API", "LOCAL_RANK", "NODE_RANK"))}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=170)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "RANK 0 DONE" in proc.stdout and "RANK 1 DONE" in proc.stdout
    assert os.listdir(runs / "ddp") == ["version_0"]
    assert len(event_files(runs)) == 1  # one writer
    (run,) = find_runs(str(tmp_path))  # one wandb run in the whole job
    assert [s for s, _ in run.series("train/loss")] == [1, 3, 5]
    assert [s for s, _ in tb_scalars(runs / "ddp" / "version_0", "train/loss")] == [1, 3, 5]


def test_bad_input_fails_early(tmp_path):
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    with pytest.raises(NotADirectoryError, match="a-file"):
        MultiLogger(save_dir=blocker / "runs")
    with pytest.raises(ValueError, match=r"Unknown tensorboard option\(s\) \['flush_sec'\]"):
        MultiLogger(save_dir=tmp_path, tensorboard={"flush_sec": 1})
    with pytest.raises(ValueError, match=r"Unknown wandb option\(s\) \['projet'\]"):
        MultiLogger(save_dir=tmp_path, wandb={"projet": "x"})
    with pytest.raises(ValueError, match="`wandb` must be True, False or a dict"):
        MultiLogger(save_dir=tmp_path, wandb="yes")
    with pytest.raises(ValueError, match="logs nowhere"):
        MultiLogger(save_dir=tmp_path, tensorboard=False, wandb=False)
    logger = MultiLogger(save_dir=tmp_path, wandb=False)
    with pytest.raises(ValueError, match="'bad/metric' must be a scalar"):
        logger.log_metrics({"bad/metric": torch.ones(3)}, step=0)
    assert not (tmp_path / "lightning_monitor").exists()  # nothing created by a failed or idle logger


def test_offline_is_announced_once_with_sync_command(tmp_path, caplog):
    logger = MultiLogger(save_dir=tmp_path, name="off")
    with caplog.at_level("INFO"):
        for step in range(3):
            logger.log_metrics({"x": 1.0}, step=step)
    # our line only: once wandb has started in this process, its own records ("Logging user logs to
    # .../offline-run-...") reach caplog too
    messages = [r.getMessage() for r in caplog.records if r.getMessage().startswith("wandb is logging offline (")]
    assert len(messages) == 1
    assert "no W&B API key" in messages[0] and "wandb sync " in messages[0]
    pattern = messages[0].split("wandb sync ")[1].strip()  # every segment of the run, not just the first
    logger.finalize("success")
    logger.log_metrics({"x": 2.0}, step=3)  # a second segment (as `test` after `fit` makes)
    logger.finalize("success")
    segments = sorted(glob.glob(pattern))
    assert len(segments) == 2 and all(os.path.basename(s).startswith("offline-run-") for s in segments)
    assert {os.path.dirname(s) for s in segments} == {os.path.join(logger.log_dir, "wandb")}


def test_fit_then_test_keeps_every_row_in_both(tmp_path):
    """`test` after `fit` in the same process continues the run: nothing the fit logged is cut (no rewind, no
    purge), so the synced wandb series and TensorBoard hold every validation point."""
    logger = MultiLogger(save_dir=tmp_path, name="ft")
    trainer = make_trainer(tmp_path, logger=logger, max_epochs=2, max_steps=-1, log_every_n_steps=1)
    model = TinyImageModel()
    with _started_over_warnings() as told:
        trainer.fit(model, image_loader(n=32), image_loader(n=16, seed=1))
        trainer.test(model, image_loader(n=16, seed=2))
    assert told == []  # the test segment logs at the fit's last step: nothing is hidden
    tb_val = tb_scalars(logger.log_dir, "val/loss")
    assert [s for s, _ in tb_val] == [1, 3]
    runs = find_runs(logger.log_dir)
    assert len(runs) == 2 and all(run.rewound_to is None for run in runs)
    steps = [row["_step"] for run in runs for row in run.history]
    assert steps == list(range(len(steps)))  # the test segment continues wandb's _step
    assert synced_series(runs, "val/loss") == [(s, pytest.approx(v)) for s, v in tb_val]
    assert [s for s, _ in synced_series(runs, "train/loss")] == [0, 1, 2, 3]


def test_a_later_job_testing_the_same_version_drops_nothing(tmp_path):
    """A separate `trainer.test(ckpt_path=...)` job on the same version (a new logger and trainer, as a new process
    would make; Lightning logs its test metrics at step 0) drops none of the fit's points in either backend."""
    logger = MultiLogger(save_dir=tmp_path, name="later")
    ckpt = ModelCheckpoint(dirpath=tmp_path / "ckpt")
    make_trainer(tmp_path, logger=logger, max_epochs=2, max_steps=-1, log_every_n_steps=1, callbacks=[ckpt],
                 enable_checkpointing=True).fit(TinyImageModel(), image_loader(n=32), image_loader(n=16, seed=1))
    fit_val, fit_train = tb_scalars(logger.log_dir, "val/loss"), tb_scalars(logger.log_dir, "train/loss")
    again = MultiLogger(save_dir=tmp_path, name="later", version=logger.version)
    with _started_over_warnings() as told:
        make_trainer(tmp_path, logger=again).test(TinyImageModel(), image_loader(n=16, seed=2),
                                                  ckpt_path=ckpt.best_model_path)
    assert told == []  # a test at step 0 is no fit started over
    assert [s for s, _ in fit_val] == [1, 3] and tb_scalars(logger.log_dir, "val/loss") == fit_val
    assert tb_scalars(logger.log_dir, "train/loss") == fit_train
    runs = find_runs(logger.log_dir)
    assert all(run.rewound_to is None for run in runs)
    steps = [row["_step"] for run in runs for row in run.history]
    assert steps == list(range(len(steps)))
    assert synced_series(runs, "val/loss") == [(s, pytest.approx(v)) for s, v in fit_val]
    assert [s for s, _ in synced_series(runs, "train/loss")] == [0, 1, 2, 3]
    assert [s for s, _ in synced_series(runs, "test/loss")] == [0]
