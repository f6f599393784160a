"""The rule engine HealthMonitor runs live and ``lightning-monitor replay`` runs over a finished run's files: the
same :class:`Engine` fed the same values step by step gives the same alerts, word for word.

One evaluation takes the values logged at one step (key -> number, already on the host). Each rule whose key is
among them judges its condition on that value; a rule fires when the condition has held ``patience`` evaluations
in a row, and an :class:`Alert` is made when it starts firing: once per episode, again only after an evaluation in
which the condition did not hold. Everything is plain Python on a few numbers per rule and step.
"""

from __future__ import annotations

import math
from collections import deque
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Optional

import numpy as np

from lightning_monitor._health.rules import Rule

#: robust z-score: 1.4826 x the median absolute deviation estimates the standard deviation of normal data
_MAD_TO_SIGMA = 1.4826
#: values a ``drop`` rule keeps for the run's median (the most recent ones)
_DROP_HISTORY = 1000
#: values a ``drop`` rule needs before it judges (the median of fewer says little)
_DROP_MIN = 5


@dataclass(frozen=True)
class Alert:
    """A rule that started firing at ``step``: ``value`` and ``threshold`` are the two numbers it compared (the
    threshold is ``None`` for a NaN/Inf), ``message`` says it in words."""

    step: int
    rule: str
    key: str
    value: float
    threshold: Optional[float]
    message: str
    action: str

    def line(self) -> str:
        """The alert as one terminal line."""
        return f"lightning-monitor: ALERT {self.rule} at step {self.step}: {self.message}"

    def record(self, time: float) -> dict[str, Any]:
        """The alert as one JSON object (``alerts.jsonl``; non-finite numbers as the strings ``nan``/``inf``)."""
        return {"step": self.step, "time": time, "rule": self.rule, "key": self.key, "value": _json(self.value),
                "threshold": _json(self.threshold), "message": self.message, "action": self.action}


def _json(value: Optional[float]) -> Any:
    return value if value is None or math.isfinite(value) else str(value)


@dataclass
class _State:
    """What one rule remembers between evaluations."""

    streak: int = 0  # evaluations in a row in which the condition held
    firing: bool = False
    alerts: int = 0
    history: deque = field(default_factory=deque)  # earlier (step, value) pairs, as the condition needs them
    best: Optional[tuple[int, float]] = None  # not_improving: the best (step, value) so far
    since_best: int = 0


@dataclass
class Evaluation:
    """What one evaluation found: the alerts it made and the state (1 firing, 0 not) of every rule it judged."""

    alerts: list[Alert] = field(default_factory=list)
    judged: dict[str, int] = field(default_factory=dict)


class Engine:
    """The rules and their state over one run (one fit)."""

    def __init__(self, rules: Sequence[Rule]) -> None:
        self.rules = list(rules)
        self.states = {rule.name: _State() for rule in self.rules}
        #: alerts made so far (all rules)
        self.alert_count = 0

    def evaluate(self, step: int, values: Mapping[str, float]) -> Evaluation:
        """Judge every rule whose key is among ``values`` (the numbers logged at ``step``)."""
        out = Evaluation()
        for rule in self.rules:
            key = next((k for k in rule.keys if k in values), None)
            if key is None:
                continue
            state = self.states[rule.name]
            verdict = _judge(rule, state, key, step, float(values[key]))
            state.streak = state.streak + 1 if verdict is not None else 0
            was, state.firing = state.firing, verdict is not None and state.streak >= _needed(rule)
            out.judged[rule.name] = int(state.firing)
            if state.firing and not was and verdict is not None:
                state.alerts += 1
                self.alert_count += 1
                value, threshold, detail = verdict
                out.alerts.append(Alert(step, rule.name, key, value, threshold, f"{rule.describe()} ({detail})",
                                        rule.action))
        return out

    def state_dict(self) -> dict[str, Any]:
        """What the rules remember (streaks, episodes, windows, bests) and the alert count, as plain containers (a
        checkpoint loads them with ``weights_only``)."""
        return {"alert_count": self.alert_count, "rules": {
            name: {"streak": st.streak, "firing": st.firing, "alerts": st.alerts, "since_best": st.since_best,
                   "best": None if st.best is None else tuple(st.best),
                   "history": [tuple(h) if isinstance(h, (tuple, list)) else h for h in st.history]}
            for name, st in self.states.items()}}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Take up :meth:`state_dict`'s state: the rules of the same name continue (a window longer than the rule's
        now is cut to it); a rule not in ``state`` starts afresh, one no longer here is left out."""
        self.alert_count = int(state.get("alert_count", 0))
        saved = state.get("rules", {})
        for rule in self.rules:
            if rule.name not in saved:
                continue
            got = saved[rule.name]
            keep = _DROP_HISTORY if rule.condition == "drop" else rule.window
            history = [tuple(h) if isinstance(h, (tuple, list)) else float(h) for h in got.get("history", [])]
            best = got.get("best")
            self.states[rule.name] = _State(
                streak=int(got.get("streak", 0)), firing=bool(got.get("firing", False)),
                alerts=int(got.get("alerts", 0)), history=deque(history[-keep:]),
                best=None if best is None else (int(best[0]), float(best[1])),
                since_best=int(got.get("since_best", 0)))


def _needed(rule: Rule) -> int:
    """Evaluations in a row the condition must hold (``not_improving`` counts its patience itself)."""
    return 1 if rule.condition == "not_improving" else rule.patience


def _g(x: float) -> str:
    return f"{x:.4g}"


def _held(rule: Rule, detail: str) -> str:
    return detail + (f" for {rule.patience} evaluations in a row" if rule.patience > 1 else "")


Verdict = Optional[tuple[float, Optional[float], str]]


def _judge(rule: Rule, state: _State, key: str, step: int, value: float) -> Verdict:
    """Whether ``rule``'s condition holds for ``value`` now: ``(value, threshold, detail)`` when it does, else
    ``None``; the state the condition keeps (its history, the best value) is updated either way."""
    t = rule.threshold
    finite = math.isfinite(value)
    if rule.condition == "non_finite":
        return (value, None, f"{key} = {value}") if not finite else None
    if rule.condition == "above":
        return (value, t, _held(rule, f"{key} = {_g(value)} > {_g(t)}")) if finite and value > t else None
    if rule.condition == "below":
        return (value, t, _held(rule, f"{key} = {_g(value)} < {_g(t)}")) if finite and value < t else None
    if not finite:  # a NaN/Inf is the non_finite rule's business: it neither spikes nor enters a history
        return None
    if rule.condition == "spike":
        return _spike(rule, state, key, value)
    if rule.condition == "rising":
        return _rising(rule, state, key, step, value)
    if rule.condition == "drop":
        return _drop(rule, state, key, value)
    return _not_improving(rule, state, key, step, value)


def _spike(rule: Rule, state: _State, key: str, value: float) -> Verdict:
    """Robust z-score of ``value`` against the median and MAD of the previous ``window`` values (from half a window
    on); only upward spikes count."""
    earlier = np.fromiter(state.history, dtype=np.float64)
    state.history.append(value)
    if len(state.history) > rule.window:
        state.history.popleft()
    if len(earlier) < max(3, rule.window // 2):
        return None
    median = float(np.median(earlier))
    scale = max(_MAD_TO_SIGMA * float(np.median(np.abs(earlier - median))), 1e-3 * abs(median), 1e-12)
    z = (value - median) / scale
    if z <= rule.threshold:
        return None
    level = median + rule.threshold * scale
    return value, level, _held(rule, f"{key} = {_g(value)}, robust z-score {z:.1f} > {_g(rule.threshold)}"
                                     f" against the median {_g(median)} of its last {len(earlier)} values")


def _rising(rule: Rule, state: _State, key: str, step: int, value: float) -> Verdict:
    """Over the last ``window`` values: the least-squares line rises by more than ``threshold`` from the first
    step to the last, and at least three in four steps between them go up (a steady rise, not one jump)."""
    state.history.append((step, value))
    if len(state.history) > rule.window:
        state.history.popleft()
    if len(state.history) < rule.window:
        return None
    steps = np.array([s for s, _ in state.history], dtype=np.float64)
    values = np.array([v for _, v in state.history], dtype=np.float64)
    span = steps[-1] - steps[0]
    if span <= 0:
        return None
    slope = float(np.polyfit(steps, values, 1)[0])
    rise = slope * span
    ups = float(np.mean(np.diff(values) > 0))
    if rise <= rule.threshold or ups < 0.75:
        return None
    return rise, rule.threshold, (f"{key} rose by {_g(rise)} over its last {len(values)} values (steps"
                                  f" {int(steps[0])}..{int(steps[-1])}, up in {ups:.0%} of them)"
                                  f" > {_g(rule.threshold)}")


def _drop(rule: Rule, state: _State, key: str, value: float) -> Verdict:
    """``value`` below ``1 - threshold`` of the median of the run's values so far (from the 5th value on)."""
    earlier = np.fromiter(state.history, dtype=np.float64)
    state.history.append(value)
    if len(state.history) > _DROP_HISTORY:
        state.history.popleft()
    if len(earlier) < _DROP_MIN:
        return None
    median = float(np.median(earlier))
    level = (1.0 - rule.threshold) * median
    if value >= level:
        return None
    return value, level, _held(rule, f"{key} = {_g(value)} < {_g(1.0 - rule.threshold)} x the run's median"
                                     f" {_g(median)}")


def _not_improving(rule: Rule, state: _State, key: str, step: int, value: float) -> Verdict:
    """No new best (lower for ``mode="min"``, by more than ``min_delta``) for ``patience`` evaluations."""
    sign = 1.0 if rule.mode == "min" else -1.0
    if state.best is None or sign * (state.best[1] - value) > rule.min_delta:
        state.best, state.since_best = (step, value), 0
        return None
    state.since_best += 1
    if state.since_best < rule.patience:
        return None
    best_step, best = state.best
    level = best - sign * rule.min_delta
    return value, level, (f"{key} = {_g(value)} has not improved on its best {_g(best)} (step {best_step})"
                          f" for {state.since_best} evaluations")
