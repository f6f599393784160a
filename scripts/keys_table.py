"""Print the logged-key table of docs/keys.md (markdown: class | key | meaning), generated from every public class's
``LOGGED_KEYS``; with ``--update`` rewrite the block between ``<!-- keys:start -->`` and ``<!-- keys:end -->`` of
docs/keys.md (or of the file named) in place instead.

    python scripts/keys_table.py             # print the table
    python scripts/keys_table.py --update    # refresh it in docs/keys.md
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Iterable
from pathlib import Path

import lightning_monitor

START, END = "<!-- keys:start -->", "<!-- keys:end -->"
#: the page that holds the table
PAGE = Path(__file__).resolve().parents[1] / "docs" / "keys.md"


def markdown_table(classes: Iterable[type]) -> str:
    """The key table: ``| class | key | meaning |``, one row per ``LOGGED_KEYS`` entry, in class order."""
    lines = ["| class | key | meaning |", "|---|---|---|"]
    for cls in classes:
        for key, meaning in getattr(cls, "LOGGED_KEYS", {}).items():
            meaning = meaning.replace("``", "`").replace("|", "\\|")
            lines.append(f"| `{cls.__name__}` | `{key}` | {meaning} |")
    return "\n".join(lines) + "\n"


def table() -> str:
    return markdown_table(getattr(lightning_monitor, name) for name in lightning_monitor.__all__)


def update_block(path: Path, start: str, end: str, table_text: str) -> None:
    """Rewrite the block between the ``start`` and ``end`` markers of ``path`` with ``table_text``."""
    text = path.read_text(encoding="utf-8")
    if start not in text or end not in text:
        sys.exit(f"{path} has no {start} ... {end} block to fill")
    head, rest = text.split(start, 1)
    tail = rest.split(end, 1)[1]
    path.write_text(f"{head}{start}\n{table_text}{end}{tail}", encoding="utf-8")


def cli(description: str, make_table: Callable[[], str], start: str, end: str, what: str, page: Path) -> None:
    """Print ``make_table()``, or with ``--update [FILE]`` rewrite the ``start``...``end`` block of ``FILE``
    (``page`` when none is named)."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--update", type=Path, nargs="?", const=page, metavar="FILE",
                        help=f"rewrite the {what} block of FILE (default: {page.relative_to(page.parents[1])})")
    args = parser.parse_args()
    if args.update is not None:
        update_block(args.update, start, end, make_table())
    else:
        sys.stdout.write(make_table())


def update(path: Path) -> None:
    update_block(path, START, END, table())


if __name__ == "__main__":
    cli(__doc__.splitlines()[0], table, START, END, "key", PAGE)
