"""What a stalled rank writes: every thread's Python stack, the phase, the step, the seconds since the last
progress and the DataLoader worker pids, in ``stalls/rank{R}-step{S}.txt``."""

from __future__ import annotations

import multiprocessing
import os
import sys
import threading
import traceback
from typing import Optional

from lightning_monitor._stall.watch import Stall


def top_frame(thread_id: int) -> str:
    """The innermost frame of a thread as ``function (file:line)``; ``?`` when the thread is gone."""
    frame = sys._current_frames().get(thread_id)
    if frame is None:
        return "?"
    code = frame.f_code
    return f"{code.co_name} ({os.path.basename(code.co_filename)}:{frame.f_lineno})"


def worker_pids() -> list[int]:
    """The pids of this process's live child processes (the DataLoader's workers among them)."""
    return sorted(p.pid for p in multiprocessing.active_children() if p.pid is not None)


def text(stall: Stall, *, rank: int, training_thread: int, now_wall: float) -> str:
    """The dump: a header, then every thread's stack, the training thread (the one that runs the hooks) first."""
    frames = sys._current_frames()
    names = {t.ident: t.name for t in threading.enumerate()}
    mark = stall.mark
    lines = [
        "lightning-monitor: StallMonitor stack dump",
        f"rank: {rank}",
        f"pid: {os.getpid()}",
        f"step: {mark.step}",
        f"phase: {mark.phase}",
        f"seconds_since_progress: {stall.seconds:.1f}",
        f"limit_sec: {stall.limit:.1f}",
        f"time: {now_wall:.3f}",
        f"dataloader_worker_pids: {' '.join(map(str, worker_pids())) or '-'}",
        f"training_thread: {training_thread}",
        "",
    ]
    order = sorted(frames, key=lambda ident: (ident != training_thread, ident))
    for ident in order:
        role = " (training thread)" if ident == training_thread else ""
        lines.append(f"--- thread {ident} {names.get(ident, '?')}{role}")
        lines.extend(line.rstrip("\n") for line in traceback.format_stack(frames[ident]))
        lines.append("")
    return "\n".join(lines)


def write(folder: str, rank: int, step: int, body: str) -> tuple[Optional[str], Optional[OSError]]:
    """``body`` into ``folder/rank{R}-step{S}.txt`` (``-2``, ``-3``... for a later stall at the same step): the path,
    or the error."""
    try:
        os.makedirs(folder, exist_ok=True)
        path = os.path.join(folder, f"rank{rank}-step{step}.txt")
        n = 1
        while os.path.exists(path):
            n += 1
            path = os.path.join(folder, f"rank{rank}-step{step}-{n}.txt")
        with open(path, "w", encoding="utf-8") as f:
            f.write(body)
        return path, None
    except OSError as err:
        return None, err
