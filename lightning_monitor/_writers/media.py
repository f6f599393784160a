"""Conversions shared by every backend: images to uint8 HWC, histograms to (counts, edges, stats).

TensorBoard multiplies float images by 255 while wandb rescales them by their own range, so the same float
tensor becomes two different pictures. Everything is converted to uint8 here first, and both backends get the
same bytes.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional, Union

import numpy as np
import torch

MAX_WANDB_BINS = 512  # wandb.Histogram refuses more
#: the longest side, in pixels, of a logged image: a larger one is downscaled by an integer factor (one warning).
#: Measured on 2 CPU cores, an 8192 x 8192 RGB float image takes 82 s and peaks at ~6 GB uncapped.
MAX_IMAGE_SIDE = 2048
_BAND_ELEMENTS = 1 << 23  # values converted to float32 at a time while downscaling (32 MiB)
_downscaled: set[str] = set()  # keys already warned about


def to_uint8_hwc(image: Any, key: str = "image") -> np.ndarray:
    """Return ``image`` as an ``H x W x C`` uint8 array with C in {1, 3, 4}, its longest side at most
    :data:`MAX_IMAGE_SIDE` pixels.

    Accepts torch tensors or numpy arrays shaped ``H x W``, ``C x H x W`` or ``H x W x C`` (C in 1, 3, 4), of
    dtype uint8, bool, any integer or any float. A 3-d torch tensor is channel-first when its first dimension is 1, 3
    or 4 (as torchvision and wandb read tensors), a 3-d numpy array channel-last when its last one is (as PIL and
    matplotlib read arrays). uint8 is kept as is; floats within [0, 1] are scaled by 255; integers within [0, 255] are
    cast; anything else (normalised floats, wider integer ranges) is scaled from its own min..max to 0..255.
    Non-finite values become 0. A larger image is first downscaled by an integer factor (the mean of each block of
    pixels, computed in float32 bands of at most ``_BAND_ELEMENTS`` values, in the image's own dtype and device until
    then), with one warning per key.

    Raises:
        ValueError: for any other shape or an image without pixels, naming ``key`` and the shape.
    """
    tensor = image.detach() if isinstance(image, torch.Tensor) else None
    array: Any = tensor if tensor is not None else np.asarray(image)
    shape = tuple(array.shape)
    if array.ndim == 2:
        array = array[:, :, None]
    elif array.ndim == 3:
        channel_first = shape[0] in (1, 3, 4) and (tensor is not None or shape[2] not in (1, 3, 4))
        if channel_first:
            array = array.permute(1, 2, 0) if tensor is not None else np.transpose(array, (1, 2, 0))
        elif shape[2] not in (1, 3, 4):
            raise ValueError(
                f"image {key!r} has shape {shape}: expected H x W, C x H x W or H x W x C with C in 1, 3, 4"
            )
    else:
        raise ValueError(
            f"image {key!r} has shape {shape}: expected H x W, C x H x W or H x W x C with C in 1, 3, 4"
            " (log a batch of images as a grid, e.g. with torchvision.utils.make_grid)"
        )
    if 0 in array.shape:
        raise ValueError(f"image {key!r} has shape {shape}: an image needs at least one pixel")
    kind = _kind(array.dtype)
    factor = -(-max(array.shape[0], array.shape[1]) // MAX_IMAGE_SIDE)
    if factor > 1:
        array = _downscale(torch.as_tensor(array), factor, key)  # float32, small: before any full-size copy
    elif tensor is not None:
        array = array.float() if array.dtype in (torch.bfloat16, torch.float16) else array
    if isinstance(array, torch.Tensor):
        array = array.cpu().numpy()
    if kind == "uint8":
        return np.ascontiguousarray(array if factor == 1 else np.round(array).astype(np.uint8))
    if kind == "bool":
        return array.astype(np.uint8) * 255 if factor == 1 else np.round(array * 255).astype(np.uint8)
    array = array.astype(np.float64)
    array = np.where(np.isfinite(array), array, 0.0)
    lo, hi = float(array.min()), float(array.max())
    if kind == "int":
        if lo >= 0 and hi <= 255:
            return np.round(array).astype(np.uint8)
    elif lo >= 0 and hi <= 1:
        return np.round(array * 255).astype(np.uint8)
    if hi <= lo:
        return np.zeros(array.shape, dtype=np.uint8)
    return np.round((array - lo) / (hi - lo) * 255).astype(np.uint8)


def _kind(dtype: Any) -> str:
    """``uint8``, ``bool``, ``int`` or ``float``: how the values of an image of ``dtype`` map to 0..255."""
    name = str(dtype).removeprefix("torch.")
    if name == "uint8":
        return "uint8"
    if name == "bool":
        return "bool"
    return "float" if "float" in name else "int"


def _downscale(image: torch.Tensor, factor: int, key: str) -> torch.Tensor:
    """``H x W x C`` ``image`` shrunk by ``factor`` (each output pixel the float32 mean of a ``factor``-square block;
    edge blocks average the pixels they hold), converted band by band so memory stays bounded; one warning per key."""
    height, width, channels = image.shape
    if key not in _downscaled:
        _downscaled.add(key)
        from lightning.pytorch.utilities import rank_zero_warn

        rank_zero_warn(
            f"image {key!r} is {height} x {width} px: logged downscaled by {factor} (block mean) to"
            f" {-(-height // factor)} x {-(-width // factor)} px; the longest side is capped at {MAX_IMAGE_SIDE} px"
            " (lightning_monitor._writers.media.MAX_IMAGE_SIDE) so one image costs a bounded time and memory. Log a"
            " smaller image to choose the resampling yourself."
        )
    rows = max(factor, _BAND_ELEMENTS // (width * channels) // factor * factor)
    bands = []
    for top in range(0, height, rows):
        band = image[top : top + rows].permute(2, 0, 1).to(torch.float32).contiguous()  # C x rows x W: pooled fast
        bands.append(torch.nn.functional.avg_pool2d(band[None], factor, stride=factor, ceil_mode=True)[0])
    return torch.cat(bands, dim=1).permute(1, 2, 0)


@dataclass(frozen=True)
class Images:
    """One or more pictures ready for every backend: uint8 ``H x W x C`` arrays, one caption each (or none)."""

    key: str
    arrays: list[np.ndarray]
    captions: Optional[list[str]]


def prepare_images(key: str, images: Any, caption: Optional[Union[str, Sequence[str]]] = None) -> Images:
    """One image or a list of them as uint8 HWC arrays, with one caption per image (a single string is shared).

    Raises:
        ValueError: no image, an unsupported shape (naming it), or a caption list of another length than the images.
    """
    batch = list(images) if isinstance(images, (list, tuple)) else [images]
    if not batch:
        raise ValueError(f"image {key!r}: an empty list; pass one image or a non-empty list")
    arrays = [to_uint8_hwc(image, key) for image in batch]
    captions = [caption] * len(arrays) if isinstance(caption, str) else None if caption is None else list(caption)
    if captions is not None and len(captions) != len(arrays):
        raise ValueError(f"image {key!r}: {len(arrays)} images but {len(captions)} captions")
    return Images(key, arrays, captions)


def encode_png(image: np.ndarray) -> bytes:
    """``H x W x C`` uint8 (C 3 or 4) as PNG bytes, zlib level 1 (lossless; fast rather than smallest)."""
    from PIL import Image

    out = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(image)).save(out, format="PNG", compress_level=1)
    return out.getvalue()


def to_rgb(image: np.ndarray) -> np.ndarray:
    """Grey HWC uint8 to three channels (TensorBoard's image plugin expects RGB or RGBA)."""
    return np.repeat(image, 3, axis=2) if image.shape[2] == 1 else image


@dataclass(frozen=True)
class HistogramData:
    """Bin counts with their ``len(counts) + 1`` edges, and exact statistics of the binned values."""

    counts: np.ndarray
    edges: np.ndarray
    min: float
    max: float
    num: float
    sum: float
    sum_squares: float


def make_histogram(
    values_or_counts: Any,
    edges: Optional[Union[Sequence[float], np.ndarray, torch.Tensor]] = None,
    bins: int = 64,
    key: str = "histogram",
    stats: Optional[dict] = None,
) -> HistogramData:
    """Build a :class:`HistogramData` from raw values (binned here) or from ``counts`` with their ``edges``.

    ``stats`` may carry exact ``min``/``max``/``num``/``sum``/``sum_squares`` when the counts came from a sample;
    without it they are taken from the values, or estimated from bin centres.
    """
    if edges is None:
        values = values_or_counts
        if isinstance(values, torch.Tensor):
            values = values.detach().float().flatten().cpu().numpy()
        values = np.asarray(values, dtype=np.float64).ravel()
        values = values[np.isfinite(values)]
        if values.size == 0:
            raise ValueError(f"histogram {key!r} has no finite values to bin")
        lo, hi = float(values.min()), float(values.max())
        if hi <= lo:
            lo, hi = lo - 0.5, hi + 0.5
        counts, bin_edges = np.histogram(values, bins=bins, range=(lo, hi))
        data_stats = dict(
            min=float(values.min()),
            max=float(values.max()),
            num=float(values.size),
            sum=float(values.sum()),
            sum_squares=float((values * values).sum()),
        )
    else:
        counts = values_or_counts
        if isinstance(counts, torch.Tensor):
            counts = counts.detach().cpu().numpy()
        if isinstance(edges, torch.Tensor):
            edges = edges.detach().cpu().numpy()
        counts = np.asarray(counts, dtype=np.float64).ravel()
        bin_edges = np.asarray(edges, dtype=np.float64).ravel()
        if bin_edges.size != counts.size + 1:
            raise ValueError(
                f"histogram {key!r}: {counts.size} counts need {counts.size + 1} edges, got {bin_edges.size}"
            )
        centres = (bin_edges[:-1] + bin_edges[1:]) / 2
        data_stats = dict(
            min=float(bin_edges[0]),
            max=float(bin_edges[-1]),
            num=float(counts.sum()),
            sum=float((counts * centres).sum()),
            sum_squares=float((counts * centres * centres).sum()),
        )
    if counts.size > MAX_WANDB_BINS:
        raise ValueError(f"histogram {key!r} has {counts.size} bins; wandb accepts at most {MAX_WANDB_BINS}")
    if stats:
        data_stats.update({k: float(v) for k, v in stats.items() if k in data_stats})
    return HistogramData(counts=np.asarray(counts, dtype=np.float64), edges=bin_edges, **data_stats)
