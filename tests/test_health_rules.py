"""HealthMonitor's rules without a fit: each condition on exact sequences (once per episode, again after it
cleared), the option and rule checks, rules from YAML (a file for replay, a LightningCLI config), the command."""

from __future__ import annotations

import math

import pytest
from helpers import callback_from_cli_yaml

from lightning_monitor import HealthMonitor
from lightning_monitor._health.engine import Engine
from lightning_monitor._health.replay import load_options
from lightning_monitor._health.rules import DEFAULT_NAMES, Rule, build_rules, user_rule


def _run(rule: Rule, values: list[float], key: str = "x") -> list[int]:
    """The steps (0, 1, 2, ...) at which ``rule`` alerts over ``values`` of ``key``."""
    engine = Engine([rule])
    return [a.step for step, v in enumerate(values) for a in engine.evaluate(step, {key: v}).alerts]


def test_above_with_patience_alerts_once_per_episode():
    rule = Rule("hot", ("x",), "above", 1.0, patience=2)
    #          0  1  2  3  4  5  6  7  8  9
    values = [0, 2, 0, 2, 2, 2, 2, 0, 2, 2]
    assert _run(rule, values) == [4, 9]  # two in a row: step 4; stays firing to 6; cleared at 7; again at 9


def test_state_per_evaluation_and_a_key_never_logged():
    engine = Engine([Rule("hot", ("x",), "above", 1.0)])
    assert engine.evaluate(0, {"y": 5.0}).judged == {}  # its key is not there: not judged at all
    first = engine.evaluate(1, {"x": 5.0})
    assert first.judged == {"hot": 1} and [a.rule for a in first.alerts] == ["hot"]
    assert engine.evaluate(2, {"x": 5.0}).alerts == []  # the same episode
    assert engine.evaluate(3, {"x": 0.0}).judged == {"hot": 0}
    assert engine.alert_count == 1 and engine.states["hot"].alerts == 1


def test_first_present_key_is_read():
    rule = Rule("rss", ("m_max", "m"), "above", 1.0)
    engine = Engine([rule])
    (alert,) = engine.evaluate(0, {"m": 0.5, "m_max": 2.0}).alerts
    assert alert.key == "m_max" and alert.value == 2.0 and alert.threshold == 1.0
    assert "m_max = 2 > 1" in alert.message


def test_non_finite_and_below():
    assert _run(Rule("nan", ("x",), "non_finite"), [1, math.nan, math.nan, 1, math.inf]) == [1, 4]
    assert _run(Rule("low", ("x",), "below", 0.5), [1, 0.2, 0.9, 0.1]) == [1, 3]
    alert = Engine([Rule("nan", ("x",), "non_finite")]).evaluate(3, {"x": math.nan}).alerts[0]
    assert alert.record(12.5) == {"step": 3, "time": 12.5, "rule": "nan", "key": "x", "value": "nan",
                                  "threshold": None, "message": "x non finite (x = nan)", "action": "warn"}


def test_spike_is_a_robust_z_score_upwards_only():
    rule = Rule("spike", ("x",), "spike", 8.0, window=10)
    noisy = [1.0, 1.1, 0.9, 1.05, 0.95] * 4  # median 1, MAD 0.05: scale 0.0741
    assert _run(rule, noisy) == []
    assert _run(rule, noisy + [1.5]) == []  # z = 0.5 / 0.0741 = 6.7 < 8
    assert _run(rule, noisy + [1.7]) == [20]  # z = 9.4
    assert _run(rule, noisy + [0.0]) == []  # a drop is no spike
    assert _run(rule, [1.0, 50.0] + noisy) == []  # fewer than half a window before it: not judged
    assert _run(rule, noisy + [math.nan, 1.0]) == []  # a NaN neither spikes nor enters the window


def test_spike_threshold_in_the_message_and_level():
    rule = Rule("spike", ("x",), "spike", 8.0, window=10)
    engine = Engine([rule])
    for step, value in enumerate([1.0, 1.1, 0.9, 1.05, 0.95] * 2):
        engine.evaluate(step, {"x": value})
    (alert,) = engine.evaluate(10, {"x": 50.0}).alerts
    assert alert.value == 50.0 and alert.threshold == pytest.approx(1.0 + 8.0 * 1.4826 * 0.05)
    assert "robust z-score" in alert.message and "median 1 of its last 10 values" in alert.message


def test_rising_needs_a_steady_rise_over_a_full_window():
    rule = Rule("leak", ("x",), "rising", 0.5, window=5)
    assert _run(rule, [0.0, 0.2, 0.4, 0.6, 0.8]) == [4]  # rise 0.8 > 0.5, every step up
    assert _run(rule, [0.0, 0.1, 0.2, 0.3]) == []  # not a full window yet
    assert _run(rule, [0.0, 0.1, 0.2, 0.3, 0.4]) == []  # rise 0.4
    assert _run(rule, [0.0, 0.0, 0.0, 0.0, 2.0]) == []  # one jump is no leak (up in 1 of 4)


def test_drop_against_the_runs_median_and_not_improving():
    drop = Rule("slow", ("x",), "drop", 0.5, patience=2)
    assert _run(drop, [100, 100, 100, 100, 100, 40, 40, 100, 40, 40]) == [6, 9]
    assert _run(drop, [40, 40, 100, 100, 100]) == []  # fewer than 5 values before: not judged
    stuck = Rule("plateau", ("v",), "not_improving", patience=3)
    #        0    1    2    3    4    5    6    7
    val = [1.0, 0.8, 0.9, 0.85, 0.8, 0.9, 0.7, 0.75]
    assert _run(stuck, val, "v") == [4]  # best 0.8 at step 1; no better at 2, 3, 4; 0.7 at 6 clears it
    maximise = Rule("acc", ("v",), "not_improving", patience=2, mode="max", min_delta=0.05)
    assert _run(maximise, [0.5, 0.52, 0.54, 0.7], "v") == [2]  # +0.02, +0.04 are within min_delta


def test_user_rules_from_mappings():
    rule = user_rule({"key": "val_loss", "rule": "not_improving", "patience": 5})
    assert rule == Rule("val_loss_not_improving", ("val_loss",), "not_improving", patience=5)
    named = user_rule({"key": "train/acc", "rule": "below", "threshold": 0.2, "action": "stop", "name": "acc_low",
                       "message": "accuracy collapsed"})
    assert (named.name, named.threshold, named.action, named.describe()) == ("acc_low", 0.2, "stop",
                                                                             "accuracy collapsed")
    assert user_rule({"key": "a/b", "rule": "spike", "threshold": 5}).name == "a_b_spike"


@pytest.mark.parametrize("spec, error, match", [
    ({"key": "x", "rule": "sideways"}, ValueError, r"`rules\[0\].rule` must be one of"),
    ({"key": "x", "rule": "above"}, ValueError, "needs a `threshold`"),
    ({"rule": "above", "threshold": 1}, ValueError, "needs a `key`"),
    ({"key": "x", "rule": "above", "threshold": "high"}, TypeError, r"`rules\[0\].threshold` must be a number"),
    ({"key": "x", "rule": "above", "threshold": 1, "patience": 0}, ValueError, r"patience` must be an integer >= 1"),
    ({"key": "x", "rule": "above", "threshold": 1, "action": "panic"}, ValueError, r"action` must be one of"),
    ({"key": "x", "rule": "above", "threshold": 1, "colour": "red"}, ValueError, r"unknown fields \['colour'\]"),
    ({"key": "x", "rule": "above", "threshold": 1, "name": "alerts"}, ValueError, "lower_snake_case and not one"),
    ({"key": "x", "rule": "drop", "threshold": 1.5}, ValueError, "share of the median lost"),
    ("x above 1", TypeError, "must be a mapping"),
])
def test_a_bad_rule_is_refused_naming_it(spec, error, match):
    with pytest.raises(error, match=match):
        HealthMonitor(rules=[spec])


@pytest.mark.parametrize("kwargs, error, match", [
    ({"spike_z": 0}, ValueError, "`spike_z` must be a number > 0.0"),
    ({"spike_window": 2.5}, TypeError, "`spike_window` must be an integer"),
    ({"data_wait_share": 1.5}, ValueError, "`data_wait_share`"),
    ({"throughput_drop": 1.0}, ValueError, "`throughput_drop`"),
    ({"straggler_ratio": 1.0}, ValueError, "`straggler_ratio`"),
    ({"disable": ["nope"]}, ValueError, "`disable` names no default rule"),
    ({"actions": {"nope": "stop"}}, ValueError, "`actions` names no rule"),
    ({"actions": {"loss_spike": "panic"}}, ValueError, "one of"),
    ({"defaults": 1}, TypeError, "`defaults` must be True or False"),
    ({"filename": "a/b.jsonl"}, ValueError, "`filename`"),
    ({"rules": [{"key": "x", "rule": "above", "threshold": 1, "name": "loss_spike"}]}, ValueError, "two rules"),
])
def test_a_bad_option_is_refused_naming_it(kwargs, error, match):
    with pytest.raises(error, match=match):
        HealthMonitor(**kwargs)


def test_defaults_disable_and_actions():
    assert [r.name for r in HealthMonitor().health_rules] == list(DEFAULT_NAMES)
    monitor = HealthMonitor(rules=[{"key": "val_loss", "rule": "not_improving", "patience": 5}],
                            disable=["throughput_drop", "straggler"], actions={"nonfinite_loss": "stop"},
                            loss_key="my_loss")
    names = [r.name for r in monitor.health_rules]
    assert "throughput_drop" not in names and names[-1] == "val_loss_not_improving"
    rules = {r.name: r for r in monitor.health_rules}
    assert rules["nonfinite_loss"].action == "stop" and rules["nonfinite_loss"].keys == ("my_loss",)
    assert [r.name for r in HealthMonitor(defaults=False).health_rules] == []


def test_rules_file_forms(tmp_path):
    listed = tmp_path / "list.yaml"
    listed.write_text("- {key: val_loss, rule: not_improving, patience: 5}\n")
    assert load_options(str(listed)) == {"rules": [{"key": "val_loss", "rule": "not_improving", "patience": 5}]}
    options = tmp_path / "options.yaml"
    options.write_text("spike_z: 4\ndisable: [straggler]\nfilename: x.jsonl\n")
    assert load_options(str(options)) == {"spike_z": 4, "disable": ["straggler"]}  # live-only options ignored
    cli = tmp_path / "cli.yaml"
    cli.write_text("class_path: lightning_monitor.HealthMonitor\ninit_args:\n  leak_gib: 1.0\n")
    assert load_options(str(cli)) == {"leak_gib": 1.0}
    assert len(build_rules(**load_options(str(options)))) == len(DEFAULT_NAMES) - 1
    bad = tmp_path / "bad.yaml"
    bad.write_text("spike: 4\n")
    with pytest.raises(ValueError, match=r"HealthMonitor has no option \['spike'\]"):
        load_options(str(bad))


def test_lightning_cli_builds_it_from_yaml(tmp_path):
    monitor = callback_from_cli_yaml(tmp_path, HealthMonitor, (
        "        rules:\n"
        "          - {key: val_loss, rule: not_improving, patience: 5}\n"
        "          - {key: train/acc, rule: below, threshold: 0.2, patience: 3, action: stop}\n"
        "        actions: {nonfinite_loss: stop}\n"
        "        spike_z: 6.0\n"
    ))
    rules = {r.name: r for r in monitor.health_rules}
    assert rules["val_loss_not_improving"].patience == 5
    assert rules["train_acc_below"].action == "stop" and rules["nonfinite_loss"].action == "stop"
    assert rules["loss_spike"].threshold == 6.0


def test_the_command_has_subcommands_and_reports_a_bad_run_dir(tmp_path, capsys):
    from lightning_monitor.command import main

    with pytest.raises(SystemExit):
        main([])
    assert main(["replay", str(tmp_path)]) == 2
    assert "no TensorBoard event file" in capsys.readouterr().err
