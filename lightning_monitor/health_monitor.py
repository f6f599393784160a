"""HealthMonitor: rules over what is logged, judged at logging steps, and an alert when the run goes wrong."""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from dataclasses import replace
from functools import partial
from typing import Any, ClassVar, Optional

import lightning.pytorch as pl
from typing_extensions import override

from lightning_monitor._core.keys import document_keys
from lightning_monitor._health import report as _report
from lightning_monitor._health.engine import Alert, Engine
from lightning_monitor._health.rules import DROPPED_KEY, Rule, build_rules
from lightning_monitor._health.tap import Pending, Tap
from lightning_monitor._monitor import dispatch as _dispatch
from lightning_monitor._monitor.base import Monitor
from lightning_monitor.run_summary import run_dir

#: how much an action does, least first (the strongest of a logging step's alerts is taken)
_SEVERITY = {"warn": 0, "stop": 1, "raise": 2}


class HealthAlertError(RuntimeError):
    """Raised by HealthMonitor for an alert of a rule whose action is ``raise``."""


@document_keys
class HealthMonitor(Monitor):
    """Judges the run at its logging steps: NaN/Inf, loss and gradient spikes, a starved input pipeline, nearly full
    device memory, a host memory leak, a throughput drop, a straggler rank, points a backend dropped or refused, and
    rules of your own; alerts once per episode.

    The rules read the numbers every logger already received at that step, on the host: the monitors' keys
    (GradientMonitor, MemoryMonitor, SpeedMonitor) and the model's own ``self.log`` values. HealthMonitor adds an
    in-memory logger of its own at the end of ``trainer.loggers`` for the fit (Lightning hands it the same numbers
    as the others; it is removed at the fit's end), so it makes no host-device sync and no collective of its own;
    under DDP a rule with action ``stop`` or ``raise`` adds one small broadcast from global rank 0 at each logging
    step, so that every rank stops (or raises) at the same step. The values of a logging step are judged when they
    are all in: when Lightning hands the model's ``self.log`` values to the loggers at the end of that batch (every
    rank), else (no ``self.log`` value at that step) at the start of the next batch; ``stop`` then ends the fit the
    Lightning way (``trainer.should_stop``: checkpoints are written and the loggers finalized) after that batch.

    A rule fires when its condition has held for ``patience`` evaluations in a row, and alerts when it starts
    firing: once per episode, again only after an evaluation in which the condition did not hold. An alert, on
    global rank 0, is one terminal line (through the progress bar, never inside a bar line), ``health/alerts`` and
    ``health/{rule}`` on every logger at that step, a text card (TensorBoard, a wandb table), ``run.alert`` when the
    wandb run is online, and one JSON line in ``alerts.jsonl`` in the run directory (``step``, ``time``, ``rule``,
    ``key``, ``value``, ``threshold``, ``message``, ``action``). RunSummary lists them. ``lightning-monitor replay
    RUN_DIR`` runs the same rules over a finished run's TensorBoard files. The default rules and their thresholds
    are in docs/health.md.

    Logged keys (none in a run without an alert):

    {logged_keys}

    Args:
        rules: rules of your own, each a mapping: ``key`` (a logged key), ``rule`` (``above``, ``below``,
            ``non_finite``, ``spike``, ``rising``, ``not_improving``, ``drop``), ``threshold`` (for ``above``,
            ``below``, ``spike``: a robust z-score, ``rising``: the rise over the window, ``drop``: the share of
            the run's median lost), ``window``, ``patience``, ``min_delta``, ``mode`` (``min``/``max``),
            ``action`` (``warn``, ``stop``, ``raise``), ``name``, ``message``; e.g.
            ``{"key": "val_loss", "rule": "not_improving", "patience": 5}``.
        every_n_steps: judge every this many steps (default: the trainer's ``log_every_n_steps``, when the
            monitors and ``self.log`` log).
        defaults: the default rules on (docs/health.md); ``False`` keeps only ``rules``.
        disable: names of default rules to leave out, e.g. ``["throughput_drop"]``.
        actions: the action of any rule by name, e.g. ``{"nonfinite_loss": "stop"}`` (default ``warn``).
        loss_key: the logged key of the training loss; ``None`` looks for ``train/loss``, ``train_loss``, ``loss``,
            ``train/loss_step``, ``train_loss_step``.
        spike_z: robust z-score (median and MAD of the window) above which the loss or the gradient norm spiked.
        spike_window: logging steps the spike rules compare against.
        data_wait_share: share of a window's time spent waiting for data above which training is input-bound.
        data_wait_windows: logging windows in a row the data wait must stay above ``data_wait_share``.
        oom_share: peak reserved device memory, as a share of the device, above which memory is nearly full.
        leak_gib: rise of the process's resident memory (GiB) over ``leak_window`` logging steps that is a leak
            (when it also rises in three of four of them).
        leak_window: logging steps the leak rule looks at.
        throughput_drop: share of the run's median samples/s lost below which throughput dropped.
        throughput_windows: logging windows in a row the throughput must stay that low.
        straggler_ratio: slowest over fastest rank's time before the gradient all-reduce above which one rank
            straggles (DDP).
        straggler_windows: logging windows in a row the ratio must stay that high.
        filename: the JSON-lines file of alerts in the run directory; ``None`` writes none.
        print_alerts: print each alert as one terminal line on global rank 0.
        exclude_keys: glob patterns of keys left out of every backend (e.g. ``["health/*"]``).

    Raises:
        TypeError, ValueError: a rule or an option that is wrong on its face, naming it.
        MisconfigurationException: in ``setup`` when the trainer has no logger.

    Example::

        trainer = Trainer(logger=MultiLogger(), callbacks=[GradientMonitor(), SpeedMonitor(), HealthMonitor(
            rules=[{"key": "val_loss", "rule": "not_improving", "patience": 5}],
            actions={"nonfinite_loss": "stop"})])
    """

    LOGGED_KEYS: ClassVar[dict[str, str]] = {
        "health/alerts": "alerts raised so far in the fit (from the first alert on, at each evaluation)",
        "health/{rule}": "1 while the rule fires, 0 once it no longer does (from its first alert on, at each"
        " evaluation of its key)",
        "health/alert_text": "text: the alerts of a logging step (a TensorBoard text card, a wandb table)",
    }

    def __init__(
        self,
        rules: Optional[list[dict[str, Any]]] = None,
        every_n_steps: Optional[int] = None,
        *,
        defaults: bool = True,
        disable: Optional[list[str]] = None,
        actions: Optional[dict[str, str]] = None,
        loss_key: Optional[str] = None,
        spike_z: float = 8.0,
        spike_window: int = 20,
        data_wait_share: float = 0.5,
        data_wait_windows: int = 3,
        oom_share: float = 0.95,
        leak_gib: float = 0.5,
        leak_window: int = 20,
        throughput_drop: float = 0.5,
        throughput_windows: int = 3,
        straggler_ratio: float = 1.5,
        straggler_windows: int = 3,
        filename: Optional[str] = "alerts.jsonl",
        print_alerts: bool = True,
        exclude_keys: Optional[Sequence[str]] = None,
    ) -> None:
        super().__init__(every_n_steps, exclude_keys)
        if filename is not None and (not isinstance(filename, str) or not filename or os.sep in filename
                                     or filename in (".", "..")):
            raise ValueError(f"`filename` must be a file name such as 'alerts.jsonl' (or None), got {filename!r}")
        if not isinstance(print_alerts, bool):
            raise TypeError(f"`print_alerts` must be True or False, got {print_alerts!r}")
        self.rules = list(rules or [])
        self.defaults, self.disable, self.actions = defaults, list(disable or []), dict(actions or {})
        self.loss_key, self.spike_z, self.spike_window = loss_key, spike_z, spike_window
        self.data_wait_share, self.data_wait_windows, self.oom_share = data_wait_share, data_wait_windows, oom_share
        self.leak_gib, self.leak_window = leak_gib, leak_window
        self.throughput_drop, self.throughput_windows = throughput_drop, throughput_windows
        self.straggler_ratio, self.straggler_windows = straggler_ratio, straggler_windows
        self.filename, self.print_alerts = filename, print_alerts
        #: every rule this monitor judges, built and checked from the options above
        self.health_rules: list[Rule] = build_rules(
            self.rules, defaults=defaults, disable=self.disable, actions=self.actions, loss_key=loss_key,
            spike_z=spike_z, spike_window=spike_window, data_wait_share=data_wait_share,
            data_wait_windows=data_wait_windows, oom_share=oom_share, leak_gib=leak_gib, leak_window=leak_window,
            throughput_drop=throughput_drop, throughput_windows=throughput_windows, straggler_ratio=straggler_ratio,
            straggler_windows=straggler_windows,
        )
        #: the alerts of the last fit, in order (global rank 0)
        self.alerts: list[Alert] = []
        self._acts = any(rule.action != "warn" for rule in self.health_rules)  # needs the same decision on all ranks
        self._counts_drops = any(DROPPED_KEY in rule.keys for rule in self.health_rules)
        self._drops: dict[str, int] = {}  # points each backend dropped, as of the last evaluation (rank 0)
        self._drops_at_start: dict[str, int] = {}  # ... and as of the fit's start
        self._new_drops: dict[str, int] = {}  # ... since the evaluation before it
        self._engine = Engine(self.health_rules)
        self._pending = Pending()
        self._tap: Optional[Tap] = None
        self._due: Optional[int] = None  # the logging step whose values are judged at the next boundary
        self._armed = False  # the next Tap.log_metrics is Lightning's of the logging batch that just ended
        self._logged_at = -1  # the last step the health keys were logged at

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_tap"] = None  # the in-memory logger belongs to the trainer of this process's fit
        return state

    # ------------------------------------------------------------------------------------------ the fit
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        if stage != "fit":
            return
        self._engine, self._pending, self._due, self._armed, self._logged_at, self.alerts = (
            Engine(self.health_rules), Pending(), None, False, -1, [])
        self._detach(trainer)
        if self._counts_drops and trainer.is_global_zero:  # the writers' own counters (no sync), from here on
            self._drops = self._drops_at_start = _dispatch.dropped_points(trainer)
        self._tap = Tap(self._pending, trainer.loggers[0], on_log=partial(self._logged, trainer))
        trainer.loggers = [*trainer.loggers, self._tap]  # last: trainer.logger and the checkpoint path stay the user's

    @override
    def state_dict(self) -> dict[str, Any]:
        """The rules' state (streaks, episodes, windows, bests) and the alert count: a fit restarted from a
        checkpoint (``ckpt_path``) goes on with them, so a rule firing before it is the same episode after it."""
        return {"engine": self._engine.state_dict()}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores a checkpoint's callback state after `setup`, which starts every fit afresh
        self._engine.load_state_dict(state_dict.get("engine", {}))

    @override
    def teardown(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        self._detach(trainer)
        super().teardown(trainer, pl_module, stage)

    @override
    def on_exception(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", exception: BaseException) -> None:
        self._detach(trainer)

    def _detach(self, trainer: "pl.Trainer") -> None:
        """Take the in-memory logger out of ``trainer.loggers``: after the fit the list is the user's own again."""
        if self._tap is not None:
            trainer.loggers = [logger for logger in trainer.loggers if logger is not self._tap]
            self._tap = None

    @override
    def on_train_batch_start(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", batch: Any, batch_idx: int
    ) -> None:
        self._begin_batch(trainer, pl_module, batch, batch_idx)
        self._armed = False
        if self._due is not None:  # a logging step Lightning logged none of the model's values at: judged now
            self._evaluate(trainer, final=False)

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        step = self._batch_logging_step(trainer)
        if step is not None:
            # the model's self.log values of this step reach the loggers after this hook: judged then (_logged)
            self._due, self._armed = step, True

    def _logged(self, trainer: "pl.Trainer") -> None:
        """The Tap got values. The first time after a logging batch's end, it is Lightning handing every logger the
        model's values of that step, on every rank, before its training loop checks ``trainer.should_stop``: the
        step is judged here, so that ``stop`` ends the fit after this very batch. (Lightning skips that call when
        the model logged nothing at the step; the step is then judged at the next batch's start, on every rank.)"""
        if self._armed:
            self._armed = False
            self._evaluate(trainer, final=False)

    @override
    def on_train_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._armed = False
        if self._due is not None:
            self._evaluate(trainer, final=False)

    @override
    def on_train_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        self._evaluate(trainer, final=True)  # what was logged after the last logging step (no collective: rank 0)

    # ------------------------------------------------------------------------------------------ judging
    def _evaluate(self, trainer: "pl.Trainer", final: bool) -> None:
        """Judge every step logged since the last evaluation (global rank 0; other ranks drop what they got), report
        the alerts, and act on them: under DDP with a ``stop``/``raise`` rule, rank 0's decision is broadcast (a
        collective on every rank, right after a logging step only)."""
        due, self._due = self._due, None
        groups = self._pending.drain()
        decision: tuple[int, str] = (0, "")
        if trainer.is_global_zero:
            if self._counts_drops:
                groups = self._with_drops(trainer, groups, due)
            found: list[Alert] = []
            judged: dict[str, int] = {}
            for step, values in groups:
                evaluation = self._engine.evaluate(step, values)
                found += [self._said_drops(a) if a.key == DROPPED_KEY else a for a in evaluation.alerts]
                judged.update(evaluation.judged)
            judged.update(dict.fromkeys({a.rule for a in found}, 1))  # an alert of this boundary shows, even if cleared
            steps = [s for s, _ in groups] + ([due] if due is not None else [])
            if steps:
                self._report(trainer, found, judged, max(steps))
            strongest = max(found, key=lambda a: _SEVERITY[a.action], default=None)
            if strongest is not None and strongest.action != "warn":
                reason = f"{strongest.rule} at step {strongest.step}: {strongest.message}"
                decision = (_SEVERITY[strongest.action], reason)
        if not final and self._acts and trainer.world_size > 1:
            # collective on every rank, only at a logging step (Lightning's log_metrics of that batch, else the next
            # batch's start: the same point on every rank): every rank acts alike
            decision = trainer.strategy.broadcast(decision, src=0)
        elif final and trainer.world_size > 1:
            decision = (0, "")  # the fit is over: a decision rank 0 alone took can no longer be shared
        self._act(trainer, *decision)

    def _with_drops(self, trainer: "pl.Trainer", groups: list[tuple[int, dict[str, float]]],
                    due: Optional[int]) -> list[tuple[int, dict[str, float]]]:
        """``groups`` with the points the backends dropped or refused since the last evaluation (``DROPPED_KEY``,
        0 when none: an episode ends) added to the last step judged; the counters are the failure guard's."""
        steps = [step for step, _ in groups] + ([due] if due is not None else [])
        if not steps:
            return groups
        now = _dispatch.dropped_points(trainer)
        before, self._drops = self._drops, now
        self._new_drops = {name: n - before.get(name, 0) for name, n in now.items() if n > before.get(name, 0)}
        last = max(steps)
        values = dict(groups[-1][1]) if groups and groups[-1][0] == last else {}
        values[DROPPED_KEY] = float(sum(self._new_drops.values()))
        return [group for group in groups if group[0] != last] + [(last, values)]

    def _said_drops(self, alert: Alert) -> Alert:
        """The alert of a rule on the dropped points, saying which backend dropped how many."""
        rule = next(r for r in self.health_rules if r.name == alert.rule)
        counts = ", ".join(
            f"{name}: {n} since the last logging step, {self._drops[name] - self._drops_at_start.get(name, 0)} in"
            " this fit" for name, n in sorted(self._new_drops.items()))
        return replace(alert, message=f"{rule.describe()} ({counts}; its warning above says which)")

    def _act(self, trainer: "pl.Trainer", severity: int, reason: str) -> None:
        if severity >= _SEVERITY["raise"]:
            raise HealthAlertError(reason)
        if severity >= _SEVERITY["stop"]:
            trainer.should_stop = True
            if trainer.is_global_zero and self.print_alerts:
                _dispatch.say(trainer, f"lightning-monitor: HealthMonitor stops the fit after this batch: {reason}")

    def _report(self, trainer: "pl.Trainer", alerts: Sequence[Alert], judged: Mapping[str, int], step: int) -> None:
        """The health keys at ``step`` and, for new alerts, the terminal lines, the text card, wandb's alert and the
        JSON lines (global rank 0)."""
        self.alerts.extend(alerts)
        metrics: dict[str, float] = {f"health/{name}": float(firing) for name, firing in judged.items()
                                     if self._engine.states[name].alerts}
        if self._engine.alert_count:
            metrics["health/alerts"] = float(self._engine.alert_count)
        if metrics and step > self._logged_at:
            self._logged_at = step
            self._log_scalars(trainer, metrics, step)
        if not alerts:
            return
        for alert in alerts:
            if self.print_alerts:
                _dispatch.say(trainer, alert.line())
            _dispatch.log_alert(trainer, f"lightning-monitor: {alert.rule}", f"step {alert.step}: {alert.message}")
        if self._keeps("health/alert_text"):
            _dispatch.log_text(trainer, "health/alert_text", _report.card(alerts), step)
        if self.filename is not None:
            path = os.path.join(run_dir(trainer), self.filename)
            error = _report.append_jsonl(path, alerts)
            if error is not None:
                self._warn("jsonl", f"HealthMonitor could not write {path} ({error}); the alerts still go to the"
                                    " terminal and the loggers.")
