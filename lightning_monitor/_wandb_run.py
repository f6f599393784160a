"""Starting and finishing a wandb run so that it never blocks or kills training.

- The mode is decided without ever prompting: offline when there is no API key, the server is unreachable, or
  ``WANDB_MODE`` says so.
- ``wandb.init`` is bounded by ``init_timeout``; an online start that fails falls back to an offline run.
- ``finish`` is bounded too: an online run that cannot upload in time keeps its local copy for ``wandb sync``.
- Environment variables that wandb sets in our process (``WANDB_SERVICE`` …) are put back as they were.
"""

from __future__ import annotations

import contextlib
import inspect
import netrc
import os
import socket
import threading
import time
from typing import Any, Iterator, Optional
from urllib.parse import urlparse

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

#: seconds ``wandb.init`` may take before we give up on the online run (wandb's own default is 90).
INIT_TIMEOUT_SEC = 30
#: seconds ``run.finish()`` may take (uploading an online run) before training moves on.
FINISH_TIMEOUT_SEC = 60
NETWORK_TIMEOUT_SEC = 2.0
#: seconds between writes of the offline run file (wandb's default: 15), the same as TensorBoard's flush here.
TRANSACTION_LOG_FLUSH_SEC = 2.0
#: ``WandbLogger`` arguments that are not ``wandb.init`` arguments.
LOGGER_ONLY_KEYS = ("log_model", "prefix", "checkpoint_name", "add_file_policy")
_announced: set[str] = set()


def option_keys() -> set[str]:
    """Every option ``MultiLogger(wandb={...})`` accepts."""
    import wandb

    keys = {p for p in inspect.signature(wandb.init).parameters if p not in ("self", "kwargs")}
    return (keys | set(LOGGER_ONLY_KEYS) | {"offline"}) - {"dir"}


def decide_mode(options: dict[str, Any]) -> tuple[str, str]:
    """``(mode, reason)``; pops ``mode``/``offline`` from ``options``. Never prompts, waits at most 2 s."""
    if "mode" in options:
        return options.pop("mode"), "asked for"
    if options.pop("offline", False):
        return "offline", "offline=True"
    env = os.environ.get("WANDB_MODE")
    if env:
        return ("offline" if env == "dryrun" else env), f"WANDB_MODE={env}"
    base_url = os.environ.get("WANDB_BASE_URL", "https://api.wandb.ai")
    parsed = urlparse(base_url)
    host = parsed.hostname or "api.wandb.ai"
    if not _has_api_key(host):
        return "offline", "no W&B API key: set WANDB_API_KEY or run `wandb login`"
    port = parsed.port or (443 if parsed.scheme == "https" else 80)
    try:
        socket.create_connection((host, port), timeout=NETWORK_TIMEOUT_SEC).close()
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


@contextlib.contextmanager
def _environment_kept() -> Iterator[None]:
    before = dict(os.environ)
    try:
        yield
    finally:
        for key in set(os.environ) - set(before):
            del os.environ[key]
        for key, value in before.items():
            if os.environ.get(key) != value:
                os.environ[key] = value


def start(init: dict[str, Any], mode: str, reason: str, attempts: int = 2) -> Optional[Any]:
    """Start a run with ``wandb.init(**init)``; ``None`` (with one warning) when even an offline run fails."""
    import wandb

    settings = init.pop("settings", None)
    if settings is None or isinstance(settings, dict):
        settings = {
            "init_timeout": INIT_TIMEOUT_SEC,
            # wandb writes the run file every 15 s by default: what a killed job logged in its last 15 s was lost.
            "x_transaction_log_flush_interval": TRANSACTION_LOG_FLUSH_SEC,
            **(settings or {}),
        }
    for attempt in range(attempts):
        try:
            with _environment_kept():
                run = wandb.init(**init, mode=mode, settings=settings)
            break
        except Exception as err:  # noqa: BLE001 - wandb must never stop training
            if mode == "online" and not _service_lost(err):
                rank_zero_warn(f"wandb could not start online ({type(err).__name__}: {err}); logging offline instead.")
                # The failed online run keeps its id registered in wandb's service ("run ID is in use"): only a
                # fresh service lets the offline run keep the same id, i.e. stay the same run once synced.
                _teardown()
                return start(dict(init, settings=settings), "offline", "the online start failed", attempts=3)
            if attempt == attempts - 1:
                rank_zero_warn(f"wandb could not start ({type(err).__name__}: {err}); logging to TensorBoard only.")
                return None
            if _service_lost(err):  # wandb's service process died earlier in this process: start a new one
                _teardown()
            time.sleep(0.5)
    run.define_metric("trainer/global_step")
    run.define_metric("*", step_metric="trainer/global_step", step_sync=True)
    if mode == "offline" and run.id not in _announced:  # once per run, not again when test() resumes it
        _announced.add(run.id)
        run_dir = os.path.dirname(run.dir) if getattr(run, "dir", None) else init.get("dir")
        rank_zero_info(f"wandb is logging offline ({reason}). Upload the run later with: wandb sync {run_dir}")
    return run


def _teardown() -> None:
    """Drop wandb's service connection (the next ``wandb.init`` starts a new service); quiet if it is already dead."""
    import wandb

    try:
        wandb.teardown()
    except Exception:  # noqa: BLE001 - a dead service cannot be told to stop; the connection is dropped anyway
        pass


def _service_lost(err: BaseException) -> bool:
    """Whether ``err`` says wandb's service process is gone (killed, crashed) rather than anything about the run."""
    return isinstance(err, (ConnectionError, BrokenPipeError)) or "Mailbox" in type(err).__name__


def finish(run: Any, exit_code: int, timeout: float = FINISH_TIMEOUT_SEC) -> None:
    """``run.finish(exit_code)`` in a helper thread, waited for at most ``timeout`` seconds."""
    errors: list[BaseException] = []

    def target() -> None:
        try:
            with _environment_kept():
                run.finish(exit_code=exit_code)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)

    thread = threading.Thread(target=target, name="lightning-monitor-wandb-finish", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        rank_zero_warn(
            f"wandb did not finish within {timeout:.0f} s (uploading?); training moves on. The local copy is in"
            f" {os.path.dirname(run.dir)}: upload it with `wandb sync` if it does not arrive."
        )
    elif errors:
        raise errors[0]
