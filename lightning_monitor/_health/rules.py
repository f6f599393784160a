"""HealthMonitor's rules: what a rule is (:class:`Rule`), the rules on by default (:func:`default_rules`) and a
user's rule from a plain mapping, as Python or a YAML file gives it (:func:`user_rule`).

A rule watches one logged key (the first of its ``keys`` present in an evaluation: a default rule names the
cross-rank ``_max`` of a per-rank value before the value itself), tests one condition on it, and fires when the
condition has held for ``patience`` evaluations in a row. This module imports nothing of the package but the option
checks, so the live monitor and ``lightning-monitor replay`` build the same rules from the same options.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, replace
from typing import Any, Optional

from lightning_monitor._core import options as _options

#: what a rule tests on its key's values (one evaluation per logged value)
CONDITIONS = ("above", "below", "non_finite", "spike", "rising", "not_improving", "drop")
#: what an alert does besides being reported: ``warn`` (report only), ``stop`` (end the fit cleanly), ``raise``
ACTIONS = ("warn", "stop", "raise")
#: keys HealthMonitor logs that are not a rule's state (a rule may not take these names)
RESERVED = ("alerts", "alert_text")
_NAME = re.compile(r"^[a-z][a-z0-9_]*$")

#: the keys a user's training loss is looked for under when ``loss_key`` is not given, in this order
LOSS_KEYS = ("train/loss", "train_loss", "loss", "train/loss_step", "train_loss_step")
#: the points the backends dropped or refused since the last evaluation: not a logged key, the count the writers'
#: failure guard keeps, which HealthMonitor adds to each evaluation (live only: replay has no such count)
DROPPED_KEY = "run/dropped_points"


@dataclass(frozen=True)
class Rule:
    """One health rule. ``threshold``: the bound of ``above``/``below``, the robust z-score of ``spike``, the rise
    over the window of ``rising``, the share of the run's median lost by ``drop``; ``window``: how many earlier
    values ``spike`` and ``rising`` look at; ``patience``: evaluations in a row the condition must hold (for
    ``not_improving``: evaluations without a new best); ``min_delta`` and ``mode`` (``min``/``max``): what counts as
    an improvement; ``what``: the rule in words, the start of its message."""

    name: str
    keys: tuple[str, ...]
    condition: str
    threshold: float = 0.0
    window: int = 20
    patience: int = 1
    min_delta: float = 0.0
    mode: str = "min"
    action: str = "warn"
    what: str = ""

    def describe(self) -> str:
        """The rule in words: ``what`` or a sentence made from its fields."""
        if self.what:
            return self.what
        return f"{self.keys[0]} {self.condition.replace('_', ' ')}"


def rule_name(key: str, condition: str) -> str:
    """The name of a user's rule that gives none: ``val_loss_not_improving`` (lower snake case, ``/`` as ``_``)."""
    name = re.sub(r"[^a-z0-9_]+", "_", f"{key}_{condition}".lower()).strip("_")
    return re.sub(r"_+", "_", name) if name and name[0].isalpha() else f"rule_{name}"


def user_rule(spec: Any, index: int = 0) -> Rule:
    """A rule from a user's mapping, as written in Python or YAML::

        {"key": "val_loss", "rule": "not_improving", "patience": 5}
        {"key": "train/acc", "rule": "below", "threshold": 0.2, "patience": 3, "action": "stop", "name": "acc_low"}

    Fields: ``key`` and ``rule`` (one of :data:`CONDITIONS`) required; ``threshold`` (required for ``above``,
    ``below``, ``spike``, ``rising``, ``drop``), ``window``, ``patience``, ``min_delta``, ``mode``, ``action``,
    ``name``, ``message`` optional.

    Raises:
        TypeError: ``spec`` is not a mapping, or a field has the wrong type.
        ValueError: an unknown field, condition, action or mode, a missing field, a bad name.
    """
    if isinstance(spec, Rule):
        return check_rule(spec)
    where = f"rules[{index}]"
    if not isinstance(spec, Mapping):
        raise TypeError(f"`{where}` must be a mapping such as {{'key': 'val_loss', 'rule': 'not_improving'}},"
                        f" got {spec!r}")
    allowed = {"key", "rule", "threshold", "window", "patience", "min_delta", "mode", "action", "name", "message"}
    unknown = sorted(set(spec) - allowed)
    if unknown:
        raise ValueError(f"`{where}` has unknown fields {unknown}; a rule takes {sorted(allowed)}")
    for field in ("key", "rule"):
        if field not in spec:
            raise ValueError(f"`{where}` needs a `{field}`, got {dict(spec)!r}")
    key, condition = spec["key"], spec["rule"]
    if not isinstance(key, str) or not key:
        raise TypeError(f"`{where}.key` must be a logged key such as 'val_loss', got {key!r}")
    condition = _options.check_choice(f"{where}.rule", condition, CONDITIONS)
    if condition in ("above", "below", "spike", "rising", "drop") and spec.get("threshold") is None:
        raise ValueError(f"`{where}` ({condition} on {key!r}) needs a `threshold`")
    rule = Rule(
        name=spec.get("name") or rule_name(key, condition),
        keys=(key,),
        condition=condition,
        threshold=0.0 if spec.get("threshold") is None else spec["threshold"],
        window=spec.get("window", 20),
        patience=spec.get("patience", 1),
        min_delta=spec.get("min_delta", 0.0),
        mode=spec.get("mode", "min"),
        action=spec.get("action", "warn"),
        what=spec.get("message", ""),
    )
    return check_rule(rule, where)


def check_rule(rule: Rule, where: Optional[str] = None) -> Rule:
    """``rule`` with its fields checked (and normalised: ``int``/``float``), else the option error naming it."""
    where = where or f"rule {rule.name!r}"
    if not isinstance(rule.name, str) or not _NAME.match(rule.name) or rule.name in RESERVED:
        raise ValueError(f"`{where}.name` must be lower_snake_case and not one of {RESERVED}, got {rule.name!r}")
    _options.check_choice(f"{where}.rule", rule.condition, CONDITIONS)
    threshold = _options.check_number(f"{where}.threshold", rule.threshold)
    if rule.condition == "drop" and not 0 < threshold < 1:
        raise ValueError(f"`{where}.threshold` of a drop is the share of the median lost, in (0, 1); got {threshold}")
    window = _options.check_int(f"{where}.window", rule.window, low=3)
    patience = _options.check_int(f"{where}.patience", rule.patience, low=1)
    min_delta = _options.check_number(f"{where}.min_delta", rule.min_delta, low=0.0)
    mode = _options.check_choice(f"{where}.mode", rule.mode, ("min", "max"))
    action = _options.check_choice(f"{where}.action", rule.action, ACTIONS)
    if not isinstance(rule.what, str):
        raise TypeError(f"`{where}.message` must be text, got {rule.what!r}")
    return replace(rule, threshold=threshold, window=window, patience=patience, min_delta=min_delta, mode=mode,
                   action=action)


def _per_rank(key: str) -> tuple[str, ...]:
    """A per-rank value's keys, worst rank first: the cross-rank ``_max`` (world size > 1), then the value."""
    return (f"{key}_max", key)


#: the default rules' names, in the order they are evaluated (the ``disable`` and ``actions`` options name them)
DEFAULT_NAMES = ("nonfinite_loss", "nonfinite_grad", "loss_spike", "grad_spike", "input_bound", "near_oom",
                 "alloc_retries", "host_memory_leak", "throughput_drop", "straggler", "dropped_points")


def default_rules(
    *, loss_key: Optional[str] = None, spike_z: float = 8.0, spike_window: int = 20, data_wait_share: float = 0.5,
    data_wait_windows: int = 3, oom_share: float = 0.95, leak_gib: float = 0.5, leak_window: int = 20,
    throughput_drop: float = 0.5, throughput_windows: int = 3, straggler_ratio: float = 1.5,
    straggler_windows: int = 3,
) -> list[Rule]:
    """The rules on by default, each threshold from its option (HealthMonitor's options of the same names).

    Raises:
        TypeError, ValueError: an option of the wrong type or out of range, named.
    """
    if loss_key is not None and (not isinstance(loss_key, str) or not loss_key):
        raise TypeError(f"`loss_key` must be None or a logged key such as 'train/loss', got {loss_key!r}")
    spike_z = _options.check_number("spike_z", spike_z, above=0.0)
    spike_window = _options.check_int("spike_window", spike_window, low=3)
    data_wait_share = _options.check_number("data_wait_share", data_wait_share, above=0.0, high=1.0)
    data_wait_windows = _options.check_int("data_wait_windows", data_wait_windows, low=1)
    oom_share = _options.check_number("oom_share", oom_share, above=0.0, high=1.0)
    leak_gib = _options.check_number("leak_gib", leak_gib, above=0.0)
    leak_window = _options.check_int("leak_window", leak_window, low=3)
    throughput_drop = _options.check_number("throughput_drop", throughput_drop, above=0.0)
    if throughput_drop >= 1.0:
        raise ValueError(f"`throughput_drop` must be a share of the median lost, in (0, 1), got {throughput_drop}")
    throughput_windows = _options.check_int("throughput_windows", throughput_windows, low=1)
    straggler_ratio = _options.check_number("straggler_ratio", straggler_ratio, above=1.0)
    straggler_windows = _options.check_int("straggler_windows", straggler_windows, low=1)
    loss = (loss_key,) if loss_key else LOSS_KEYS
    return [
        Rule("nonfinite_loss", loss, "non_finite", what="the training loss is NaN/Inf"),
        Rule("nonfinite_grad", ("grad/nonfinite_steps", "grad/nonfinite_count"), "above", 0.0,
             what="gradients had NaN/Inf"),
        Rule("loss_spike", loss, "spike", spike_z, window=spike_window, what="the training loss spiked"),
        Rule("grad_spike", ("grad/norm_total",), "spike", spike_z, window=spike_window,
             what="the gradient norm spiked"),
        Rule("input_bound", _per_rank("time/data_wait_share"), "above", data_wait_share, patience=data_wait_windows,
             what="training waits for its input data"),
        Rule("near_oom", _per_rank("memory/cuda/peak_reserved_share"), "above", oom_share,
             what="device memory is nearly full"),
        Rule("alloc_retries", _per_rank("memory/cuda/alloc_retries"), "above", 0.0,
             what="the CUDA allocator had to free its cache to allocate (memory pressure)"),
        Rule("host_memory_leak", _per_rank("memory/host/rss_gib"), "rising", leak_gib, window=leak_window,
             what="host memory rises steadily (a leak?)"),
        Rule("throughput_drop", ("throughput/samples_per_sec",), "drop", throughput_drop,
             patience=throughput_windows, what="throughput dropped below the run's median"),
        Rule("straggler", ("time/straggler_ratio",), "above", straggler_ratio, patience=straggler_windows,
             what="one rank is slower than the others (a straggler)"),
        Rule("dropped_points", (DROPPED_KEY,), "above", 0.0, what="a backend dropped or refused logged points"),
    ]


def build_rules(
    rules: Optional[Sequence[Any]] = None, *, defaults: bool = True, disable: Optional[Sequence[str]] = None,
    actions: Optional[Mapping[str, str]] = None, **thresholds: Any,
) -> list[Rule]:
    """Every rule of a HealthMonitor: the default rules (unless ``defaults=False``) less those ``disable`` names,
    then the user's ``rules``; ``actions`` sets the action of any of them by name.

    Raises:
        ValueError: a ``disable`` or ``actions`` entry naming no rule, two rules of one name, a bad action.
    """
    _options.check_bool("defaults", defaults)
    if isinstance(disable, str) or not all(isinstance(n, str) for n in disable or ()):
        raise TypeError(f"`disable` must be None or a list of rule names, got {disable!r}")
    if actions is not None and not isinstance(actions, Mapping):
        raise TypeError(f"`actions` must be None or a mapping rule name -> action, got {actions!r}")
    if isinstance(rules, (str, Mapping)):
        raise TypeError(f"`rules` must be None or a list of rules, got {rules!r}")
    out = default_rules(**thresholds)  # checked even when off: a wrong option is wrong either way
    out = [r for r in out if r.name not in set(disable or ())] if defaults else []
    out += [user_rule(spec, i) for i, spec in enumerate(rules or ())]
    names = [r.name for r in out]
    twice = sorted({n for n in names if names.count(n) > 1})
    if twice:
        raise ValueError(f"two rules are named {twice}: give a user rule its own `name`")
    unknown = sorted(set(disable or ()) - set(DEFAULT_NAMES))
    if unknown:
        raise ValueError(f"`disable` names no default rule: {unknown}; the default rules are {list(DEFAULT_NAMES)}")
    for name, action in (actions or {}).items():
        if name not in names:
            raise ValueError(f"`actions` names no rule: {name!r}; the rules are {names}")
        _options.check_choice(f"actions[{name!r}]", action, ACTIONS)
    return [replace(r, action=(actions or {}).get(r.name, r.action)) for r in out]
