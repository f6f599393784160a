import os
import sys

import pytest

sys.path.insert(0, os.path.dirname(__file__))


@pytest.fixture(autouse=True)
def _isolated(request, tmp_path, monkeypatch):
    """Each test runs in its own directory with no W&B credentials, so wandb runs offline and writes there.

    The monitors' cost budget (which spaces out histograms and grids by measured time) is off, through its
    environment switch (inherited by DDP and job subprocesses): a test asserts what a monitor logs at each step, not
    what this loaded machine's clock allowed. Tests marked ``budget`` keep it on."""
    monkeypatch.chdir(tmp_path)
    if request.node.get_closest_marker("budget") is None:
        monkeypatch.setenv("LIGHTNING_MONITOR_COST_BUDGET", "off")
    else:
        monkeypatch.delenv("LIGHTNING_MONITOR_COST_BUDGET", raising=False)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_PROJECT", "WANDB_DIR", "WANDB_BASE_URL"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("NETRC", str(tmp_path / "no-netrc"))
    monkeypatch.setenv("WANDB_SILENT", "true")


@pytest.fixture(autouse=True)
def _fresh_process_state(monkeypatch):
    """Each test starts from the state a fresh process has, whatever ran before it (the suite runs in a random
    order, pytest-randomly): the package's once-per-process memories are empty, its clock is real, torch's global
    generator is seeded the same way for every test, and Lightning's seed variables are unset.

    - ``_writers.media._downscaled``: keys already warned about as downscaled (a later test logging the same key
      would get no warning);
    - ``_run.wandb_start._announced``: run ids already announced as offline;
    - ``_writers.backends._seconds_writing``: host seconds spent writing, summed over the process;
    - ``_core.clock``: a test that set a fake clock and failed before restoring it;
    - ``torch``'s default generator: a model built with ``torch.randn`` / default init gets the same weights
      whichever tests ran first (pytest-randomly reseeds ``random`` and numpy, not torch);
    - ``PL_GLOBAL_SEED`` / ``PL_SEED_WORKERS``: set by ``seed_everything`` and read by Lightning in later
      processes (``ddp_spawn`` workers, DataLoader workers).
    """
    import torch

    from lightning_monitor._core import clock as _clock
    from lightning_monitor._run import wandb_start as _wandb_start
    from lightning_monitor._writers import backends as _backends
    from lightning_monitor._writers import media as _media

    monkeypatch.setattr(_media, "_downscaled", set())
    monkeypatch.setattr(_wandb_start, "_announced", set())
    monkeypatch.setattr(_backends, "_seconds_writing", 0.0)
    for var in ("PL_GLOBAL_SEED", "PL_SEED_WORKERS"):
        monkeypatch.delenv(var, raising=False)
    _clock.reset()
    torch.manual_seed(0)
    yield
    _clock.reset()
    _no_wandb_run_left()


def _no_wandb_run_left() -> None:
    """A test that left a wandb run open (a plain ``WandbLogger`` is never finished by Lightning) must not hand it to
    the next test: a later ``WandbLogger`` reuses ``wandb.run``, whose service an earlier test may have killed (the
    suite in a random order put ``test_plain_logger_list_gets_the_same_isolation`` before
    ``test_dispatch_to_plain_list_and_csv``). Finished within a bound; a run whose service is gone is dropped."""
    wandb = sys.modules.get("wandb")
    run = getattr(wandb, "run", None) if wandb is not None else None
    if run is None:
        return
    from lightning_monitor._run import wandb_start

    try:
        wandb_start.finish(run, exit_code=0, timeout=20)
    except Exception:  # noqa: BLE001 - its service is gone: drop the connection, forget the run (wandb 0.31 keeps
        wandb_start._teardown()  # it in wandb.run even then, and a later WandbLogger would reuse it)
        from wandb.sdk.lib import module as wandb_globals

        wandb_globals.unset_globals()


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



def _seed_line(config):
    """pytest-randomly's seed and how to replay the order, or ``None`` when the suite runs in file order."""
    seed = getattr(config.option, "randomly_seed", None)
    if not config.pluginmanager.hasplugin("randomly") or seed is None:
        return None
    return f"Using --randomly-seed={seed} (`python -m pytest -q --randomly-seed={seed}` replays this order)"


def pytest_collection_finish(session):
    """Under ``-q`` pytest hides its header, pytest-randomly's seed line with it: print the seed before the first
    test anyway (a CI job killed by its timeout still shows it) and again in the summary."""
    reporter = session.config.pluginmanager.get_plugin("terminalreporter")
    line = _seed_line(session.config)
    if reporter is not None and line is not None and session.config.option.verbose < 0:
        reporter.write_line(line)


def pytest_terminal_summary(terminalreporter, exitstatus, config):
    """The seed again, last, so that a failure that depends on the order can be replayed."""
    line = _seed_line(config)
    if line is not None:
        terminalreporter.write_line(line)
