"""Print the options table of docs/options.md (markdown: class | option | default | meaning), generated from every
public class's ``__init__`` signature and the ``Args:`` section of its docstring; with ``--update`` rewrite the
block between ``<!-- options:start -->`` and ``<!-- options:end -->`` of docs/options.md (or of the file named) in
place instead.

    python scripts/options_table.py             # print the table
    python scripts/options_table.py --update    # refresh it in docs/options.md
"""

from __future__ import annotations

import inspect
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import lightning_monitor

sys.path.insert(0, str(Path(__file__).resolve().parent))
from keys_table import cli, update_block  # noqa: E402  (the block writer shared by both tables)

START, END = "<!-- options:start -->", "<!-- options:end -->"
#: the page that holds the table
PAGE = Path(__file__).resolve().parents[1] / "docs" / "options.md"
_ENTRY = re.compile(r"^(\*{0,2}\w+)\s*(\([^)]*\))?:\s*(.*)$")


def documented_args(doc: str) -> dict[str, str]:
    """``name -> text`` of every entry in the Google-style ``Args:`` section of ``doc`` (continuation lines joined)."""
    lines = inspect.cleandoc(doc or "").splitlines()
    at = next((i for i, line in enumerate(lines) if line.strip() == "Args:"), None)
    if at is None:
        return {}
    args: dict[str, str] = {}
    indent, name = None, None
    for line in lines[at + 1:]:
        if not line.strip():
            continue
        depth = len(line) - len(line.lstrip())
        if indent is None:
            indent = depth
        if depth < indent:
            break  # the next section (Raises:, Example::)
        entry = _ENTRY.match(line.strip()) if depth == indent else None
        if entry:
            name = entry.group(1).lstrip("*")
            args[name] = entry.group(3).strip()
        elif name is not None:
            args[name] += " " + line.strip()
    return args


def first_sentence(text: str) -> str:
    """The text up to the end of its first sentence (a period followed by a space or the end)."""
    match = re.search(r"(?<!e\.g)(?<!i\.e)\.(\s|$)", text)  # "e.g. " and "i.e. " end no sentence
    return text[: match.start() + 1] if match else text


def options(cls: type) -> list[tuple[str, str, str]]:
    """``(option, default, meaning)`` for every parameter of ``cls.__init__``, in signature order."""
    docs = documented_args(cls.__doc__ or "")
    rows = []
    for param in inspect.signature(cls.__init__).parameters.values():
        if param.name == "self" or param.kind in (param.VAR_POSITIONAL, param.VAR_KEYWORD):
            continue
        default = "required" if param.default is param.empty else f"`{param.default!r}`"
        rows.append((param.name, default, first_sentence(docs.get(param.name, ""))))
    return rows


def markdown_table(classes: Iterable[type]) -> str:
    """The options table: ``| class | option | default | meaning |``, one row per ``__init__`` option."""
    lines = ["| class | option | default | meaning |", "|---|---|---|---|"]
    for cls in classes:
        for name, default, meaning in options(cls):
            meaning = meaning.replace("``", "`").replace("|", "\\|")
            lines.append(f"| `{cls.__name__}` | `{name}` | {default.replace('|', chr(92) + '|')} | {meaning} |")
    return "\n".join(lines) + "\n"


def table() -> str:
    return markdown_table(getattr(lightning_monitor, name) for name in lightning_monitor.__all__)


def update(path: Path) -> None:
    update_block(path, START, END, table())


if __name__ == "__main__":
    cli(__doc__.splitlines()[0], table, START, END, "options", PAGE)
