"""How each Lightning logger receives media: the only place that knows backend types.

``log_*_to(logger, ...)`` return ``False`` when ``logger`` cannot take that kind of value (e.g. ``CSVLogger``
and histograms); the caller decides whether to warn. Scalars go through ``Logger.log_metrics`` everywhere.
"""

from __future__ import annotations

from typing import Mapping, Optional, Sequence

import numpy as np
from lightning.pytorch.loggers import Logger, TensorBoardLogger, WandbLogger

from lightning_monitor._media import HistogramData, to_rgb


def log_histograms_to(logger: Logger, hists: Mapping[str, HistogramData], step: int) -> bool:
    """Histograms at one step. wandb gets them in one ``log_metrics`` call (one history row and one round trip to
    its service, not one per key); TensorBoard one ``add_histogram_raw`` each, with the same counts."""
    if isinstance(logger, TensorBoardLogger):
        writer = logger.experiment
        for key, hist in hists.items():
            # TensorBoard wants right bucket edges; the left edge of the first bucket is ``min``.
            writer.add_histogram_raw(
                key,
                min=hist.min,
                max=hist.max,
                num=hist.num,
                sum=hist.sum,
                sum_squares=hist.sum_squares,
                bucket_limits=hist.edges[1:].tolist(),
                bucket_counts=hist.counts.tolist(),
                global_step=step,
            )
        return True
    if isinstance(logger, WandbLogger):
        import wandb

        logger.log_metrics({k: wandb.Histogram(np_histogram=(h.counts, h.edges)) for k, h in hists.items()}, step=step)
        return True
    if callable(getattr(logger, "log_histograms", None)):
        logger.log_histograms(dict(hists), step=step)
        return True
    if callable(getattr(logger, "log_histogram", None)):
        for key, hist in hists.items():
            logger.log_histogram(key, hist, step=step)
        return True
    return False


def log_images_to(
    logger: Logger, key: str, images: Sequence[np.ndarray], step: int, captions: Optional[Sequence[str]]
) -> bool:
    """``images`` are uint8 HWC arrays (see :func:`lightning_monitor._media.to_uint8_hwc`)."""
    if isinstance(logger, TensorBoardLogger):
        writer = logger.experiment
        for index, image in enumerate(images):
            tag = key if len(images) == 1 else f"{key}/{index}"
            writer.add_image(tag, to_rgb(image), global_step=step, dataformats="HWC")
        return True
    if isinstance(logger, WandbLogger):
        import wandb

        items = [
            wandb.Image(image[:, :, 0] if image.shape[2] == 1 else image, caption=None if captions is None else captions[i])
            for i, image in enumerate(images)
        ]
        logger.log_metrics({key: items if len(items) > 1 else items[0]}, step=step)
        return True
    if callable(getattr(logger, "log_image", None)):
        logger.log_image(key, list(images), step=step, caption=captions)
        return True
    return False


def log_text_to(logger: Logger, key: str, text: str, step: int) -> bool:
    if isinstance(logger, TensorBoardLogger):
        logger.experiment.add_text(key, text, global_step=step)
        return True
    if isinstance(logger, WandbLogger):
        logger.log_text(key, columns=["text"], data=[[text]], step=step)
        return True
    if callable(getattr(logger, "log_text", None)):
        logger.log_text(key, text, step=step)
        return True
    return False
