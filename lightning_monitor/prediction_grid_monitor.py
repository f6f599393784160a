"""PredictionGridMonitor: what the model predicts on a fixed set of real validation samples, drawn as a grid."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from lightning.pytorch.utilities.model_helpers import is_overridden
from typing_extensions import override

from lightning_monitor._core import options as _options
from lightning_monitor._core.keys import document_keys
from lightning_monitor._grid import draw as _draw
from lightning_monitor._grid import inputs as _grid_input
from lightning_monitor._monitor import dist as _dist
from lightning_monitor._monitor.base import Monitor
from lightning_monitor._monitor.budget import DEFAULT_SHARE

_MAX_LISTED = 8  # wrong predictions spelled out in the caption


@document_keys
class PredictionGridMonitor(Monitor):
    r"""Log a grid of fixed validation samples with the model's prediction and the true label drawn into each tile.

    A fixed set of ``num_samples`` samples (drawn once with ``seed`` from the validation set, kept on the CPU and
    in the checkpoint) is shown after every validation epoch, so the same digits are seen improving from epoch to
    epoch. Each tile carries the predicted label with its confidence and the true label in a band under the image;
    wrong predictions get a red frame and, with ``mistakes_first``, come first. The picture itself holds the
    answer, so TensorBoard shows it too; wandb also gets a caption such as
    ``"epoch 3 (step 1200): 21/24 correct; wrong: 4->9 (0.61), ..."``. The defaults are sized for TensorBoard's
    default image card (about 301 x 200 px, the image scaled to fit): 24 samples in 8 columns of 66 px tiles with an
    18 px label font, so ``"9 | 0.55"`` shows with digits about 7 px high without "show actual image size".

    It draws image classifiers: validation batches ``(images, labels, ...)`` (images ``[B, C, H, W]`` with C 1 or
    3, labels integer class ids) and a module whose output is class scores (logits), log-probabilities or
    probabilities shaped ``[B, num_classes]``. ``batch_fn`` adapts other batches (a dict, say) and ``output_fn``
    other outputs. It never ends a run: a batch it cannot read, an output that is not class scores, or a fit with
    no validation loop (and no ``every_n_steps``) gives one warning saying what it expected and which option fixes
    it, and the monitor logs nothing more in that run.

    Predictions are computed without gradients, in eval mode (every submodule's train/eval mode is restored
    afterwards), by calling the LightningModule directly, never its DDP wrapper. Under DDP that happens on global
    rank 0 alone: no collectives, the other ranks do nothing. Under ``ModelParallelStrategy`` (FSDP2's
    ``fully_shard`` and tensor parallelism applied in ``configure_model``) a forward needs every rank: rank 0 takes
    the samples and broadcasts them once (one collective per run, so a rank with no validation batches of its own
    still has them), every rank runs the model on them at each grid (a DTensor output is gathered with
    ``full_tensor()``) and rank 0 alone draws and logs (every rank must still enter the validation loop, as the
    module's own sharded ``validation_step`` needs: Lightning skips it on a rank whose loader has a length of 0).
    Lightning's ``FSDPStrategy`` (FSDP1) and DeepSpeed wrap the module so that its own forward cannot be called:
    the monitor refuses them in ``setup``.

    {logged_keys}

    Args:
        num_samples: how many fixed samples to show.
        seed: seed of the draw of the fixed samples from the validation set.
        nrow: tiles per row of the grid (``None``: the number that shows the grid largest in TensorBoard's default
            image card).
        tile_size: height in pixels each image is scaled to; the label font is the largest at which
            ``"9 | 0.55"`` fits the tile's width (18 px for the default 66 px tiles), in a band of two lines under it.
            More samples or wider tiles than the defaults are drawn smaller in TensorBoard's card (full size under
            "show actual image size" and in wandb).
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
        cost_budget: the share of training time all lightning-monitor monitors together may take (their own hook
            time, measured, from the end of the first batch); on a fast model the grid (its forward over the samples,
            its picture and the ``predictions/accuracy`` that comes with it) is then made at fewer validations (or
            logging steps) to stay within it. Said once when it happens. ``None``: a grid every time, whatever it
            costs. With a model sharded over ranks (the grid's forward is a collective) grids are never spaced out.

    Raises:
        TypeError: an argument of the wrong type (``num_samples=2.5``), at construction.
        ValueError: a bad argument (at construction).
        MisconfigurationException: no logger, or ``FSDPStrategy`` (FSDP1) or ``DeepSpeedStrategy``.

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
    FLAT_SHARDS_UNSUPPORTED = "wraps the LightningModule's forward and shards it out of the grid's reach"

    def __init__(
        self,
        num_samples: int = 24,
        *,
        seed: int = 0,
        nrow: Optional[int] = None,
        tile_size: int = 66,
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
        cost_budget: Optional[float] = DEFAULT_SHARE,
    ) -> None:
        num_samples = _options.check_int("num_samples", num_samples, low=1)
        seed = _options.check_int("seed", seed)
        nrow = _options.check_int("nrow", nrow, low=1, none_ok=True)
        tile_size = _options.check_int("tile_size", tile_size, low=8)
        padding = _options.check_count("padding", padding)
        dataloader_idx = _options.check_count("dataloader_idx", dataloader_idx)
        _options.check_bool("mistakes_first", mistakes_first)
        super().__init__(every_n_steps, exclude_keys, cost_budget)
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
        self._blanks: list[Any] = []  # each picture's tile before its labels (_draw.blank), made with _display
        self._labels_np: Optional[np.ndarray] = None
        self._last_drawn_at = -1  # trainer.global_step (model updates) of the last grid: one model state, one grid
        self._off = False  # turned off for the rest of the run (one warning said why)
        self._grid_part = self._part("prediction grids", 0.5)  # drawing and logging one; spaced out on a fast model

    # ------------------------------------------------------------------ hooks
    @override
    def setup(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", stage: str) -> None:
        super().setup(trainer, pl_module, stage)
        self._off = False  # a new run: a model the last one could not read may be readable now
        if trainer.is_global_zero:
            _draw.warm_up()  # before training: not a cost of the first grid (the budget spaces grids out by it)

    @override
    def on_train_start(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        super().on_train_start(trainer, pl_module)
        if self.every_n_steps is None and not trainer.enable_validation:
            self._turn_off(
                "it draws after each validation run, and this fit has none (no val_dataloader, no validation_step,"
                " or limit_val_batches=0): add a validation loop, or pass `every_n_steps=` to draw during training"
                " from the samples of a val_dataloader"
            )

    @override
    def on_train_batch_end(
        self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", outputs: Any, batch: Any, batch_idx: int
    ) -> None:
        # After the batch's optimizer step, logged at the batch's step: the step (and the model) a validation run
        # at the end of this batch would show, so the two never disagree and one model state gets one grid.
        if self.every_n_steps is None or self._off or not _dist.works_on_model_here(trainer):
            return  # no grids asked for, or turned off; or a rank with no part in the grid
        step = self._batch_logging_step(trainer)
        if step is None:
            return  # not a logging step, or a micro-batch that did not step the optimizer
        if self._images is None and not self._take_samples(trainer, lambda: _any_val_loader(trainer, pl_module)):
            return
        self._render(trainer, pl_module, step, f"step {step}")

    @override
    def on_validation_epoch_end(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> None:
        if self._off or not _dist.works_on_model_here(trainer):
            return
        if self._images is None and trainer.val_dataloaders is not None:
            # also in the sanity check: a batch it cannot read is said before the first training step
            if not self._take_samples(trainer, lambda: trainer.val_dataloaders):
                return
        if trainer.sanity_checking or self._images is None or self._last_drawn_at == trainer.global_step:
            return  # (the last check: this model state was just drawn at this step by the training grid)
        step = self._validation_step(trainer)  # the step Lightning logs val/* at
        self._render(trainer, pl_module, step, f"epoch {trainer.current_epoch} (step {step})")

    @property
    @override
    def state_key(self) -> str:
        # two grids (say, one per validation dataloader) keep their own samples in the checkpoint; Lightning reads the
        # key at every hook call (its profiler's action name): made once for the options' values, not per call
        options = (self.dataloader_idx, self.num_samples, self.seed)  # a tuple: ~1 us less than a dict, 6 times a batch
        if self.__dict__.get("_state_key_of") != options:
            self._state_key_of, self._state_key = options, self._generate_state_key(
                dataloader_idx=self.dataloader_idx, num_samples=self.num_samples, seed=self.seed)
        return self._state_key

    @override
    def state_dict(self) -> dict[str, Any]:
        if self._images is None:
            return {}
        return {"images": self._images, "labels": self._labels}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        if "images" not in state_dict:
            return
        images, labels = state_dict.get("images"), state_dict.get("labels")
        problem = _grid_input.state_problem(images, labels)
        # a checkpoint from another version, or edited by hand: never trusted blindly
        if problem or images is None or labels is None:
            self._warn("state", f"PredictionGridMonitor ignores the samples stored in the checkpoint ({problem}); it"
                                " takes new ones from the validation data.")
            return
        self._images, self._labels = images.cpu(), labels.cpu()
        self._display = None

    @override
    def is_off(self) -> bool:
        return self._off

    # ------------------------------------------------------------------ samples
    def _turn_off(self, why: str) -> None:
        """One warning saying why, then nothing more from this monitor in this run (it never ends the run)."""
        self._off = True
        self._warn("off", f"PredictionGridMonitor logs nothing more in this run: {why}")

    def _take_samples(self, trainer: "pl.Trainer", loaders: Callable[[], Any]) -> bool:
        """Take the fixed samples on rank 0 from ``loaders()``; ``False`` (the monitor off, with one warning) when
        there are none or they cannot be read. When every rank runs the model, rank 0's samples (or its reason for
        turning off) are broadcast: every rank decides the same, and a rank with no validation batches of its own
        still runs the forward."""
        taken: Any = None
        if trainer.is_global_zero:
            try:
                found = loaders()
                if found is None:
                    raise _grid_input.Unreadable(
                        "it takes its fixed samples from a val_dataloader, and this fit has none"
                    )
                loader = _grid_input.pick_loader(found, self.dataloader_idx)
                channels = None if self.mean is None else len(self.mean)
                taken = _grid_input.take_samples(
                    loader, self.num_samples, self.seed, lambda b: _grid_input.split_batch(b, self.batch_fn, channels)
                )
            except Exception as error:  # a batch_fn of the user's may raise anything: it costs the grid, not the run
                taken = _why(error)
        if _dist.model_on_every_rank(trainer):
            taken = trainer.strategy.broadcast(taken, src=0)  # collective, on every rank; once per run
        if isinstance(taken, str):
            self._turn_off(taken)
            return False
        self._images, self._labels = taken
        return True

    # ------------------------------------------------------------------ predictions and picture
    def _predict(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> np.ndarray:
        assert self._images is not None and self._labels is not None  # taken before any grid is drawn
        precision = trainer.precision_plugin
        x = precision.convert_input(self._images.to(pl_module.device))
        modes = [(module, module.training) for module in pl_module.modules()]
        pl_module.eval()
        try:
            # the LightningModule itself, never the DDP wrapper: under DDP no collectives, rank 0 alone; sharded,
            # every rank at once (FSDP2 gathers each layer's parameters; the same inputs on every rank)
            with torch.no_grad(), precision.forward_context():
                out = pl_module(x)
            scores = self.output_fn(out) if self.output_fn is not None else out
            if _dist.model_on_every_rank(trainer):
                scores = _full_tensor(scores)  # a tensor-parallel output is a DTensor: gathered on every rank
        finally:
            for module, mode in modes:
                module.training = mode
        scores = _grid_input.check_scores(scores, len(self._labels), self.output_fn is not None)
        # sync point: the one host transfer of a grid (on rank 0; sharded, on every rank); after it, numpy
        return _grid_input.to_probabilities(scores.detach().float().numpy(force=True).astype(np.float64))

    def _render(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int, title: str) -> None:
        # under the cost budget a grid (its forward, its accuracy and its picture) may wait for a later step; with a
        # model sharded over ranks the forward is a collective: each rank's own clock must not decide for it
        if not _dist.model_on_every_rank(trainer) and not self._affordable(self._grid_part):
            return
        with self._spending(self._grid_part):
            self._render_now(trainer, pl_module, step, title)

    def _render_now(self, trainer: "pl.Trainer", pl_module: "pl.LightningModule", step: int, title: str) -> None:
        self._last_drawn_at = trainer.global_step
        try:
            probs = self._predict(trainer, pl_module)
        except Exception as error:  # an output it cannot read, or a forward that fails on these samples
            self._turn_off(_why(error))
            return
        if not trainer.is_global_zero:
            return  # a sharded model: this rank's part was the forward; rank 0 draws
        if self.class_names is not None and len(self.class_names) < probs.shape[1]:
            self._warn("class_names", (
                f"`class_names` has {len(self.class_names)} names but the model scores {probs.shape[1]} classes:"
                " PredictionGridMonitor shows the ids of the classes past the list"
            ))
        if self._display is None or self._labels_np is None:  # once per sample set; host tensors only
            assert self._images is not None and self._labels is not None  # taken before any grid is drawn
            self._display = _draw.display_images(self._images, self.tile_size, self.mean, self.std)
            self._blanks = [_draw.blank(picture) for picture in self._display]
            self._labels_np = self._labels.numpy()
        confidence, predicted = probs.max(axis=1), probs.argmax(axis=1)
        labels = self._labels_np
        wrong = (predicted != labels).tolist()
        self._draw(trainer, step, title, confidence, predicted, wrong)

    def _draw(self, trainer: "pl.Trainer", step: int, title: str, confidence: np.ndarray, predicted: np.ndarray,
              wrong: list[bool]) -> None:
        labels = self._labels_np
        assert labels is not None and self._display is not None
        order = list(range(len(labels)))
        if self.mistakes_first:
            order.sort(key=lambda i: not wrong[i])  # stable: the fixed order within each group
        pictures = self._display
        tiles, mistakes = [], []
        for i in order:
            pred, true, conf = self._name(int(predicted[i])), self._name(int(labels[i])), float(confidence[i])
            colour = _draw.WRONG_TEXT_RGB if wrong[i] else _draw.RIGHT_TEXT_RGB
            lines = [(f"{pred} | {conf:.2f}", colour), (f"true {true}", _draw.TEXT_RGB)]
            tiles.append(_draw.tile(pictures[i], lines, wrong[i], self._blanks[i]))
            if wrong[i]:
                mistakes.append(f"{true}->{pred} ({conf:.2f})")
        right = len(labels) - len(mistakes)
        caption = f"{title}: {right}/{len(labels)} correct"
        if mistakes:
            more = f", +{len(mistakes) - _MAX_LISTED} more" if len(mistakes) > _MAX_LISTED else ""
            caption += "; wrong: " + ", ".join(mistakes[:_MAX_LISTED]) + more
        tile_h, tile_w = tiles[0].shape[:2]
        ncol = self.nrow or _draw.columns(len(tiles), tile_w, tile_h, self.padding)
        image = _draw.grid(tiles, ncol, self.padding)
        self._log_image(trainer, "predictions/grid", image, step, caption)
        self._log_scalars(trainer, {"predictions/accuracy": right / len(labels)}, step)

    def _name(self, index: int) -> str:
        if self.class_names is not None and 0 <= index < len(self.class_names):
            return self.class_names[index]
        return str(index)


def _any_val_loader(trainer: "pl.Trainer", pl_module: "pl.LightningModule") -> Any:
    """The validation dataloader(s) before the first validation run: the trainer's, the datamodule's or the
    module's own ``val_dataloader``; ``None`` when there is none."""
    if trainer.val_dataloaders is not None:
        return trainer.val_dataloaders
    datamodule = getattr(trainer, "datamodule", None)  # a Trainer property, undeclared for type checkers
    if datamodule is not None and is_overridden("val_dataloader", datamodule):
        return datamodule.val_dataloader()
    if is_overridden("val_dataloader", pl_module):
        return pl_module.val_dataloader()
    return None


def _full_tensor(scores: Any) -> Any:
    """A DTensor (sharded or replicated across ranks) as the whole tensor on every rank (a collective); else as is."""
    from torch.distributed.tensor import DTensor

    return scores.full_tensor() if isinstance(scores, DTensor) else scores


def _why(error: Exception) -> str:
    """The warning text for what went wrong: an :class:`Unreadable`'s own message, else the error and the fixes."""
    if isinstance(error, _grid_input.Unreadable):
        return str(error)
    return (
        f"reading the samples or predicting on them raised {type(error).__name__}: {error}. It draws image"
        f" classifiers and expects {_grid_input.EXPECTED_BATCH} and class scores [B, num_classes] from the"
        " module's forward; `batch_fn=` and `output_fn=` adapt other layouts"
    )

