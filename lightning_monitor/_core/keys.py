"""The logged-key table of a class docstring, rendered at import from the class's ``LOGGED_KEYS`` (key -> meaning)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import TypeVar

#: The docstring line that :func:`document_keys` replaces with the key table (its indentation is kept).
PLACEHOLDER = "{logged_keys}"

T = TypeVar("T", bound=type)


def keys_table(keys: Mapping[str, str], indent: str = "") -> str:
    """An RST simple table ``key | meaning`` with one row per key, each line prefixed by ``indent``."""
    cells = [("key", "meaning")] + [(f"``{key}``", meaning) for key, meaning in keys.items()]
    width = [max(len(row[i]) for row in cells) for i in (0, 1)]
    border = f"{indent}{'=' * width[0]}  {'=' * width[1]}"
    rows = [f"{indent}{key.ljust(width[0])}  {meaning}".rstrip() for key, meaning in cells]
    return "\n".join([border, rows[0], border, *rows[1:], border])


def document_keys(cls: T) -> T:
    """Class decorator: fill the ``{logged_keys}`` line of ``cls``'s docstring with the table of ``cls.LOGGED_KEYS``.

    Raises:
        ValueError: the docstring has no ``{logged_keys}`` line (not raised when docstrings are stripped, ``-OO``).
    """
    doc = cls.__doc__
    if doc is None:
        return cls
    lines = doc.splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip() == PLACEHOLDER), None)
    if at is None:
        raise ValueError(f"{cls.__name__}'s docstring has no {PLACEHOLDER!r} line for its key table")
    indent = lines[at][: len(lines[at]) - len(lines[at].lstrip())]
    lines[at] = keys_table(cls.LOGGED_KEYS, indent)  # type: ignore[attr-defined]
    cls.__doc__ = "\n".join(lines)
    return cls
