"""Starting and finishing a wandb run so that it never prompts, blocks or kills training.

- The mode is decided by us, never by a prompt: a mode that needs the W&B server (``online``, ``shared``), whether
  asked for (``mode=``, ``WANDB_MODE``) or chosen because nothing was asked for, is used only when an API key is
  configured and a W&B server answers a query wandb's own client makes (``serverInfo`` on ``/graphql``) within
  ``NETWORK_TIMEOUT_SEC`` as only a W&B server does; otherwise (no answer, any other web server, the key refused) the
  run is offline, with one message saying why. wandb itself only prompts for a key it cannot find, and we only let it
  go online with one it will find (the same places it looks: ``WANDB_API_KEY``, ``WANDB_IDENTITY_TOKEN_FILE``, the
  ``.netrc`` entry for the server, ``settings.api_key``, an earlier ``wandb.login(key=...)``).
- ``require_online=True`` (a ``MultiLogger(wandb={...})`` option) turns every fallback to offline into an error:
  :func:`check_options` raises before training when no key is configured or the server does not answer, and
  :func:`start` raises when the online start fails.
- A start is bounded by ``INIT_TIMEOUT_SEC``: the server probe takes at most 3 s, the online attempt at most
  ``ONLINE_INIT_TIMEOUT_SEC``, and the fallback (a fresh wandb service, the offline run) the rest. Measured on a busy
  2-core machine: a server that accepts connections and never answers, 3 s (probe 2 s + offline start); one that
  answers the probe but not the rest of its API, 24 s (online attempt 20.3 s + teardown 2.0 s + offline start
  1.6 s).
- An offline run sends nothing: wandb's own usage metrics are turned off for it (wandb sends them to the server and
  waits for it at interpreter exit: 11.5 s with a silent server). If an online attempt already started them, exit
  can still wait up to wandb's 10 s request timeout (measured 11.5 s).
- ``finish`` is bounded too: an online run that cannot upload in time keeps its local copy for ``wandb sync``; a
  service that died (crashed, killed) is let go, so that the process exits cleanly and a later start gets a new one.
- ``WANDB_*`` environment variables that wandb sets in our process (``WANDB_SERVICE`` …) are put back as they were,
  without touching a variable anyone else set meanwhile.
"""

from __future__ import annotations

import contextlib
import glob
import inspect
import os
import threading
import time
from collections.abc import Iterator, Mapping
from typing import Any, Optional

from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn

from lightning_monitor._core.compat import stop_wandb_analytics
from lightning_monitor._run import wandb_probe as _wandb_probe
from lightning_monitor._run.wandb_probe import NETWORK_TIMEOUT_SEC  # noqa: F401 - the start's limits, in one place

#: seconds a whole start may take, falling back to offline included (wandb's own ``init_timeout`` default is 90).
INIT_TIMEOUT_SEC = 30
#: seconds left to the online attempt: the rest of ``INIT_TIMEOUT_SEC`` is for dropping wandb's service and
#: starting the offline run (about 5-10 s measured on a busy 2-core machine).
ONLINE_INIT_TIMEOUT_SEC = 20
#: seconds ``run.finish()`` may take (uploading an online run) before training moves on.
FINISH_TIMEOUT_SEC = 60
#: seconds between writes of the offline run file (wandb's default: 15), the same as TensorBoard's flush here.
TRANSACTION_LOG_FLUSH_SEC = 2.0
#: ``WandbLogger`` arguments that are not ``wandb.init`` arguments.
LOGGER_ONLY_KEYS = ("log_model", "prefix", "checkpoint_name", "add_file_policy")
#: our own option: ``True`` makes every fallback to offline an error (default ``False``: offline, with a warning).
REQUIRE_ONLINE = "require_online"
#: modes that need an API key and a reachable server (``run`` is wandb's old name for ``online``).
SERVER_MODES = ("online", "shared", "run")
_ASKED_ONLINE = "asked for"  # how a reason starts when a mode the user asked for was replaced by offline
_announced: set[str] = set()


class WandbOnlineError(RuntimeError):
    """``require_online=True`` and the run cannot be online (no API key, server unreachable, start failed)."""


def option_keys() -> set[str]:
    """Every option ``MultiLogger(wandb={...})`` accepts."""
    import wandb

    keys = {p for p in inspect.signature(wandb.init).parameters if p not in ("self", "kwargs")}
    return (keys | set(LOGGER_ONLY_KEYS) | {"offline", REQUIRE_ONLINE}) - {"dir"}


def check_options(options: Mapping[str, Any]) -> None:
    """Check the wandb options when the logger is made, on every rank, before any training step.

    Only ``require_online=True`` costs anything (one HTTP request of at most ``NETWORK_TIMEOUT_SEC``).

    Raises:
        ValueError: ``require_online`` is not a bool, or it asks for online while the mode asked for is not.
        WandbOnlineError: ``require_online=True`` and no API key is configured or the server does not answer.
    """
    require = options.get(REQUIRE_ONLINE, False)
    if not isinstance(require, bool):
        raise ValueError(f"wandb option `{REQUIRE_ONLINE}` must be True or False, got {require!r}")
    if require:
        decide_mode(dict(options))  # raises WandbOnlineError with the reason


def decide_mode(options: dict[str, Any]) -> tuple[str, str]:
    """``(mode, reason)`` for ``wandb.init``; never prompts, waits at most about ``NETWORK_TIMEOUT_SEC``.

    Pops ``mode`` and ``offline`` from ``options`` (``require_online`` stays: :func:`start` reads it).

    Raises:
        ValueError: ``require_online=True`` with an offline or disabled mode asked for.
        WandbOnlineError: ``require_online=True`` and the run cannot be online.
    """
    require = bool(options.get(REQUIRE_ONLINE, False))
    asked: Optional[str] = None
    if "mode" in options:
        mode, asked = options.pop("mode"), "mode={!r}"
    elif options.pop("offline", False):
        mode, asked = "offline", "offline=True"
    elif os.environ.get("WANDB_MODE"):
        mode, asked = os.environ["WANDB_MODE"], "WANDB_MODE={}"
    else:
        mode = "online"
    options.pop("offline", None)
    mode = {"dryrun": "offline", "run": "online"}.get(mode, mode)
    asked = asked.format(mode) if asked else None
    if mode not in SERVER_MODES:
        if require:
            raise ValueError(f"wandb option `{REQUIRE_ONLINE}=True` contradicts {asked}: drop one of them")
        return mode, asked or ""
    problem = _wandb_probe.server_problem(options.get("settings"))
    if problem is None:
        return mode, ""
    if require:
        raise WandbOnlineError(
            f"wandb cannot log online ({problem}) and `{REQUIRE_ONLINE}=True` forbids logging offline instead."
            f" Fix the cause, or drop `{REQUIRE_ONLINE}` to log offline and upload later with `wandb sync`."
        )
    return "offline", f"{_ASKED_ONLINE} {asked}, but {problem}" if asked else problem


def _wandb_environment() -> dict[str, str]:
    return {key: value for key, value in os.environ.items() if key.startswith("WANDB_")}


class _EnvironmentKept:
    """Undo the ``WANDB_*`` environment changes a wandb call makes in our process, and nothing else.

    Changes are those between entering and leaving the call, or between entering and :meth:`moved_on` when the
    caller stopped waiting for the call (a timed-out ``finish``): from then on the caller's thread runs on and may
    set variables itself, so later changes are not taken for wandb's. A variable is put back only while it still
    holds the value wandb left in it.
    """

    def __init__(self) -> None:
        self._before = _wandb_environment()
        self._seen: Optional[dict[str, str]] = None  # the environment when the caller moved on
        self._lock = threading.Lock()
        self._done = False

    def moved_on(self) -> None:
        """The caller stops waiting for the call: only the changes made until now will be undone."""
        with self._lock:
            if not self._done:
                self._seen = _wandb_environment()

    def restore(self) -> None:
        with self._lock:
            if self._done:
                return
            self._done = True
            now = _wandb_environment()
            left = self._seen if self._seen is not None else now
            for key in set(self._before) | set(left):
                if self._before.get(key) == left.get(key) or now.get(key) != left.get(key):
                    continue  # not changed by the call, or changed again since by someone else
                if key in self._before:
                    os.environ[key] = self._before[key]
                else:
                    os.environ.pop(key, None)


@contextlib.contextmanager
def _environment_kept() -> Iterator[_EnvironmentKept]:
    kept = _EnvironmentKept()
    try:
        yield kept
    finally:
        kept.restore()


def start(init: dict[str, Any], mode: str, reason: str, attempts: int = 2) -> Optional[Any]:
    """Start a run with ``wandb.init(**init)``; ``None`` (with one warning) when even an offline run fails.

    ``init`` may hold ``require_online`` (see :func:`decide_mode`); it is not passed to wandb.

    Raises:
        WandbOnlineError: ``require_online=True`` and the online start failed.
    """
    import wandb

    require = bool(init.pop(REQUIRE_ONLINE, False))
    settings = init.pop("settings", None)
    silenced = False  # we turned wandb's own terminal lines off: our one line says where the run is
    if settings is None or isinstance(settings, dict):
        silenced = not {"silent", "quiet"} & set(settings or {}) and not {"WANDB_SILENT", "WANDB_QUIET"} & set(
            os.environ)
        settings = {
            "init_timeout": ONLINE_INIT_TIMEOUT_SEC if mode in SERVER_MODES else INIT_TIMEOUT_SEC,
            # wandb writes the run file every 15 s by default: what a killed job logged in its last 15 s was lost.
            "x_transaction_log_flush_interval": TRANSACTION_LOG_FLUSH_SEC,
            # wandb's banners, its "Run history / Run summary" blocks and its per-folder `wandb sync` footer (54 of
            # the smoke run's 108 terminal lines): our one line per run below says what matters. A user who sets
            # `silent` or `quiet` (settings, WANDB_SILENT, WANDB_QUIET) keeps their choice.
            **({"silent": True} if silenced else {}),
            **(settings or {}),
        }
    if mode == "offline":
        _check_resume(init)
        _stop_wandb_analytics()
    run: Any = None
    for attempt in range(attempts):
        try:
            with _environment_kept():
                run = wandb.init(**{**init, "mode": mode, "settings": settings})
            break
        except Exception as err:  # noqa: BLE001 - wandb must never stop training
            if mode in SERVER_MODES and not _service_lost(err):
                if require:
                    raise WandbOnlineError(
                        f"wandb could not start online ({type(err).__name__}: {err}) and `{REQUIRE_ONLINE}=True`"
                        " forbids logging offline instead"
                    ) from err
                rank_zero_warn(f"wandb could not start online ({type(err).__name__}: {err}); logging offline instead.")
                # The failed online run keeps its id registered in wandb's service ("run ID is in use"): only a
                # fresh service lets the offline run keep the same id, i.e. stay the same run once synced.
                _stop_wandb_analytics()
                _teardown()
                if isinstance(settings, dict):
                    settings = {**settings, "init_timeout": INIT_TIMEOUT_SEC}
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
        # every segment of this run (a later test or restart adds one), synced in the order they were written;
        # wandb adds -1, -2, ... to a folder name already taken in the same second
        segments = os.path.join(os.path.dirname(str(run_dir)), f"offline-run-*-{run.id}*")
        message = f"wandb is logging offline ({reason}). Upload the run later with: wandb sync {segments}"
        if reason.startswith(_ASKED_ONLINE):  # the user asked for online: a warning, not an info line
            rank_zero_warn(message)
        else:
            rank_zero_info(message)
    elif silenced and mode in SERVER_MODES and run.id not in _announced:  # wandb's own link is silenced: ours
        _announced.add(run.id)
        url = getattr(run, "url", None)
        if url:
            rank_zero_info(f"wandb is logging online: {url}")
    return run


def _check_resume(init: dict[str, Any]) -> None:
    """Offline, wandb accepts ``resume="must"`` for a run it has never seen; say so (it starts a new run)."""
    run_id = init.get("id")
    if init.get("resume") != "must" or not run_id:
        return
    wandb_dir = os.path.join(init.get("dir") or os.environ.get("WANDB_DIR") or os.getcwd(), "wandb")
    if not glob.glob(os.path.join(glob.escape(wandb_dir), f"*run-*-{glob.escape(str(run_id))}")):
        rank_zero_warn(
            f'wandb `resume="must"` asks to continue run {run_id!r}, but this run is offline and {wandb_dir} holds'
            " no earlier part of it: wandb starts it as a new run (online, it would have refused)."
        )


def _stop_wandb_analytics() -> None:
    """Stop wandb sending its own usage metrics (to ``base_url``), for the rest of the process.

    wandb (0.31) exports them from a background thread and flushes them at interpreter exit, waiting up to 10 s per
    request: with a silent server every job exit stalled 10-20 s, even for an offline run. Called for offline runs
    and when the server did not answer.
    """
    stop_wandb_analytics()


def _teardown() -> None:
    """Drop wandb's service connection (the next ``wandb.init`` starts a new service); quiet if it is already dead."""
    import wandb

    try:
        wandb.teardown()
    except (Exception, SystemExit):  # noqa: BLE001 - a dead service cannot be told to stop; the connection is
        pass  # dropped anyway (wandb exits with the exit code of a service that ended badly: not the user's exit)


def _service_lost(err: BaseException) -> bool:
    """Whether ``err`` says wandb's service process is gone (killed, crashed) rather than anything about the run:
    a lost connection, or a request the connection dropped (``HandleAbandonedError``, ``MailboxError`` before)."""
    name = type(err).__name__
    return isinstance(err, (ConnectionError, BrokenPipeError)) or "Mailbox" in name or "Abandoned" in name


def finish(run: Any, exit_code: int, timeout: float = FINISH_TIMEOUT_SEC) -> None:
    """``run.finish(exit_code)`` in a helper thread, waited for at most ``timeout`` seconds.

    Raises:
        Exception: what ``run.finish`` raised. When it says wandb's service is gone, the connection to it is dropped
            first (the next start makes a new service, and the exit runs no teardown of a dead one).
    """
    errors: list[BaseException] = []
    kept = _EnvironmentKept()

    def target() -> None:
        try:
            run.finish(exit_code=exit_code)
        except BaseException as err:  # noqa: BLE001 - re-raised in the caller's thread
            errors.append(err)
        finally:
            kept.restore()

    thread = threading.Thread(target=target, name="lightning-monitor-wandb-finish", daemon=True)
    thread.start()
    thread.join(timeout)
    if thread.is_alive():
        kept.moved_on()  # from here on, the training thread may set variables of its own
        rank_zero_warn(
            f"wandb did not finish within {timeout:.0f} s (uploading?); training moves on. The local copy is in"
            f" {os.path.dirname(run.dir)}: upload it with `wandb sync` if it does not arrive."
        )
    elif errors:
        if _service_lost(errors[0]):
            _teardown()
        raise errors[0]


def local_copy(run: Any) -> Optional[str]:
    """The folder of ``run``'s local files (``.../wandb/offline-run-...`` or ``run-...``: what ``wandb sync`` takes),
    or ``None`` when it has none."""
    files = getattr(run, "dir", None)
    folder = os.path.dirname(str(files)) if files else None
    return folder if folder and os.path.isdir(folder) else None


def is_online(run: Any) -> bool:
    """Whether a wandb run sends to a server (its settings' mode; ``Run.offline`` is not in every wandb)."""
    return str(getattr(run.settings, "mode", "offline")) not in ("offline", "dryrun", "disabled")
