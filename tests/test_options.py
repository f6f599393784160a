"""Every monitor's (and RunSummary's) numeric and flag options go through one check
(``lightning_monitor._core.options``): a wrong type is a ``TypeError``, a value out of range a ``ValueError``, both
naming the option and echoing the value;
valid values pass."""

from __future__ import annotations

import re
from typing import Any

import pytest

from lightning_monitor import (
    ActivationMonitor,
    GradientMonitor,
    MemoryMonitor,
    PredictionGridMonitor,
    RunSummary,
    SpeedMonitor,
    StallMonitor,
)
from lightning_monitor._core import options as _options

#: (class, option, a valid value, a value out of range) for every integer option (counts included)
INTEGERS = [
    (cls, "every_n_steps", 3, 0) for cls in (GradientMonitor, MemoryMonitor, SpeedMonitor, PredictionGridMonitor,
                                             ActivationMonitor)
] + [
    (GradientMonitor, "group_depth", 0, -1),
    (GradientMonitor, "bins", 512, 513),
    (GradientMonitor, "max_hist_elements", 1, 0),
    (GradientMonitor, "max_histograms", 0, -1),
    (GradientMonitor, "max_param_keys", 0, -1),
    (SpeedMonitor, "warmup_steps", 0, -1),
    (SpeedMonitor, "max_measured_shapes", 1, 0),
    (PredictionGridMonitor, "num_samples", 1, 0),
    (PredictionGridMonitor, "nrow", 1, 0),
    (PredictionGridMonitor, "tile_size", 8, 7),
    (PredictionGridMonitor, "padding", 0, -1),
    (PredictionGridMonitor, "dataloader_idx", 0, -1),
    (StallMonitor, "exit_code", 1, 0),
    (ActivationMonitor, "max_modules", 0, -1),
    (ActivationMonitor, "bins", 512, 513),
    (ActivationMonitor, "max_hist_elements", 1, 0),
]
#: the same for the number options (floats; an int is a number too)
NUMBERS = [
    (MemoryMonitor, "warn_share", 0.5, 0),
    (MemoryMonitor, "nvml_interval_sec", 1, -1.0),
    (SpeedMonitor, "flops_per_batch", 1e9, -1.0),
    (SpeedMonitor, "peak_flops_per_sec", 1e12, 0.0),
    (StallMonitor, "timeout", 0.5, 0.0),
    (StallMonitor, "min_timeout", 1, -1.0),
    (StallMonitor, "step_factor", 2.5, 0.0),
]
#: the flags: True or False only
FLAGS = [
    (GradientMonitor, name) for name in ("per_param_norms", "param_norms", "update_ratio", "histograms",
                                         "param_histograms")
] + [(MemoryMonitor, "nvml"), (SpeedMonitor, "measure_flops"), (PredictionGridMonitor, "mistakes_first"),
     (RunSummary, "print_table"), (RunSummary, "use_rich"), (StallMonitor, "print_alerts"),
     (ActivationMonitor, "histograms")]


def _id(case: tuple[Any, ...]) -> str:
    return f"{case[0].__name__}-{case[1]}"


def _raises(error: type[Exception], cls: type, option: str, value: Any) -> None:
    with pytest.raises(error, match=rf"^`{option}` must be .*, got {re.escape(repr(value))}$"):
        cls(**{option: value})


@pytest.mark.parametrize("case", INTEGERS, ids=_id)
def test_an_integer_option_refuses_a_float_a_bool_and_a_value_out_of_range(case):
    cls, option, good, bad = case
    _raises(TypeError, cls, option, 2.5)
    _raises(TypeError, cls, option, True)
    _raises(TypeError, cls, option, "3")
    _raises(ValueError, cls, option, bad)
    _raises(ValueError, cls, option, -5)
    assert getattr(cls(**{option: good}), option) == good


@pytest.mark.parametrize("case", NUMBERS, ids=_id)
def test_a_number_option_refuses_text_a_bool_and_a_value_out_of_range(case):
    cls, option, good, bad = case
    _raises(TypeError, cls, option, "high")
    _raises(TypeError, cls, option, True)
    _raises(ValueError, cls, option, bad)
    _raises(ValueError, cls, option, -2.5)
    _raises(ValueError, cls, option, float("nan"))
    assert getattr(cls(**{option: good}), option) == good


@pytest.mark.parametrize("case", FLAGS, ids=_id)
def test_a_flag_is_true_or_false(case):
    cls, option = case
    _raises(TypeError, cls, option, 1)
    _raises(TypeError, cls, option, "yes")
    assert getattr(cls(**{option: False}), option) is False


def test_the_messages_say_what_the_option_accepts():
    cases = [
        (dict(bins=2.5), TypeError, "`bins` must be an integer in 1..512, got 2.5"),
        (dict(max_histograms=-1), ValueError, "`max_histograms` must be None or an integer >= 0, got -1"),
        (dict(every_n_steps=True), TypeError, "`every_n_steps` must be None or an integer >= 1, got True"),
        (dict(nonfinite="ignore"), ValueError, "`nonfinite` must be one of ('warn', 'raise', 'skip'), got 'ignore'"),
    ]
    for kwargs, error, message in cases:
        with pytest.raises(error, match=f"^{re.escape(message)}$"):
            GradientMonitor(**kwargs)
    with pytest.raises(TypeError, match=re.escape("`use_rich` must be None or True or False, got 1")):
        RunSummary(use_rich=1)


def test_the_checks_return_what_they_checked():
    assert _options.check_int("n", 3, low=1) == 3 and _options.check_int("n", None, none_ok=True) is None
    assert _options.check_count("n", 0) == 0
    value = _options.check_number("x", 2, above=0)
    assert value == 2.0 and isinstance(value, float)
    assert _options.check_number("x", 1.0, low=0, high=1) == 1.0
    with pytest.raises(ValueError, match=re.escape("`x` must be a number in 0..1, got 1.5")):
        _options.check_number("x", 1.5, low=0, high=1)
    with pytest.raises(ValueError, match=re.escape("`x` must be a number > 0 and <= 1, got 0")):
        _options.check_number("x", 0, above=0, high=1)
    assert _options.check_choice("c", "b", ("a", "b")) == "b"
    with pytest.raises(ValueError, match=re.escape("`c` must be one of (0, 1), got True")):
        _options.check_choice("c", True, (0, 1))  # True == 1, but it is no choice
