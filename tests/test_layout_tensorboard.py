"""The run's TensorBoard layout (Custom Scalars tab): what goes on one chart, kept up to date as keys appear, every
tag it names holding data, read back from the event files and from a real TensorBoard server's data API."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from typing import Any

import pytest
from helpers import TinyImageModel, event_files, free_port, image_loader, make_trainer, tb_accumulator
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_monitor import GradientMonitor, MemoryMonitor, MultiLogger, SpeedMonitor
from lightning_monitor._writers.layout import LAYOUT_TAG, charts


def _layouts(log_dir: str) -> list[tuple[int, Any]]:
    """Every layout record written under ``log_dir``: (step, Layout proto), in writing order."""
    from tensorboard.plugins.custom_scalar import layout_pb2

    out = []
    for event in tb_accumulator(log_dir).Tensors(LAYOUT_TAG):
        layout = layout_pb2.Layout()
        layout.ParseFromString(event.tensor_proto.string_val[0])
        out.append((event.step, layout))
    return out


def _tags(chart: Any) -> list[str]:
    """The tags a chart names: a margin chart's series, a multiline chart's exact patterns (``^tag$``) unescaped."""
    if chart.HasField("margin"):
        return [t for s in chart.margin.series for t in (s.value, s.lower, s.upper)]
    return [re.sub(r"\\(.)", r"\1", pattern[1:-1]) for pattern in chart.multiline.tag]


def _charts(layout: Any) -> dict[str, tuple[str, list[str]]]:
    return {c.title: (cat.title, _tags(c)) for cat in layout.category for c in cat.chart}


# ---------------------------------------------------------------------------------------------------- the rules


def test_what_goes_on_one_chart():
    tags = ["train/loss", "val/loss", "test/loss", "acc", "val_acc", "epoch", "grad/norm_total", "grad/norm/conv",
            "grad/norm/head", "throughput/samples_per_sec", "throughput/val_samples_per_sec", "time/data_wait_share",
            "memory/host/rss_gib", "memory/host/rss_gib_min", "memory/host/rss_gib_mean", "memory/host/rss_gib_max",
            "memory/host/rss_gib_max_rank", "memory/cuda/train_peak_allocated_gib",
            "memory/cuda/validation_peak_allocated_gib", "summary/steps", "param/update_ratio/conv"]
    got = {title: (category, kind, members) for category, title, kind, members in charts(tags)}
    assert got["loss"] == ("metrics", "lines", ("train/loss", "val/loss", "test/loss"))
    assert got["acc"] == ("metrics", "lines", ("acc", "val_acc"))
    assert got["gradient norm per group"] == ("gradients", "lines",
                                              ("grad/norm_total", "grad/norm/conv", "grad/norm/head"))
    assert got["samples per second (training, validation)"][2] == ("throughput/samples_per_sec",
                                                                   "throughput/val_samples_per_sec")
    speed = [title for category, title, _, _ in charts(tags) if category == "speed"]
    assert speed[:2] == ["samples per second (training, validation)", "data wait share"]  # side by side
    assert got["memory/host/rss_gib over ranks (mean, min-max band)"] == (
        "memory", "band", ("memory/host/rss_gib_mean", "memory/host/rss_gib_min", "memory/host/rss_gib_max"))
    assert got["CUDA peak allocated per phase (GiB)"][2] == ("memory/cuda/train_peak_allocated_gib",
                                                             "memory/cuda/validation_peak_allocated_gib")
    named = [t for _, _, _, members in charts(tags) for t in members]
    assert len(named) == len(set(named))  # each tag on one chart
    assert set(named) == set(tags) - {"epoch", "summary/steps"}  # Lightning's epoch, one-point summaries: none
    # a logger prefix is carried by every tag and read past
    prefixed = charts([f"pre-{t}" for t in ("train/loss", "val/loss")], lead="pre-")
    assert prefixed == [("metrics", "loss", "lines", ("pre-train/loss", "pre-val/loss"))]


# ------------------------------------------------------------------------------------------ written with a run


def _fit_then_test(tmp_path: Any, logger: Any) -> Any:
    trainer = make_trainer(tmp_path, logger=logger, max_steps=8, val_check_interval=4,
                           callbacks=[GradientMonitor(), MemoryMonitor(), SpeedMonitor(warmup_steps=0)])
    model = TinyImageModel()
    trainer.fit(model, image_loader(64), image_loader(32))
    trainer.test(model, image_loader(32))
    return trainer


@pytest.mark.parametrize("kind", ["multi", "plain"])
def test_layout_names_every_tag_written_and_only_those(tmp_path, kind):
    logger = (MultiLogger(save_dir=tmp_path / "runs", name="lay", wandb=False) if kind == "multi"
              else TensorBoardLogger(tmp_path / "runs", name="lay"))
    _fit_then_test(tmp_path, logger)
    acc = tb_accumulator(logger.log_dir)
    scalars = {tag for tag in acc.Tags()["scalars"] if acc.Scalars(tag)}
    layouts = _layouts(logger.log_dir)
    # rewritten only when a new tag appeared (the first logging step, the first validation, the test), never at a
    # step that brought none: 8 steps of 5 writers' scalars make a handful of layout records
    first = {min(e.step for e in acc.Scalars(tag)) for tag in scalars}
    assert {s for s, _ in layouts} == first and len(layouts) <= 3 * len(first), [s for s, _ in layouts]
    assert [s for s, _ in layouts] == sorted(s for s, _ in layouts)  # steps never go back: the last one wins
    last = _charts(layouts[-1][1])
    named = {t for _, members in last.values() for t in members}
    assert named <= scalars  # every tag it names has data
    assert scalars - named <= {"epoch", "hp_metric"} | {t for t in scalars if t.startswith("summary/")}  # Lightning's
    assert last["loss"] == ("metrics", ["train/loss", "val/loss", "test/loss"])  # fit, then test: one chart
    assert last["gradient norm per group"][1][0] == "grad/norm_total"


def test_a_later_process_on_the_run_keeps_the_charts_of_the_earlier_one(tmp_path):
    """``test`` in a new process (a new logger on the same version) writes the run's last layout record: it still
    names the fit's tags (kept in the run directory's layout-tags.txt), beside its own."""
    fit_logger = MultiLogger(save_dir=tmp_path / "runs", name="lay", version=0, wandb=False)
    trainer = make_trainer(tmp_path, logger=fit_logger, max_steps=4, callbacks=[GradientMonitor()])
    trainer.fit(TinyImageModel(), image_loader(64), image_loader(32))
    fit_tags = {t for _, members in _charts(_layouts(fit_logger.log_dir)[-1][1]).values() for t in members}
    later = MultiLogger(save_dir=tmp_path / "runs", name="lay", version=0, wandb=False)  # what a new job makes
    make_trainer(tmp_path, logger=later).test(TinyImageModel(), image_loader(32))
    last = _charts(_layouts(later.log_dir)[-1][1])
    named = {t for _, members in last.values() for t in members}
    assert "grad/norm_total" in fit_tags and fit_tags | {"test/loss"} <= named
    assert last["loss"] == ("metrics", ["train/loss", "val/loss", "test/loss"])


# ------------------------------------------------------------------------------------ a real TensorBoard server


def _get(port: int, path: str, **query: str) -> Any:
    url = f"http://127.0.0.1:{port}{path}" + (f"?{urllib.parse.urlencode(query)}" if query else "")
    with urllib.request.urlopen(url, timeout=10) as response:  # noqa: S310 - our own local server
        return json.loads(response.read())


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_a_tensorboard_server_serves_the_layout_and_every_tag_in_it_has_data(tmp_path):
    logger = MultiLogger(save_dir=tmp_path / "runs", name="lay", wandb=False)
    _fit_then_test(tmp_path, logger)
    assert event_files(logger.log_dir)
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "tensorboard.main", "--logdir", str(tmp_path / "runs"), "--port", str(port),
         "--host", "127.0.0.1", "--load_fast", "false", "--reload_interval", "1"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, "CUDA_VISIBLE_DEVICES": ""},
    )
    try:
        layout: dict[str, Any] = {}
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline and not layout.get("category"):
            time.sleep(0.5)
            try:
                layout = _get(port, "/data/plugin/custom_scalars/layout")
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                assert server.poll() is None, "tensorboard exited"
        assert layout.get("category"), "no layout served within 120 s"
        runs = _get(port, "/data/runs")
        assert runs == ["lay/version_0"]
        titles = {c["title"]: c for category in layout["category"] for c in category["chart"]}
        assert {"loss", "gradient norm per group", "samples per second (training, validation)",
                "data wait share"} <= set(titles)
        named = set()
        for chart in titles.values():
            if "margin" in chart:
                named |= {chart["margin"]["series"][0][k] for k in ("value", "lower", "upper")}
            else:
                named |= {re.sub(r"\\(.)", r"\1", p[1:-1]) for p in chart["multiline"]["tag"]}
        for tag in sorted(named):
            points = _get(port, "/data/plugin/scalars/scalars", tag=tag, run=runs[0])
            assert points, tag  # [[wall_time, step, value], ...]
        loss = [p[1] for p in _get(port, "/data/plugin/scalars/scalars", tag="test/loss", run=runs[0])]
        assert loss == [8]  # the test segment's metric, on the loss chart beside train/ and val/
    finally:
        server.terminate()
        try:
            server.wait(timeout=15)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait(timeout=15)
