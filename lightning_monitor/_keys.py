"""Logged-key tables: read a class's docstring key table, match keys to ``{placeholder}`` patterns, check names.

Every public class documents its keys twice: a table in its docstring (an RST simple table or a markdown table
whose header is ``key | meaning``) and a ``LOGGED_KEYS`` class attribute. The contract test holds the two equal
and holds what a real run logs to them; ``scripts/keys_table.py`` renders the README's table from them.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import lru_cache
from typing import Optional

#: The first segment of every key (DESIGN.md "Logged keys").
AREAS = ("grad", "param", "memory", "throughput", "time", "predictions", "run")

_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")
_RST_BORDER = re.compile(r"^\s*(=+)(\s+)(=+)\s*$")
_MD_SEPARATOR = re.compile(r"^\s*\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)+\|?\s*$")
_MD_CELL_SPLIT = re.compile(r"(?<!\\)\|")
_SEGMENT = re.compile(r"^[a-z][a-z0-9_]*$")
# Units the key must spell as _gib / _sec / _per_sec (tokens between underscores of a key's last segment).
_WRONG_UNITS = {
    "b", "byte", "bytes", "kb", "kib", "mb", "mib", "gb", "tb", "tib",
    "s", "secs", "second", "seconds", "ms", "us", "ns", "minute", "minutes", "hour", "hours",
}


def _unquote(text: str) -> str:
    """``key`` or `key` -> key."""
    text = text.strip()
    for quote in ("``", "`"):
        if len(text) > 2 * len(quote) and text.startswith(quote) and text.endswith(quote):
            return text[len(quote) : -len(quote)].strip()
    return text


def _rst_tables(lines: list[str]) -> Iterable[list[tuple[str, str]]]:
    """Two-column RST simple tables: border, header, border, rows, border. Continuation rows (empty key) join."""
    i = 0
    while i < len(lines):
        border = _RST_BORDER.match(lines[i])
        if not border:
            i += 1
            continue
        split = border.start(3)  # where the second column starts
        rows: list[tuple[str, str]] = []
        borders = 1
        i += 1
        while i < len(lines) and borders < 3:
            line = lines[i]
            if _RST_BORDER.match(line):
                borders += 1
            elif line.strip():
                key, meaning = line[:split].strip(), line[split:].strip()
                if key:
                    rows.append((key, meaning))
                elif rows:  # a meaning wrapped onto the next line
                    rows[-1] = (rows[-1][0], f"{rows[-1][1]} {meaning}")
            i += 1
        if rows:
            yield rows


def _md_tables(lines: list[str]) -> Iterable[list[tuple[str, str]]]:
    """Two-column markdown tables: header row, ``|---|---|``, rows; ``\\|`` escapes a bar inside a cell."""
    i = 0
    while i + 1 < len(lines):
        if not (lines[i].strip().startswith("|") and _MD_SEPARATOR.match(lines[i + 1])):
            i += 1
            continue
        rows = []
        for line in [lines[i]] + lines[i + 2 :]:
            if not line.strip().startswith("|"):
                break
            cells = [c.strip().replace("\\|", "|") for c in _MD_CELL_SPLIT.split(line.strip().strip("|"))]
            if len(cells) != 2:
                raise ValueError(f"a key table row needs exactly two cells (key | meaning), got {line.strip()!r}")
            rows.append((cells[0], cells[1]))
            i += 1
        i += 2
        yield rows


def parse_key_table(doc: str) -> dict[str, str]:
    """The ``key -> meaning`` rows of every table in ``doc`` whose header row is ``key | meaning``.

    Keys lose their RST/markdown code quotes; meanings are kept verbatim (wrapped RST lines joined by a space).

    Raises:
        ValueError: no key table in ``doc``, or a key listed twice.
    """
    lines = [line.rstrip() for line in (doc or "").splitlines()]
    found: dict[str, str] = {}
    tables = 0
    for rows in (*_rst_tables(lines), *_md_tables(lines)):
        header, body = rows[0], rows[1:]
        if (header[0].lower(), header[1].lower()) != ("key", "meaning"):
            continue
        tables += 1
        for key, meaning in body:
            key = _unquote(key)
            if key in found:
                raise ValueError(f"key {key!r} is listed twice in the docstring's key table")
            found[key] = meaning
    if not tables:
        raise ValueError("no `key | meaning` table found in the docstring")
    return found


def docstring_keys(cls: type) -> dict[str, str]:
    """The key table documented in ``cls``'s docstring, ``key pattern -> meaning``."""
    try:
        return parse_key_table(cls.__doc__ or "")
    except ValueError as err:
        raise ValueError(f"{cls.__name__}: {err}") from None


@lru_cache(maxsize=None)
def _pattern_regex(pattern: str) -> re.Pattern:
    parts = _PLACEHOLDER.split(pattern)
    # a placeholder is a name taken verbatim: any non-empty text, '/' and '.' included (``memory/{name}_max``
    # stands for ``memory/host/rss_gib_max``, ``grad/hist/{name}`` for ``grad/hist/conv.weight``)
    return re.compile("^" + "(.+)".join(re.escape(p) for p in parts) + "$")


def key_matches(pattern: str, key: str) -> bool:
    """Whether the logged ``key`` is an instance of the documented ``pattern`` (``{placeholder}`` = any name)."""
    return _pattern_regex(pattern).match(key) is not None


def match_key(key: str, patterns: Iterable[str]) -> Optional[str]:
    """The first pattern in ``patterns`` that ``key`` matches, else ``None``. Literal patterns are tried first."""
    ordered = sorted(patterns, key=lambda p: "{" in p)
    return next((p for p in ordered if key_matches(p, key)), None)


def naming_problems(pattern: str) -> list[str]:
    """What is wrong with a documented key pattern under DESIGN.md "Logged keys" (empty list: nothing).

    ``<area>/<metric>``, ``/`` the only separator, every segment lower_snake_case, the area one of :data:`AREAS`,
    placeholders only in the last segment (names go last), bytes in ``_gib``, times in ``_sec``, rates ``_per_sec``.
    """
    problems = []
    segments = pattern.split("/")
    if len(segments) < 2:
        problems.append("needs at least `<area>/<metric>`")
    if segments[0] not in AREAS:
        problems.append(f"area {segments[0]!r} is not one of {AREAS}")
    for i, segment in enumerate(segments):
        if _PLACEHOLDER.search(segment) and i != len(segments) - 1:
            problems.append(f"placeholder in {segment!r} is not in the last segment (names go last)")
        plain = _PLACEHOLDER.sub("x", segment)
        if not _SEGMENT.match(plain) or "__" in plain or plain.endswith("_"):
            problems.append(f"segment {segment!r} is not lower_snake_case")
        if "monitor" in plain or "logger" in plain or plain.startswith("on_"):
            problems.append(f"segment {segment!r} embeds a class or hook name")
    tokens = _PLACEHOLDER.sub("x", segments[-1]).split("_")
    wrong = sorted(set(tokens) & _WRONG_UNITS)
    if wrong:
        problems.append(f"unit {wrong} in {segments[-1]!r}: bytes are `_gib`, times `_sec`, rates `_per_sec`")
    return problems


def markdown_table(classes: Iterable[type]) -> str:
    """The README key table: ``| class | key | meaning |``, one row per ``LOGGED_KEYS`` entry, in class order."""
    lines = ["| class | key | meaning |", "|---|---|---|"]
    for cls in classes:
        for key, meaning in getattr(cls, "LOGGED_KEYS", {}).items():
            meaning = meaning.replace("``", "`").replace("|", "\\|")
            lines.append(f"| `{cls.__name__}` | `{key}` | {meaning} |")
    return "\n".join(lines) + "\n"
