"""GradientMonitor's NaN/Inf bookkeeping: counts between logging steps, the ``grad/nonfinite*`` values, raise/skip."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

MAX_NAMED = 5  # offending parameter names quoted in a warning or error


class NonfiniteLedger:
    """Which parameters had NaN/Inf gradients, at how many optimizer steps, since the last logging step.

    Parameters are indices into the monitor's parameter list. Under ``nonfinite="warn"`` the counts stay on the
    device (:meth:`queue`) until the logging step packs them (:meth:`pending`) and reads them back (:meth:`read`);
    under ``"raise"``/``"skip"`` they are counted on the host (:meth:`count`), which must read every step's flags.
    """

    def __init__(self) -> None:
        self.reset()

    def reset(self) -> None:
        self._device: dict[tuple[int, ...], torch.Tensor] = {}  # per present-set: steps with NaN/Inf per param + any
        self._host: dict[int, int] = {}  # raise/skip: steps with NaN/Inf per parameter
        self._host_steps = 0  # raise/skip: steps with any NaN/Inf
        self.ever_bad: set[str] = set()  # names that had NaN/Inf in this run: their key stays (0 when clean)
        self.capped: set[str] = set()  # names that had NaN/Inf but no key: over the per-parameter key cap
        self.seen = False  # any NaN/Inf in this run: grad/nonfinite_count and _steps are logged from then on
        self._read: tuple[dict[int, float], float] = ({}, 0.0)  # device counts read back in this logging batch

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_device": {}}  # device tensors stay behind (ddp_spawn pickles callbacks)

    def queue(self, present: tuple[int, ...], sq: torch.Tensor) -> None:
        """``warn``, between logging steps: add this step's flags on the device (no host sync)."""
        bad = ~torch.isfinite(sq)
        bad = torch.cat([bad, bad.any().reshape(1)])  # per parameter, then "any" for the step count
        acc = self._device.get(present)
        self._device[present] = bad.double() if acc is None else acc.add_(bad)

    def count(self, present: tuple[int, ...], sq: torch.Tensor) -> list[int]:
        """``raise``/``skip``, between logging steps: the parameters with NaN/Inf now, counted on the host."""
        flags = np.array((~torch.isfinite(sq)).tolist())  # sync point: every step under raise/skip (documented)
        bad = [present[j] for j in np.flatnonzero(flags)]
        for i in bad:
            self._host[i] = self._host.get(i, 0) + 1
        self._host_steps += 1 if bad else 0
        return bad

    def pending(self) -> list[torch.Tensor]:
        """The device counts to pack into the logging step's one host transfer, in the order :meth:`read` expects."""
        return list(self._device.values())

    def read(self, host: np.ndarray) -> tuple[dict[int, float], float]:
        """Unpack :meth:`pending`'s values from ``host``: (steps with NaN/Inf per parameter, steps with any)."""
        per_param: dict[int, float] = {}
        any_steps, off = 0.0, 0
        for present in self._device:
            for i, v in zip(present, host[off : off + len(present)], strict=True):
                per_param[i] = per_param.get(i, 0.0) + float(v)
            any_steps += float(host[off + len(present)])
            off += len(present) + 1
        self._device.clear()
        return per_param, any_steps

    def read_pending(self, host: np.ndarray) -> None:
        """:meth:`read` ``host`` and keep the counts until :meth:`take_read` (several optimizer steps of one logging
        batch add up)."""
        bad_steps, any_steps = self.read(host)
        before, steps = self._read
        self._read = ({i: before.get(i, 0.0) + bad_steps.get(i, 0.0) for i in {*before, *bad_steps}},
                      steps + any_steps)

    def take_read(self) -> tuple[dict[int, float], float]:
        """What :meth:`read_pending` kept since the last call (per parameter, steps with any), and forget it."""
        out, self._read = self._read, ({}, 0.0)
        return out

    def note(self, bad: Sequence[int]) -> None:
        """Count, on the host, an optimizer step whose NaN/Inf were read already (a logging step's earlier step)."""
        for i in bad:
            self._host[i] = self._host.get(i, 0) + 1
        self._host_steps += 1 if len(bad) else 0

    def report(
        self,
        names: Sequence[str],
        nonfinite: np.ndarray,
        bad_now: np.ndarray,
        now_steps: int,
        bad_steps: dict[int, float],
        any_steps: float,
        max_keys: Optional[int],
    ) -> tuple[dict[str, float], set[str], int]:
        """The ``grad/nonfinite*`` values of a logging step and the parameters with NaN/Inf since the last one.

        ``nonfinite[i]`` are this step's NaN/Inf elements of parameter ``i`` (every parameter); ``bad_now`` the
        parameters that have any, found at ``now_steps`` optimizer steps; ``bad_steps``/``any_steps`` what
        :meth:`read` returned. Per-parameter keys go to the first ``max_keys`` parameters ever found bad (stable
        series); the third value is how many offenders that cap left without a key of their own.
        """
        if not (self.seen or any_steps or now_steps or bad_now.size or bad_steps or self._host or self._host_steps):
            # no NaN/Inf in this run so far (nonfinite counts come only with non-finite norms: bad_now): no values
            return {}, set(), len(self.capped)
        # steps with NaN/Inf since the last logging step: counted on the device (warn) or the host (raise/skip)
        any_steps += float(self._host_steps + now_steps)
        offenders = {names[i] for i in bad_now.tolist()}
        offenders |= {names[i] for i, v in bad_steps.items() if v > 0}
        offenders |= {names[i] for i, v in self._host.items() if v > 0}
        self._host.clear()
        self._host_steps = 0
        # logged from the first logging step that saw a NaN/Inf on (a chart of zeros for a whole run says nothing;
        # the values are still on the host at every logging step for whoever needs them)
        self.seen = self.seen or any_steps > 0 or bool(nonfinite.sum() > 0) or bool(offenders)
        metrics = {"grad/nonfinite_count": float(nonfinite.sum()), "grad/nonfinite_steps": any_steps}
        if not self.seen:
            metrics = {}
        fresh = sorted(offenders - self.ever_bad)
        room = len(fresh) if max_keys is None else max(0, max_keys - len(self.ever_bad))
        self.ever_bad |= set(fresh[:room])
        self.capped |= set(fresh[room:])
        if self.ever_bad:
            where = {n: i for i, n in enumerate(names)}
            for name in sorted(self.ever_bad):
                metrics[f"grad/nonfinite/{name}"] = float(nonfinite[where[name]])
        return metrics, offenders, len(self.capped)


def act(policy: str, bad: list[int], params: Sequence[torch.Tensor], names: Sequence[str], optimizer: Any,
        step: int) -> None:
    """``raise`` or ``skip`` for the parameters (indices into ``params``) whose gradients hold NaN/Inf."""
    if policy == "raise":
        grads = {i: g for i in bad[:MAX_NAMED] if (g := params[i].grad) is not None}  # all: they held the NaN/Inf
        counts = torch.stack([(~torch.isfinite(g)).sum() for g in grads.values()]).tolist()  # raising anyway
        named = ", ".join(f"{names[i]} ({int(c)} NaN/Inf)" for i, c in zip(grads, counts, strict=True))
        raise FloatingPointError(f"GradientMonitor: non-finite gradients at step {step} in {named}")
    # skip: with no gradient, torch optimizers leave the parameter, its momentum and weight decay untouched
    for group in optimizer.param_groups:
        for p in group["params"]:
            p.grad = None


def warnings(offenders: set[str], capped: int, step: int, policy: str, max_keys: Optional[int]
             ) -> list[tuple[str, str]]:
    """GradientMonitor's warnings (tag, message: each said once a run) about a logging step's :meth:`report`."""
    out = []
    if offenders:
        names = ", ".join(sorted(offenders)[:MAX_NAMED])
        out.append(("nonfinite", (
            f"GradientMonitor: NaN/Inf gradients by step {step} in {names}"
            f"{' and more' if len(offenders) > MAX_NAMED else ''}; counted under grad/nonfinite_*"
            f" (policy {policy!r}, warned once)."
        )))
    if capped:
        out.append(("cap:nonfinite", (
            f"GradientMonitor: more parameters had NaN/Inf than max_param_keys={max_keys};"
            " the others count in grad/nonfinite_count only (raise max_param_keys, None: no cap)."
        )))
    return out
