"""MultiLogger: Lightning's TensorBoardLogger and WandbLogger as one logger, one run, one step axis."""

from __future__ import annotations

import glob
import hashlib
import importlib.util
import inspect
import netrc
import os
import re
import socket
from argparse import Namespace
from typing import Any, Iterator, Mapping, Optional, Sequence, Union
from urllib.parse import urlparse

import numpy as np
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import Logger, TensorBoardLogger
from lightning.pytorch.loggers.logger import rank_zero_experiment
from lightning.pytorch.utilities import rank_zero_info, rank_zero_only, rank_zero_warn
from typing_extensions import override

from lightning_monitor._backends import log_histogram_to, log_images_to, log_text_to
from lightning_monitor._media import HistogramData, make_histogram, to_uint8_hwc

#: seconds between TensorBoard flushes; TensorBoard's own default (120 s) is too slow to watch a run live.
DEFAULT_FLUSH_SECS = 2
_WANDB_PIP = "pip install wandb"
_NETWORK_TIMEOUT_SEC = 2.0


class MultiLogger(Logger):
    r"""One Lightning logger that writes to TensorBoard and Weights & Biases at once.

    It composes Lightning's own :class:`~lightning.pytorch.loggers.TensorBoardLogger` and
    :class:`~lightning.pytorch.loggers.WandbLogger` and adds what they lack in common: histograms, images and
    text. Both backends describe one run: TensorBoard writes to ``save_dir/name/version`` and the wandb run,
    stored inside that directory, is called ``name/version`` with an id derived from the run directory, so
    starting again with the same ``version`` appends to the same TensorBoard run and resumes the same wandb run.
    Every value is written at the step it is given (the trainer's ``global_step``) to both sides; wandb plots it
    against ``trainer/global_step``.

    wandb never blocks training: without an API key, network, or with ``WANDB_MODE=offline`` it runs offline,
    says so once with the ``wandb sync`` command to upload later, and never prompts.

    The logger itself logs no keys of its own:

    ====  =======
    key   meaning
    ====  =======
    ====  =======

    Args:
        save_dir: root directory of all runs.
        name: experiment name: ``save_dir/name`` holds its versions; also the default wandb project.
        version: run version; ``None`` takes the next free ``version_N``. Pass the version of an earlier run
            (e.g. when resuming from its checkpoint) to continue that run.
        tensorboard: ``True``, ``False`` or a dict of options for ``TensorBoardLogger`` / ``SummaryWriter``
            (e.g. ``{"flush_secs": 10, "log_graph": True}``).
        wandb: ``True``, ``False`` or a dict of options for ``WandbLogger`` / ``wandb.init`` (e.g.
            ``{"project": "x", "entity": "y", "mode": "offline", "tags": [...]}``).

    Raises:
        ValueError: an unknown option, or a ``save_dir`` that cannot be created.
        ModuleNotFoundError: wandb asked for but not installed.

    Example::

        trainer = Trainer(logger=MultiLogger(save_dir="runs", name="mnist"), callbacks=[GradientMonitor()])
    """

    LOGGED_KEYS: dict[str, str] = {}

    def __init__(
        self,
        save_dir: Union[str, os.PathLike] = "runs",
        name: str = "lightning_monitor",
        version: Optional[Union[int, str]] = None,
        tensorboard: Union[bool, dict[str, Any]] = True,
        wandb: Union[bool, dict[str, Any]] = True,
    ) -> None:
        super().__init__()
        if not name or not isinstance(name, str):
            raise ValueError(f"`name` must be a non-empty string, got {name!r}")
        save_dir = os.fspath(save_dir)
        _check_writable(save_dir)
        tb_options = _options("tensorboard", tensorboard)
        if tb_options is not None:
            _check_keys("tensorboard", tb_options, _tensorboard_keys())
        self._wandb_options = _options("wandb", wandb)
        if self._wandb_options is not None:
            if importlib.util.find_spec("wandb") is None:
                raise ModuleNotFoundError(f"MultiLogger(wandb=...) needs wandb: `{_WANDB_PIP}`, or pass wandb=False")
            _check_keys("wandb", self._wandb_options, _wandb_keys())
        self._tensorboard_on = tb_options is not None
        tb_kwargs = {"default_hp_metric": False, "flush_secs": DEFAULT_FLUSH_SECS, **(tb_options or {})}
        # Built even when TensorBoard is off: it owns the run directory and the version numbering.
        self._tb = TensorBoardLogger(save_dir, name=name, version=version, **tb_kwargs)
        self._tb_hp_metric = bool(tb_kwargs["default_hp_metric"])
        self._wandb: Optional[Any] = None  # WandbLogger, made on first use on rank 0
        self._wandb_failed = False
        self._tb_resumed: Optional[bool] = None  # did the run directory hold event files before we wrote?
        self._tb_purge_pending = False

    # ------------------------------------------------------------------ identity
    @property
    @override
    def name(self) -> str:
        return self._tb.name

    @property
    @override
    def version(self) -> Union[int, str]:
        return self._tb.version

    @property
    @override
    def save_dir(self) -> str:
        return self._tb.save_dir

    @property
    @override
    def root_dir(self) -> str:
        return self._tb.root_dir

    @property
    @override
    def log_dir(self) -> str:
        """The run directory ``save_dir/name/version``: event files, the wandb run and checkpoints live here."""
        return self._tb.log_dir

    @property
    def run_id(self) -> str:
        """The wandb run id: ``name-version-<hash of the absolute run directory>``; stable across restarts."""
        digest = hashlib.sha1(os.path.abspath(self.log_dir).encode()).hexdigest()[:8]
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        return _slug(f"{self.name}-{version}-{digest}")

    @property
    def tensorboard(self) -> Optional[TensorBoardLogger]:
        """Lightning's TensorBoardLogger behind this logger, or ``None`` when TensorBoard is off."""
        return self._tb if self._tensorboard_on else None

    @property
    def wandb(self) -> Optional[Any]:
        """Lightning's WandbLogger behind this logger (made on first use), or ``None`` when wandb is off."""
        if self._wandb_options is None or self._wandb_failed:
            return None
        if self._wandb is None:
            self._wandb = self._make_wandb()
        return self._wandb

    @property
    @rank_zero_experiment
    def experiment(self) -> Any:
        """The TensorBoard ``SummaryWriter`` (or the wandb run when TensorBoard is off)."""
        if self._tensorboard_on:
            return self._tb_writer()
        return self.wandb.experiment if self.wandb is not None else None

    # ------------------------------------------------------------------ logging
    @override
    @rank_zero_only
    def log_metrics(self, metrics: Mapping[str, Any], step: Optional[int] = None) -> None:
        scalars = {key: _scalar(key, value) for key, value in metrics.items()}
        if self._tensorboard_on:
            self._before_tb_write(step)
            self._tb.log_metrics(scalars, step)
        self._to_wandb(lambda w: w.log_metrics(scalars, step))

    @override
    @rank_zero_only
    def log_hyperparams(self, params: Union[dict[str, Any], Namespace], *args: Any, **kwargs: Any) -> None:
        if self._tensorboard_on:
            self._before_tb_write(None)
            self._tb.log_hyperparams(params, *args, **kwargs)
            if not self._tb_hp_metric and not (args or kwargs.get("metrics")):
                self._tb_hparams_table(params)
        self._to_wandb(lambda w: w.log_hyperparams(params))

    @rank_zero_only
    def log_histogram(
        self,
        key: str,
        values: Any,
        edges: Optional[Sequence[float]] = None,
        step: Optional[int] = None,
        bins: int = 64,
        stats: Optional[dict[str, float]] = None,
    ) -> None:
        """Log a histogram of raw ``values`` (binned here into ``bins``) or of ``counts`` with their ``edges``.

        Both backends get the same counts: TensorBoard through ``add_histogram_raw``, wandb through
        ``wandb.Histogram(np_histogram=(counts, edges))``. ``stats`` may carry exact
        ``min/max/num/sum/sum_squares`` when the counts were computed from a sample.
        """
        hist = values if isinstance(values, HistogramData) else make_histogram(values, edges, bins, key, stats)
        for logger in self._children(step):
            log_histogram_to(logger, key, hist, step)

    @rank_zero_only
    def log_image(
        self,
        key: str,
        images: Any,
        step: Optional[int] = None,
        caption: Optional[Union[str, Sequence[str]]] = None,
    ) -> None:
        """Log one image or a list of images (tensor or array, CHW/HWC/HW, any common dtype and range).

        Images are converted to uint8 once (:func:`lightning_monitor._media.to_uint8_hwc`) so both dashboards
        show the same picture; ``caption`` shows in wandb (TensorBoard has no captions).
        """
        batch = list(images) if isinstance(images, (list, tuple)) else [images]
        arrays = [to_uint8_hwc(image, key) for image in batch]
        captions = [caption] * len(arrays) if isinstance(caption, str) else caption
        if captions is not None and len(captions) != len(arrays):
            raise ValueError(f"image {key!r}: {len(arrays)} images but {len(captions)} captions")
        for logger in self._children(step):
            log_images_to(logger, key, arrays, step, captions)

    @rank_zero_only
    def log_text(self, key: str, text: str, step: Optional[int] = None) -> None:
        """Log a piece of text (TensorBoard's text tab, a one-cell table in wandb)."""
        for logger in self._children(step):
            log_text_to(logger, key, text, step)

    @override
    def log_graph(self, model: torch.nn.Module, input_array: Optional[torch.Tensor] = None) -> None:
        if self._tensorboard_on:
            self._tb.log_graph(model, input_array)

    # ------------------------------------------------------------------ lifecycle
    @override
    @rank_zero_only
    def save(self) -> None:
        if self._tensorboard_on and self._tb_resumed is not None:
            self._tb.save()

    @override
    @rank_zero_only
    def after_save_checkpoint(self, checkpoint_callback: ModelCheckpoint) -> None:
        self._to_wandb(lambda w: w.after_save_checkpoint(checkpoint_callback))

    @override
    @rank_zero_only
    def finalize(self, status: str) -> None:
        """Flush and close both backends; the wandb run is finished (marked failed unless ``status`` is success).

        One backend failing does not stop the other from being flushed. After a successful run the first error
        is raised; after a failed run it is only warned about, so it never masks the training exception.
        """
        errors: list[BaseException] = []
        if self._tensorboard_on and self._tb_resumed is not None:
            try:
                self._tb.finalize(status)
            except Exception as err:  # noqa: BLE001 - the other backend must still be flushed
                errors.append(err)
        if self._wandb is not None:
            wandb_logger, self._wandb = self._wandb, None  # a later fit/test makes a fresh one (same id)
            try:
                wandb_logger.finalize(status)
                if wandb_logger._experiment is not None:
                    wandb_logger._experiment.finish(exit_code=0 if status == "success" else 1)
            except Exception as err:  # noqa: BLE001
                errors.append(err)
        for err in errors:
            if status == "success" and err is errors[0]:
                raise err
            rank_zero_warn(f"MultiLogger.finalize({status!r}): {type(err).__name__}: {err}")

    # ------------------------------------------------------------------ internals
    def _children(self, step: Optional[int]) -> Iterator[Logger]:
        if self._tensorboard_on:
            self._before_tb_write(step)
            yield self._tb
        if self.wandb is not None:
            yield self.wandb

    def _tb_writer(self) -> Any:
        if self._tb_resumed is None:
            self._tb_resumed = bool(glob.glob(os.path.join(self.log_dir, "events.out.tfevents.*")))
            self._tb_purge_pending = self._tb_resumed
        return self._tb.experiment

    def _before_tb_write(self, step: Optional[int]) -> None:
        writer = self._tb_writer()
        if self._tb_purge_pending and step is not None:
            # Continuing an earlier run: TensorBoard drops that run's points at steps >= `step` (those the earlier
            # run logged after the checkpoint we resumed from), so the series stays one strictly increasing line.
            from tensorboard.compat.proto.event_pb2 import Event, SessionLog

            writer._get_file_writer().add_event(Event(step=step, session_log=SessionLog(status=SessionLog.START)))
            self._tb_purge_pending = False

    def _tb_hparams_table(self, params: Union[dict[str, Any], Namespace]) -> None:
        """TensorBoard's HParams tab without Lightning's placeholder ``hp_metric = -1`` scalar."""
        from lightning.fabric.utilities.logger import _convert_params, _flatten_dict
        from torch.utils.tensorboard.summary import hparams

        flat = self._tb._sanitize_params(_flatten_dict(_convert_params(params)))
        writer = self._tb_writer()._get_file_writer()
        for summary in hparams(flat, {}):
            writer.add_summary(summary)

    def _to_wandb(self, call: Any) -> None:
        if self.wandb is not None:
            call(self.wandb)

    def _make_wandb(self) -> Any:
        from lightning.pytorch.loggers import WandbLogger

        options = dict(self._wandb_options or {})
        mode, reason = _wandb_mode(options)
        version = self.version if isinstance(self.version, str) else f"version_{self.version}"
        kwargs: dict[str, Any] = {
            "name": f"{self.name}/{version}",
            "project": os.environ.get("WANDB_PROJECT", self.name),
            "id": self.run_id,
            "save_dir": self.log_dir,
            "mode": mode,
            "resume": "allow",
        }
        kwargs.update(options)
        logger = WandbLogger(**kwargs)
        if rank_zero_only.rank == 0:
            os.makedirs(self.log_dir, exist_ok=True)
            try:
                run = logger.experiment
            except Exception as err:  # noqa: BLE001 - wandb must never stop training
                self._wandb_failed = True
                rank_zero_warn(
                    f"wandb could not start ({type(err).__name__}: {err}); logging to TensorBoard only."
                    " Pass wandb={'mode': 'offline'} to keep a local wandb run."
                )
                return None
            if mode == "offline":
                run_dir = os.path.dirname(run.dir) if getattr(run, "dir", None) else self.log_dir
                rank_zero_info(f"wandb is logging offline ({reason}). Upload the run later with: wandb sync {run_dir}")
        return logger


# ---------------------------------------------------------------------- helpers
def _options(backend: str, value: Union[bool, dict, None]) -> Optional[dict[str, Any]]:
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"`{backend}` must be True, False or a dict of options, got {value!r}")


def _check_keys(backend: str, options: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"Unknown {backend} option(s) {unknown}. Valid options: {sorted(allowed)}")


def _signature_keys(*functions: Any) -> set[str]:
    keys: set[str] = set()
    for function in functions:
        for param in inspect.signature(function).parameters.values():
            if param.kind not in (param.VAR_KEYWORD, param.VAR_POSITIONAL) and param.name != "self":
                keys.add(param.name)
    return keys


def _tensorboard_keys() -> set[str]:
    from torch.utils.tensorboard import SummaryWriter

    return _signature_keys(TensorBoardLogger.__init__, SummaryWriter.__init__) - {
        "save_dir", "name", "version", "log_dir", "logdir", "comment"
    }


def _wandb_keys() -> set[str]:
    import wandb
    from lightning.pytorch.loggers import WandbLogger

    return _signature_keys(WandbLogger.__init__, wandb.init) - {"save_dir", "dir", "version", "experiment"}


def _check_writable(path: str) -> None:
    """Fail early, naming the directory, when ``path`` cannot be created or written (without creating it)."""
    probe = os.path.abspath(path)
    while not os.path.exists(probe):
        parent = os.path.dirname(probe)
        if parent == probe:
            break
        probe = parent
    if not os.path.isdir(probe):
        raise NotADirectoryError(f"MultiLogger cannot create save_dir {path!r}: {probe!r} is a file, not a directory")
    if not os.access(probe, os.W_OK | os.X_OK):
        raise PermissionError(f"MultiLogger cannot write to save_dir {path!r}: {probe!r} is not writable")


def _scalar(key: str, value: Any) -> Union[int, float]:
    """A metric as a plain number; bf16/fp16 tensors keep their true value; non-finite values pass through."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().float().item() if value.is_floating_point() else int(value.item())
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got an array of shape {value.shape}")
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_)):
        return int(value)
    if isinstance(value, (int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:120]


def _wandb_mode(options: dict[str, Any]) -> tuple[str, str]:
    """Decide online/offline without ever prompting; pops ``mode``/``offline`` from ``options``."""
    if "mode" in options:
        return options.pop("mode"), "asked for"
    if options.pop("offline", False):
        return "offline", "offline=True"
    env = os.environ.get("WANDB_MODE")
    if env:
        return ("offline" if env == "dryrun" else env), f"WANDB_MODE={env}"
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    host = urlparse(base_url).hostname or "api.wandb.ai"
    if not _has_api_key(host):
        return "offline", "no W&B API key: set WANDB_API_KEY or run `wandb login`"
    port = urlparse(base_url).port or (443 if base_url.startswith("https") else 80)
    try:
        socket.create_connection((host, port), timeout=_NETWORK_TIMEOUT_SEC).close()
    except OSError:
        return "offline", f"{host}:{port} is unreachable"
    return "online", ""


def _has_api_key(host: str) -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    path = os.environ.get("NETRC", os.path.expanduser("~/.netrc"))
    try:
        return netrc.netrc(path).authenticators(host) is not None
    except (OSError, netrc.NetrcParseError):
        return False
