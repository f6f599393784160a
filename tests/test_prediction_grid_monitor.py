"""PredictionGridMonitor: the grid really written to TensorBoard and wandb, read back and checked pixel by pixel."""

from __future__ import annotations

import os
import pickle
import re
import warnings
from typing import Any

import lightning.pytorch as pl
import numpy as np
import pytest
import torch
from conftest import SPAWN_ABORT_RERUN
from helpers import TinyImageModel, find_runs, image_loader, make_trainer, tb_accumulator, tb_images, tb_scalars
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities.exceptions import MisconfigurationException
from PIL import Image
from torch import nn
from torch.utils.data import DataLoader, Dataset, TensorDataset

from lightning_monitor import MultiLogger, PredictionGridMonitor
from lightning_monitor._grid import draw as _draw
from lightning_monitor._grid.draw import FRAME_PX, PAD_VALUE, band_px

KEY = "predictions/grid"


def tile_origin(k: int, tile_h: int, tile_w: int, nrow: int, padding: int) -> tuple[int, int]:
    """Top-left pixel of the k-th tile in a torchvision make_grid layout."""
    row, col = divmod(k, nrow)
    return padding + row * (tile_h + padding), padding + col * (tile_w + padding)


def tile_at(grid: np.ndarray, k: int, tile_h: int, tile_w: int, nrow: int, padding: int) -> np.ndarray:
    top, left = tile_origin(k, tile_h, tile_w, nrow, padding)
    return grid[top : top + tile_h, left : left + tile_w]


def has_red_frame(tile: np.ndarray) -> bool:
    edges = np.concatenate([tile[:FRAME_PX].reshape(-1, 3), tile[-FRAME_PX:].reshape(-1, 3),
                            tile[:, :FRAME_PX].reshape(-1, 3), tile[:, -FRAME_PX:].reshape(-1, 3)])
    return bool((edges == np.array([255, 0, 0])).all())


def tb_logger() -> TensorBoardLogger:
    return TensorBoardLogger(".", name="tb", version=0)


class RiggedModel(pl.LightningModule):
    """Reads the sample id from the image (every pixel holds ``id / 50``) and predicts ``predictions[id]``.

    ``kind`` picks the output: logits, log-probabilities or probabilities, all meaning 0.70 for the predicted class.
    """

    def __init__(self, predictions: list[int], kind: str = "logits", num_classes: int = 10) -> None:
        super().__init__()
        self.register_buffer("predictions", torch.tensor(predictions))
        self.kind, self.num_classes = kind, num_classes
        self.w = nn.Parameter(torch.zeros(1))

    def forward(self, x: torch.Tensor) -> Any:
        ids = (x[:, 0, 14, 14] * 50).round().long()
        rest = 0.3 / (self.num_classes - 1)
        probs = torch.full((len(x), self.num_classes), rest) + self.w * 0
        probs = probs.scatter(1, self.predictions[ids].unsqueeze(1), 0.7)
        if self.kind == "probs":
            return probs
        if self.kind == "log_probs":
            return probs.log()
        if self.kind == "logits":
            return probs.log() + 3.0  # shifted: neither probabilities nor log-probabilities
        return {"logits": probs.log()}  # a layout the monitor cannot read alone

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        return (self.w**2).sum()

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        pass

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.1)


def rigged_data(n: int = 12) -> TensorDataset:
    ids = torch.arange(n)
    images = (ids.float() / 50).reshape(n, 1, 1, 1).expand(n, 1, 28, 28).clone()
    return TensorDataset(images, ids % 10)


def test_tb_grid_size_layout_and_keys(tmp_path):
    monitor = PredictionGridMonitor(num_samples=10, nrow=4, padding=3, tile_size=56)
    trainer = make_trainer(tmp_path, max_epochs=2, max_steps=-1, logger=tb_logger(), callbacks=[monitor])
    trainer.fit(TinyImageModel(), image_loader(n=32), image_loader(n=40, seed=1))
    images = tb_images(trainer.logger.log_dir, KEY)
    # after each validation epoch, at the step Lightning logs the epoch's val/loss at
    assert [step for step, _ in images] == [s for s, _ in tb_scalars(trainer.logger.log_dir, "val/loss")] == [1, 3]
    tile_h, tile_w, nrow, pad = 56 + band_px(56), 56, 4, 3
    rows = 3  # 10 tiles, 4 per row
    for _, grid in images:
        assert grid.shape == (rows * (tile_h + pad) + pad, nrow * (tile_w + pad) + pad, 3)
        for r in range(rows + 1):  # padding lines between tiles are the pad colour
            assert (grid[r * (tile_h + pad) : r * (tile_h + pad) + pad] == PAD_VALUE).all()
        for c in range(nrow + 1):
            assert (grid[:, c * (tile_w + pad) : c * (tile_w + pad) + pad] == PAD_VALUE).all()
        for k in (10, 11):  # the empty cells of the last row
            assert (tile_at(grid, k, tile_h, tile_w, nrow, pad) == PAD_VALUE).all()
        for k in range(10):  # every tile: a picture, then its dark label band with text in it
            band = tile_at(grid, k, tile_h, tile_w, nrow, pad)[56 + 2 : -FRAME_PX - 1, FRAME_PX + 1 : -FRAME_PX - 1]
            assert (band != band[0, -1]).any(axis=2).sum() > 20
    # accuracy: the final model on the same seeded draw of 10 validation samples, computed here independently
    dataset = image_loader(n=40, seed=1).dataset
    indices = torch.randperm(40, generator=torch.Generator().manual_seed(0))[:10]
    x, y = dataset.tensors[0][indices], dataset.tensors[1][indices]
    with torch.no_grad():
        expected = (trainer.lightning_module(x).argmax(1) == y).float().mean().item()
    accuracy = tb_scalars(trainer.logger.log_dir, "predictions/accuracy")
    assert [s for s, _ in accuracy] == [1, 3] and accuracy[-1][1] == pytest.approx(expected)
    tags = tb_accumulator(trainer.logger.log_dir).Tags()
    logged = {k for k in tags["scalars"] + tags["images"] if k.startswith("predictions/")}
    assert logged == set(PredictionGridMonitor.LOGGED_KEYS)
    table = dict(re.findall(r"^\s*``(predictions/[a-z_]+)``\s+(.+?)\s*$", PredictionGridMonitor.__doc__, re.M))
    assert table == PredictionGridMonitor.LOGGED_KEYS


def test_wandb_holds_the_same_image_with_caption(tmp_path):
    logger = MultiLogger(save_dir=str(tmp_path / "runs"), name="grid")
    monitor = PredictionGridMonitor(num_samples=12, nrow=6)
    trainer = make_trainer(tmp_path, max_epochs=1, max_steps=-1, logger=logger, callbacks=[monitor])
    trainer.fit(RiggedModel([i % 10 if i not in (2, 5) else 7 for i in range(12)]),
                DataLoader(rigged_data(), batch_size=4), DataLoader(rigged_data(), batch_size=4))
    trainer.logger.finalize("success")
    (run,) = find_runs(str(tmp_path / "runs"))
    (row,) = [r for r in run.history if KEY in r]
    value = row[KEY]
    assert value["_type"] == "image-file"
    assert value["caption"] == "epoch 0 (step 2): 10/12 correct; wrong: 2->7 (0.70), 5->7 (0.70)"
    assert row["trainer/global_step"] == 2
    png = os.path.join(os.path.dirname(run.path), "files", value["path"])
    wandb_pixels = np.asarray(Image.open(png).convert("RGB"))
    ((step, tb_pixels),) = tb_images(logger.log_dir, KEY)
    assert step == 2 and np.array_equal(wandb_pixels, tb_pixels)
    assert run.series("predictions/accuracy") == [(2, pytest.approx(10 / 12))]


@pytest.mark.parametrize("kind", ["logits", "log_probs", "probs"])
@pytest.mark.parametrize("mistakes_first", [True, False])
def test_rigged_mistakes_are_framed_red_and_first(tmp_path, kind, mistakes_first):
    wrong = [2, 5, 9]
    predictions = [(i + 1) % 10 if i in wrong else i % 10 for i in range(12)]
    monitor = PredictionGridMonitor(num_samples=12, nrow=4, padding=2, tile_size=84, mistakes_first=mistakes_first,
                                    class_names=[f"c{i}" for i in range(10)])
    trainer = make_trainer(tmp_path, logger=tb_logger(), callbacks=[monitor])
    trainer.validate(RiggedModel(predictions, kind), DataLoader(rigged_data(), batch_size=5))
    ((step, grid),) = tb_images(trainer.logger.log_dir, KEY)
    assert step == 0
    tile_h, tile_w = 84 + band_px(84), 84
    expected_order = wrong + [i for i in range(12) if i not in wrong] if mistakes_first else list(range(12))
    for k, sample in enumerate(expected_order):
        tile = tile_at(grid, k, tile_h, tile_w, 4, 2)
        assert has_red_frame(tile) == (sample in wrong), (k, sample)
        # which sample this tile shows: its grey level is the id / 50, de-normalised to 0..255
        assert tuple(tile[42, 42]) == (round(sample / 50 * 255),) * 3, (k, sample)
        band = tile[84 + 1 : -FRAME_PX - 1, FRAME_PX + 1 : -FRAME_PX - 1].astype(int)
        reddish = ((band[..., 0] - band[..., 1]) > 80).sum()
        greenish = ((band[..., 1] - band[..., 0]) > 80).sum()
        assert (reddish > 5 and greenish == 0) if sample in wrong else (greenish > 5 and reddish == 0)
    assert tb_scalars(trainer.logger.log_dir, "predictions/accuracy") == [(0, pytest.approx(0.75))]


def test_labels_legible_in_tensorboards_default_card(tmp_path):
    """The default grid (24 samples) fitted into TensorBoard's default image card (about 301 x 200 px, found in the
    tensorboard 2.x image card's CSS, see ``_draw.CARD_PX``) shows the label digits at least 7 px high, measured on the
    pixels TensorBoard stored; the first line reads ``"<pred> | <confidence>"``. (The old 690 x 450 grid of 32 tiles
    with a 10 px font showed them at 8 * 0.44 = 3.5 px.)"""
    from PIL import Image as PILImage
    from PIL import ImageDraw, ImageFont

    wrong = [3, 17]
    predictions = [(i + 1) % 10 if i in wrong else i % 10 for i in range(24)]
    monitor = PredictionGridMonitor()
    trainer = make_trainer(tmp_path, logger=tb_logger(), callbacks=[monitor])
    trainer.validate(RiggedModel(predictions), DataLoader(rigged_data(24), batch_size=8))
    ((_, grid),) = tb_images(trainer.logger.log_dir, KEY)
    tile_w = 66
    tile_h = tile_w + band_px(tile_w)
    assert grid.shape == (3 * (tile_h + 2) + 2, 8 * (tile_w + 2) + 2, 3)  # 8 columns x 3 rows
    height, width = grid.shape[:2]
    scale = min(_draw.CARD_PX[0] / width, _draw.CARD_PX[1] / height)  # CSS object-fit: contain
    assert width * scale <= _draw.CARD_PX[0] and height * scale <= _draw.CARD_PX[1]
    font_size = _draw.font_px(tile_w)
    font = ImageFont.load_default(size=font_size)
    for k, sample in enumerate(wrong + [i for i in range(24) if i not in wrong]):
        tile = tile_at(grid, k, tile_h, tile_w, 8, 2)
        pred = predictions[sample]
        colour = _draw.WRONG_TEXT_RGB if sample in wrong else _draw.RIGHT_TEXT_RGB
        # the predicted digit: the first glyph of the first line; its height in displayed pixels
        left = _draw.TEXT_MARGIN_PX
        glyph = tile[tile_w : tile_w + font_size + 4, left : left + int(font.getlength(str(pred)))].astype(int)
        rows = np.nonzero((np.abs(glyph - np.array(colour)).sum(axis=2) < 60).any(axis=1))[0]
        assert (rows.max() - rows.min() + 1) * scale >= _draw.LEGIBLE_DIGIT_PX, (k, rows, scale)
        if sample not in wrong:  # the whole band is exactly these two lines, drawn independently here
            band = PILImage.new("RGB", (tile_w, band_px(tile_w)), _draw.BAND_RGB)
            draw = ImageDraw.Draw(band)
            draw.text((left, 2), f"{pred} | 0.70", fill=colour, font=font)
            draw.text((left, 2 + font_size + 2), f"true {sample % 10}", fill=_draw.TEXT_RGB, font=font)
            assert np.array_equal(tile[tile_w:], np.asarray(band)), k


def test_caption_lists_mistakes_with_confidence(tmp_path):
    predictions = [(i + 1) % 10 if i in (9, 2) else i % 10 for i in range(12)]
    monitor = PredictionGridMonitor(num_samples=12, class_names=[f"c{i}" for i in range(10)])
    logger = MultiLogger(save_dir=str(tmp_path / "runs"), name="cap", tensorboard=False)
    trainer = make_trainer(tmp_path, logger=logger, callbacks=[monitor])
    trainer.validate(RiggedModel(predictions, "log_probs"), DataLoader(rigged_data(), batch_size=5))
    logger.finalize("success")
    (run,) = find_runs(str(tmp_path / "runs"))
    ((_, value),) = run.series(KEY)
    assert value["caption"] == "epoch 0 (step 0): 10/12 correct; wrong: c2->c3 (0.70), c9->c0 (0.70)"


def _sample_ids(grid: np.ndarray, dataset: torch.Tensor, n: int, nrow: int) -> list[int]:
    """Which dataset items the tiles show: each tile's 3x-upscaled pixels (frame excluded) matched exactly."""
    expected = (dataset.clamp(0, 1) * 255).round().to(torch.uint8)[:, 0, 1:-1, 1:-1]
    ids = []
    for k in range(n):
        tile = tile_at(grid, k, 84 + band_px(84), 84, nrow, 2)
        pixels = torch.from_numpy(tile[:84:3, :84:3, 0].copy())[1:-1, 1:-1]
        (match,) = [i for i in range(len(dataset)) if torch.equal(expected[i], pixels)]
        ids.append(match)
    return ids


@pytest.mark.filterwarnings("ignore:.*shuffling enabled")  # shuffled on purpose: the draw must not depend on it
def test_same_samples_every_epoch_and_after_resume(tmp_path):
    g = torch.Generator().manual_seed(3)
    val = TensorDataset(torch.rand(40, 1, 28, 28, generator=g), torch.randint(0, 10, (40,), generator=g))
    monitor = PredictionGridMonitor(num_samples=6, nrow=3, tile_size=84, mistakes_first=False, seed=7)
    trainer = make_trainer(tmp_path, max_epochs=3, max_steps=-1, limit_train_batches=2, logger=tb_logger(),
                           callbacks=[monitor])
    trainer.fit(TinyImageModel(), image_loader(n=32), DataLoader(val, batch_size=8, shuffle=True))
    grids = tb_images(trainer.logger.log_dir, KEY)
    assert len(grids) == 3
    shown = [_sample_ids(grid, val.tensors[0], 6, 3) for _, grid in grids]
    assert shown[0] == shown[1] == shown[2] and len(set(shown[0])) == 6  # the same 6 real samples each epoch
    state = pickle.loads(pickle.dumps(monitor.state_dict()))
    resumed = PredictionGridMonitor(num_samples=6, nrow=3, tile_size=84, mistakes_first=False, seed=7)
    resumed.load_state_dict(state)
    other = make_trainer(tmp_path / "b", logger=TensorBoardLogger(str(tmp_path / "b"), name="tb", version=0),
                         callbacks=[resumed])
    noise = TensorDataset(torch.rand(40, 1, 28, 28), torch.zeros(40, dtype=torch.long))
    other.validate(trainer.lightning_module, DataLoader(noise, batch_size=8))
    ((_, grid),) = tb_images(other.logger.log_dir, KEY)
    assert _sample_ids(grid, val.tensors[0], 6, 3) == shown[0]  # resume shows the same samples


def test_a_tampered_checkpoint_state_costs_the_stored_samples_not_the_run(tmp_path):
    """Samples restored from a checkpoint are checked: a wrong shape gives one warning and new samples from the
    validation data (not an opaque shape error at validation)."""
    monitor = PredictionGridMonitor(num_samples=6, nrow=3, tile_size=84)
    stored = r"ignores the samples stored in the checkpoint \(images of shape \(6, 28, 28\)"
    with pytest.warns(UserWarning, match=stored):
        monitor.load_state_dict({"images": torch.rand(6, 28, 28), "labels": torch.zeros(6, dtype=torch.long)})
    with pytest.warns(UserWarning, match="labels of shape"):
        monitor._warn.clear()
        monitor.load_state_dict({"images": torch.rand(6, 1, 28, 28), "labels": torch.zeros(5)})
    trainer = make_trainer(tmp_path, logger=tb_logger(), callbacks=[monitor])
    trainer.validate(TinyImageModel(), image_loader(n=16, seed=1))
    ((_, grid),) = tb_images(trainer.logger.log_dir, KEY)  # drawn from fresh samples
    assert grid.shape[0] > 0


def test_mean_std_undone_for_one_and_three_channels(tmp_path):
    mean, std = [0.5, 0.1307, 0.2], [0.25, 0.3081, 0.5]
    raw = torch.rand(8, 3, 10, 10, generator=torch.Generator().manual_seed(0))
    normalised = (raw - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1)

    class ThreeChannel(RiggedModel):
        def forward(self, x):
            return torch.zeros(len(x), 4) + self.w

    monitor = PredictionGridMonitor(num_samples=8, nrow=8, tile_size=30, mean=mean, std=std)
    trainer = make_trainer(tmp_path, logger=tb_logger(), callbacks=[monitor])
    trainer.validate(ThreeChannel([0]), DataLoader(TensorDataset(normalised, torch.zeros(8, dtype=torch.long))))
    ((_, grid),) = tb_images(trainer.logger.log_dir, KEY)
    assert grid.shape == (30 + band_px(30) + 4, 8 * 32 + 2, 3)
    expected = (raw * 255).round().to(torch.uint8).permute(0, 2, 3, 1).numpy()
    for k in range(8):  # all right (label 0 = argmax of equal scores): no frame, tile is the 3x upscaled raw image
        assert np.array_equal(tile_at(grid, k, 30 + band_px(30), 30, 8, 2)[:30:3, :30:3], expected[k])

    grey = torch.rand(4, 1, 28, 28)
    monitor = PredictionGridMonitor(num_samples=4, nrow=8, tile_size=84, mean=[0.1307], std=[0.3081])
    trainer = make_trainer(tmp_path / "g", logger=TensorBoardLogger(str(tmp_path / "g"), name="tb", version=0),
                           callbacks=[monitor])
    data = TensorDataset((grey - 0.1307) / 0.3081, torch.zeros(4, dtype=torch.long))
    trainer.validate(ThreeChannel([0]), DataLoader(data))
    ((_, grid),) = tb_images(trainer.logger.log_dir, KEY)
    assert grid.shape == (84 + band_px(84) + 4, 4 * 86 + 2, 3)
    first = tile_at(grid, 0, 84 + band_px(84), 84, 8, 2)[:84:3, :84:3]
    assert np.array_equal(first[..., 0], first[..., 2])  # grey stays grey in RGB
    assert np.abs(first[..., 0].astype(int) - (grey[0, 0] * 255).round().numpy()).max() <= 1


class ModeRecorder(TinyImageModel):
    """TinyImageModel with dropout and a frozen (eval-mode) submodule, recording every forward call."""

    def __init__(self) -> None:
        super().__init__()
        self.drop = nn.Dropout(0.5)
        self.frozen = nn.BatchNorm2d(1)
        self.calls: list[tuple[int, bool, bool, bool]] = []

    def on_train_start(self) -> None:
        self.frozen.eval()

    def forward(self, x):
        self.calls.append((len(x), torch.is_grad_enabled(), self.training, self.frozen.training))
        return super().forward(self.drop(self.frozen(x)))


class Snapshot(pl.Callback):
    def on_train_batch_end(self, trainer, pl_module, *args):
        self.grads = [None if p.grad is None else p.grad.clone() for p in pl_module.parameters()]
        self.modes = [m.training for m in pl_module.modules()]
        self.calls = len(pl_module.calls)


class Check(pl.Callback):
    def __init__(self, snapshot: Snapshot) -> None:
        self.snapshot, self.renders = snapshot, 0

    def on_train_batch_end(self, trainer, pl_module, *args):
        grads = [None if p.grad is None else p.grad for p in pl_module.parameters()]
        pairs = zip(self.snapshot.grads, grads, strict=True)
        assert all(a is None and b is None or torch.equal(a, b) for a, b in pairs)
        assert [m.training for m in pl_module.modules()] == self.snapshot.modes
        assert pl_module.training and not pl_module.frozen.training
        self.renders += len(pl_module.calls) > self.snapshot.calls


def test_no_grad_eval_mode_and_modes_restored(tmp_path):
    snapshot = Snapshot()
    check = Check(snapshot)
    monitor = PredictionGridMonitor(num_samples=7, every_n_steps=2)
    model = ModeRecorder()
    trainer = make_trainer(tmp_path, max_steps=6, logger=tb_logger(), callbacks=[snapshot, monitor, check])
    trainer.fit(model, image_loader(n=48), image_loader(n=16))
    grid_calls = [c for c in model.calls if c[0] == 7]
    # 3 batches per epoch: training grids after the batches of steps 1, 3 and 5; validation grids after steps 2
    # and 5, the second skipped (the training grid of step 5 just drew that model state at that step)
    assert check.renders == 3 and len(grid_calls) == 4
    assert all(not grad and not training and not frozen for _, grad, training, frozen in grid_calls)
    assert [s for s, _ in tb_images(trainer.logger.log_dir, KEY)] == [1, 2, 3, 5]


class DictData(Dataset):
    def __len__(self) -> int:
        return 12

    def __getitem__(self, i: int) -> dict:
        return {"image": rigged_data()[i][0], "label": rigged_data()[i][1]}


def grid_warnings(record: list) -> list[str]:
    return [str(w.message) for w in record if "PredictionGridMonitor" in str(w.message)]


def test_dict_batch_works_with_batch_fn_and_fails_softly_without(tmp_path):
    """A dict-batch image classifier: without ``batch_fn`` one warning naming it, no grid, and the fit goes on."""
    monitor = PredictionGridMonitor(num_samples=4)
    trainer = make_trainer(tmp_path, max_steps=4, num_sanity_val_steps=1, logger=tb_logger(), callbacks=[monitor])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(RiggedModel(list(range(12))), DataLoader(DictData(), batch_size=4),
                    DataLoader(DictData(), batch_size=4))
    (message,) = grid_warnings(record)  # said once, at the sanity check, not at every validation
    assert re.search(r"logs nothing more in this run: it expects validation batches `\(images, labels, ...\)`.*"
                     r"got dict with keys \['image', 'label'\]; pass `batch_fn=`", message), message
    assert trainer.global_step == 4 and trainer.state.status == "finished"
    assert "predictions/accuracy" not in tb_accumulator(trainer.logger.log_dir).Tags()["scalars"]
    monitor = PredictionGridMonitor(num_samples=4, batch_fn=lambda b: (b["image"], b["label"]))
    trainer = make_trainer(tmp_path / "ok", max_steps=3, logger=TensorBoardLogger(str(tmp_path / "ok"), name="tb"),
                           callbacks=[monitor])
    trainer.fit(RiggedModel(list(range(12))), DataLoader(DictData(), batch_size=4),
                DataLoader(DictData(), batch_size=4))
    # one validation, after the 3rd and last batch: at the step Lightning logs its val/loss at
    assert tb_scalars(trainer.logger.log_dir, "predictions/accuracy") == [(2, 1.0)]
    assert [s for s, _ in tb_images(trainer.logger.log_dir, KEY)] == [2]


def test_output_not_class_scores_warns_once_naming_output_fn(tmp_path):
    monitor = PredictionGridMonitor(num_samples=4)
    trainer = make_trainer(tmp_path, max_epochs=2, max_steps=-1, logger=tb_logger(), callbacks=[monitor])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(RiggedModel(list(range(12)), kind="dict"), DataLoader(rigged_data(), batch_size=4),
                    DataLoader(rigged_data(), batch_size=4))
    (message,) = grid_warnings(record)  # two validations, one warning
    assert re.search(r"needs class scores.* \[4, num_classes\].*forward returned dict with keys \['logits'\];"
                     r" pass `output_fn=`", message), message
    assert trainer.global_step == 6 and not tb_accumulator(trainer.logger.log_dir).Tags()["images"]
    monitor = PredictionGridMonitor(num_samples=4, output_fn=lambda out: out["logits"])
    trainer = make_trainer(tmp_path / "ok", logger=TensorBoardLogger(str(tmp_path / "ok"), name="tb", version=0),
                           callbacks=[monitor])
    trainer.validate(RiggedModel(list(range(12)), kind="dict"), DataLoader(rigged_data(), batch_size=4))
    assert tb_scalars(trainer.logger.log_dir, "predictions/accuracy") == [(0, 1.0)]


def test_a_forward_that_raises_on_the_samples_costs_the_grid_not_the_run(tmp_path):
    """A model for 3-channel images handed 1-channel samples: its conv raises inside the grid's forward."""

    class ThreeChannelNet(TinyImageModel):
        def __init__(self) -> None:
            super().__init__()
            self.rgb = nn.Conv2d(3, 1, 1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return super().forward(self.rgb(x))

        def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
            return super().training_step((batch[0].expand(-1, 3, -1, -1), batch[1]), batch_idx)

        def validation_step(self, batch: Any, batch_idx: int) -> None:
            super().validation_step((batch[0].expand(-1, 3, -1, -1), batch[1]), batch_idx)

    trainer = make_trainer(tmp_path, max_epochs=2, max_steps=-1, logger=tb_logger(),
                           callbacks=[PredictionGridMonitor(num_samples=4)])
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        trainer.fit(ThreeChannelNet(), image_loader(n=32), image_loader(n=16))
    (message,) = grid_warnings(record)
    assert re.search(r"raised RuntimeError: .*channels.*`batch_fn=` and `output_fn=` adapt", message), message
    assert trainer.state.status == "finished" and trainer.global_step == 4
    assert [s for s, _ in tb_scalars(trainer.logger.log_dir, "val/loss")] == [1, 3]
    assert not tb_accumulator(trainer.logger.log_dir).Tags()["images"]


class TabularRegression(pl.LightningModule):
    """Not an image classifier: 8 features -> one float target, batches ``(x [B, 8], y [B] float)``."""

    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(8, 16), nn.ReLU())
        self.head = nn.Linear(16, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.body(x)).squeeze(1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        loss = nn.functional.mse_loss(self(batch[0]), batch[1])
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        self.log("val/loss", nn.functional.mse_loss(self(batch[0]), batch[1]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=0.01)


def _tabular(n: int) -> DataLoader:
    g = torch.Generator().manual_seed(n)
    x = torch.randn(n, 8, generator=g)
    return DataLoader(TensorDataset(x, x.sum(1)), batch_size=8)


def _fit_all_monitors(root: Any, kind: str, grid: bool) -> tuple[Any, list[str]]:
    """Fit ``kind`` with MultiLogger and the three other monitors (and the grid when ``grid``); (logger, warnings)."""
    from lightning_monitor import GradientMonitor, MemoryMonitor, SpeedMonitor

    logger = MultiLogger(save_dir=str(root / "runs"), name=kind)
    callbacks = [GradientMonitor(), MemoryMonitor(), SpeedMonitor()] + ([PredictionGridMonitor()] if grid else [])
    trainer = make_trainer(root, max_steps=8, num_sanity_val_steps=1, logger=logger, callbacks=callbacks)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        if kind == "regression":
            trainer.fit(TabularRegression(), _tabular(32), _tabular(16))
        else:  # an image classifier trained with no validation data at all
            trainer.fit(TinyImageModel(), image_loader(n=64))
    logger.finalize("success")
    assert trainer.state.status == "finished" and trainer.global_step == 8
    return logger, grid_warnings(record)


@pytest.mark.parametrize("kind", ["regression", "no_validation"])
def test_all_four_monitors_finish_a_run_the_grid_cannot_draw(tmp_path, kind):
    """The grid costs itself, with one warning; every key the other monitors log without it is still there."""
    logger, said = _fit_all_monitors(tmp_path / "grid", kind, grid=True)
    reference, quiet = _fit_all_monitors(tmp_path / "ref", kind, grid=False)
    assert quiet == [] and len(said) == 1, said
    expected = {"regression": r"got list of 2 \(Tensor\[16, 8\] float32, Tensor\[16\] float32\); pass `batch_fn=`",
                "no_validation": r"this fit has none .*pass `every_n_steps=`"}[kind]
    assert re.search(expected, said[0]), said[0]
    acc, ref = tb_accumulator(logger.log_dir), tb_accumulator(reference.log_dir)
    for family in ("scalars", "histograms"):
        tags, ref_tags = set(acc.Tags()[family]), set(ref.Tags()[family])
        assert not any(t.startswith("predictions/") for t in tags)
        assert ref_tags <= tags, ref_tags - tags
        read = acc.Scalars if family == "scalars" else acc.Histograms
        read_ref = ref.Scalars if family == "scalars" else ref.Histograms
        for tag in ref_tags:  # at the same steps
            assert [e.step for e in read(tag)] == [e.step for e in read_ref(tag)], tag
    scalars = set(acc.Tags()["scalars"])
    # no key for a monitor that turned itself off: its share of the time included (the others' stay)
    assert "time/monitor_share/prediction_grid" not in scalars and "time/monitor_share/gradient" in scalars
    for prefix in ("grad/norm", "memory/host/", "throughput/", "time/"):
        assert any(t.startswith(prefix) for t in scalars), (prefix, sorted(scalars))
    assert any(t.startswith("grad/hist/") for t in acc.Tags()["histograms"])
    assert not acc.Tags()["images"]
    (run,) = find_runs(logger.log_dir)  # wandb got the other monitors' values too
    tb_steps = [s for s, _ in tb_scalars(logger.log_dir, "grad/norm_total")]
    assert [s for s, _ in run.series("grad/norm_total")] == tb_steps


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (dict(num_samples=0), "`num_samples` must be an integer >= 1, got 0"),
        (dict(nrow=-1), "`nrow` must be None or an integer >= 1, got -1"),
        (dict(every_n_steps=0), "`every_n_steps` must be None or an integer >= 1, got 0"),
        (dict(mean=[0.1]), "`mean` and `std` go together"),
        (dict(mean=[0.1, 0.2], std=[1.0, 1.0]), "1 or 3 values"),
        (dict(mean=[0.1], std=[0.0]), r"`std` values must be > 0, got \[0.0\]"),
        (dict(class_names=[]), "`class_names` must be a non-empty list of strings, got \\[\\]"),
        (dict(output_fn="logits"), "`output_fn` must be callable, got 'logits'"),
    ],
)
def test_arguments_validated_with_the_bad_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        PredictionGridMonitor(**kwargs)


def test_defaults_picklable_and_no_logger_is_misconfiguration(tmp_path):
    monitor = pickle.loads(pickle.dumps(PredictionGridMonitor()))
    assert monitor.num_samples == 24 and monitor.state_dict() == {}
    trainer = make_trainer(tmp_path, logger=False, callbacks=[monitor])
    with pytest.raises(MisconfigurationException, match="needs a logger"):
        trainer.validate(TinyImageModel(), image_loader(n=8))


class RankRecorder(TinyImageModel):
    """Writes one line per forward call on the 5 fixed samples to ``grid_calls_rank{rank}.txt``."""

    def forward(self, x):
        if len(x) == 5:
            with open(f"grid_calls_rank{self.global_rank}.txt", "a") as f:
                f.write(f"{self.trainer.global_step}\n")
        return super().forward(x)


@pytest.mark.slow
@pytest.mark.timeout(120)
@SPAWN_ABORT_RERUN
def test_ddp_rank_zero_alone_renders_and_writes(tmp_path):
    monitor = PredictionGridMonitor(num_samples=5)
    trainer = make_trainer(tmp_path, accelerator="cpu", devices=2, strategy="ddp_spawn", max_epochs=2,
                           max_steps=-1, logger=tb_logger(), callbacks=[monitor])
    trainer.fit(RankRecorder(), image_loader(n=32), image_loader(n=16, batch_size=4))
    assert open(tmp_path / "grid_calls_rank0.txt").read().split() == ["1", "2"]  # 32 / 2 ranks / 16 per batch
    assert not (tmp_path / "grid_calls_rank1.txt").exists()
    assert [s for s, _ in tb_images(str(tmp_path / "tb" / "version_0"), KEY)] == [0, 1]  # Lightning's val steps


class SyncProbe(pl.Callback):
    """Placed around the monitor: records at which steps code of the monitor made sync-forcing tensor calls."""

    def __init__(self, counter: Any, steps: dict[int, int], before: bool) -> None:
        self.counter, self.steps, self.before = counter, steps, before

    def on_train_batch_start(self, trainer, pl_module, *args):
        self.step = trainer.global_step

    def on_train_batch_end(self, trainer, pl_module, *args):  # the monitor draws step grids at batch end
        sign = -1 if self.before else 1
        self.steps[self.step] = self.steps.get(self.step, 0) + sign * len(self.counter.calls)


def test_no_host_sync_outside_logging_steps(tmp_path):
    from lightning_monitor import prediction_grid_monitor
    from lightning_monitor._grid import draw as _draw
    from lightning_monitor.testing import HostSyncCounter

    counter = HostSyncCounter(only_from=[prediction_grid_monitor.__file__, _draw.__file__])
    steps: dict[int, int] = {}
    monitor = PredictionGridMonitor(num_samples=4, every_n_steps=3)
    callbacks = [SyncProbe(counter, steps, True), monitor, SyncProbe(counter, steps, False)]
    trainer = make_trainer(tmp_path, max_steps=8, logger=tb_logger(), callbacks=callbacks)
    with counter:
        trainer.fit(TinyImageModel(), image_loader(n=64), image_loader(n=8))
    assert {s for s, n in steps.items() if n} == {2, 5} and set(steps) == set(range(8))


def image_label(batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
    return batch["image"], batch["label"]


def test_configurable_from_lightning_cli_yaml(tmp_path, monkeypatch):
    from lightning.pytorch.cli import LightningCLI

    monkeypatch.setattr("sys.argv", ["cli"])

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  callbacks:\n"
        "    - class_path: lightning_monitor.PredictionGridMonitor\n"
        "      init_args:\n"
        "        num_samples: 16\n"
        "        mean: [0.1307]\n"
        "        std: [0.3081]\n"
        "        class_names: [zero, one, two, three, four, five, six, seven, eight, nine]\n"
        "        every_n_steps: 100\n"
        "        batch_fn: test_prediction_grid_monitor.image_label\n"
    )
    cli = LightningCLI(TinyImageModel, run=False, args=["--config", str(config)], save_config_callback=None,
                       seed_everything_default=False)
    (monitor,) = [c for c in cli.trainer.callbacks if isinstance(c, PredictionGridMonitor)]
    assert (monitor.num_samples, monitor.mean, monitor.std, monitor.every_n_steps) == (16, [0.1307], [0.3081], 100)
    assert monitor.class_names[9] == "nine" and monitor.batch_fn is image_label


@pytest.mark.parametrize("precision", ["bf16-mixed", "bf16-true"])
def test_reduced_precision_module(tmp_path, precision):
    monitor = PredictionGridMonitor(num_samples=6)
    trainer = make_trainer(tmp_path, precision=precision, logger=tb_logger(), callbacks=[monitor])
    trainer.validate(TinyImageModel(), image_loader(n=8))
    ((step, grid),) = tb_images(trainer.logger.log_dir, KEY)
    assert grid.shape == (2 * (66 + band_px(66) + 2) + 2, 3 * 68 + 2, 3)  # 6 default tiles: 3 columns fit best


class DeviceRecorder(TinyImageModel):
    def forward(self, x):
        if len(x) == 5:
            self.grid_inputs = (x.device.type, x.dtype)
        return super().forward(x)


@pytest.mark.gpu
def test_gpu_predictions_run_on_the_module_device_and_samples_stay_on_cpu(tmp_path):
    monitor = PredictionGridMonitor(num_samples=5)
    model = DeviceRecorder()
    trainer = make_trainer(tmp_path, accelerator="gpu", precision="16-mixed", max_epochs=1, max_steps=-1,
                           logger=tb_logger(), callbacks=[monitor])
    trainer.fit(model, image_loader(n=32), image_loader(n=16))
    assert model.grid_inputs[0] == "cuda"
    assert monitor.state_dict()["images"].device.type == "cpu"
    # one validation, after the 2nd and last batch: at the step Lightning logs its val/loss at (as on the CPU)
    assert [s for s, _ in tb_images(trainer.logger.log_dir, KEY)] == [1]
