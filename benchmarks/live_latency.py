"""Live latency: time from ``log_metrics`` to the value being readable from the TensorBoard event file, defaults.

A fresh logger with its default settings logs one scalar per sample (``live/value`` at step i) after a random pause
(0-1 s, so samples land anywhere in the flush cycle); a reader polls the run directory every ``--poll`` seconds
with TensorBoard's ``EventAccumulator`` (incremental ``Reload``, what the TensorBoard server does) until that step
appears. Reported: median and max over the samples. Lightning's ``TensorBoardLogger`` with its defaults
(``flush_secs=120``, ``max_queue=10``) is measured the same way with a shorter give-up time (``--lightning-timeout``).

Run::

    python benchmarks/live_latency.py [--samples 8]
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import wandb  # noqa: E402
from lightning.pytorch.loggers import TensorBoardLogger  # noqa: E402
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator  # noqa: E402

from lightning_monitor import MultiLogger  # noqa: E402


def latency(logger: object, log_dir: str, samples: int, poll: float, timeout: float) -> list[float]:
    """Seconds per sample (``inf`` where the value never appeared within ``timeout``)."""
    logger.log_metrics({"live/warmup": 0.0}, step=0)  # creates the writer / starts the run: not timed
    acc = EventAccumulator(log_dir, size_guidance={"scalars": 0})
    rng = random.Random(0)
    out = []
    for i in range(1, samples + 1):
        time.sleep(rng.uniform(0.0, 1.0))
        t0 = time.perf_counter()
        logger.log_metrics({"live/value": float(i)}, step=i)
        seen = float("inf")
        while time.perf_counter() - t0 < timeout:
            acc.Reload()
            if "live/value" in acc.Tags()["scalars"] and any(e.step == i for e in acc.Scalars("live/value")):
                seen = time.perf_counter() - t0
                break
            time.sleep(poll)
        out.append(seen)
    return out


def fmt(values: list[float]) -> list[str]:
    seen = [v for v in values if v != float("inf")]
    missing = len(values) - len(seen)
    med = _common.Spread(values).median
    return [f"{med * 1e3:.0f}" if med != float("inf") else "not seen",
            f"{max(values) * 1e3:.0f}" if not missing else "not seen", f"{len(seen)}/{len(values)}"]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--poll", type=float, default=0.05, help="reader poll period, seconds")
    parser.add_argument("--timeout", type=float, default=30.0, help="give-up time per sample, MultiLogger")
    parser.add_argument("--lightning-samples", type=int, default=2)
    parser.add_argument("--lightning-timeout", type=float, default=10.0, help="give-up time per sample, Lightning")
    args = parser.parse_args()
    _common.pin(1)
    rows = []
    with tempfile.TemporaryDirectory() as root:
        ours = MultiLogger(save_dir=root, name="ours")
        values = latency(ours, ours.log_dir, args.samples, args.poll, args.timeout)
        ours.finalize("success")
        if wandb.run is not None:
            wandb.finish()
        rows.append(["MultiLogger() (TensorBoard + wandb offline)", *fmt(values)])
        if args.lightning_samples:
            tb = TensorBoardLogger(root, name="tb")
            values = latency(tb, tb.log_dir, args.lightning_samples, args.poll, args.lightning_timeout)
            tb.finalize("success")
            rows.append([f"TensorBoardLogger() (gave up after {args.lightning_timeout:.0f} s)", *fmt(values)])
    print(f"## Live latency: log_metrics -> readable from the event file\n\n{_common.machine()}\n")
    print(f"Poll every {args.poll * 1e3:.0f} ms with EventAccumulator.Reload().\n")
    print(_common.markdown_table(["logger (defaults)", "median ms", "max ms", "samples seen"], rows))


if __name__ == "__main__":
    main()
