"""Drawing for :class:`~lightning_monitor.PredictionGridMonitor`: tiles with their labels drawn in, and the grid.

Every tile is the (upscaled) input image with a label band of :data:`BAND_PX` pixels under it: the prediction with
its confidence on the first line, the true label on the second. A wrong prediction gets a :data:`FRAME_PX` pixel
frame in :data:`WRONG_RGB` around the whole tile. Text is drawn with PIL's default font, so it shows the same in
TensorBoard and wandb (a wandb caption alone is invisible in TensorBoard).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch
from torch.nn import functional as F

#: height in pixels of the label band under each image (two lines of PIL's default font)
BAND_PX = 26
#: width in pixels of the frame around a wrongly predicted tile
FRAME_PX = 3
WRONG_RGB = (255, 0, 0)
BAND_RGB = (32, 32, 32)
RIGHT_TEXT_RGB = (110, 235, 110)
WRONG_TEXT_RGB = (255, 110, 110)
TEXT_RGB = (235, 235, 235)
#: value of the padding between tiles (white, so dark images stay apart)
PAD_VALUE = 255

_font = None


def _default_font():
    global _font
    if _font is None:
        from PIL import ImageFont

        _font = ImageFont.load_default()
    return _font


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


def _fit(draw: Any, text: str, width: int) -> str:
    font = _default_font()
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "..", font=font) > width:
        text = text[:-1]
    return text + ".."


def tile(image: np.ndarray, lines: Sequence[tuple[str, tuple[int, int, int]]], wrong: bool) -> np.ndarray:
    """One ``H x W x 3`` uint8 image to a ``(H + BAND_PX) x W x 3`` tile with ``lines`` drawn under it."""
    from PIL import Image, ImageDraw

    height, width = image.shape[:2]
    canvas = Image.new("RGB", (width, height + BAND_PX), BAND_RGB)
    canvas.paste(Image.fromarray(np.ascontiguousarray(image), mode="RGB"), (0, 0))
    draw = ImageDraw.Draw(canvas)
    font = _default_font()
    margin = FRAME_PX + 1
    line_h = (BAND_PX - 2) // max(1, len(lines))
    for i, (text, colour) in enumerate(lines):
        draw.text((margin, height + 1 + i * line_h), _fit(draw, text, width - 2 * margin), fill=colour, font=font)
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
