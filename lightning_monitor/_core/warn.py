"""Warnings said once per run: one :class:`WarnOnce` per monitor or writer, cleared when a new run starts; and how
our warnings look in a terminal (:func:`install_warning_format`)."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable
from typing import Any, Optional, Union

from lightning.pytorch.utilities import rank_zero_warn

#: the package's directory: a warning attributed to a file under it is ours
PACKAGE_DIR = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
#: how a warning of ours starts in the terminal (instead of ``.../lightning_monitor/_core/warn.py:23: UserWarning:``)
PREFIX = "lightning-monitor: "
_installed: Optional[Callable[..., str]] = None  # our warnings.formatwarning, once installed


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

    def said(self, tag: str) -> bool:
        """Whether ``tag`` was warned about since the last :meth:`clear` (a caller skips building the message)."""
        return tag in self._said

    def clear(self) -> None:
        self._said.clear()


def is_ours(filename: str) -> bool:
    """Whether a warning attributed to ``filename`` comes from this package."""
    try:
        return os.path.commonpath([os.path.abspath(filename), PACKAGE_DIR]) == PACKAGE_DIR
    except ValueError:  # another drive (Windows), or a pseudo file name such as "<string>"
        return False


def install_warning_format() -> None:
    """Print the warnings of this package as ``lightning-monitor: <message>``, without the internal ``file:line:
    UserWarning:`` prefix; every other warning keeps the format it had (Lightning's own, which prints its warnings
    as ``file:line: message``, or Python's). Installed once, at the package's import, by wrapping whatever
    ``warnings.formatwarning`` is then (Lightning replaces it at its own import, which comes first: ours is a
    ``lightning``-named path that Lightning's format would otherwise claim). Idempotent."""
    global _installed
    if _installed is not None and warnings.formatwarning is _installed:
        return
    before = warnings.formatwarning

    def formatwarning(message: Union[Warning, str], category: type[Warning], filename: str, lineno: int,
                      line: Optional[str] = None, **kwargs: Any) -> str:
        if is_ours(filename):
            kind = "" if category is UserWarning else f"{category.__name__}: "
            return f"{PREFIX}{kind}{message}\n"
        return before(message, category, filename, lineno, line, **kwargs)

    warnings.formatwarning = _installed = formatwarning
