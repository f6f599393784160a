"""Host-sync-forcing calls per training step, for the lightning-monitor suite and for its peers.

Counts ``.item() / .tolist() / .cpu() / .numpy() / __bool__ / __float__ / __int__ / __index__`` calls with
``lightning_monitor.testing.HostSyncCounter`` (a ``TorchFunctionMode``) over a real fit of the MNIST ``LitNet``,
split into training steps by a callback placed first (batch start -> next batch start), and into logging steps
(``(step + 1) % n == 0``) and the others. On a GPU each of these calls makes the host wait for the device; on this
CPU-only machine they are counted, not timed. Two counts per configuration:

* ``all code`` (``only_from=None``): every such call, whoever makes it (Lightning's own loop included: compare
  with the baseline row);
* ``its own code`` (``only_from`` = the configuration's own package: ``lightning_monitor/`` for ours,
  Lightning's callback modules for the built-ins, the hand-written callback (TensorBoard's ``add_histogram`` runs
  inside ``torch/``, so its calls are attributed to the callback that called it), ``wandb/`` for ``wandb.watch``).

A second table splits our suite's calls per callback (walking up the stack to the callback module that made them).
Note: on a CPU-only run the counter cannot tell a device->host copy from a read of a host copy (e.g. ``.tolist()``
of a tensor that ``.cpu()`` just returned, or the grid's per-tile labels read from its CPU copy of predictions).

Run::

    python benchmarks/host_syncs.py [--steps 20 --every 5] [--model transformer]
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
from collections import Counter

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _common  # noqa: E402
import lightning  # noqa: E402
import lightning.pytorch as pl  # noqa: E402
import overhead  # noqa: E402
import torch  # noqa: E402
import wandb  # noqa: E402

import lightning_monitor  # noqa: E402
from lightning_monitor.testing import CALLBACK_FILES, HostSyncCounter, SyncsPerStep  # noqa: E402

_LIGHTNING = os.path.dirname(lightning.__file__)
OWN_CODE = {
    "baseline": [],
    "ours": [os.path.dirname(lightning_monitor.__file__)],
    "ours+grid": [os.path.dirname(lightning_monitor.__file__)],
    "lightning": [os.path.join(_LIGHTNING, "pytorch", "callbacks"), os.path.join(_LIGHTNING, "pytorch", "accelerators"),
                  os.path.join(_LIGHTNING, "fabric", "utilities", "throughput.py")],
    "add_histogram": [os.path.abspath(overhead.__file__)],
    "wandb.watch": [os.path.dirname(wandb.__file__)],
}
def count(config: str, steps: int, n: int, model_name: str = "mnist") -> dict[int, list[tuple[str, str, int, str]]]:
    torch.manual_seed(0)
    model = overhead.LitNet() if model_name == "mnist" else overhead.Transformer()
    data = overhead.Data(model_name, batches=steps + 4, batch_size=16)
    counter = HostSyncCounter(only_from=None, owners=CALLBACK_FILES)
    per_step = SyncsPerStep(counter)
    with tempfile.TemporaryDirectory() as root:
        logger, callbacks, before_fit = overhead.build(config, model_name, n, root)
        trainer = pl.Trainer(
            accelerator="cpu", devices=1, max_steps=steps, log_every_n_steps=n, logger=logger,
            callbacks=[per_step, *callbacks], enable_progress_bar=False, enable_model_summary=False,
            enable_checkpointing=False, num_sanity_val_steps=0, default_root_dir=root,
        )
        before_fit(model)
        with counter:
            trainer.fit(model, datamodule=data)
        if wandb.run is not None:
            wandb.finish()
    return per_step.per_step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--every", type=int, default=5, help="logging interval n")
    parser.add_argument("--model", choices=["mnist", "transformer"], default="mnist",
                        help="the MNIST LitNet or the 6-layer transformer encoder of overhead.py (16 x 64 tokens)")
    args = parser.parse_args()
    _common.pin(1)
    n = args.every
    print(f"## Host-sync-forcing calls per training step\n\n{_common.machine()}\n")
    title = "MNIST LitNet" if args.model == "mnist" else "Transformer encoder (6 layers, d_model 256, 64 tokens)"
    print(f"{title}, batch 16, {args.steps} steps, logging every {n}; steps 0 and {n - 1} (first batch: FLOP "
          f"count, first logging event: sample capture) left out of the means. `ours` has "
          f"every callback at its defaults (the prediction grid is drawn after validation only); `ours+grid` adds "
          f"PredictionGridMonitor(every_n_steps={n}); the per-callback table is from `ours+grid`.\n")
    rows, ours = [], {}
    for config in overhead.CONFIGS:
        if config == "ours+grid" and args.model != "mnist":
            continue  # no images to draw
        per_step = count(config, args.steps, n, args.model)
        if config == "ours" and args.model != "mnist":
            ours = per_step
        if config == "ours+grid":
            ours = per_step
        own = tuple(OWN_CODE[config])
        steady = [s for s in per_step if s not in (0, n - 1)]
        logging = [s for s in steady if (s + 1) % n == 0]
        quiet = [s for s in steady if (s + 1) % n]

        def mean(steps: list[int], own_only: bool, per_step: dict = per_step, own: tuple = own) -> str:
            total = sum(1 for s in steps for c in per_step[s] if not own_only or (own and c[1].startswith(own)))
            return f"{total / max(1, len(steps)):.1f}"

        rows.append([config, mean(quiet, False), mean(logging, False), mean(quiet, True) if own else "-",
                     mean(logging, True) if own else "-"])
    print(_common.markdown_table(
        ["config", "all code: non-logging step", "all code: logging step", "its own code: non-logging step",
         "its own code: logging step"], rows))

    print("\nOur suite per callback (calls from lightning_monitor code, per step; `first` = the first logging step):\n")
    own = os.path.dirname(lightning_monitor.__file__)
    cb_rows = []
    logging = [s for s in ours if (s + 1) % n == 0]
    quiet = [s for s in ours if (s + 1) % n]
    for name in CALLBACK_FILES:
        def calls(step: int, name: str = name) -> list[tuple[str, str, int, str]]:
            return [c for c in ours[step] if c[3] == name and c[1].startswith(own)]

        later = [len(calls(s)) for s in logging[1:]]
        sites = Counter(f"{op}@{os.path.basename(f)}:{line}" for s in logging[1:2] for op, f, line, _ in calls(s))
        cb_rows.append([name, max((len(calls(s)) for s in quiet), default=0), len(calls(logging[0])),
                        f"{sum(later) / max(1, len(later)):.1f}", ", ".join(f"{k} x{v}" for k, v in sites.items())])
    print(_common.markdown_table(["callback", "max on a non-logging step", "first logging step",
                                  "later logging steps (mean)", "call sites at a later logging step"], cb_rows))


if __name__ == "__main__":
    main()
