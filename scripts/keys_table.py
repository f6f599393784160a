"""Print the README's logged-key table (markdown: class | key | meaning), generated from every public class's
``LOGGED_KEYS``; with ``--update README.md`` rewrite the block between ``<!-- keys:start -->`` and
``<!-- keys:end -->`` in place instead.

    python scripts/keys_table.py                    # print the table
    python scripts/keys_table.py --update README.md # refresh it in the README
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Iterable
from pathlib import Path

import lightning_monitor

START, END = "<!-- keys:start -->", "<!-- keys:end -->"


def markdown_table(classes: Iterable[type]) -> str:
    """The README key table: ``| class | key | meaning |``, one row per ``LOGGED_KEYS`` entry, in class order."""
    lines = ["| class | key | meaning |", "|---|---|---|"]
    for cls in classes:
        for key, meaning in getattr(cls, "LOGGED_KEYS", {}).items():
            meaning = meaning.replace("``", "`").replace("|", "\\|")
            lines.append(f"| `{cls.__name__}` | `{key}` | {meaning} |")
    return "\n".join(lines) + "\n"


def table() -> str:
    return markdown_table(getattr(lightning_monitor, name) for name in lightning_monitor.__all__)


def update(path: Path) -> None:
    text = path.read_text(encoding="utf-8")
    if START not in text or END not in text:
        sys.exit(f"{path} has no {START} ... {END} block to fill")
    head, rest = text.split(START, 1)
    tail = rest.split(END, 1)[1]
    path.write_text(f"{head}{START}\n{table()}{END}{tail}", encoding="utf-8")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--update", type=Path, metavar="README", help="rewrite the key block of this file")
    args = parser.parse_args()
    if args.update is not None:
        update(args.update)
    else:
        sys.stdout.write(table())


if __name__ == "__main__":
    main()
