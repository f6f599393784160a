import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _isolated(tmp_path, monkeypatch):
    """Each test runs in its own directory with no W&B credentials, so wandb runs offline and writes there."""
    monkeypatch.chdir(tmp_path)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


def pytest_collection_modifyitems(config, items):
    import torch

    for item in items:  # see TORCH_EXIT_ABORT: re-run on exactly that failure, never on another
        item.add_marker(TORCH_EXIT_ABORT_RERUN)
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


#: torch's spawned DDP workers can abort at interpreter exit ("terminate called without an active exception",
#: SIGABRT) after the fit has finished, when the two ranks tear the gloo process group down at the same time under
#: load. Tests that use ``strategy="ddp_spawn"`` are re-run on exactly that failure, never on an assertion.
SPAWN_ABORT_RERUN = pytest.mark.flaky(reruns=2, only_rerun=["ProcessExitedException"])
#: The same abort in a 2-process job a test runs as a subprocess (``strategy="ddp"``, FSDP2): the job's output ends
#: with torch's message and its exit code is -6 although every rank finished. Any test whose failure message holds
#: that message (the tests put the job's output in their assertion messages) is re-run, up to twice.
TORCH_EXIT_ABORT_RERUN = pytest.mark.flaky(reruns=2, only_rerun=["terminate called without an active exception"])
