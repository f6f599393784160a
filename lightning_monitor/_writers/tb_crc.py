"""TensorBoard's event-file checksum in C (``google-crc32c``) instead of TensorBoard's pure-Python loop.

TensorBoard's writer (used by ``torch.utils.tensorboard.SummaryWriter`` and so by Lightning's ``TensorBoardLogger``)
checksums every record with a CRC32C written in Python, ~130 ns per byte: 10 ms for the 74 KB event of 64
gradient histograms and 200 group norms. It runs on the writer's thread but holds the GIL, so training pays it.
:func:`use_fast_crc` swaps in the C implementation of the same checksum (identical bytes on disk, checked against
TensorBoard's own function on first use) for every TensorBoard writer in the process. Nothing changes when
``google-crc32c`` has no C extension on this platform or TensorBoard no longer has the function we replace.

The swap is made in one place, :func:`use_fast_crc`, when the first TensorBoard writer of lightning-monitor is made,
and it applies to every TensorBoard writer of the process, the user's own ``SummaryWriter`` included (the bytes on
disk are the same). ``LIGHTNING_MONITOR_FAST_CRC=off`` in the environment leaves TensorBoard's own function alone.
"""

from __future__ import annotations

import functools
import os
import warnings
from collections.abc import Callable

_MASK_DELTA = 0xA282EAD8
#: the environment variable that keeps TensorBoard's own (pure-Python) checksum: ``off``
ENV_OFF = "LIGHTNING_MONITOR_FAST_CRC"


def _masked(crc: Callable[[bytes], int]) -> Callable[[bytes], int]:
    def masked_crc32c(data: bytes) -> int:
        """TFRecord's masked CRC32C of ``data`` (rotate right 15 bits, add a constant), as TensorBoard's."""
        x = crc(data)
        return (((x >> 15) | (x << 17)) + _MASK_DELTA) & 0xFFFFFFFF

    return masked_crc32c


@functools.cache
def use_fast_crc() -> bool:
    """Make TensorBoard's record writer checksum in C; True when it does (runs once, never raises)."""
    if os.environ.get(ENV_OFF, "").strip().lower() == "off":
        return False  # the user keeps TensorBoard's own checksum (read when the first writer is made)
    try:
        with warnings.catch_warnings():  # its "pure python implementation is slower" warning: we then do nothing
            warnings.simplefilter("ignore")
            import google_crc32c
        from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
        from tensorboard.summary.writer import record_writer
    except ImportError:
        return False
    if google_crc32c.implementation != "c" or record_writer.masked_crc32c is not pywrap_tensorflow.masked_crc32c:
        return False  # only a slow fallback here, or somebody already replaced it: leave it alone
    fast = _masked(google_crc32c.value)
    probe = bytes(range(256)) * 3
    if fast(probe) != pywrap_tensorflow.masked_crc32c(probe):
        return False
    record_writer.masked_crc32c = fast
    return True
