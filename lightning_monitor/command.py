"""The ``lightning-monitor`` console command: one subcommand per job (``replay``, ``compare``), each added to one
parser.

    lightning-monitor replay runs/mnist/version_0 [--rules rules.yaml]
    lightning-monitor compare runs/mnist/version_0 runs/mnist/version_1 [--format markdown] [--fail-on step_time=5%]

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


def _add_compare(subparsers: Any) -> None:
    parser = subparsers.add_parser(
        "compare", help="compare runs' headline numbers side by side (and fail on a regression)",
        description="Print runs' headline numbers side by side, each with its ratio to the first run, from each"
                    " run's summary.json (or, without one, its TensorBoard files). With --fail-on, exit 1 naming every"
                    " number of a later run that got worse than the first run's past its limit.")
    parser.add_argument("run_dirs", metavar="RUN_DIR", nargs="+", help="run directories; the first is the baseline")
    parser.add_argument("--format", choices=("text", "markdown", "json"), default="text", help="default: text")
    parser.add_argument("--fail-on", metavar="LIMITS", default="",
                        help="NAME=PERCENT%%,... such as step_time=5%%,peak_memory=10%%: exit 1 when a later run is"
                             " worse than the first by more (slower, bigger; lower samples/s or MFU)")
    parser.add_argument("--summary-file", metavar="NAME", default="summary.json",
                        help="RunSummary's file name in each run directory (default: summary.json)")
    parser.set_defaults(run=_compare)


def _compare(args: argparse.Namespace) -> int:
    from lightning_monitor._summary import compare as _summary_compare

    try:
        limits = _summary_compare.parse_limits(args.fail_on)
        runs = [_summary_compare.load(path, args.summary_file) for path in args.run_dirs]
    except (OSError, ValueError) as err:
        print(f"lightning-monitor compare: {err}", file=sys.stderr)
        return 2
    failed = _summary_compare.regressions(runs, limits)
    print(_summary_compare.render(runs, args.format, limits, failed))
    for line in _summary_compare.unchecked(runs, limits):
        print(f"lightning-monitor compare: {line}", file=sys.stderr)
    for line in failed:
        print(f"lightning-monitor compare: {line}", file=sys.stderr)
    return 1 if failed else 0


#: every subcommand, as the function that adds it to the subparsers
SUBCOMMANDS: tuple[Callable[[Any], None], ...] = (_add_replay, _add_compare)


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
