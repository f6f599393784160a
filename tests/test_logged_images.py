"""Images of any dtype, range and layout become the same picture in TensorBoard and wandb; huge ones are
downscaled once, impossible shapes are errors naming the key."""

from __future__ import annotations

import os

import numpy as np
import pytest
import torch
from helpers import find_runs, tb_images
from PIL import Image

from lightning_monitor import MultiLogger


@pytest.fixture(autouse=True)
def _no_key_warned_yet(monkeypatch):
    """_media warns about a downscaled key once per process: every test here starts with none warned about, so
    the warnings it expects come in any order (and on a re-run)."""
    from lightning_monitor._writers import media as _media

    monkeypatch.setattr(_media, "_downscaled", set())


RAMP = np.arange(12 * 16).reshape(12, 16)  # distinct values so a wrong scaling cannot go unnoticed


IMAGE_CASES = {
    # name: (image as logged, the uint8 picture it must become, computed here independently)
    "uint8_hwc_rgb": (np.stack([RAMP % 256] * 3, axis=2).astype(np.uint8), np.stack([RAMP % 256] * 3, 2)),
    "float01_chw_rgb": (torch.tensor(RAMP / RAMP.max()).expand(3, 12, 16).float(),
                        np.stack([np.round(RAMP / RAMP.max() * 255)] * 3, 2)),
    "normalised_float_grey": (torch.tensor((RAMP - 95.5) / 50.0).float()[None],
                              np.round(RAMP / RAMP.max() * 255)[:, :, None]),
    "int64_0_255_grey": (torch.tensor(RAMP % 200), (RAMP % 200)[:, :, None]),
    "int32_wide_range": (torch.tensor(RAMP * 1000, dtype=torch.int32), np.round(RAMP / RAMP.max() * 255)[:, :, None]),
    "bool_mask": (torch.tensor(RAMP % 2 == 0), ((RAMP % 2 == 0) * 255)[:, :, None]),
}


@pytest.mark.parametrize("case", sorted(IMAGE_CASES))
def test_images_become_the_same_picture_in_both(tmp_path, case):
    image, expected = IMAGE_CASES[case]
    expected = np.asarray(expected, dtype=np.uint8)
    expected_rgb = np.repeat(expected, 3, axis=2) if expected.shape[2] == 1 else expected
    logger = MultiLogger(save_dir=tmp_path, name="img")
    logger.log_image("img/x", image, step=1, caption=case)
    logger.finalize("success")
    tb_png = tb_images(logger.log_dir, "img/x")[0][1]
    assert np.array_equal(tb_png, expected_rgb)
    (run,) = find_runs(logger.log_dir)
    ((_, meta),) = run.series("img/x")
    wandb_png = np.asarray(Image.open(os.path.join(os.path.dirname(run.path), "files", meta["path"])).convert("RGB"))
    assert np.array_equal(wandb_png, expected_rgb) and meta["caption"] == case


def test_unsupported_image_shape_is_named(tmp_path):
    logger = MultiLogger(save_dir=tmp_path, wandb=False)
    with pytest.raises(ValueError, match=r"image 'img/batch' has shape \(4, 3, 8, 8\)"):
        logger.log_image("img/batch", torch.zeros(4, 3, 8, 8), step=0)
    with pytest.raises(ValueError, match=r"image 'img/odd' has shape \(8, 8, 7\)"):
        logger.log_image("img/odd", torch.zeros(8, 8, 7), step=0)


def _read_pictures(logger, key):
    """The picture TensorBoard and wandb hold for ``key`` (first event), as RGB uint8 arrays."""
    tb_png = tb_images(logger.log_dir, key)[0][1]
    (run,) = find_runs(logger.log_dir)
    meta = run.series(key)[0][1]
    wandb_png = np.asarray(Image.open(os.path.join(os.path.dirname(run.path), "files", meta["path"])).convert("RGB"))
    return tb_png, wandb_png


def test_a_huge_image_is_downscaled_once_with_a_warning(tmp_path):
    """6000 x 4500 px: the longest side over MAX_IMAGE_SIDE (2048) makes a factor of 3; both backends get the mean of
    each 3 x 3 block (computed here with numpy, in float64), and one warning names the key however often it is
    logged."""
    from lightning_monitor._writers import media as _media

    image = np.random.default_rng(0).integers(0, 256, (6000, 4500, 3), dtype=np.uint8)
    expected = np.round(image.reshape(2000, 3, 1500, 3, 3).astype(np.float64).mean(axis=(1, 3))).astype(np.uint8)
    logger = MultiLogger(save_dir=tmp_path, name="huge")
    with pytest.warns(UserWarning, match=r"image 'img/huge' is 6000 x 4500 px: logged downscaled by 3") as record:
        logger.log_image("img/huge", image, step=0)
        logger.log_image("img/huge", image, step=1)
    assert sum("img/huge" in str(w.message) for w in record) == 1
    assert _media.MAX_IMAGE_SIDE == 2048
    logger.finalize("success")
    tb_png, wandb_png = _read_pictures(logger, "img/huge")
    assert np.array_equal(tb_png, expected) and np.array_equal(wandb_png, expected)


def test_a_float_image_is_downscaled_before_any_full_size_copy():
    """A 4097 x 10 float64 image (factor 3, edge blocks of 2 rows): block means of the float values, then the usual
    [0, 1] -> 0..255 mapping; torch and numpy inputs give the same picture."""
    from lightning_monitor._writers.media import to_uint8_hwc

    values = np.linspace(0, 1, 4097 * 10).reshape(4097, 10)
    padded = np.full((4098, 12), np.nan)
    padded[:4097, :10] = values
    expected = np.round(np.nanmean(padded.reshape(1366, 3, 4, 3), axis=(1, 3)) * 255).astype(np.uint8)
    with pytest.warns(UserWarning, match="downscaled by 3"):
        from_numpy = to_uint8_hwc(values, key="img/float")
    from_torch = to_uint8_hwc(torch.tensor(values)[None], key="img/float")  # CHW tensor, same picture
    assert np.abs(from_numpy[:, :, 0].astype(int) - expected).max() <= 1  # float32 means vs float64 here
    assert np.array_equal(from_numpy, from_torch)


def test_an_ambiguous_3x8x4_tensor_is_channel_first(tmp_path):
    """3 x 8 x 4 fits both CHW and HWC: a torch tensor is read as CHW (as torchvision and wandb read tensors), a
    numpy array as HWC (channel-last when its last dim is 1, 3 or 4, as PIL reads arrays: 3 x 8 px, RGBA)."""
    chw = torch.arange(3 * 8 * 4, dtype=torch.uint8).reshape(3, 8, 4)
    logger = MultiLogger(save_dir=tmp_path, name="chw")
    logger.log_image("img/chw", chw, step=0)
    logger.log_image("img/hwc", chw.numpy(), step=0)
    logger.finalize("success")
    tb_png, wandb_png = _read_pictures(logger, "img/chw")
    expected = chw.permute(1, 2, 0).numpy()
    assert tb_png.shape == (8, 4, 3) and np.array_equal(tb_png, expected) and np.array_equal(wandb_png, expected)
    tb_png, _ = _read_pictures(logger, "img/hwc")
    assert tb_png.shape == (3, 8, 3)  # 3 x 8 px (read back as RGB)


@pytest.mark.parametrize("shape", [(0, 0), (3, 0, 8), (8, 0, 3)], ids=["hw", "chw", "hwc"])
def test_a_zero_size_image_is_an_error_naming_the_key(tmp_path, shape):
    logger = MultiLogger(save_dir=tmp_path, name="empty", wandb=False)
    with pytest.raises(ValueError, match=r"image 'img/empty' has shape .*: an image needs at least one pixel"):
        logger.log_image("img/empty", torch.zeros(shape), step=0)
