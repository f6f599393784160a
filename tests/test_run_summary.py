"""RunSummary: the end-of-run numbers against what TensorBoard and wandb really hold, on success, Ctrl-C, an
exception and DDP."""

from __future__ import annotations

import glob
import itertools
import json
import os
import signal
import sys
import time
from typing import Any

import numpy as np
import pytest
import torch
from helpers import (
    TinyImageModel,
    event_files,
    find_runs,
    image_loader,
    make_trainer,
    run_ddp_script,
    tb_accumulator,
    tb_all_scalars,
)
from lightning.pytorch import Callback
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_monitor import (
    GradientMonitor,
    MemoryMonitor,
    MultiLogger,
    PredictionGridMonitor,
    RunSummary,
    SpeedMonitor,
    run_summary,
)
from lightning_monitor._core import clock as _clock
from lightning_monitor._summary import numbers as _summary


def _monitors() -> list[Any]:
    return [GradientMonitor(), MemoryMonitor(), SpeedMonitor(peak_flops_per_sec=1e12),
            PredictionGridMonitor(num_samples=8)]


@pytest.fixture(autouse=True)
def _real_clock() -> Any:
    yield
    _clock.reset()  # every test leaves the package's clock real


def _fake_clock(start: float = 100.0, tick: float = 2.5) -> None:
    """RunSummary reads ``start``, ``start + tick``, ...: once at setup and once at the end, so wall_sec == tick.

    The package has one clock (``_clock``), also read by the monitors' hook timing and the logger writes; they keep
    the real one (as when RunSummary had a clock of its own): only reads made in ``run_summary`` tick."""
    ticks = itertools.count(start, tick)

    def now() -> float:
        return next(ticks) if sys._getframe(1).f_globals["__name__"] == run_summary.__name__ else time.perf_counter()

    _clock.set_clock(now)


def _json(log_dir: str) -> dict[str, Any]:
    """summary.json's ``summary/...`` entries (its ``verdicts`` list, tested in test_verdicts.py, left out)."""
    with open(os.path.join(log_dir, "summary.json"), encoding="utf-8") as f:
        document = json.load(f)
    assert isinstance(document.pop("verdicts"), list)
    return document


def _expected(series: dict[str, list[tuple[int, Any]]]) -> dict[str, Any]:
    """The summary computed here, independently, from a backend's logged series."""
    def vals(key: str) -> list[float]:
        return [float(v) for _, v in series[key]]

    norms = series["grad/norm_total"]
    top = max(range(len(norms)), key=lambda i: (norms[i][1], -i))
    step = norms[top][0]
    groups = {k.split("/", 2)[2]: dict(v)[step] for k, v in series.items() if k.startswith("grad/norm/")}
    # GradientMonitor logs its NaN/Inf counts only once there was one (an always-zero chart says nothing)
    nonfinite = sum(vals("grad/nonfinite_steps")) if "grad/nonfinite_steps" in series else 0
    return {
        "summary/grad_nonfinite_steps": nonfinite,
        "summary/samples_per_sec_p50": np.percentile(vals("throughput/samples_per_sec"), 50),
        "summary/samples_per_sec_p10": np.percentile(vals("throughput/samples_per_sec"), 10),
        "summary/step_sec_p50": np.percentile(vals("time/step_sec"), 50),
        "summary/step_sec_p95": np.percentile(vals("time/step_sec"), 95),
        "summary/data_wait_share_mean": np.mean(vals("time/data_wait_share")),
        "summary/mfu_p50": np.percentile(vals("throughput/mfu"), 50),
        "summary/host_rss_gib_max": max(vals("memory/host/rss_gib")),
        "summary/host_rss_gib_max_rank": 0,
        "summary/grad_norm_max": norms[top][1],
        "summary/grad_norm_max_step": step,
        "summary/grad_norm_max_group": max(groups, key=groups.get),
        "summary/accuracy_first": vals("predictions/accuracy")[0],
        "summary/accuracy_last": vals("predictions/accuracy")[-1],
        "summary/overhead_share_mean": np.mean(vals("time/monitor_share")),
        **{f"summary/overhead_share_mean/{k.rsplit('/', 1)[1]}": np.mean(vals(k))
           for k in series if k.startswith("time/monitor_share/")},
    }


def test_summary_equals_aggregates_of_what_tensorboard_and_wandb_hold(capsys):
    summary = RunSummary(use_rich=False)
    _fake_clock()
    logger = MultiLogger(save_dir="runs", name="summary")
    trainer = make_trainer(".", logger=logger, callbacks=[*_monitors(), summary], max_steps=8, val_check_interval=4)
    trainer.fit(TinyImageModel(), image_loader(64), image_loader(32))
    written = {key: entry["value"] for key, entry in _json(logger.log_dir).items()}
    assert written == summary.summary
    assert written["summary/status"] == "success"
    assert written["summary/wall_sec"] == 2.5 and written["summary/steps"] == 8
    assert _json(logger.log_dir)["summary/wall_sec"]["unit"] == "s"
    assert _json(logger.log_dir)["summary/host_rss_gib_max"]["unit"] == "GiB"

    tb = tb_all_scalars(logger.log_dir)
    assert len(tb["throughput/samples_per_sec"]) >= 3  # several windows: the percentiles are not one value
    assert {f"summary/overhead_share_mean/{name}" for name in ("gradient", "speed")} <= set(written)
    for key, value in _expected(tb).items():  # TensorBoard stores float32
        assert written[key] == (pytest.approx(value, rel=1e-6) if isinstance(value, float) else value), key
    (run,) = find_runs("runs")
    history = {key: run.series(key) for key in {k for row in run.history for k in row}}
    assert _expected(history) == {k: written[k] for k in _expected(history)}  # wandb: float64, exactly

    # TensorBoard: the headline numbers as scalars at the last step (and HParams metric columns), the whole table
    # as the text card; the other numbers are no one-dot charts (they are in the card, the file and wandb)
    numbers = {k: v for k, v in written.items() if not isinstance(v, str) and k in _summary.HEADLINE}
    assert set(numbers) == set(_summary.HEADLINE)  # all four measured in this run
    for key, value in numbers.items():
        assert tb[key] == [(8, pytest.approx(value, rel=1e-6))], key
    assert {k for k in tb if k.startswith("summary/")} == set(numbers)
    acc = tb_accumulator(logger.log_dir)
    card = acc.Tensors("summary/table/text_summary")[0].tensor_proto.string_val[0].decode()
    assert "Run summary (success)" in card and "| samples/s | p50 " in card
    from tensorboard.plugins.hparams import plugin_data_pb2

    experiment = plugin_data_pb2.HParamsPluginData.FromString(
        acc.summary_metadata["_hparams_/experiment"].plugin_data.content).experiment
    assert set(numbers) <= {m.name.tag for m in experiment.metric_infos}

    # wandb's run summary holds the same values (text too), and no history row carries them
    assert {k: v for k, v in run.summary.items() if k.startswith("summary/")} == written
    assert not any(k.startswith("summary/") for row in run.history for k in row)

    assert "Run summary (" not in capsys.readouterr().out  # held: printed after what follows the fit
    summary.print_now()
    summary.print_now()  # once
    out = capsys.readouterr().out
    assert out.count("Run summary (") == 1
    assert f"written to {os.path.join(logger.log_dir, 'summary.json')}" in out
    assert "  step time " in out and "largest norm" in out and "monitoring cost " in out


def test_summary_of_a_fit_without_monitors_and_with_plain_loggers():
    """Only the rows whose monitor ran: wall time and steps. A plain TensorBoardLogger gets the scalars and the
    card, CSVLogger the numbers; the file goes to the first logger's run directory."""
    tb, csv = TensorBoardLogger("tb", name="plain"), CSVLogger("csv", name="plain")
    summary = RunSummary(print_table=False)
    _fake_clock(tick=4.0)
    trainer = make_trainer(".", logger=[tb, csv], callbacks=[summary], max_steps=3)
    trainer.fit(TinyImageModel(), image_loader(64))
    assert _json(tb.log_dir) == {
        "summary/status": {"value": "success", "unit": None},
        "summary/wall_sec": {"value": 4.0, "unit": "s"},
        "summary/steps": {"value": 3, "unit": "steps"},
    }
    assert tb_all_scalars(tb.log_dir)["summary/wall_sec"] == [(3, 4.0)]
    assert "summary/table/text_summary" in tb_accumulator(tb.log_dir).Tags()["tensors"]
    with open(os.path.join(csv.log_dir, "metrics.csv"), encoding="utf-8") as f:
        header, *rows = [line.strip().split(",") for line in f]
    assert {"summary/wall_sec", "summary/steps"} <= set(header)
    assert float(rows[-1][header.index("summary/wall_sec")]) == 4.0
    assert not os.path.exists(os.path.join(csv.log_dir, "summary.json"))


class _Raise(Callback):
    def __init__(self, error: BaseException, at_step: int) -> None:
        self.error, self.at_step = error, at_step

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        if trainer.global_step == self.at_step:
            raise self.error


@pytest.mark.parametrize("error, status", [(KeyboardInterrupt(), "interrupted"), (RuntimeError("boom"), "failed")])
def test_a_run_ended_by_ctrl_c_or_an_exception_writes_a_summary_marked_so(error, status, capsys):
    handler = signal.getsignal(signal.SIGINT)  # Lightning ignores SIGINT after a KeyboardInterrupt: restore it
    summary = RunSummary(use_rich=False)
    logger = MultiLogger(save_dir="runs", name="stopped")
    trainer = make_trainer(".", logger=logger, callbacks=[SpeedMonitor(), summary, _Raise(error, at_step=5)],
                           max_steps=8, enable_progress_bar=True)
    try:
        expected = SystemExit if isinstance(error, KeyboardInterrupt) else RuntimeError  # Lightning exits on Ctrl-C
        with pytest.raises(expected) as raised:
            trainer.fit(TinyImageModel(), image_loader(256))
        if expected is RuntimeError:
            assert raised.value is error  # the summary hides nothing
    finally:
        signal.signal(signal.SIGINT, handler)
    written = _json(logger.log_dir)
    assert written["summary/status"]["value"] == status
    assert written["summary/steps"]["value"] == 5
    assert written["summary/samples_per_sec_p50"]["value"] > 0  # windows logged before the stop
    (run,) = find_runs("runs")
    assert run.summary["summary/status"] == status and run.summary["summary/steps"] == 5
    assert run.exit_code == 1
    card = tb_accumulator(logger.log_dir).Tensors("summary/table/text_summary")[0].tensor_proto.string_val[0]
    assert f"Run summary ({status})".encode() in card
    out = capsys.readouterr().out
    assert out.count("Run summary (") == 1 and f"\nRun summary ({status})" in out  # below the progress bar


def test_a_summary_that_fails_costs_a_warning_not_the_run(monkeypatch):
    def broken(*args: Any, **kwargs: Any) -> None:
        raise ZeroDivisionError("a bug in the summary")

    monkeypatch.setattr(_summary, "compute", broken)
    trainer = make_trainer(".", logger=CSVLogger("csv"), callbacks=[SpeedMonitor(), RunSummary()], max_steps=2)
    with pytest.warns(UserWarning, match=r"RunSummary could not make the summary \(ZeroDivisionError: a bug"):
        trainer.fit(TinyImageModel(), image_loader(64))
    assert trainer.global_step == 2 and trainer.state.finished


class _GAN(TinyImageModel):
    """Manual optimization with two optimizers: two optimizer steps a batch."""

    def __init__(self) -> None:
        super().__init__()
        self.automatic_optimization = False

    def training_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        for opt in self.optimizers():
            loss = torch.nn.functional.nll_loss(self(x), y)
            opt.zero_grad()
            self.manual_backward(loss)
            opt.step()

    def configure_optimizers(self) -> Any:
        return [torch.optim.SGD(self.conv.parameters(), lr=0.01), torch.optim.SGD(self.head.parameters(), lr=0.01)]


def test_manual_optimization_with_two_optimizers():
    summary = RunSummary(print_table=False)
    trainer = make_trainer(".", logger=CSVLogger("csv"), callbacks=[GradientMonitor(), SpeedMonitor(), summary],
                           max_steps=8)
    trainer.fit(_GAN(), image_loader(64))
    assert summary.summary["summary/steps"] == trainer.global_step == 8
    with open(os.path.join(trainer.logger.log_dir, "metrics.csv"), encoding="utf-8") as f:
        header, *rows = [line.strip().split(",") for line in f]
    norms = [(int(r[header.index("step")]), float(r[header.index("grad/norm_total")])) for r in rows
             if r[header.index("grad/norm_total")]]
    assert len(norms) >= 2
    assert summary.summary["summary/grad_norm_max"] == pytest.approx(max(v for _, v in norms), rel=1e-6)
    assert summary.summary["summary/samples_per_sec_p50"] > 0


def test_compute_takes_cross_rank_peaks_their_rank_and_the_group_at_the_largest_norm():
    series = {
        "memory/host/rss_gib": [(1, 1.0), (3, 1.5)],
        "memory/host/rss_gib_max": [(1, 2.0), (3, 2.5), (5, 2.5)],
        "memory/host/rss_gib_max_rank": [(1, 0.0), (3, 1.0), (5, 0.0)],
        "memory/cuda/validation_peak_allocated_gib": [(4, 0.5), (8, 0.75)],
        "grad/norm_total": [(1, 3.0), (3, 7.0), (5, 7.0)],
        "grad/norm/head": [(1, 2.0), (3, 1.0), (5, 9.0)],
        "grad/norm/conv": [(1, 1.0), (3, 6.0), (5, 1.0)],
        "grad/nonfinite_steps": [(1, 0.0), (3, 2.0), (5, 1.0)],
        "time/step_sec": [(1, 4.0), (3, 1.0), (5, 2.0), (7, 3.0)],
    }
    values = _summary.compute(series, status="success", wall_sec=None, steps=6)
    assert values == {
        "summary/status": "success", "summary/steps": 6,
        "summary/step_sec_p50": 2.5, "summary/step_sec_p95": pytest.approx(3.85),
        "summary/cuda_validation_peak_allocated_gib_max": 0.75,
        "summary/cuda_validation_peak_allocated_gib_max_rank": 0,
        "summary/host_rss_gib_max": 2.5, "summary/host_rss_gib_max_rank": 1,  # the first step of the peak
        "summary/grad_nonfinite_steps": 3,
        "summary/grad_norm_max": 7.0, "summary/grad_norm_max_step": 3, "summary/grad_norm_max_group": "conv",
    }
    text = _summary.plain(values)
    assert "peak memory, validation  0.750 GiB allocated on the device, rank 0" in text
    assert "3 steps with NaN/Inf, largest norm 7 at step 3 (conv)" in text
    assert "wall time" in text and "samples/s" not in text  # only rows with data


def test_rich_table_when_rich_is_installed(capsys):
    pytest.importorskip("rich")
    summary = RunSummary()
    trainer = make_trainer(".", logger=CSVLogger("csv"), callbacks=[SpeedMonitor(), summary], max_steps=4)
    trainer.fit(TinyImageModel(), image_loader(64))
    trainer.validate(TinyImageModel(), image_loader(32))  # a later stage: the table comes after its results
    out = capsys.readouterr().out
    assert out.count("Run summary (success)") == 1 and "│ samples/s" in out
    assert out.index("Run summary (success)") > out.index("val/loss")


def test_options_are_checked(monkeypatch):
    for bad in ("", "a/b.json", "..", 3):
        with pytest.raises(ValueError, match="`filename` must be a file name"):
            RunSummary(filename=bad)
    monkeypatch.setattr(run_summary, "_RICH_AVAILABLE", False)
    with pytest.raises(ModuleNotFoundError, match="pip install rich"):
        RunSummary(use_rich=True)
    RunSummary(use_rich=False, filename=None)


DDP_SCRIPT = """
import sys
sys.path.insert(0, {tests!r})
import torch
from helpers import TinyImageModel, image_loader, make_trainer
from lightning_monitor import MemoryMonitor, MultiLogger, RunSummary, SpeedMonitor

class Heavy(TinyImageModel):
    def on_train_start(self):
        if self.global_rank == 1:
            self.ballast = torch.ones(300 * 2**18)  # 300 MiB, written, so resident: rank 1 holds the peak

trainer = make_trainer({root!r}, max_steps=4, strategy="ddp", devices=2,
                       logger=MultiLogger(save_dir={root!r}, name="ddp", wandb=False),
                       callbacks=[MemoryMonitor(every_n_steps=2), SpeedMonitor(every_n_steps=2),
                                  RunSummary(use_rich=False)])
trainer.fit(Heavy(), image_loader(64))
"""


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_ddp_writes_one_summary_with_the_cross_rank_peak_and_its_rank(tmp_path):
    root = tmp_path / "ddp"
    root.mkdir()
    source = DDP_SCRIPT.format(tests=os.path.dirname(__file__), root=str(root))
    proc = run_ddp_script(tmp_path, "ddp_summary.py", source)
    assert proc.stdout.count("Run summary (success)") == 1  # both ranks print to this pipe: rank 0 alone did
    (path,) = glob.glob(str(root / "**" / "summary.json"), recursive=True)
    assert len(event_files(root)) == 1
    written = {key: entry["value"] for key, entry in _json(os.path.dirname(path)).items()}
    tb = tb_all_scalars(os.path.dirname(path))
    assert written["summary/host_rss_gib_max_rank"] == 1
    assert written["summary/host_rss_gib_max"] == pytest.approx(max(v for _, v in tb["memory/host/rss_gib_max"]),
                                                                rel=1e-6)
    assert written["summary/host_rss_gib_max"] > max(v for _, v in tb["memory/host/rss_gib"]) + 0.25  # not rank 0's
    assert written["summary/steps"] == 4
    assert written["summary/samples_per_sec_p50"] == pytest.approx(
        float(np.percentile([v for _, v in tb["throughput/samples_per_sec"]], 50)), rel=1e-6)
