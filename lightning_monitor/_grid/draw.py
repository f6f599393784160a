"""Drawing for :class:`~lightning_monitor.PredictionGridMonitor`: tiles with their labels drawn in, and the grid.

Every tile is the (scaled) input image with a label band under it: the prediction and its confidence on the first
line (``"9 | 0.55"``), the true label on the second (``"true 4"``). A wrong prediction gets a :data:`FRAME_PX`
pixel frame in :data:`WRONG_RGB` around the whole tile. Text is drawn with PIL's default font, so it shows the same
in TensorBoard and wandb (a wandb caption alone is invisible in TensorBoard).

Sizes are chosen for TensorBoard's default image card, where nobody clicks "show actual image size": the card fits
the image into a box of about :data:`CARD_PX` (``object-fit: contain``, scaled up or down), so what is legible there
depends on the label's size relative to the whole grid. The label font is a fixed share of the tile width (the
largest size at which ``"9 | 0.55"`` fits), and :func:`columns` picks the number of columns that shows the grid
largest in that box.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch.nn import functional as F

#: width in pixels of the frame around a wrongly predicted tile
FRAME_PX = 3
#: pixels between the tile's edge and its text (the frame plus one)
TEXT_MARGIN_PX = FRAME_PX + 1
WRONG_RGB = (255, 0, 0)
BAND_RGB = (32, 32, 32)
RIGHT_TEXT_RGB = (110, 235, 110)
WRONG_TEXT_RGB = (255, 110, 110)
TEXT_RGB = (235, 235, 235)
#: value of the padding between tiles (white, so dark images stay apart)
PAD_VALUE = 255
#: the widest first line of a class-id label: the font is the largest at which it fits the tile
LABEL_SAMPLE = "9 | 0.55"
#: (width, height) in CSS pixels of the box TensorBoard's time-series dashboard fits an image into in its default,
#: narrowest image card (tensorboard 2.x ``image_card_component``): cards are ``minmax(335px, 1fr)`` wide with 16 px
#: side padding and a 1 px border (335 - 32 - 2 = 301); ``min-height: 320px`` less the 4 + 16 px vertical padding,
#: the two heading lines (48 px icon buttons, a 13 px run line), 4 px margin and the 24 px step slider leaves about
#: 200. The ``img`` is ``height: 100%; max-width: 100%; object-fit: contain``: scaled to the box in both directions.
CARD_PX = (301, 200)
#: the smallest digit height, in displayed pixels, counted as legible (about a 10 px font)
LEGIBLE_DIGIT_PX = 7.0


@functools.cache
def _font(size: int) -> Any:
    from PIL import ImageFont

    try:
        return ImageFont.load_default(size=size)  # a scalable font (Pillow >= 10.1 with FreeType)
    except TypeError:  # an older Pillow: its one bitmap font, about 11 px
        return ImageFont.load_default()


def warm_up() -> None:
    """Imports what drawing and writing a grid need (Pillow's image plugins, the PNG encoder TensorBoard's
    ``add_image`` uses, ``make_grid``): ~8 ms, a one-off of the first grid otherwise, which the cost budget would read
    as what every grid costs."""
    from PIL import Image, ImageDraw  # noqa: F401
    from torchvision.utils import make_grid  # noqa: F401

    Image.preinit()  # Pillow's documented loader of its common format plugins (PNG among them)


@functools.cache
def font_px(tile_width: int) -> int:
    """The label font size of a tile ``tile_width`` pixels wide: the largest at which :data:`LABEL_SAMPLE` fits."""
    room = tile_width - 2 * TEXT_MARGIN_PX
    size = max(6, tile_width // 3)
    while size > 6 and _font(size).getlength(LABEL_SAMPLE) > room:
        size -= 1
    return size


def band_px(tile_width: int) -> int:
    """Height in pixels of the label band (two lines) under the picture of a tile ``tile_width`` pixels wide."""
    return 2 * (font_px(tile_width) + 2) + 4


def digit_px(tile_width: int) -> int:
    """Height in pixels of a label digit in a tile ``tile_width`` pixels wide (as drawn, not as displayed)."""
    _, top, _, bottom = _font(font_px(tile_width)).getbbox("0123456789")
    return int(bottom - top)


def displayed_scale(width: int, height: int, card: tuple[int, int] = CARD_PX) -> float:
    """How much TensorBoard's default image card scales a ``width`` x ``height`` image (``object-fit: contain``)."""
    return min(card[0] / width, card[1] / height)


def grid_size(n: int, ncol: int, tile_w: int, tile_h: int, padding: int) -> tuple[int, int]:
    """(width, height) of :func:`grid`'s picture of ``n`` tiles in ``ncol`` columns."""
    ncol = min(ncol, n)
    rows = math.ceil(n / ncol)
    return ncol * (tile_w + padding) + padding, rows * (tile_h + padding) + padding


def columns(n: int, tile_w: int, tile_h: int, padding: int) -> int:
    """The number of columns (1..n) that shows ``n`` tiles largest in TensorBoard's default card."""
    return max(range(1, n + 1), key=lambda c: (displayed_scale(*grid_size(n, c, tile_w, tile_h, padding)), -c))


def display_images(
    images: torch.Tensor, tile_size: int, mean: Optional[Sequence[float]], std: Optional[Sequence[float]]
) -> np.ndarray:
    """``[N, C, H, W]`` inputs (C 1 or 3) to ``N x tile_size x W' x 3`` uint8 pictures (numpy, on the host).

    With ``mean``/``std`` the normalisation is undone (``x * std + mean``, clamped to 0..1); without, values already
    within 0..1 are kept and anything else is scaled from the set's own min..max (one range for the whole set, so
    tiles stay comparable). uint8 inputs are read as 0..255.
    """
    x = images.detach().cpu()
    x = x.float() / 255 if x.dtype == torch.uint8 else x.float()
    channels = x.shape[1]
    if mean is not None and std is not None:
        m = torch.tensor(list(mean), dtype=torch.float32).reshape(1, -1, 1, 1)
        s = torch.tensor(list(std), dtype=torch.float32).reshape(1, -1, 1, 1)
        x = (x * s + m).clamp(0, 1)
    else:
        x = torch.nan_to_num(x, nan=0.0, posinf=0.0, neginf=0.0)
        lo, hi = float(x.min()), float(x.max())
        if lo < 0 or hi > 1:
            x = (x - lo) / (hi - lo) if hi > lo else torch.zeros_like(x)
    if channels == 1:
        x = x.expand(-1, 3, -1, -1)
    height, width = x.shape[-2:]
    out_w = max(1, round(width * tile_size / height))
    if tile_size >= height:  # upscale: keep pixels crisp
        x = F.interpolate(x, size=(tile_size, out_w), mode="nearest")
    else:
        x = F.interpolate(x, size=(tile_size, out_w), mode="bilinear", antialias=True, align_corners=False)
    return (x.clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()


def _fit(draw: Any, text: str, width: int, font: Any) -> str:
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


@functools.lru_cache(maxsize=4096)
def _fitted(text: str, width: int, size: int) -> str:
    """``text`` cut (with "..") to ``width`` pixels in the label font of ``size``: labels repeat from grid to grid."""
    from PIL import Image, ImageDraw

    return _fit(ImageDraw.Draw(Image.new("RGB", (1, 1))), text, width, _font(size))


def blank(image: np.ndarray) -> Any:
    """The tile of one ``H x W x 3`` uint8 picture before its labels: a Pillow image of the picture above an empty
    label band (made once per sample, copied for each grid)."""
    from PIL import Image

    height, width = image.shape[:2]
    canvas = Image.new("RGB", (width, height + band_px(width)), BAND_RGB)
    canvas.paste(Image.fromarray(np.ascontiguousarray(image), mode="RGB"), (0, 0))
    return canvas


def tile(image: np.ndarray, lines: Sequence[tuple[str, tuple[int, int, int]]], wrong: bool, base: Any) -> np.ndarray:
    """One ``H x W x 3`` uint8 image to a ``(H + band_px(W)) x W x 3`` tile with (up to two) ``lines`` under it
    (``base``: the picture's :func:`blank`, kept between grids and copied here)."""
    from PIL import ImageDraw

    height, width = image.shape[:2]
    size = font_px(width)
    canvas = base.copy()
    draw = ImageDraw.Draw(canvas)
    font = _font(size)
    room = width - 2 * TEXT_MARGIN_PX
    for i, (text, colour) in enumerate(lines[:2]):
        draw.text((TEXT_MARGIN_PX, height + 2 + i * (size + 2)), _fitted(text, room, size), fill=colour, font=font)
    if wrong:
        w, h = canvas.size
        for k in range(FRAME_PX):
            draw.rectangle((k, k, w - 1 - k, h - 1 - k), outline=WRONG_RGB)
    return np.asarray(canvas)


def grid(tiles: Sequence[np.ndarray], nrow: int, padding: int) -> np.ndarray:
    """Tiles into one ``H x W x 3`` uint8 grid with torchvision's ``make_grid``."""
    from torchvision.utils import make_grid

    batch = torch.from_numpy(np.stack(tiles)).permute(0, 3, 1, 2).contiguous()
    if batch.shape[0] == 1:  # make_grid returns a lone image without its padding; keep the layout uniform
        _, channels, height, width = batch.shape
        out = torch.full((channels, height + 2 * padding, width + 2 * padding), PAD_VALUE, dtype=torch.uint8)
        out[:, padding : padding + height, padding : padding + width] = batch[0]
    else:
        out = make_grid(batch, nrow=nrow, padding=padding, pad_value=PAD_VALUE)
    return out.permute(1, 2, 0).numpy()  # a host tensor: no device transfer
