"""Warnings said once per run: one :class:`WarnOnce` per monitor or writer, cleared when a new run starts."""

from __future__ import annotations

from lightning.pytorch.utilities import rank_zero_warn


class WarnOnce:
    """``warn(tag, message)`` says ``message`` the first time ``tag`` is seen since the last :meth:`clear`.

    Owned by a monitor (cleared in its ``setup``) or a writer (one per logger), so a second run in the same process
    warns again and tests need no global to reset.
    """

    def __init__(self) -> None:
        self._said: set[str] = set()

    def __call__(self, tag: str, message: str) -> bool:
        """Warn (on global rank 0) unless ``tag`` was already warned about; ``True`` when this call warned."""
        if tag in self._said:
            return False
        self._said.add(tag)
        rank_zero_warn(message)
        return True

    def clear(self) -> None:
        self._said.clear()
