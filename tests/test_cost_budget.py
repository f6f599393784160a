"""The cost budget: the monitors' own measured time is held under a share of training time by spacing out their
expensive parts (histograms, the per-step NaN/Inf check, the prediction grid), never their scalars; said once."""

from __future__ import annotations

import warnings

import pytest
from helpers import TinyImageModel, image_loader, make_trainer, tb_accumulator, tb_scalars
from lightning.pytorch import Callback
from lightning.pytorch.loggers import TensorBoardLogger

from lightning_monitor import GradientMonitor, MemoryMonitor, PredictionGridMonitor, SpeedMonitor
from lightning_monitor._core import clock
from lightning_monitor._grad.nonfinite import NonfiniteLedger
from lightning_monitor._monitor.budget import DEFAULT_SHARE, PLANNED, Budget, Part

pytestmark = pytest.mark.budget  # the budget on (conftest turns it off for every other test)

#: a budget no real part fits in: after its first run every expensive part waits
TINY = 1e-9
LOGGING_STEPS = [1, 3, 5, 7, 9, 11]  # 12 steps, log_every_n_steps=2


class Spent:
    def __init__(self, seconds: float = 0.0) -> None:
        self.seconds = seconds

    def hook_seconds(self) -> float:
        return self.seconds


@pytest.fixture
def fake_clock():
    now = [100.0]
    clock.set_clock(lambda: now[0])
    yield now
    clock.reset()


def test_budget_is_the_share_of_the_time_since_it_started_and_each_part_keeps_to_its_slice(fake_clock):
    a, b = Spent(5.0), Spent(1.0)
    budget = Budget(0.04, [a, b], planned=1.0)  # the whole budget to plan to: round numbers
    part = Part("histograms", 0.5)
    part.record(0.002)  # ran once before the budget started (the first batch): it is not charged
    assert budget.allows(part)  # before start everything may run
    budget.start()
    part.spent = 0.0
    assert budget.spent() == 0.0 and budget.allowed() == 0.0
    fake_clock[0] = 101.0  # one second of training: 40 ms allowed, 20 ms of it for this part
    a.seconds += 0.010
    assert budget.allowed() == pytest.approx(0.04) and budget.spent() == pytest.approx(0.010)
    assert budget.allows(part)  # 10 + 2 <= 40 and 0 + 2 <= 20
    part.record(0.018)  # expected cost now 0.7 * 2 + 0.3 * 18 = 6.8 ms; its slice holds 18 ms
    a.seconds += 0.018
    assert part.cost == pytest.approx(0.0068)
    assert not budget.allows(part)  # whole budget: 28 + 6.8 <= 40, but its slice: 18 + 6.8 > 20
    fake_clock[0] = 101.5  # 60 ms allowed, 30 ms for the part
    assert budget.allows(part)
    b.seconds += 0.030  # another monitor's scalars: the whole budget is spent (58 + 6.8 > 60)
    assert not budget.allows(part)
    assert budget.allows(Part("grids", 0.5))  # a part that never ran may always run once


def test_the_parts_plan_to_fill_nine_tenths_of_the_budget(fake_clock):
    """The budget is a ceiling: by default the parts fill at most ``PLANNED`` (0.9) of it, the rest a margin for what
    the plan cannot know. 1 s of training under a 10 % budget: 100 ms the ceiling, 90 ms to plan to."""
    a = Spent()
    budget = Budget(0.1, [a])
    part = Part("histograms", 1.0)
    budget.start()  # at 100 s
    part.record(0.010)  # 10 ms spent, 10 ms expected next time
    fake_clock[0] = 101.0
    a.seconds += 0.075  # 75 + 10 <= 90: runs
    assert PLANNED == 0.9 and budget.allowed() == pytest.approx(0.1) and budget.allows(part)
    a.seconds += 0.010  # 85 + 10 > 90, under the 100 ms ceiling all the same: waits
    assert not budget.allows(part)


def test_a_refused_part_waits_by_one_comparison_and_runs_again_as_soon_as_it_fits(fake_clock):
    """A part refused by its own slice, or by the whole budget, is not checked again (no monitor's seconds read)
    before the earliest time it could fit; at that time exactly it runs (the check is the same as without the
    shortcut)."""
    read = []

    class Counted(Spent):
        def hook_seconds(self) -> float:
            read.append(1)
            return self.seconds

    a = Counted()
    budget = Budget(0.01, [a], planned=1.0)  # 10 ms a second; a part with half of it: 5 ms a second
    part = Part("grids", 0.5)
    budget.start()  # at 100 s
    part.record(0.005)  # ran: 5 ms spent, 5 ms expected next time: its slice holds 10 ms from 102 s on
    a.seconds += 0.005
    fake_clock[0] = 101.0
    assert not budget.allows(part)
    read.clear()
    fake_clock[0] = 101.999
    assert not budget.allows(part) and not read  # refused without a sum over the monitors
    fake_clock[0] = 102.0
    assert budget.allows(part) and read  # 5 + 5 <= 10 ms of its slice, 5 + 5 <= 20 ms of the budget

    whole = Part("histograms", 1.0)  # the whole budget as its slice: only the monitors' total refuses it
    whole.record(0.002)
    a.seconds += 0.030  # the scalars spent 30 ms: 35 ms with the 5 above, 37 ms with this part, by 103.7 s
    fake_clock[0] = 103.0
    assert not budget.allows(whole)  # 2 + 2 <= 30 ms of its slice, but 35 + 2 > 30 ms of the budget
    read.clear()
    fake_clock[0] = 103.69
    assert not budget.allows(whole) and not read
    fake_clock[0] = 103.7
    assert budget.allows(whole) and read


def test_the_trainer_is_read_once_a_batch_for_every_monitor_and_each_keeps_its_cadence(tmp_path, monkeypatch):
    """The first monitor reads the batch's step for all of them; each still logs at its own steps. A monitor first
    in the list whose batch start does not run the base's (a subclass that forgets ``super()``) leaves the others
    reading the trainer themselves, with the same steps."""
    from lightning_monitor._monitor import cadence

    reads = []
    real = cadence.batch_start
    monkeypatch.setattr(cadence, "batch_start", lambda *a: reads.append(1) or real(*a))

    class Forgetful(MemoryMonitor):
        def on_train_batch_start(self, *args) -> None:  # breaks the documented contract: no super()
            pass

    for first in (MemoryMonitor, Forgetful):
        reads.clear()
        root = tmp_path / first.__name__
        monitors = [first(every_n_steps=4), GradientMonitor(histograms=False, every_n_steps=3), SpeedMonitor()]
        log_dir, _ = _fit(root, monitors, max_steps=12)
        assert [s for s, _ in tb_scalars(log_dir, "grad/norm_total")] == [2, 5, 8, 11]
        assert [s for s, _ in tb_scalars(log_dir, "time/step_sec")] == LOGGING_STEPS  # log_every_n_steps=2
        if first is MemoryMonitor:
            assert [s for s, _ in tb_scalars(log_dir, "memory/host/rss_gib")] == [3, 7, 11]
            assert len(reads) == 12  # one read a batch for three monitors
        else:
            assert len(reads) == 12  # the second monitor reads it for the rest


def test_the_batch_start_step_is_trainer_global_step(tmp_path):
    """``cadence.batch_start`` reads Lightning's step counter without the trainer's properties: at every batch the
    step is ``trainer.global_step`` (gradient accumulation included: two batches a step), the candidate the steps of
    ``log_every_n_steps``; a trainer without those loops is read through ``global_step`` itself."""
    from types import SimpleNamespace

    from lightning_monitor._monitor import cadence

    read: list[tuple[tuple, int]] = []

    class Reader(Callback):
        def on_train_batch_start(self, trainer, pl_module, batch, batch_idx) -> None:
            read.append((cadence.batch_start(trainer, pl_module), trainer.global_step))

    trainer = make_trainer(tmp_path, logger=False, callbacks=[Reader()], max_steps=6, log_every_n_steps=3,
                           accumulate_grad_batches=2)
    trainer.fit(TinyImageModel(), image_loader(192))
    assert [got for got, _ in read] == [(s, False, s if s in (2, 5) else None) for s in (0, 0, 1, 1, 2, 2, 3, 3, 4,
                                                                                      4, 5, 5)]
    assert [got[0] for got, _ in read] == [step for _, step in read]
    other = SimpleNamespace(global_step=5, log_every_n_steps=3)
    assert cadence.batch_start(other, SimpleNamespace(automatic_optimization=True)) == (5, False, 5)


@pytest.mark.parametrize("value", [0, -0.1, 1.5, float("nan"), "3%", True])
@pytest.mark.parametrize("monitor", [GradientMonitor, PredictionGridMonitor])
def test_cost_budget_is_a_share_or_none(monitor, value):
    with pytest.raises((TypeError, ValueError), match="`cost_budget` must be None or a number"):
        monitor(cost_budget=value)
    assert monitor().cost_budget == DEFAULT_SHARE and monitor(cost_budget=None).cost_budget is None


def _fit(tmp_path, callbacks, extra=(), **kwargs):
    logger = TensorBoardLogger(str(tmp_path), name="tb", version=0)
    kwargs.setdefault("max_steps", 12)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[*callbacks, *extra], **kwargs)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        trainer.fit(TinyImageModel(), image_loader(192), image_loader(32))
    return logger.log_dir, [str(w.message) for w in caught]


@pytest.mark.parametrize("budget", [None, TINY], ids=["no-budget", "tiny-budget"])
def test_histograms_are_spaced_out_and_the_scalars_are_not(tmp_path, budget):
    log_dir, said = _fit(tmp_path, [GradientMonitor(cost_budget=budget), SpeedMonitor(), MemoryMonitor()])
    acc = tb_accumulator(log_dir)
    hist_steps = sorted({e.step for tag in acc.Tags()["histograms"] for e in acc.Histograms(tag)})
    assert [s for s, _ in tb_scalars(log_dir, "grad/norm_total")] == LOGGING_STEPS
    assert [s for s, _ in tb_scalars(log_dir, "time/step_sec")] == LOGGING_STEPS
    told = [m for m in said if "cost_budget=None" in m]  # one warning for the monitor, naming both its parts
    if budget is None:
        assert hist_steps == LOGGING_STEPS and not told
    else:  # the first logging step measures what histograms cost; none fits after it
        assert hist_steps == [1]
        assert len(told) == 1 and told[0].startswith("GradientMonitor: ")
        assert "gradient histograms and the NaN/Inf checks between logging steps run less often" in told[0]


class PoisonFrom(Callback):
    """From optimizer step ``step`` on, the first layer's weight gradient holds a NaN (a run that went bad)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_before_optimizer_step(self, trainer, pl_module, optimizer) -> None:
        if trainer.global_step >= self.step:
            next(pl_module.parameters()).grad[0] = float("nan")


@pytest.mark.parametrize("budget", [None, TINY], ids=["no-budget", "tiny-budget"])
def test_a_spaced_out_nan_check_still_sees_a_run_gone_bad_at_the_next_logging_step(tmp_path, budget):
    """NaN from step 4 on. Without a budget every step is checked: at step 5 two steps had NaN (4 and 5). With the
    per-step check spaced out, the logging step still checks its own step: the NaN shows at step 5, the same
    parameter named, ``grad/nonfinite_steps`` counting the steps checked."""
    poison = PoisonFrom(4)  # before the monitor in the list: the monitor sees the poisoned gradient
    log_dir, said = _fit(tmp_path, [poison, GradientMonitor(cost_budget=budget, histograms=False)])
    steps = dict(tb_scalars(log_dir, "grad/nonfinite_steps"))
    assert steps[5] == (2.0 if budget is None else 1.0)
    assert dict(tb_scalars(log_dir, "grad/nonfinite/conv.weight"))[5] > 0
    assert sum("NaN/Inf gradients by step 5" in m for m in said) == 1


@pytest.mark.parametrize("budget", [None, TINY], ids=["no-budget", "tiny-budget"])
def test_grids_are_spaced_out_with_their_accuracy(tmp_path, budget):
    """A grid (its forward over the samples, the picture, the accuracy that comes with them) waits; the other
    monitors' scalars do not."""
    grid = PredictionGridMonitor(num_samples=8, every_n_steps=2, cost_budget=budget)
    log_dir, said = _fit(tmp_path, [grid, SpeedMonitor()])  # the validation at step 11 draws nothing new
    acc = tb_accumulator(log_dir)
    grid_steps = [e.step for e in acc.Images("predictions/grid")]
    assert [s for s, _ in tb_scalars(log_dir, "predictions/accuracy")] == grid_steps
    assert [s for s, _ in tb_scalars(log_dir, "time/step_sec")] == LOGGING_STEPS
    if budget is None:
        assert grid_steps == LOGGING_STEPS
    else:
        assert grid_steps == [1]
        assert sum("PredictionGridMonitor: prediction grids cost about" in m for m in said) == 1


def test_the_environment_switch_turns_every_budget_off(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTNING_MONITOR_COST_BUDGET", "off")
    log_dir, said = _fit(tmp_path, [GradientMonitor(cost_budget=TINY)])
    acc = tb_accumulator(log_dir)
    assert sorted({e.step for e in acc.Histograms("grad/hist/conv.weight")}) == LOGGING_STEPS
    assert not [m for m in said if "cost_budget=None" in m]


def test_the_budget_counts_every_monitor_and_not_the_first_batch(tmp_path, fake_clock):
    """Under a clock that only the model and one monitor's hook move: the budget starts after the first batch (a
    slow first batch is not charged) and counts another monitor's time against this one's parts."""
    seen = {}

    class Slow(Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            fake_clock[0] += 10.0 if trainer.global_step == 0 else 1.0  # a 10 s first batch, then 1 s a batch

        def on_train_batch_end(self, trainer, pl_module, *args) -> None:
            monitor = next(c for c in trainer.callbacks if isinstance(c, GradientMonitor))
            if monitor._budget is not None and monitor._budget.began is not None:
                seen[trainer.global_step] = (monitor._budget.allowed(), monitor._budget.spent())

    _fit(tmp_path, [Slow(), GradientMonitor(histograms=False), SpeedMonitor()], max_steps=4)
    # the budget started at the second batch's start (clock 111: after the first batch's 10 s and this batch's
    # 1 s tick); every later batch adds 1 s of training, 3 % of it allowed; the monitors' hooks took no fake time
    assert seen == {2: (0.0, 0.0), 3: (pytest.approx(0.03), 0.0), 4: (pytest.approx(0.06), 0.0)}



def test_a_refusal_of_one_fit_does_not_hold_in_the_next(tmp_path):
    """A part refused under a tiny budget waits far into the future (``Part.wait_until``); the next fit of the same
    monitor starts a new budget: its first batch's NaN/Inf check runs (before the budget starts, every part may)."""
    monitor = GradientMonitor(histograms=False, cost_budget=TINY)
    runs_in_first_batch = []

    class Count(Callback):
        def on_train_batch_end(self, trainer, pl_module, outputs, batch, batch_idx) -> None:
            if trainer.global_step == 1:
                runs_in_first_batch.append(monitor._watch_part.ran)

    _fit(tmp_path / "one", [monitor, Count()], max_steps=12, log_every_n_steps=12)
    assert monitor._watch_part.wait_until > clock.now() + 1e3  # refused for good in that fit
    ran = monitor._watch_part.ran
    _fit(tmp_path / "two", [monitor, Count()], max_steps=12, log_every_n_steps=12)
    assert runs_in_first_batch == [1, ran + 1]


def test_a_parts_run_in_the_first_batch_does_not_set_what_it_is_expected_to_cost(tmp_path, fake_clock, monkeypatch):
    """A part whose first run (in the first batch) carries its one-offs is measured anew once the budget starts:
    the between-logging-steps NaN/Inf check, 2 s on its first call and 1 ms after, keeps running under a 3 %
    budget of 1 s batches (judged by its 2 s first run, it would wait 66 s of training)."""
    ran = []

    class Clock(Callback):
        def on_train_batch_start(self, trainer, *args) -> None:
            fake_clock[0] += 1.0  # 1 s a batch

    monitor = GradientMonitor(histograms=False)
    original = NonfiniteLedger.queue

    def queue(self, *args, **kwargs):
        ran.append(monitor._batches)
        fake_clock[0] += 2.0 if len(ran) == 1 else 0.001  # the check's own cost, on the fake clock
        return original(self, *args, **kwargs)

    monkeypatch.setattr(NonfiniteLedger, "queue", queue)
    _fit(tmp_path, [Clock(), monitor], max_steps=12, log_every_n_steps=12)
    assert ran[0] == 1 and monitor._watch_part.cost == pytest.approx(0.001)  # measured after the start, not 2 s
    assert len(ran) >= 8, ran  # 30 ms of budget per 1 s batch: the 1 ms check fits at most quiet steps
