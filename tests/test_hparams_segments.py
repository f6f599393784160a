"""HParams across segments: after ``fit`` then ``test`` (one process, or ``test`` later on the same version) the
validation and test metrics and the summary's headline numbers are metric columns of the run, read back from the
event files as TensorBoard reads them, and from a real TensorBoard server's data API."""

from __future__ import annotations

import glob
import json
import os
import subprocess
import sys
import time
import urllib.request
from typing import Any

import pytest
from helpers import TinyImageModel, event_files, free_port, image_loader, make_trainer, tb_accumulator

from lightning_monitor import MultiLogger, RunSummary, SpeedMonitor
from lightning_monitor._run import hparams as _hparams
from lightning_monitor._summary.numbers import HEADLINE

HEADLINE_IN_THIS_RUN = {"summary/wall_sec", "summary/samples_per_sec_p50", "summary/overhead_share_mean"}


def _experiment(log_dir: str) -> Any:
    from tensorboard.plugins.hparams import plugin_data_pb2

    acc = tb_accumulator(log_dir)
    content = acc.summary_metadata["_hparams_/experiment"].plugin_data.content
    return acc, plugin_data_pb2.HParamsPluginData.FromString(content).experiment


def _fit_then_test(root: str, version: Any = None, test_only: bool = False) -> MultiLogger:
    logger = MultiLogger(save_dir=root, name="hp", version=version, wandb=False)
    callbacks = [] if test_only else [SpeedMonitor(every_n_steps=2), RunSummary(print_table=False)]
    trainer = make_trainer(".", logger=logger, callbacks=callbacks, max_steps=6, val_check_interval=3)
    model = TinyImageModel(lr=0.02)
    if not test_only:
        trainer.fit(model, image_loader(64), image_loader(32))
    trainer.test(model, image_loader(32))
    return logger


def test_fit_then_test_makes_the_test_metrics_columns_each_with_scalar_data():
    logger = _fit_then_test("runs")
    acc, experiment = _experiment(logger.log_dir)
    columns = [m.name.tag for m in experiment.metric_infos]
    assert {"val/loss", "test/loss"} | HEADLINE_IN_THIS_RUN <= set(columns), columns
    assert len(columns) == len(set(columns))
    assert {h.name for h in experiment.hparam_infos} == {"lr"}
    scalars = set(acc.Tags()["scalars"])
    for column in columns:  # the tab reads a column's values from the run's scalar events
        assert column in scalars and acc.Scalars(column), column
    # one experiment summary in the run directory, in its own file; each segment has its own event file
    assert os.path.isfile(os.path.join(logger.log_dir, _hparams.FILE_NAME))
    assert len(event_files(logger.log_dir)) == 2
    assert not glob.glob(os.path.join(logger.log_dir, "*.partial"))
    # the session's hyperparameter values (first segment's start) and its end
    assert acc.summary_metadata["_hparams_/session_start_info"].plugin_data.content
    assert acc.summary_metadata["_hparams_/session_end_info"].plugin_data.content


def test_test_in_a_later_segment_on_the_same_version_keeps_the_fit_columns():
    first = _fit_then_test("runs")
    _, before = _experiment(first.log_dir)
    # a later job: new logger and trainer on version 0 (the earlier one finalized and released the run directory)
    later = _fit_then_test("runs", version=first.version, test_only=True)
    assert later.log_dir == first.log_dir
    _, after = _experiment(later.log_dir)
    assert [m.name.tag for m in after.metric_infos] == [m.name.tag for m in before.metric_infos]
    assert len(event_files(later.log_dir)) == 3


def test_only_the_headline_summary_numbers_are_scalars():
    """The other numbers are in the text card, summary.json and wandb's run summary: no one-dot charts."""
    logger = _fit_then_test("runs")
    acc = tb_accumulator(logger.log_dir)
    summary_scalars = {t for t in acc.Tags()["scalars"] if t.startswith("summary/")}
    assert summary_scalars == HEADLINE_IN_THIS_RUN <= set(HEADLINE)
    with open(os.path.join(logger.log_dir, "summary.json"), encoding="utf-8") as f:
        written = json.load(f)
    assert {"summary/step_sec_p50", "summary/samples_per_sec_p10", "summary/steps"} <= set(written)
    assert "summary/table/text_summary" in acc.Tags()["tensors"]


def _get(url: str, body: Any = None) -> Any:
    data = None if body is None else json.dumps(body).encode()
    request = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"}
                                     if data else {}, method="POST" if data else "GET")
    request.add_header("X-TensorBoard-Feature-Flags", "{}")
    with urllib.request.urlopen(request, timeout=10) as answer:  # noqa: S310 - our local TensorBoard
        return json.loads(answer.read())


@pytest.mark.slow
@pytest.mark.timeout(120)
def test_a_real_tensorboard_server_shows_the_columns_with_their_values(tmp_path):
    logger = _fit_then_test(str(tmp_path / "runs"))
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "runs"), "--port", str(port),
         "--host", "127.0.0.1", "--load_fast", "false"],
        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 90
        experiment: dict[str, Any] = {}
        while time.monotonic() < deadline:
            try:
                experiment = _get(f"{base}/data/plugin/hparams/experiment", {"experimentName": ""})
                if experiment.get("metricInfos"):
                    break
            except OSError:
                pass
            time.sleep(1)
        columns = [m["name"]["tag"] for m in experiment.get("metricInfos", [])]
        assert {"val/loss", "test/loss"} | HEADLINE_IN_THIS_RUN <= set(columns), (experiment, server.poll())
        groups = _get(f"{base}/data/plugin/hparams/session_groups", {
            "experimentName": "", "allowedStatuses": ["STATUS_UNKNOWN", "STATUS_SUCCESS", "STATUS_FAILURE",
                                                      "STATUS_RUNNING"],
            "colParams": [{"metric": {"tag": c}} for c in columns] + [{"hparam": "lr"}],
            "startIndex": 0, "sliceSize": 10})
        (group,) = groups["sessionGroups"]
        values = {v["name"]["tag"]: v["value"] for v in group["metricValues"]}
        assert set(values) == set(columns)  # every column has a value in the run (from its scalar events)
        assert group["hparams"]["lr"] == pytest.approx(0.02)
        run = os.path.relpath(logger.log_dir, tmp_path / "runs")
        for column in columns:
            points = _get(f"{base}/data/plugin/scalars/scalars?run={run}&tag={column}")
            assert points, column
    finally:
        server.kill()
        server.communicate(timeout=30)
