"""SpeedMonitor: placeholder until its issue lands."""

from __future__ import annotations

from lightning.pytorch.callbacks import Callback


class SpeedMonitor(Callback):
    """Not implemented yet."""

    LOGGED_KEYS: dict[str, str] = {}
