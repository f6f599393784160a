"""PredictionGridMonitor: what the model predicts on a fixed set of real validation samples, drawn as a grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from torch.utils.data import DataLoader, IterableDataset
from typing_extensions import override

from lightning_monitor import _draw
from lightning_monitor._keys import document_keys
from lightning_monitor._monitor import Monitor

_BATCH_HELP = (
    "PredictionGridMonitor expects validation batches `(images, labels, ...)`: images a tensor [B, C, H, W] with"
    " C 1 or 3 (or [B, H, W]), labels an integer tensor [B] of class ids"
)
_MAX_LISTED = 8  # wrong predictions spelled out in the caption


@document_keys
class PredictionGridMonitor(Monitor):
    r"""Log a grid of fixed validation samples with the model's prediction and the true label drawn into each tile.

    A fixed set of ``num_samples`` samples (drawn once with ``seed`` from the validation set, kept on the CPU and
    in the checkpoint) is shown after every validation epoch, so the same digits are seen improving from epoch to
    epoch. Each tile carries the predicted label with its confidence and the true label in a band under the image;
    wrong predictions get a red frame and, with ``mistakes_first``, come first. The picture itself holds the
    answer, so TensorBoard shows it too; wandb also gets a caption such as
    ``"epoch 3 (step 1200): 29/32 correct; wrong: 4->9 (0.61), ..."``.

    Predictions are computed on global rank 0 alone, without gradients, in eval mode (every submodule's
    train/eval mode is restored afterwards), by calling the LightningModule directly, never its DDP wrapper: no
    collectives, the other ranks do nothing. The module's output must be class scores (logits),
    log-probabilities or probabilities shaped ``[B, num_classes]``; ``output_fn`` adapts anything else, and
    ``batch_fn`` adapts batches that are not ``(images, labels)``.

    {logged_keys}

    Args:
        num_samples: how many fixed samples to show.
        seed: seed of the draw of the fixed samples from the validation set.
        nrow: tiles per row of the grid.
        tile_size: height in pixels each image is scaled to (28 px MNIST digits become 84 px); a band of 26 px
            with the labels goes under it.
        padding: pixels between tiles.
        mean: per-channel mean the inputs were normalised with (e.g. ``[0.1307]`` for MNIST); with ``std`` it is
            undone for display. Without them, inputs outside 0..1 are scaled from their min..max.
        std: per-channel standard deviation the inputs were normalised with (e.g. ``[0.3081]``).
        class_names: names drawn instead of class ids.
        mistakes_first: put the wrong predictions first in the grid.
        every_n_steps: also log a grid every that many training steps, at the steps Lightning's ``self.log``
            uses (``None``: after validation only).
        dataloader_idx: which validation dataloader to take the samples from when there are several.
        batch_fn: maps one validation batch to ``(images, labels)`` when it is not already laid out that way
            (e.g. ``lambda b: (b["image"], b["label"])``).
        output_fn: maps the module's output for a batch of images to ``[B, num_classes]`` scores,
            log-probabilities or probabilities (e.g. ``lambda out: out["logits"]``).
        exclude_keys: globs over the keys this monitor logs, left out of every backend (e.g. ``["grad/hist/*"]``
            drops a whole family, ``["memory/host/available_gib"]`` one key).

    Raises:
        ValueError: a bad argument, or (at the first validation) a batch or output layout it cannot read.
        MisconfigurationException: no logger, or a strategy that shards the model (FSDP, DeepSpeed).

    Example::

        trainer = Trainer(
            logger=MultiLogger(save_dir="runs", name="mnist"),
            callbacks=[PredictionGridMonitor(mean=[0.1307], std=[0.3081])],
        )
    """

    LOGGED_KEYS = {
        "predictions/grid": "image: fixed samples, predicted label + confidence and true label drawn in",
        "predictions/accuracy": "share of the fixed samples predicted right (0..1)",
    }
    SHARDED_UNSUPPORTED = "runs the model on rank 0 alone (its forward must not need every rank)"

    def __init__(
        self,
        num_samples: int = 32,
        *,
        seed: int = 0,
        nrow: int = 8,
        tile_size: int = 84,
        padding: int = 2,
        mean: Optional[list[float]] = None,
        std: Optional[list[float]] = None,
        class_names: Optional[list[str]] = None,
        mistakes_first: bool = True,
        every_n_steps: Optional[int] = None,
        dataloader_idx: int = 0,
        batch_fn: Optional[Callable[[Any], Any]] = None,
        output_fn: Optional[Callable[[Any], Any]] = None,
        exclude_keys: Optional[Sequence[str]] = None,
    ) -> None:
        lowest = {"num_samples": 1, "nrow": 1, "tile_size": 8, "padding": 0, "dataloader_idx": 0}
        values = {"num_samples": num_samples, "nrow": nrow, "tile_size": tile_size, "padding": padding,
                  "dataloader_idx": dataloader_idx}
        for name, low in lowest.items():
            value = values[name]
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"`{name}` must be an integer >= {low}, got {value!r}")
        super().__init__(every_n_steps, exclude_keys)
        if (mean is None) != (std is None):
            raise ValueError(f"`mean` and `std` go together, got mean={mean!r}, std={std!r}")
        if mean is not None and std is not None:
            if len(mean) not in (1, 3) or len(std) != len(mean):
                raise ValueError(f"`mean` and `std` need 1 or 3 values each, got mean={mean!r}, std={std!r}")
            if any(s <= 0 for s in std):
                raise ValueError(f"`std` values must be > 0, got {std!r}")
        if class_names is not None and (not class_names or not all(isinstance(c, str) for c in class_names)):
            raise ValueError(f"`class_names` must be a non-empty list of strings, got {class_names!r}")
        for name, fn in (("batch_fn", batch_fn), ("output_fn", output_fn)):
            if fn is not None and not callable(fn):
                raise ValueError(f"`{name}` must be callable, got {fn!r}")
        self.num_samples, self.seed, self.nrow = num_samples, seed, nrow
        self.tile_size, self.padding = tile_size, padding
        self.mean = None if mean is None else [float(m) for m in mean]
        self.std = None if std is None else [float(s) for s in std]
        self.class_names = None if class_names is None else list(class_names)
        self.mistakes_first, self.dataloader_idx = mistakes_first, dataloader_idx
        self.batch_fn, self.output_fn = batch_fn, output_fn
        self._images: Optional[torch.Tensor] = None  # the fixed samples, on the CPU
        self._labels: Optional[torch.Tensor] = None
        self._display: Optional[np.ndarray] = None  # their pictures, N x h x w x 3 uint8 (made at the first grid)
        self._labels_np: Optional[np.ndarray] = None
        self._last_drawn_at = -1  # trainer.global_step (model updates) of the last grid: one model state, one grid

    # ------------------------------------------------------------------ hooks
    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the batch's optimizer step, logged at the batch's step: the step (and the model) a validation run
        # at the end of this batch would show, so the two never disagree and one model state gets one grid.
        if self.every_n_steps is None or not trainer.is_global_zero:
            return  # no grids asked for; or not rank 0, the only one that renders (the others do nothing at all)
        step = self._batch_logging_step(trainer)
        if step is None:
            return  # not a logging step, or a micro-batch that did not step the optimizer
        if self._images is None:
            loader = trainer.val_dataloaders
            datamodule = getattr(trainer, "datamodule", None)  # a Trainer property, undeclared for type checkers
            if loader is None and datamodule is not None and is_overridden("val_dataloader", datamodule):
                loader = datamodule.val_dataloader()
            elif loader is None and is_overridden("val_dataloader", pl_module):
                loader = pl_module.val_dataloader()
            if loader is None:
                return  # no validation data yet: the first validation takes the samples
            self._take_samples(loader)
        self._render(trainer, pl_module, step, f"step {step}")

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if not trainer.is_global_zero:
            return
        if self._images is None and trainer.val_dataloaders is not None:
            self._take_samples(trainer.val_dataloaders)  # also in the sanity check: a bad batch fails early
        if trainer.sanity_checking or self._images is None or self._last_drawn_at == trainer.global_step:
            return  # (the last check: this model state was just drawn at this step by the training grid)
        step = self._validation_step(trainer)  # the step Lightning logs val/* at
        self._render(trainer, pl_module, step, f"epoch {trainer.current_epoch} (step {step})")

    @property
    @override
    def state_key(self) -> str:
        # two grids (say, one per validation dataloader) keep their own samples in the checkpoint
        return self._generate_state_key(
            dataloader_idx=self.dataloader_idx, num_samples=self.num_samples, seed=self.seed
        )

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._images is None:
            return {}
        return {"images": self._images, "labels": self._labels}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "images" in state_dict:
            self._images, self._labels = state_dict["images"].cpu(), state_dict["labels"].cpu()
            self._display = None

    # ------------------------------------------------------------------ samples
    def _take_samples(self, loaders: Any) -> None:
        loader = _pick_loader(loaders, self.dataloader_idx)
        dataset = getattr(loader, "dataset", None)
        map_style = dataset is not None and not isinstance(dataset, IterableDataset)
        if isinstance(loader, DataLoader) and loader.batch_size is not None and dataset is not None and map_style:
            try:
                size = len(dataset)
            except TypeError:
                size = 0
            if size > 0:  # a seeded draw over the whole set, one collated batch
                order = torch.randperm(size, generator=torch.Generator().manual_seed(self.seed))
                indices = order[: self.num_samples].sort().values.tolist()
                self._images, self._labels = self._split(loader.collate_fn([dataset[i] for i in indices]))
                return
        images, labels, count = [], [], 0  # an iterable set: its first samples
        for batch in loader:
            x, y = self._split(batch)
            images.append(x)
            labels.append(y)
            count += len(y)
            if count >= self.num_samples:
                break
        if not images:
            raise ValueError("PredictionGridMonitor found no samples in the validation dataloader")
        self._images = torch.cat(images)[: self.num_samples]
        self._labels = torch.cat(labels)[: self.num_samples]

    def _split(self, batch: Any) -> tuple[torch.Tensor, torch.Tensor]:
        out = self.batch_fn(batch) if self.batch_fn is not None else batch
        problem = f"`batch_fn` returned {_describe(out)}" if self.batch_fn is not None else f"got {_describe(batch)}"
        how = (
            "; pass `batch_fn=` a function mapping one batch to (images, labels),"
            " e.g. `PredictionGridMonitor(batch_fn=lambda b: (b['image'], b['label']))`"
        )
        if not isinstance(out, (tuple, list)) or len(out) < 2:
            raise ValueError(f"{_BATCH_HELP}; {problem}{how}")
        images, labels = out[0], out[1]
        if isinstance(labels, (list, tuple)) and all(isinstance(v, int) for v in labels):
            labels = torch.as_tensor(labels)
        if not isinstance(images, torch.Tensor) or not isinstance(labels, torch.Tensor):
            raise ValueError(f"{_BATCH_HELP}; {problem}{how}")
        if images.ndim == 3:
            images = images.unsqueeze(1)
        ok_dtype = images.is_floating_point() or images.dtype == torch.uint8
        ok_images = images.ndim == 4 and images.shape[1] in (1, 3) and ok_dtype
        ok_labels = labels.ndim == 1 and not labels.is_floating_point() and len(labels) == len(images)
        if not (ok_images and ok_labels):
            raise ValueError(f"{_BATCH_HELP}; {problem}{how}")
        if self.mean is not None and len(self.mean) not in (1, images.shape[1]):
            raise ValueError(
                f"`mean`/`std` have {len(self.mean)} values but the images have {images.shape[1]} channels"
            )
        return images.detach().cpu().clone(), labels.detach().cpu().long().clone()

    # ------------------------------------------------------------------ predictions and picture
    def _predict(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> np.ndarray:
        assert self._images is not None and self._labels is not None  # taken before any grid is drawn
        precision = trainer.precision_plugin
        x = precision.convert_input(self._images.to(pl_module.device))
        modes = [(module, module.training) for module in pl_module.modules()]
        pl_module.eval()
        try:
            # the LightningModule itself, never the DDP wrapper: no collectives, rank 0 alone
            with torch.no_grad(), precision.forward_context():
                out = pl_module(x)
            scores = self.output_fn(out) if self.output_fn is not None else out
        finally:
            for module, mode in modes:
                module.training = mode
        n = len(self._labels)
        if not (isinstance(scores, torch.Tensor) and scores.is_floating_point() and scores.ndim == 2
                and scores.shape[0] == n and scores.shape[1] >= 2):
            source = "`output_fn` returned" if self.output_fn is not None else "the module's forward returned"
            raise ValueError(
                f"PredictionGridMonitor needs class scores, log-probabilities or probabilities shaped"
                f" [{n}, num_classes] for {n} images; {source} {_describe(scores)}. Pass `output_fn=` a function"
                " mapping the module's output to that,"
                " e.g. `PredictionGridMonitor(output_fn=lambda out: out['logits'])`"
            )
        # sync point: the one host transfer of a grid, on rank 0; everything after it is numpy
        return _to_probabilities(scores.detach().float().numpy(force=True).astype(np.float64))

    def _render(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int, title: str) -> None:
        self._last_drawn_at = trainer.global_step
        probs = self._predict(trainer, pl_module)
        if self.class_names is not None and len(self.class_names) < probs.shape[1]:
            raise ValueError(
                f"`class_names` has {len(self.class_names)} names but the model scores {probs.shape[1]} classes"
            )
        if self._display is None or self._labels_np is None:  # once per sample set; host tensors only
            assert self._images is not None and self._labels is not None  # taken before any grid is drawn
            self._display = _draw.display_images(self._images, self.tile_size, self.mean, self.std)
            self._labels_np = self._labels.numpy()
        confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
        labels = self._labels_np
        wrong = (predicted != labels).tolist()
        order = list(range(len(labels)))
        if self.mistakes_first:
            order.sort(key=lambda i: not wrong[i])  # stable: the fixed order within each group
        pictures = self._display
        tiles, mistakes = [], []
        for i in order:
            pred, true, conf = self._name(int(predicted[i])), self._name(int(labels[i])), float(confidence[i])
            colour = _draw.WRONG_TEXT_RGB if wrong[i] else _draw.RIGHT_TEXT_RGB
            lines = [(f"pred {pred} {conf:.2f}", colour), (f"true {true}", _draw.TEXT_RGB)]
            tiles.append(_draw.tile(pictures[i], lines, wrong[i]))
            if wrong[i]:
                mistakes.append(f"{true}->{pred} ({conf:.2f})")
        right = len(labels) - len(mistakes)
        caption = f"{title}: {right}/{len(labels)} correct"
        if mistakes:
            more = f", +{len(mistakes) - _MAX_LISTED} more" if len(mistakes) > _MAX_LISTED else ""
            caption += "; wrong: " + ", ".join(mistakes[:_MAX_LISTED]) + more
        image = _draw.grid(tiles, self.nrow, self.padding)
        self._log_image(trainer, "predictions/grid", image, step, caption)
        self._log_scalars(trainer, {"predictions/accuracy": right / len(labels)}, step)

    def _name(self, index: int) -> str:
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)


def _pick_loader(loaders: Any, index: int) -> Any:
    if isinstance(loaders, dict):
        loaders = list(loaders.values())
    if isinstance(loaders, (list, tuple)):
        if index >= len(loaders):
            raise ValueError(f"`dataloader_idx` is {index} but there are {len(loaders)} validation dataloaders")
        return loaders[index]
    return loaders


def _to_probabilities(scores: np.ndarray) -> np.ndarray:
    """Log-probabilities (all <= 0, each row's logsumexp ~ 0) -> exp; probabilities kept; anything else softmax."""
    with np.errstate(over="ignore", invalid="ignore"):
        top = scores.max(axis=1, keepdims=True)
        logsumexp = (top + np.log(np.exp(scores - top).sum(axis=1, keepdims=True))).ravel()
        if (scores <= 0).all() and (np.abs(logsumexp) < 1e-3).all():
            return np.exp(scores)
        if np.isfinite(scores).all() and (scores >= 0).all() and (np.abs(scores.sum(axis=1) - 1) < 1e-3).all():
            return scores
        shifted = np.exp(scores - top)
        return shifted / shifted.sum(axis=1, keepdims=True)


def _describe(obj: Any, depth: int = 0) -> str:
    if isinstance(obj, torch.Tensor):
        return f"Tensor{list(obj.shape)} {str(obj.dtype).replace('torch.', '')}"
    if isinstance(obj, dict):
        return f"dict with keys {list(obj)[:8]}"
    if isinstance(obj, (list, tuple)) and depth == 0:
        inner = ", ".join(_describe(v, 1) for v in list(obj)[:4]) + (", ..." if len(obj) > 4 else "")
        return f"{type(obj).__name__} of {len(obj)} ({inner})"
    return type(obj).__name__
