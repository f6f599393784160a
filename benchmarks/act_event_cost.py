"""Cost of one ActivationMonitor logging event on the benchmarks' transformer, as a ratio to one training step.

Rows, interleaved round-robin in one process (:func:`_common.interleaved`), medians over ``--reps`` (CPU, one torch
thread, 16 sequences of 128 tokens, SGD):

* ``step``         one plain training step (forward, backward, optimizer step): the unit of the ratios.
* ``ours``         the same step with ActivationMonitor's default modules hooked (``_act.select.choose``, one
                   ``_act.tap.Tap`` per module), then the one packed read-back (``pack`` + ``tolist``) and ``combine``.
* ``per-tensor .item()``  the same modules hooked by a callback that reads RMS, mean, max |x| and the dead share
                   with four ``.item()`` calls per module output (what Composer's ActivationMonitor does).

The event's cost is the row minus ``step``. Run::

    python benchmarks/act_event_cost.py --reps 7
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch
from _common import TokenEncoder, interleaved, machine, markdown_table, pin
from torch.nn import functional as F

from lightning_monitor._act import select as _select
from lightning_monitor._act import tap as _tap


def _item_hook(values: list[float]) -> Callable[..., None]:
    def hook(module: Any, inputs: Any, output: Any) -> None:
        x = output[0] if isinstance(output, tuple) else output
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            return
        with torch.no_grad():
            d = x.detach()
            dim = _tap.unit_dim(module, d)
            values.append(d.square().mean().sqrt().item())
            values.append(d.mean().item())
            values.append(d.abs().max().item())
            alive = (d != 0).movedim(dim, -1).reshape(-1, d.shape[dim]).any(0)
            values.append(alive.logical_not().float().mean().item())
    return hook


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--reps", type=int, default=5)
    args = parser.parse_args()
    pin(1)
    torch.manual_seed(0)
    model = TokenEncoder()
    model.train()
    opt = torch.optim.SGD(model.parameters(), lr=1e-3)
    tokens = torch.randint(0, 1000, (16, 128))
    chosen, _ = _select.choose(model, None, None, [])
    modules = [m for _, m in chosen]

    def step() -> None:
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(tokens).reshape(-1, 1000), tokens.reshape(-1)).backward()
        opt.step()

    def ours() -> None:
        taps = [_tap.Tap() for _ in modules]
        counting = [True]

        def make(t: _tap.Tap) -> Callable[..., None]:
            return lambda m, i, o: t.add(m, o) if counting[0] else None
        handles = [m.register_forward_hook(make(t)) for m, t in zip(modules, taps, strict=True)]
        opt.zero_grad(set_to_none=True)
        loss = F.cross_entropy(model(tokens).reshape(-1, 1000), tokens.reshape(-1))
        counting[0] = False
        loss.backward()
        opt.step()
        for h in handles:
            h.remove()
        units = [t.units for t in taps]
        host = _tap.pack(taps, units, torch.device("cpu")).tolist()  # the one read-back
        import numpy as np

        _tap.combine(np.array(host).reshape(1, -1), [n for n, _ in chosen], units)

    def item() -> None:
        values: list[float] = []
        handles = [m.register_forward_hook(_item_hook(values)) for m in modules]
        step()
        for h in handles:
            h.remove()

    rows: dict[str, list[float]] = {"step": [], "ours": [], "per-tensor .item()": []}
    fns = {"step": step, "ours": ours, "per-tensor .item()": item}
    for fn in fns.values():  # warm-up
        fn()
    for _, name in interleaved(list(fns), args.reps):
        began = time.perf_counter()
        fns[name]()
        rows[name].append(time.perf_counter() - began)
    base = statistics.median(rows["step"])
    table = [[name, f"{statistics.median(v) * 1e3:.1f}", f"{(statistics.median(v) - base) / base:+.3f}"]
             for name, v in rows.items()]
    print(f"{machine()}; {len(modules)} modules hooked; {args.reps} reps")
    print(markdown_table(["row", "median ms", "event cost, x one step"], table))


if __name__ == "__main__":
    main()
