"""The run directory's disk: free space watched during the run, and what each backend keeps when it fails.

Both backends keep their files in the run directory: TensorBoard's event file, and wandb's run (MultiLogger always
gives wandb ``dir=<run directory>``; an offline run is only those files). So when that directory is deleted or its
disk is full, an offline wandb run keeps nothing either, although wandb itself says so only in its debug log. An
online run still sends to the server what its service can, but its local copy is lost.
"""

from __future__ import annotations

import errno
import os
import shutil
import time
from typing import Optional

from lightning.pytorch.utilities import rank_zero_warn

from lightning_monitor._writers.backends import os_error

#: free space below which the run directory's disk is reported low: this, or a tenth of a smaller disk
LOW_SPACE_BYTES = 1 << 30
#: seconds between two looks at the free space (one ``shutil.disk_usage``, a ``statvfs`` call, about 2 us)
CHECK_EVERY_SEC = 10.0
#: ``errno`` values that say a disk or a quota is full
FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)


def low_space(total: int) -> int:
    """Free bytes under which a disk of ``total`` bytes is reported low (1 GiB, or a tenth of a smaller disk)."""
    return min(LOW_SPACE_BYTES, total // 10)


class DiskWatch:
    """Looks at the free space of the run directory's disk at most every :data:`CHECK_EVERY_SEC` (the first look at
    the first write), and warns once when it is below :func:`low_space`, well before it is full."""

    def __init__(self, log_dir: str) -> None:
        self.log_dir = log_dir
        self.next_check = 0.0
        self.warned = False

    def check(self) -> None:
        now = time.monotonic()
        if now < self.next_check or self.warned:
            return
        self.next_check = now + CHECK_EVERY_SEC
        try:
            usage = shutil.disk_usage(self.log_dir)
        except OSError:
            return  # no run directory (deleted, not made yet): the writers report a deleted one
        if usage.free < low_space(usage.total):
            self.warned = True
            rank_zero_warn(
                f"The disk of the run directory {self.log_dir} is almost full: {_size(usage.free)} free of"
                f" {_size(usage.total)}. When it is full TensorBoard stops and wandb's run, stored in the same"
                " directory, keeps nothing more; free some space, or start the run with another `save_dir`."
            )


def fault(log_dir: str, err: Optional[BaseException]) -> Optional[str]:
    """``"deleted"`` when the run directory is gone, ``"full"`` when ``err`` says its disk or quota is full, ``None``
    for any other error (a per-file size limit, a permission, a backend's own failure)."""
    if not os.path.isdir(log_dir):
        return "deleted"
    cause = os_error(err)
    return "full" if cause is not None and cause.errno in FULL_ERRNOS else None


def what_is_kept(log_dir: str, kind: str, tensorboard: bool, wandb: Optional[bool]) -> str:
    """The warning for a run directory that was deleted (``kind="deleted"``) or whose disk is full (``"full"``):
    what TensorBoard (if ``tensorboard``) and wandb (``wandb``: ``True`` online, ``False`` offline, ``None`` off)
    still keep."""
    if kind == "deleted":
        head = f"The run directory {log_dir} was deleted during the run"
        lost = "its files are gone"
    else:
        head = f"The disk of the run directory {log_dir} is full"
        lost = "it cannot write its files"
    parts = [head + "; training goes on."]
    if tensorboard:
        parts.append(f"TensorBoard keeps nothing more ({lost}); lightning-monitor stops writing to it.")
    if wandb is False:
        parts.append(
            f"wandb's offline run lives in that directory and keeps nothing more either ({lost}, and wandb says so"
            " only in its debug log); lightning-monitor stops writing to it."
        )
    elif wandb:
        parts.append(f"wandb is online: the server keeps what wandb sends, but its local copy is lost ({lost}).")
    if not wandb:
        parts.append("Nothing more of this run is logged.")
    return " ".join(parts)


def _size(n: float) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
