"""Small real pieces the tests share: a tiny image model, data, a trainer factory and backend readers."""

from __future__ import annotations

import contextlib
import ctypes
import gc
import glob
import http.server
import io
import json
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from typing import Any, Optional

import lightning.pytorch as pl
import numpy as np
import torch
from torch import nn
from torch.nn import functional as F
from torch.utils.data import DataLoader, Dataset, TensorDataset
from wandb_reader import WandbRun, find_runs  # noqa: F401 - re-exported for tests


class TinyImageModel(pl.LightningModule):
    """A 1-conv classifier on 1x28x28 inputs returning log-probabilities, like the MNIST Net but tiny."""

    def __init__(self, lr: float = 0.05) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.conv = nn.Conv2d(1, 4, 3)
        self.head = nn.Linear(4 * 13 * 13, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(F.relu(self.conv(x)), 2)
        return F.log_softmax(self.head(torch.flatten(x, 1)), dim=1)

    def training_step(self, batch: Any, batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.nll_loss(self(x), y)
        self.log("train/loss", loss)
        return loss

    def validation_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("val/loss", F.nll_loss(self(x), y))

    def test_step(self, batch: Any, batch_idx: int) -> None:
        x, y = batch
        self.log("test/loss", F.nll_loss(self(x), y))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.hparams.lr)


def image_data(n: int = 64, seed: int = 0) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    return TensorDataset(torch.randn(n, 1, 28, 28, generator=g), torch.randint(0, 10, (n,), generator=g))


def image_loader(n: int = 64, batch_size: int = 16, seed: int = 0, **kwargs: Any) -> DataLoader:
    return DataLoader(image_data(n, seed), batch_size=batch_size, **kwargs)


def make_trainer(root: Any, **kwargs: Any) -> pl.Trainer:
    defaults: dict[str, Any] = dict(
        accelerator="cpu",
        devices=1,
        max_steps=8,
        log_every_n_steps=2,
        enable_progress_bar=False,
        enable_model_summary=False,
        enable_checkpointing=False,
        default_root_dir=str(root),
        num_sanity_val_steps=0,
    )
    defaults.update(kwargs)
    return pl.Trainer(**defaults)


def fit_tiny(callbacks: list[Any], logger: Any, **trainer_kwargs: Any) -> pl.Trainer:
    """A :func:`make_trainer` fit in the working directory of a :class:`TinyImageModel` on 64 training and 32
    validation samples."""
    trainer = make_trainer(".", logger=logger, callbacks=callbacks, **trainer_kwargs)
    trainer.fit(TinyImageModel(), image_loader(64), image_loader(32))
    return trainer


def rank_strided_loader(trainer: pl.Trainer, n: int = 64, global_batch: int = 16) -> DataLoader:
    """:func:`image_data` where rank r reads samples r, r + world, ... in order: the ranks' batches together are one
    process's batch of ``global_batch`` (a DDP run to compare with one process)."""
    from torch.utils.data import DistributedSampler

    data, world = image_data(n), trainer.world_size
    sampler = DistributedSampler(data, num_replicas=world, rank=trainer.global_rank, shuffle=False)
    return DataLoader(data, batch_size=global_batch // world, sampler=sampler)


def one_process_and_ddp(tmp_path: Any, model: Any, callback: Any, prefix: str, max_steps: int = 4,
                        histograms: Optional[dict[str, Any]] = None) -> dict[str, dict[str, dict[int, float]]]:
    """``{"one": ..., "ddp": ...}``: the ``prefix`` scalars (tag -> step -> value) of the same seeded fit on one process
    and on 2 ``ddp_spawn`` processes; ``model()`` and ``callback()`` make a fresh model (its loader from
    :func:`rank_strided_loader`) and monitor for each. ``histograms``: a dict that gets, under ``"one"`` and
    ``"ddp"``, the ``prefix`` histograms too (tag -> step -> TensorBoard's HistogramProto)."""
    from lightning.pytorch.loggers import TensorBoardLogger

    runs = {}
    for name, devices in (("one", 1), ("ddp", 2)):
        root = str(tmp_path / name)
        torch.manual_seed(0)
        kwargs = dict(strategy="ddp_spawn") if devices > 1 else {}
        trainer = make_trainer(tmp_path / name, devices=devices, logger=TensorBoardLogger(root), max_steps=max_steps,
                               use_distributed_sampler=False, callbacks=[callback()], **kwargs)
        trainer.fit(model())
        (path,) = event_files(root)
        acc = tb_accumulator(os.path.dirname(path))
        tags = [t for t in acc.Tags()["scalars"] if t.startswith(prefix)]
        runs[name] = {t: {e.step: e.value for e in acc.Scalars(t)} for t in tags}
        if histograms is not None:
            histograms[name] = {t: {e.step: e.histogram_value for e in acc.Histograms(t)}
                                for t in acc.Tags()["histograms"] if t.startswith(prefix)}
    return runs


@contextlib.contextmanager
def steady_heap() -> Iterator[None]:
    """A test that reads this process's RSS before and after it allocates something: no earlier test's memory may be
    freed in between, and no freed memory may be waiting to be reused.

    - Earlier tests' cyclic garbage (trainers, tensors) is collected now, and the cyclic collector stays off inside:
      a collection started by any thread (a writer thread of an earlier test) freed tens of MiB in the middle of a
      64 MiB allocation in a CI run (seed 2520996379), so RSS rose by 5.5 MiB;
    - the C allocator's free memory goes back to the system (glibc's ``malloc_trim``; nothing elsewhere): an image
      downscaled in bands of 32 MiB raises glibc's mmap threshold and leaves hundreds of MiB free but resident, which
      a leak of 8 MiB blocks reused with RSS flat for 30 steps (seed 1166850914). A user's fresh process has neither.
    """
    gc.collect()
    with contextlib.suppress(AttributeError, OSError):
        ctypes.CDLL(None).malloc_trim(0)
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


class FakeClock:
    """A clock that only moves when the test moves it (seconds, from 100); set with ``_core.clock.set_clock``.
    Binary-exact steps keep every expected value exact."""

    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


class OnFakeClock:
    """A LightningModule mixin (first among the bases): each training step moves ``clock`` by ``step_sec`` before the
    step's own work, as a step that takes that long would."""

    def __init__(self, clock: FakeClock, *args: Any, step_sec: float = 0.010, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.clock, self.step_sec = clock, step_sec

    def training_step(self, batch: Any, batch_idx: int) -> Any:
        self.clock.now += self.step_sec
        return super().training_step(batch, batch_idx)  # type: ignore[misc]


class SyncsPerBatch(pl.Callback):
    """``per_step``: how many host syncs a :class:`~lightning_monitor.testing.HostSyncCounter` counted from each
    training batch's start to its end (``trainer.global_step`` after the batch, less one); place it after the
    monitors so their batch ends are inside."""

    def __init__(self, counter: Any) -> None:
        self.counter = counter
        self.per_step: dict[int, int] = {}
        self._start = 0

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        self._start = len(self.counter)

    def on_train_batch_end(self, trainer: Any, pl_module: Any, outputs: Any, batch: Any, batch_idx: int) -> None:
        self.per_step[trainer.global_step - 1] = len(self.counter) - self._start


class TimedSamples(Dataset):
    """Fixed samples ``(x[i], y[i])``; fetching one moves ``clock`` by ``per_sample`` (a dataset that sleeps in
    ``__getitem__``, on a fake clock)."""

    def __init__(self, clock: FakeClock, x: torch.Tensor, y: torch.Tensor, per_sample: float) -> None:
        self.clock, self.x, self.y, self.per_sample = clock, x, y, per_sample

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> Any:
        self.clock.now += self.per_sample
        return self.x[i], self.y[i]


def callback_from_cli_yaml(tmp_path: Any, cls: type, init_args: str) -> Any:
    """The ``cls`` callback LightningCLI builds from a config file whose trainer holds it alone, with ``init_args``
    (YAML lines, indented as the file's init_args body: 8 spaces), and no logger."""
    from lightning.pytorch.cli import LightningCLI

    config = tmp_path / "config.yaml"
    config.write_text(
        "trainer:\n"
        "  logger: false\n"
        "  callbacks:\n"
        f"    - class_path: lightning_monitor.{cls.__name__}\n"
        "      init_args:\n" + init_args
    )
    cli = LightningCLI(TinyImageModel, run=False, args=["--config", str(config)], save_config_callback=None)
    (callback,) = [c for c in cli.trainer.callbacks if isinstance(c, cls)]
    return callback


def tb_accumulator(log_dir: str) -> Any:
    """Everything TensorBoard wrote under ``log_dir`` (size guidance 0 keeps every event, not a sample)."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(
        str(log_dir),
        size_guidance={"scalars": 0, "histograms": 0, "images": 0, "tensors": 0, "compressedHistograms": 0},
    )
    acc.Reload()
    return acc


def tb_scalars(log_dir: str, tag: str) -> list[tuple[int, float]]:
    return [(e.step, e.value) for e in tb_accumulator(log_dir).Scalars(tag)]


def tb_all_scalars(log_dir: str) -> dict[str, list[tuple[int, float]]]:
    """Every scalar series TensorBoard wrote under ``log_dir``: ``{tag: [(step, value), ...]}``."""
    acc = tb_accumulator(log_dir)
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)] for tag in acc.Tags()["scalars"]}


def tb_images(log_dir: str, tag: str) -> list[tuple[int, np.ndarray]]:
    """(step, H x W x 3 uint8 picture) of every image TensorBoard wrote under ``tag`` in ``log_dir``."""
    from PIL import Image

    return [(e.step, np.asarray(Image.open(io.BytesIO(e.encoded_image_string)).convert("RGB")))
            for e in tb_accumulator(log_dir).Images(tag)]


def event_files(log_dir: str) -> list[str]:
    return sorted(glob.glob(os.path.join(str(log_dir), "**", "events.out.tfevents.*"), recursive=True))


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on (at the time of asking)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def json_server(status: int = 200, answer: Any = None) -> Iterator[tuple[str, list[tuple[str, str]]]]:
    """A real HTTP server on 127.0.0.1 (a free port, a thread per request) answering every request, whatever its
    method and path, with ``status`` and ``answer`` as JSON (``{}`` by default): a reverse proxy that is no W&B
    server. Yields its base URL and the ``(method, path)`` of each request it got; shut down on exit."""
    body = json.dumps({} if answer is None else answer).encode()
    seen: list[tuple[str, str]] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def answer(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            if length:
                self.rfile.read(length)
            seen.append((self.command, self.path))
            self.send_response(status)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        do_GET = do_POST = do_PUT = do_PATCH = do_DELETE = do_HEAD = answer

        def log_message(self, *args: Any) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)


def run_ddp_script(tmp_path: Any, name: str, source: str, timeout: float = 170) -> subprocess.CompletedProcess[str]:
    """``source`` written to ``tmp_path/name`` and run there as its own job (it starts its 2 DDP processes itself),
    with the distributed variables of any outer launcher taken out of its environment; it must exit 0."""
    script = tmp_path / name
    script.write_text(source)
    env = {k: v for k, v in os.environ.items() if k not in ("LOCAL_RANK", "WORLD_SIZE", "NODE_RANK", "MASTER_PORT")}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                          timeout=timeout)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return proc


def flat_shard_trainer(strategy: str) -> Any:
    """What a monitor's ``setup`` reads of a trainer under Lightning's ``strategy`` (e.g. ``FSDPStrategy``), without
    building the strategy (it needs a GPU / a process group)."""
    from lightning.pytorch import strategies

    cls = getattr(strategies, strategy)

    class Trainer:
        loggers, is_global_zero, strategy = [object()], False, cls.__new__(cls)

    return Trainer()


#: The training job the fault-injection tests run as a subprocess (``python tests/reliability_job.py --help``).
RELIABILITY_JOB = os.path.join(os.path.dirname(os.path.abspath(__file__)), "reliability_job.py")


def run_reliability_job(tmp_path: Any, *args: str, env: Any = None, timeout: float = 150,
                        **popen: Any) -> tuple[subprocess.CompletedProcess[str], Any]:
    """:data:`RELIABILITY_JOB` run to its end under ``tmp_path`` (its ``runs`` directory, ``env`` added to this
    process's environment); the process and the run directory of its logger (``runs/job/version_0``)."""
    runs = tmp_path / "runs"
    full_env = {**os.environ, **(env or {})}
    proc = subprocess.run(
        [sys.executable, RELIABILITY_JOB, "--runs", str(runs), *args], cwd=tmp_path, env=full_env,
        capture_output=True, text=True, timeout=timeout, **popen,
    )
    return proc, runs / "job" / "version_0"


def start_paced_job(tmp_path: Any, *extra: str) -> tuple[subprocess.Popen[str], Any]:
    """:data:`RELIABILITY_JOB` started in the background for 400 steps of 0.1 s, writing ``step time`` lines to
    ``tmp_path/progress.txt``; the process and that file."""
    progress = tmp_path / "progress.txt"
    proc = subprocess.Popen(
        [sys.executable, RELIABILITY_JOB, "--runs", str(tmp_path / "runs"), "--steps", "400", "--sleep", "0.1",
         "--progress", str(progress), *extra],
        cwd=tmp_path, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )
    return proc, progress


def wait_for_step(proc: subprocess.Popen[str], progress: Any, step: int, timeout: float = 120) -> None:
    """Until the paced job has finished ``step`` (its progress file says so); fails if it exits or times out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        lines = progress.read_text().split() if progress.exists() else []
        if len(lines) >= 2 * (step + 1):
            return
        assert proc.poll() is None, proc.communicate()[1][-3000:]
        time.sleep(0.1)
    raise AssertionError(f"job did not reach step {step}")
