"""Multi-node: ``num_nodes=2`` launched by hand as two processes on this machine, each in its own directory (as two
machines would be), with the environment variables Lightning's ``LightningEnvironment`` reads for a manual launch
(``MASTER_ADDR``, ``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK``, ``WORLD_SIZE``)."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import psutil
import pytest
from helpers import event_files, find_runs, free_port, tb_scalars

NODE_SCRIPT = textwrap.dedent(
    """
    import os, sys
    import numpy as np
    from helpers import TinyImageModel, image_loader, make_trainer
    from lightning_monitor import GradientMonitor, MemoryMonitor, MultiLogger

    if __name__ == "__main__":
        node = int(os.environ["NODE_RANK"])
        ballast = np.ones(300 * 2**20 // 8) if node == 1 else None  # node 1's host holds 300 MiB more
        logger = MultiLogger(save_dir="runs", name="multinode")
        trainer = make_trainer(".", logger=logger, strategy="ddp", num_nodes=2, devices=1, max_steps=6,
                               log_every_n_steps=2, callbacks=[GradientMonitor(), MemoryMonitor()])
        trainer.fit(TinyImageModel(), image_loader(n=128))
        print("NODE", node, "GLOBAL_RANK", trainer.global_rank, "DONE", flush=True)
    """
)
TIMEOUT = 180


@pytest.mark.timeout(TIMEOUT + 30)
def test_two_nodes_one_writer_host_values_per_node(tmp_path):
    script = tmp_path / "node.py"
    script.write_text(NODE_SCRIPT)
    port = free_port()
    procs = []
    for node in (0, 1):
        cwd = tmp_path / f"node{node}"
        cwd.mkdir()
        env = {k: v for k, v in os.environ.items() if not k.startswith(("WANDB_API", "LOCAL_RANK", "NODE_RANK",
                                                                            "MASTER_", "WORLD_SIZE", "RANK"))}
        env.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), NODE_RANK=str(node), LOCAL_RANK="0",
                   WORLD_SIZE="2", NETRC=str(tmp_path / "no-netrc"), WANDB_SILENT="true",
                   PYTHONPATH=os.pathsep.join([os.path.dirname(os.path.dirname(__file__)), os.path.dirname(__file__)]))
        procs.append(subprocess.Popen([sys.executable, str(script)], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, text=True))
    outputs = []
    try:
        for proc in procs:
            outputs.append(proc.communicate(timeout=TIMEOUT))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    orphans = [p for p in psutil.process_iter(["cmdline"]) if str(script) in " ".join(p.info["cmdline"] or [])]
    assert not orphans
    for node, (proc, (out, err)) in enumerate(zip(procs, outputs, strict=True)):
        assert proc.returncode == 0, err[-4000:]
        assert f"NODE {node} GLOBAL_RANK {node} DONE" in out

    # one writer: global rank 0 (node 0) wrote the TensorBoard file and the one wandb run; node 1 wrote nothing
    assert len(event_files(tmp_path / "node0" / "runs")) == 1
    assert not (tmp_path / "node1" / "runs").exists() and not find_runs(str(tmp_path / "node1"))
    (run,) = find_runs(str(tmp_path / "node0"))
    log_dir = tmp_path / "node0" / "runs" / "multinode" / "version_0"
    assert [s for s, _ in tb_scalars(log_dir, "grad/norm_total")] == [1, 3, 5]
    assert [s for s, _ in run.series("grad/norm_total")] == [1, 3, 5]

    # host values per node, aggregated over ranks: node 1's host holds 300 MiB more, and says so
    rss_max = tb_scalars(log_dir, "memory/host/rss_gib_max")
    rss_min = tb_scalars(log_dir, "memory/host/rss_gib_min")
    assert [v for _, v in tb_scalars(log_dir, "memory/host/rss_gib_max_rank")] == [1.0, 1.0, 1.0]
    assert all(hi - lo > 0.2 for (_, hi), (_, lo) in zip(rss_max, rss_min, strict=True))
    assert all(0.05 < lo < hi < 64 for (_, hi), (_, lo) in zip(rss_max, rss_min, strict=True))
