"""Eager checks of MultiLogger's arguments and of the values it is asked to log."""

from __future__ import annotations

import inspect
import os
import re
from collections.abc import Mapping
from typing import Any, Optional, Union

import numpy as np
import torch
from lightning.pytorch.loggers import TensorBoardLogger


def options(backend: str, value: Union[bool, dict, None]) -> Optional[dict[str, Any]]:
    if value is False or value is None:
        return None
    if value is True:
        return {}
    if isinstance(value, Mapping):
        return dict(value)
    raise ValueError(f"`{backend}` must be True, False or a dict of options, got {value!r}")


def check_keys(backend: str, options: Mapping[str, Any], allowed: set[str]) -> None:
    unknown = sorted(set(options) - allowed)
    if unknown:
        raise ValueError(f"Unknown {backend} option(s) {unknown}. Valid options: {sorted(allowed)}")


def tensorboard_keys() -> set[str]:
    from torch.utils.tensorboard import SummaryWriter

    keys: set[str] = set()
    for function in (TensorBoardLogger.__init__, SummaryWriter.__init__):
        keys |= {p for p in inspect.signature(function).parameters if p not in ("self", "kwargs")}
    return keys - {"save_dir", "name", "version", "log_dir", "logdir", "comment"}


def check_writable(path: str) -> None:
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


def scalar(key: str, value: Any) -> Union[int, float]:
    """A metric as a plain number; bf16/fp16 tensors keep their true value; non-finite values pass through."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got a tensor of shape {tuple(value.shape)}")
        return value.detach().float().item() if value.is_floating_point() else int(value.item())
    if isinstance(value, np.ndarray):
        if value.size != 1:
            raise ValueError(f"metric {key!r} must be a scalar, got an array of shape {value.shape}")
        value = value.reshape(()).item()
    if isinstance(value, (bool, np.bool_, int, np.integer)):
        return int(value)
    if isinstance(value, (float, np.floating)):
        return float(value)
    raise ValueError(f"metric {key!r} must be a number, got {type(value).__name__}: {value!r}")


def public_params(params: Any) -> Any:
    """``params`` without ``_``-prefixed keys (LightningCLI's ``_instantiator``, ``_class_path``), at any depth."""
    if isinstance(params, Mapping):
        return {k: public_params(v) for k, v in params.items() if not str(k).startswith("_")}
    return params


def is_eval_metric(key: str) -> bool:
    """A validation or test metric (``val/loss``, ``val_acc``, ``test-f1``, ``valid/x``): an HParams column."""
    head = re.split(r"[/_\-.]", key, maxsplit=1)[0].lower()
    return head in ("val", "valid", "validation", "test")


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9_-]+", "-", text).strip("-")[:120]
