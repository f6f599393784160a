"""``lightning-monitor compare``: two real runs, one made slower on purpose, side by side; the exit code of
``--fail-on`` both ways; the same numbers as each run's summary.json; a run without one read from TensorBoard."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from typing import Any

import pytest
import torch
from helpers import TinyImageModel, image_loader, make_trainer

from lightning_monitor import MemoryMonitor, MultiLogger, RunSummary, SpeedMonitor
from lightning_monitor._summary import compare as _compare
from lightning_monitor.command import main as command


class _Slow(TinyImageModel):
    """20 ms more a training step."""

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        time.sleep(0.02)
        return super().training_step(batch, batch_idx)


def _run(model: Any, name: str, **summary: Any) -> tuple[str, RunSummary]:
    run_summary = RunSummary(print_table=False, **summary)
    logger = MultiLogger(save_dir="runs", name=name, wandb=False)
    trainer = make_trainer(".", logger=logger, callbacks=[SpeedMonitor(), MemoryMonitor(), run_summary],
                           max_steps=16, log_every_n_steps=2, limit_val_batches=0)
    trainer.fit(model, image_loader(64 * 4))
    return logger.log_dir, run_summary


@pytest.fixture
def runs() -> tuple[tuple[str, RunSummary], tuple[str, RunSummary]]:
    return _run(TinyImageModel(), "fast"), _run(_Slow(), "slow")


def _console(*args: str) -> subprocess.CompletedProcess[str]:
    """The installed console script (``python -m lightning_monitor.command`` where it is not on the PATH)."""
    exe = shutil.which("lightning-monitor")
    cmd = [exe] if exe else [sys.executable, "-m", "lightning_monitor.command"]
    return subprocess.run([*cmd, "compare", *args], capture_output=True, text=True, timeout=120)


def test_compare_fails_on_a_slower_run_past_its_limit_and_passes_a_generous_one(runs, capsys):
    (fast_dir, fast), (slow_dir, slow) = runs
    out = _console(fast_dir, slow_dir, "--fail-on", "step_time=5%,samples_per_sec=5%")
    assert out.returncode == 1, out.stdout + out.stderr
    assert f"step_time regressed in {slow_dir}" in out.stderr
    assert f"samples_per_sec regressed in {slow_dir}" in out.stderr  # lower is worse for samples/s
    assert "step time p50" in out.stdout and "verdicts" in out.stdout
    assert out.stdout.splitlines()[0].split() == [fast_dir, slow_dir]

    assert command(["compare", fast_dir, slow_dir, "--fail-on", "step_time=100000%"]) == 0
    assert "regressed" not in capsys.readouterr().err
    # the other way round the slow run is the baseline: faster is no regression
    assert command(["compare", slow_dir, fast_dir, "--fail-on", "step_time=5%,samples_per_sec=5%"]) == 0
    capsys.readouterr()

    # json: the very numbers of each run's summary.json (and RunSummary's values), with the ratios to the first
    assert command(["compare", fast_dir, slow_dir, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    numbers = {n["name"]: n for n in document["numbers"]}
    for i, (run_dir, summary) in enumerate(runs):
        with open(os.path.join(run_dir, "summary.json"), encoding="utf-8") as f:
            written = json.load(f)
        for name, key in (("samples_per_sec", "summary/samples_per_sec_p50"), ("step_time", "summary/step_sec_p50"),
                          ("step_time_p95", "summary/step_sec_p95"), ("data_wait", "summary/data_wait_share_mean"),
                          ("host_memory", "summary/host_rss_gib_max"), ("wall_time", "summary/wall_sec")):
            assert numbers[name]["values"][i] == written[key]["value"] == summary.summary[key], name
        assert document["runs"][i]["verdicts"] == [v["name"] for v in written["verdicts"]]
        assert document["runs"][i]["source"] == "summary.json"
    step = numbers["step_time"]
    assert step["ratios"] == [1.0, pytest.approx(step["values"][1] / step["values"][0])] and step["ratios"][1] > 2
    assert numbers["peak_memory"]["values"] == [None, None]  # no CUDA here: missing, not zero
    assert numbers["mfu"]["values"] == [None, None]

    assert command(["compare", fast_dir, slow_dir, "--format", "markdown"]) == 0
    table = capsys.readouterr().out.splitlines()
    assert table[0] == f"|  | {fast_dir} | {slow_dir} |" and table[1] == "|---|---|---|"
    assert any(line.startswith("| peak device memory | - | - |") for line in table)


def test_a_run_without_summary_json_compares_from_its_tensorboard_files(tmp_path, capsys):
    fast_dir, fast = _run(TinyImageModel(), "fast")
    bare_dir, bare = _run(TinyImageModel(), "bare", filename=None)  # RunSummary wrote no file
    assert not os.path.exists(os.path.join(bare_dir, "summary.json"))
    run = _compare.load(bare_dir)
    assert run.source == "tensorboard"
    for name, key in (("samples_per_sec", "summary/samples_per_sec_p50"), ("step_time", "summary/step_sec_p50"),
                      ("data_wait", "summary/data_wait_share_mean"), ("host_memory", "summary/host_rss_gib_max")):
        assert run.numbers[name] == pytest.approx(bare.summary[key], rel=1e-6), name  # TensorBoard keeps float32
    assert "wall_time" not in run.numbers  # only RunSummary knows it
    assert run.verdicts == [v.name for v in bare.verdicts]
    assert command(["compare", fast_dir, bare_dir, "--fail-on", "wall_time=5%"]) == 0
    out, err = capsys.readouterr()
    assert f"wall_time: missing in {bare_dir}, not checked" in err
    wall = next(line for line in out.splitlines() if line.startswith("wall time"))
    assert wall.split()[-1] == "-"  # shown as missing

    # an older summary.json (no verdicts, fewer numbers) still compares
    old = tmp_path / "old"
    old.mkdir()
    (old / "summary.json").write_text(json.dumps({"summary/status": {"value": "success", "unit": None},
                                                  "summary/step_sec_p50": {"value": 0.01, "unit": "s"}}))
    assert command(["compare", str(old), fast_dir, "--format", "json"]) == 0
    document = json.loads(capsys.readouterr().out)
    assert document["runs"][0]["verdicts"] is None and document["runs"][0]["numbers"] == {"step_time": 0.01}


def test_bad_arguments_are_refused_with_exit_code_2(capsys):
    assert command(["compare", "nowhere", "--fail-on", "step_time=5%"]) == 2
    assert "no summary.json and no TensorBoard event file" in capsys.readouterr().err
    assert command(["compare", ".", "--fail-on", "speed=5%"]) == 2
    assert "no number named 'speed'" in capsys.readouterr().err
    assert _compare.parse_limits("step_time=5%, peak_memory=10") == {"step_time": 0.05, "peak_memory": 0.1}
    with pytest.raises(ValueError, match="expected NAME=PERCENT%"):
        _compare.parse_limits("step_time")
