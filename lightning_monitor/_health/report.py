"""Where an alert goes besides the logged keys: one terminal line, one JSON line in ``alerts.jsonl``, the text of
its TensorBoard card."""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from typing import Optional

from lightning_monitor._core import clock as _clock
from lightning_monitor._health.engine import Alert


def append_jsonl(path: str, alerts: Sequence[Alert]) -> Optional[OSError]:
    """One JSON object per alert appended to ``path`` (made with its directory when missing); the error, if the
    file cannot be written."""
    now = _clock.wall()
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        with open(path, "a", encoding="utf-8") as f:
            for alert in alerts:
                f.write(json.dumps(alert.record(now)) + "\n")
    except OSError as err:
        return err
    return None


def card(alerts: Sequence[Alert]) -> str:
    """The alerts of one logging step as Markdown (TensorBoard's text card, wandb's one-cell table)."""
    return "\n\n".join(f"**{a.rule}** at step {a.step}: {a.message}" for a in alerts)


def read_jsonl(path: str) -> list[dict]:
    """The alerts in an ``alerts.jsonl`` file, in the order written."""
    with open(path, encoding="utf-8") as f:
        return [json.loads(line) for line in f if line.strip()]
