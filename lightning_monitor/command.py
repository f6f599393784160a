"""The ``lightning-monitor`` console command: one subcommand per job (``replay``), each added to one parser.

    lightning-monitor replay runs/mnist/version_0 [--rules rules.yaml]

A new subcommand is a function that adds its parser to the subparsers (:data:`SUBCOMMANDS`) and sets ``run`` to the
function that does it, returning the exit code.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any, Optional


def _add_replay(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "replay", help="print the alerts HealthMonitor's rules raise over a finished run",
        description="Evaluate HealthMonitor's rules over a finished run's TensorBoard files and print the alerts they"
                    " raise, one line each, as the live run printed them.")
    parser.add_argument("run_dir", metavar="RUN_DIR", help="the run directory (holding events.out.tfevents.*)")
    parser.add_argument("--rules", metavar="RULES_YAML", help="a YAML file: a list of rules, or HealthMonitor's"
                        " options (thresholds, disable, actions, rules); default: the default rules")
    parser.set_defaults(run=_replay)


def _replay(args: argparse.Namespace) -> int:
    from lightning_monitor._health import replay as _health_replay

    try:
        options = _health_replay.load_options(args.rules) if args.rules else {}
        alerts = _health_replay.replay(args.run_dir, options)
    except (OSError, ValueError, TypeError) as err:
        print(f"lightning-monitor replay: {err}", file=sys.stderr)
        return 2
    for alert in alerts:
        print(alert.line())
    print(f"{len(alerts)} alert{'' if len(alerts) == 1 else 's'}")
    return 0


#: every subcommand, as the function that adds it to the subparsers
SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (_add_replay,)


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default ``sys.argv[1:]``); the exit code."""
    parser = argparse.ArgumentParser(prog="lightning-monitor", description="lightning-monitor's tools for runs.")
    subparsers = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for add in SUBCOMMANDS:
        add(subparsers)
    args = parser.parse_args(argv)
    return int(args.run(args))


if __name__ == "__main__":
    sys.exit(main())
