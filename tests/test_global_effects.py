"""What lightning-monitor changes outside its own objects is undone or can be refused: a plain logger's methods are its
class's own again after a fit, and ``LIGHTNING_MONITOR_FAST_CRC=off`` keeps TensorBoard's own record checksum."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
from helpers import TinyImageModel, image_loader, make_trainer, tb_scalars
from lightning.pytorch.loggers import CSVLogger, TensorBoardLogger

from lightning_monitor import GradientMonitor, SpeedMonitor
from lightning_monitor._writers.plain import _GuardedCall


def test_a_plain_loggers_methods_are_its_own_again_after_fit_and_after_test(tmp_path):
    tb, csv = TensorBoardLogger(str(tmp_path), name="tb"), CSVLogger(str(tmp_path), name="csv")
    seen = []

    class Spy(GradientMonitor):  # during the fit Lightning's writes go through the guard (isolation)
        def on_train_batch_end(self, trainer, *args) -> None:
            super().on_train_batch_end(trainer, *args)
            seen.append(isinstance(vars(tb).get("log_metrics"), _GuardedCall))

    trainer = make_trainer(tmp_path, logger=[tb, csv], callbacks=[Spy(), SpeedMonitor()], max_steps=4)
    model = TinyImageModel()
    trainer.fit(model, image_loader(64), image_loader(32))
    assert seen and all(seen)
    for logger in (tb, csv):
        assert "log_metrics" not in vars(logger) and "log_hyperparams" not in vars(logger)
        assert type(logger).log_metrics is logger.log_metrics.__func__
    trainer.test(model, image_loader(32))  # guarded again for the stage, unguarded at its end
    assert "log_metrics" not in vars(tb)
    assert [s for s, _ in tb_scalars(tb.log_dir, "train/loss")] == [1, 3]  # Lightning's own writes all landed


CHECKSUM = """
import lightning_monitor
from lightning.pytorch.loggers import TensorBoardLogger
from lightning_monitor._writers.dashboards import TensorBoardWriter
from tensorboard.compat.tensorflow_stub import pywrap_tensorflow
from tensorboard.summary.writer import record_writer
TensorBoardWriter(TensorBoardLogger({root!r}))  # where lightning-monitor makes the swap
print("own" if record_writer.masked_crc32c is pywrap_tensorflow.masked_crc32c else "swapped")
"""


@pytest.mark.parametrize("setting", [None, "off"])
def test_the_checksum_swap_can_be_refused(tmp_path, setting):
    env = {k: v for k, v in os.environ.items() if k != "LIGHTNING_MONITOR_FAST_CRC"}
    if setting is not None:
        env["LIGHTNING_MONITOR_FAST_CRC"] = setting
    out = subprocess.run([sys.executable, "-c", CHECKSUM.format(root=str(tmp_path))], env=env, capture_output=True,
                         text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.strip() == ("own" if setting == "off" else "swapped")
