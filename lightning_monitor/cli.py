"""LightningCLI glue: :class:`SaveConfigCallback`, the CLI's config saver, which writes the run's ``config.yaml``
into the run directory of the first logger.

It is not a monitor: pass it as ``LightningCLI(..., save_config_callback=SaveConfigCallback)``, never in
``trainer.callbacks``. Its class is ``_SaveConfigCallback`` so that LightningCLI's ``--help`` does not offer it among
the callbacks (jsonargparse lists every imported ``Callback`` subclass whose import path has no private part).
"""

from __future__ import annotations

import os
from typing import Optional

from lightning.fabric.utilities.cloud_io import get_filesystem
from lightning.pytorch import LightningModule, Trainer
from lightning.pytorch.cli import SaveConfigCallback as _LightningSaveConfigCallback
from lightning.pytorch.loggers import Logger
from typing_extensions import override


class _SaveConfigCallback(_LightningSaveConfigCallback):
    """LightningCLI's config saver (``save_config_callback=``) that writes ``config.yaml`` into the run directory.

    This is not a monitor and logs nothing: LightningCLI makes it from its ``save_config_callback`` argument and
    adds it to the trainer's callbacks itself; do not list it in ``trainer.callbacks``.

    Lightning saves the config to ``trainer.log_dir``, which for any logger other than its own TensorBoard and
    CSV loggers is the logger's ``save_dir``: every run of a :class:`~lightning_monitor.MultiLogger` would write
    ``runs/config.yaml``, and the second run would stop with "config.yaml already exists". This callback writes
    to the first logger's ``log_dir`` (``save_dir/name/version`` for ``MultiLogger``) when it has one, and
    behaves exactly like Lightning's otherwise. Everything else (``overwrite``, ``multifile``, saving on global
    rank 0 only, ``save_config`` for extra destinations) is Lightning's. A later ``test``/``validate``/``predict``
    on a run directory that already holds ``config.yaml`` (the config of its ``fit``) keeps that file and goes on.

    Example::

        LightningCLI(LitNet, MNISTDataModule, save_config_callback=SaveConfigCallback)
    """

    @override
    def setup(self, trainer: Trainer, pl_module: LightningModule, stage: str) -> None:
        if self.already_saved or not self.save_to_log_dir:
            return super().setup(trainer, pl_module, stage)
        run_dir = trainer.strategy.broadcast(run_directory(trainer))  # rank 0 decides: its version is the run
        if run_dir is None:
            return super().setup(trainer, pl_module, stage)

        config_path = os.path.join(run_dir, self.config_filename)
        fs = get_filesystem(run_dir)
        if not self.overwrite:
            exists = trainer.strategy.broadcast(fs.isfile(config_path) if trainer.is_global_zero else False)
            if exists and stage != "fit":
                # `test` / `validate` / `predict` on a run that was trained: its config.yaml is the training's, and
                # the later segment of the run (same version) must not be refused for it
                self.already_saved = True
                return None
            if exists:  # every rank raises, none waits on a collective
                raise RuntimeError(
                    f"SaveConfigCallback expected {config_path} to NOT exist. Aborting to avoid overwriting the"
                    " config of an earlier run in the same run directory (same logger version). Start a new version,"
                    " delete that file, or pass `LightningCLI(save_config_kwargs={'overwrite': True})`."
                )
        if trainer.is_global_zero:
            fs.makedirs(run_dir, exist_ok=True)
            self.parser.save(
                self.config, config_path, skip_none=False, overwrite=self.overwrite, multifile=self.multifile
            )
            self.save_config(trainer, pl_module, stage)
            self.already_saved = True
        # every rank agrees on future setup() calls
        self.already_saved = trainer.strategy.broadcast(self.already_saved)
        return None


#: The public name. The class itself has a private name (above) to stay out of LightningCLI's callback choices.
SaveConfigCallback = _SaveConfigCallback


def run_directory(trainer: Trainer) -> Optional[str]:
    """The first logger's own run directory (its ``log_dir``), or ``None`` when it has none."""
    if not trainer.loggers:
        return None
    log_dir = getattr(trainer.loggers[0], "log_dir", None) if isinstance(trainer.loggers[0], Logger) else None
    return os.fspath(log_dir) if isinstance(log_dir, (str, os.PathLike)) else None
