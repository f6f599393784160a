"""Every private name of Lightning, torch and wandb that lightning-monitor relies on, in one place.

Each entry names the version it was checked against. When a dependency moves one of them, this is the only file to
change; nothing else in the package reaches for a private name of another package. Lazy imports stay lazy: wandb is
imported inside the functions that need it (``import lightning_monitor`` must not import wandb).

Checked against lightning 2.6.6, torch 2.14.1, wandb 0.31.0.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any, Optional

import torch

# ---------------------------------------------------------------------------------------------------- torch 2.14.1
#: ``torch._foreach_norm(tensors, ord, dtype=)``: one norm per tensor, one fused kernel on CUDA (no public equivalent
#: takes a list: ``torch.linalg.vector_norm`` is one tensor a call)
foreach_norm = torch._foreach_norm
#: ``torch._foreach_sub(a, b)``: elementwise ``a[i] - b[i]`` for two lists of tensors in one call
foreach_sub = torch._foreach_sub
#: ``torch._foreach_mul(a, b)``: elementwise ``a[i] * b[i]`` for two lists of tensors in one call
foreach_mul = torch._foreach_mul


#: the attribute under which ``torch.compile``'s ``OptimizedModule`` keeps the module it compiled (``_orig_mod``):
#: a segment of every parameter name below a compiled module, which names nothing of the user's model
COMPILED_MODULE_ATTRIBUTE = "_orig_mod"


def file_writer(summary_writer: Any) -> Any:
    """The ``FileWriter`` behind a ``torch.utils.tensorboard.SummaryWriter`` (``_get_file_writer()``, torch 2.14.1):
    one event holding many values (``add_summary``), a purge marker (``add_event``)."""
    return summary_writer._get_file_writer()


# ---------------------------------------------------------------------------------------------------- lightning 2.6.6
def add_prefix(values: Mapping[str, Any], prefix: str, join_char: str) -> dict[str, Any]:
    """``lightning.fabric.utilities.logger._add_prefix``: ``prefix + join_char + key`` for every key (a no-op
    without a prefix), as Lightning's loggers put a ``prefix`` in front of their keys."""
    from lightning.fabric.utilities.logger import _add_prefix

    return dict(_add_prefix(dict(values), prefix, join_char))


def logger_prefix(logger: Any) -> str:
    """The ``prefix`` a TensorBoardLogger or WandbLogger was made with (``_prefix``; no public accessor)."""
    return str(logger._prefix)


def flatten_dict(params: Mapping[str, Any]) -> dict[str, Any]:
    """``lightning.fabric.utilities.logger._flatten_dict``: nested hyperparameters as ``a/b`` keys."""
    from lightning.fabric.utilities.logger import _flatten_dict

    return dict(_flatten_dict(dict(params)))


def convert_params(params: Any) -> dict[str, Any]:
    """``lightning.fabric.utilities.logger._convert_params``: a Namespace or dict of hyperparameters as a dict."""
    from lightning.fabric.utilities.logger import _convert_params

    return dict(_convert_params(params))


def sanitize_params(tb: Any, params: Mapping[str, Any]) -> dict[str, Any]:
    """``TensorBoardLogger._sanitize_params``: values TensorBoard's HParams tab can hold (others as strings)."""
    return dict(tb._sanitize_params(dict(params)))


def experiment_if_made(tb: Any) -> Optional[Any]:
    """A TensorBoardLogger's ``SummaryWriter`` if it was made (``_experiment``), without making one."""
    return tb._experiment


def tensorboard_installed() -> bool:
    """Whether Lightning's TensorBoardLogger writes through ``tensorboard`` (else it falls back to tensorboardX):
    ``lightning.fabric.loggers.tensorboard._TENSORBOARD_AVAILABLE``."""
    from lightning.fabric.loggers import tensorboard as fabric_tensorboard

    return bool(fabric_tensorboard._TENSORBOARD_AVAILABLE)


def completed_batches(trainer: Any) -> int:
    """Training batches completed in this fit (``fit_loop.epoch_loop.batch_progress.total.completed``, the counter
    Lightning's ``self.log`` uses under manual optimization; the trainer has no public one)."""
    return int(trainer.fit_loop.epoch_loop.batch_progress.total.completed)


def optimizer_steps(trainer: Any) -> int:
    """``trainer.global_step`` under automatic optimization, read from its counter
    (``fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed``, what the property
    returns) without its five property calls (~5 us run cold at every batch); ``trainer.global_step`` itself on loops
    without that counter."""
    try:
        return trainer.fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total.completed
    except AttributeError:
        return trainer.global_step


# ---------------------------------------------------------------------------------------------------- wandb 0.31.0
def run_is_finished(run: Any) -> bool:
    """Whether a wandb run was finished (``Run._is_finished``)."""
    return bool(getattr(run, "_is_finished", False))


def wandb_session_key(base_url: str) -> Optional[str]:
    """The API key an earlier ``wandb.login(key=...)`` in this process left for ``base_url``: ``""`` when its
    credentials are of another kind, ``None`` when there are none (``wandb.sdk.lib.wbauth.session_credentials`` and
    ``AuthApiKey.api_key``, wandb >= 0.22); ``None`` on any other wandb."""
    try:
        from wandb.sdk.lib import wbauth

        auth = wbauth.session_credentials(host=base_url)
    except Exception:  # noqa: BLE001 - another wandb version: the key is not there
        return None
    return None if auth is None else str(getattr(auth, "api_key", "") or "")


def stop_wandb_analytics() -> None:
    """Stop wandb's own usage metrics for the rest of the process (``wandb.analytics.opentelemetry``: ``disable()``,
    and a proxy already made drops what it holds at exit: ``_singleton_telemetry_proxy._server_supports_proxy``)."""
    try:
        from wandb.analytics.opentelemetry import opentelemetry_proxy as analytics

        analytics.disable()
        proxy = analytics._singleton_telemetry_proxy
        if proxy is not None:
            proxy._server_supports_proxy = False
    except Exception:  # noqa: BLE001 - another wandb version: nothing of this to stop
        pass


def compiled_in_place(module: Any) -> bool:
    """Whether ``module`` was compiled in place: ``nn.Module.compile()`` sets ``_compiled_call_impl`` (torch 2.14.1),
    and Lightning's ``from_compiled`` (a ``torch.compile``-d LightningModule handed to the Trainer) sets
    ``_compiler_ctx`` (lightning 2.6.6). A forward hook below such a module changes what Dynamo guards on."""
    compiled_call = getattr(module, "_compiled_call_impl", None)
    return compiled_call is not None or getattr(module, "_compiler_ctx", None) is not None
