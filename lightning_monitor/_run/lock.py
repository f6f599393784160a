"""One job per run directory: the lock file a MultiLogger holds in ``save_dir/name/version`` while it writes.

Two jobs writing one run directory at once (a requeued job whose predecessor still runs, two launches with the same
``version``) would interleave two event files, share one step ledger and append to one wandb run. The first write of
a MultiLogger on global rank 0 (hyperparameters, the graph or ``save``, all before the first training step) takes
the lock; other ranks never touch it. A second job fails there with :class:`RunDirectoryInUseError` naming the
holder (host, pid) and how to pick another version.

A lock is stale, and taken over without a word, when its holder is gone:

- on this host: its pid no longer runs, or runs a process started later than the lock (the pid was reused);
- on another host: its heartbeat (the lock file's mtime, refreshed every :data:`HEARTBEAT_SEC` by a daemon thread
  of the holder) is older than :data:`STALE_SEC`.

The lock is released at ``finalize`` (a later ``fit``/``test`` of the same logger takes it again at its first write)
and at interpreter exit. Two jobs taking over the same stale lock in the same instant can both succeed: the lock
guards against overlapping jobs, not against simultaneous restarts.
"""

from __future__ import annotations

import atexit
import json
import os
import socket
import threading
import time
from typing import Any, Optional

#: the lock file inside the run directory
LOCK_NAME = "lightning-monitor.lock"
#: seconds between heartbeats (``os.utime`` of the lock file) of the job holding it
HEARTBEAT_SEC = 30.0
#: seconds without a heartbeat after which a lock held from another host is stale
STALE_SEC = 300.0


class RunDirectoryInUseError(RuntimeError):
    """Another live job holds the run directory (same ``save_dir/name/version``)."""


class _Held:
    """The lock this process holds on one run directory, its owners and its heartbeat thread."""

    def __init__(self, path: str) -> None:
        self.path = path
        self.pid = os.getpid()
        self.owners: set[int] = set()
        self.stop = threading.Event()
        self.thread = threading.Thread(target=self._beat, name="lightning-monitor-lock", daemon=True)
        self.thread.start()

    def _beat(self) -> None:
        while not self.stop.wait(HEARTBEAT_SEC):
            try:
                os.utime(self.path)
            except OSError:
                pass  # the run directory is gone or its disk failed: the writers report that


#: absolute lock path -> the lock this process holds (a forked child sees its parent's pid there: not its own)
_held: dict[str, _Held] = {}
_mutex = threading.Lock()


def lock_path(log_dir: str) -> str:
    return os.path.join(os.path.abspath(log_dir), LOCK_NAME)


def claim(log_dir: str, owner: object) -> None:
    """Take (or share, within this process) the lock of ``log_dir`` for ``owner``; create ``log_dir`` if needed.

    Raises:
        RunDirectoryInUseError: a live job elsewhere holds it.
    """
    path = lock_path(log_dir)
    with _mutex:
        held = _held.get(path)
        if held is None or held.pid != os.getpid():
            if not _acquire(path):
                return  # the run directory cannot be written: the writers' first write says so, naming it
            held = _held[path] = _Held(path)
        held.owners.add(id(owner))


def release(log_dir: str, owner: object) -> None:
    """``owner`` is done with ``log_dir``; the lock file goes when the last owner in this process is done."""
    path = lock_path(log_dir)
    with _mutex:
        held = _held.get(path)
        if held is None or held.pid != os.getpid():
            return
        held.owners.discard(id(owner))
        if not held.owners:
            _drop(held)


def holder(log_dir: str) -> Optional[dict[str, Any]]:
    """What the lock file of ``log_dir`` says about its holder (``host``, ``pid``, ``started``), or ``None``."""
    try:
        with open(lock_path(log_dir)) as f:
            info = json.load(f)
        return info if isinstance(info, dict) else None
    except (OSError, ValueError):
        return None


def _drop(held: _Held) -> None:
    held.stop.set()
    _held.pop(held.path, None)
    info = holder(os.path.dirname(held.path))
    if info is not None and info.get("pid") == held.pid and info.get("host") == socket.gethostname():
        try:
            os.remove(held.path)
        except OSError:
            pass


def _acquire(path: str) -> bool:
    """Create the lock file, taking over a stale one; ``False`` when it cannot be written (disk full, a size
    limit): the run goes on without a lock, and fails at its first write with the writer's error."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    me = {"host": socket.gethostname(), "pid": os.getpid(), "started": _process_start(os.getpid()),
          "since": time.strftime("%Y-%m-%d %H:%M:%S")}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            info = holder(os.path.dirname(path))
            if info is None and _age(path) < 5.0:
                time.sleep(0.2)  # being written by a job starting right now: read it again
                continue
            if info is not None and _alive(info, path):
                raise RunDirectoryInUseError(_in_use_message(os.path.dirname(path), info)) from None
            try:
                os.remove(path)  # stale: its job is gone
            except FileNotFoundError:
                pass
            continue
        except OSError:
            return False
        try:
            with os.fdopen(fd, "w") as f:
                json.dump(me, f)
        except OSError:
            os.remove(path)
            return False
        return True
    info = holder(os.path.dirname(path)) or {"host": "?", "pid": "?", "since": "?"}
    raise RunDirectoryInUseError(_in_use_message(os.path.dirname(path), info))


def _alive(info: dict[str, Any], path: str) -> bool:
    """Whether the job named in a lock file still runs (see the module docstring)."""
    if info.get("host") != socket.gethostname():
        return _age(path) < STALE_SEC
    pid = info.get("pid")
    if not isinstance(pid, int) or pid == os.getpid():
        return False  # our own pid: a predecessor of this process (e.g. a restarted container's pid 1) left it
    started = _process_start(pid)
    if started is None:
        return False
    recorded = info.get("started")
    return not isinstance(recorded, (int, float)) or started <= recorded + 1.0


def _process_start(pid: int) -> Optional[float]:
    """When process ``pid`` started (seconds since the epoch), or ``None`` when no such process runs."""
    import psutil

    try:
        return float(psutil.Process(pid).create_time())
    except (psutil.NoSuchProcess, psutil.ZombieProcess):
        return None
    except psutil.Error:
        return 0.0  # it exists but cannot be inspected (another user's): taken as the holder


def _age(path: str) -> float:
    try:
        return time.time() - os.stat(path).st_mtime
    except OSError:
        return float("inf")


def _in_use_message(log_dir: str, info: dict[str, Any]) -> str:
    return (
        f"The run directory {log_dir} is in use by another job (host {info.get('host')}, pid {info.get('pid')},"
        f" since {info.get('since')}): two jobs on one version would mix their event files, step ledger and wandb"
        " run. Pass another `version=` to MultiLogger (or leave it None for the next free one), or stop that job"
        f" first. If that job is already gone (on another host its lock counts as stale after {STALE_SEC:.0f} s"
        f" without a heartbeat), delete {os.path.join(log_dir, LOCK_NAME)}."
    )


@atexit.register
def _release_all() -> None:
    with _mutex:
        for held in list(_held.values()):
            if held.pid == os.getpid():
                _drop(held)
