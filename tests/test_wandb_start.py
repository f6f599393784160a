"""Starting and finishing wandb: never a prompt, an honest fallback to offline, bounded waits (``_wandb_run``).

The prompt tests run a real job in a pseudo-terminal (stdin, stdout and stderr a tty, as in an interactive shell),
with no W&B credentials anywhere (``WANDB_API_KEY`` unset, an empty ``NETRC`` file, an empty ``HOME``): that is
exactly where ``wandb.init(mode="online")`` asks "Enter your choice:" and waits forever.
"""

from __future__ import annotations

import os
import pty
import select
import subprocess
import sys
import textwrap
import threading
import time
from typing import Any

import pytest
from helpers import json_server
from wandb_reader import find_runs

from lightning_monitor._run import wandb_probe as _wandb_probe
from lightning_monitor._run import wandb_start as _wandb_run

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPT = "Enter your choice"
BOUND_SEC = 60  # a job here takes ~10 s (imports included) on a busy 2-core machine

JOB = textwrap.dedent(
    """
    import sys
    from lightning_monitor import MultiLogger

    logger = MultiLogger(save_dir=sys.argv[1], wandb=eval(sys.argv[2]))
    print("LOGGER MADE", flush=True)
    for step in range(3):
        logger.log_metrics({"train/loss": 1.0 / (step + 1)}, step=step)
    logger.finalize("success")
    print("JOB DONE", flush=True)
    """
)

# wandb on its own, as the control: in this terminal, with this environment, it really prompts
WANDB_ALONE = textwrap.dedent(
    """
    import sys, wandb
    wandb.init(mode="online", dir=sys.argv[1], project="p")
    print("JOB DONE", flush=True)
    """
)


def no_credentials_env(tmp_path, **extra: str) -> dict[str, str]:
    home = tmp_path / "home"
    home.mkdir(exist_ok=True)
    (home / "netrc").write_text("")
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), NETRC=str(home / "netrc"), PYTHONPATH=REPO, TERM="xterm", **extra)
    env.pop("XDG_CONFIG_HOME", None)
    return env


def run_in_terminal(script: str, args: list[str], env: dict[str, str], timeout: float = BOUND_SEC) -> tuple[int, str]:
    """Run ``python -c script args`` with a pseudo-terminal as stdin/stdout/stderr; ``(returncode, output)``.

    The job is killed after ``timeout`` seconds (returncode -9). Nothing is ever typed into the terminal.
    """
    controller, terminal = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-c", script, *args], stdin=terminal, stdout=terminal, stderr=terminal, env=env,
        cwd=args[0], start_new_session=True,
    )
    os.close(terminal)
    chunks: list[bytes] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            ready, _, _ = select.select([controller], [], [], 0.2)
            if ready:
                try:
                    data = os.read(controller, 65536)
                except OSError:  # the job closed the terminal (it exited)
                    data = b""
                if not data and proc.poll() is not None:
                    break
                chunks.append(data)
            elif proc.poll() is not None:
                break
        else:
            proc.kill()
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
        os.close(controller)
    return proc.returncode, b"".join(chunks).decode(errors="replace")


def test_control_wandb_alone_prompts_in_this_terminal(tmp_path):
    """Without lightning-monitor the same terminal and environment show wandb's prompt: the tests below are real."""
    code, output = run_in_terminal(WANDB_ALONE, [str(tmp_path)], no_credentials_env(tmp_path), timeout=40)
    assert PROMPT in output, output[-2000:]
    assert code != 0 and "JOB DONE" not in output  # it sat there until killed


@pytest.mark.parametrize(
    ("options", "extra_env"),
    [({"mode": "online"}, {}), ({}, {"WANDB_MODE": "online"})],
    ids=["mode-option", "WANDB_MODE-env"],
)
def test_online_asked_for_without_key_never_prompts_and_logs_offline(tmp_path, options, extra_env):
    started = time.monotonic()
    code, output = run_in_terminal(JOB, [str(tmp_path), repr(options)], no_credentials_env(tmp_path, **extra_env))
    took = time.monotonic() - started

    assert PROMPT not in output
    assert code == 0 and "JOB DONE" in output, output[-3000:]
    assert took < BOUND_SEC
    # one clear message: why it is offline, and how to upload later
    assert output.count("wandb is logging offline") == 1, output[-3000:]
    assert "no W&B API key" in output and "wandb sync" in output
    [run] = find_runs(tmp_path)
    assert run.series("train/loss") == [(0, 1.0), (1, 0.5), (2, 1.0 / 3)]
    assert run.exit_code == 0


def test_online_required_without_key_is_an_error_before_training(tmp_path):
    options = {"mode": "online", "require_online": True}
    code, output = run_in_terminal(JOB, [str(tmp_path), repr(options)], no_credentials_env(tmp_path))

    assert PROMPT not in output
    assert code == 1 and "JOB DONE" not in output, output[-3000:]
    assert "WandbOnlineError" in output and "no W&B API key" in output and "require_online" in output
    assert not list(tmp_path.rglob("*.wandb")), "no run was started"
    assert "LOGGER MADE" not in output  # raised by MultiLogger(...) itself, on every rank, before any step


# ---------------------------------------------------------------------- decide_mode / check_options (no network)
def test_decide_mode_without_key(monkeypatch):
    assert _wandb_run.decide_mode({"mode": "offline"}) == ("offline", "mode='offline'")
    mode, reason = _wandb_run.decide_mode({"mode": "online"})
    assert mode == "offline" and reason.startswith("asked for mode='online'") and "no W&B API key" in reason
    monkeypatch.setenv("WANDB_MODE", "online")
    mode, reason = _wandb_run.decide_mode({})
    assert mode == "offline" and "WANDB_MODE=online" in reason
    monkeypatch.setenv("WANDB_MODE", "dryrun")
    assert _wandb_run.decide_mode({})[0] == "offline"


def test_decide_mode_unreachable_server(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")  # nothing listens there: refused at once
    started = time.monotonic()
    mode, reason = _wandb_run.decide_mode({"mode": "online"})
    assert mode == "offline" and "http://127.0.0.1:9 did not answer" in reason
    assert time.monotonic() - started < 2 * _wandb_run.NETWORK_TIMEOUT_SEC
    with pytest.raises(_wandb_run.WandbOnlineError, match=r"127\.0\.0\.1:9 did not answer.*require_online"):
        _wandb_run.check_options({"require_online": True})


W_AND_B_ANSWER = {"data": {"serverInfo": {"__typename": "ServerInfo"}}}


@pytest.mark.parametrize(
    ("status", "answer", "online", "reason"),
    [
        (200, W_AND_B_ANSWER, True, None),
        (200, {}, False, "answers, but not as a W&B server (POST /graphql: HTTP 200, no serverInfo in the answer)"),
        (200, {"data": {"serverInfo": None}, "errors": [{"message": "no"}]}, False, "no serverInfo in the answer: no"),
        (404, {"detail": "Not Found"}, False, "not as a W&B server (POST /graphql: HTTP 404"),
        (401, {"errors": [{"message": "denied"}]}, False, "refused the API key (HTTP 401: denied)"),
    ],
    ids=["wandb", "empty-json", "graphql-errors", "not-found", "key-refused"],
)
def test_the_probe_tells_a_wandb_server_from_any_web_server(monkeypatch, status, answer, online, reason):
    """A real HTTP server answering every request alike: only the answer a W&B server gives to ``serverInfo``
    lets the run be online; anything else is offline with the reason."""
    with json_server(status, answer) as (url, seen):
        monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
        monkeypatch.setenv("WANDB_BASE_URL", url)
        mode, why = _wandb_run.decide_mode({})
    assert seen == [("POST", "/graphql")]
    if online:
        assert (mode, why) == ("online", "")
    else:
        assert mode == "offline" and url in why and reason in why


def test_the_probe_answer_without_a_key_of_ours():
    """With an identity token (no key we can send), a GraphQL refusal is left to wandb's own authentication; an
    answer that is not GraphQL is not a W&B server's."""
    refusal = b'{"errors": [{"message": "anonymous user cannot check version info"}]}'
    assert _wandb_probe._judge("http://h", 403, refusal, key_sent=False) is None
    assert "refused the API key (HTTP 403: anonymous" in _wandb_probe._judge("http://h", 403, refusal, key_sent=True)
    assert "not as a W&B server (POST /graphql: HTTP 401, not JSON)" in _wandb_probe._judge(
        "http://h", 401, b"<html>login</html>", key_sent=False)


def test_decide_mode_finds_the_key_where_wandb_does(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_BASE_URL", "http://127.0.0.1:9")
    (tmp_path / "netrc").write_text("machine 127.0.0.1:9\n  login user\n  password " + "k" * 40 + "\n")
    monkeypatch.setenv("NETRC", str(tmp_path / "netrc"))
    assert "did not answer" in _wandb_run.decide_mode({"mode": "online"})[1]  # key found: the server was tried
    assert _wandb_probe._has_credentials("http://127.0.0.1:9", {"api_key": None})
    assert not _wandb_probe._has_credentials("http://127.0.0.1:10", None)  # wandb's netrc entry is host:port


def test_check_options():
    _wandb_run.check_options({"mode": "online"})  # no key: fine, it will be offline (no network, no error)
    with pytest.raises(ValueError, match="must be True or False, got 'yes'"):
        _wandb_run.check_options({"require_online": "yes"})
    with pytest.raises(ValueError, match="contradicts mode='offline'"):
        _wandb_run.check_options({"mode": "offline", "require_online": True})
    with pytest.raises(_wandb_run.WandbOnlineError, match="no W&B API key"):
        _wandb_run.check_options({"require_online": True})
    assert "require_online" in _wandb_run.option_keys()


# ---------------------------------------------------------------------- environment kept
class FakeRun:
    """A run whose ``finish`` sets ``WANDB_SERVICE`` and then waits for ``release`` (an upload that takes long)."""

    dir = "/nowhere/files"

    def __init__(self) -> None:
        self.release = threading.Event()
        self.finished = threading.Event()

    def finish(self, exit_code: int) -> None:
        os.environ["WANDB_SERVICE"] = "set-by-wandb"
        os.environ["WANDB_X_NEW"] = "new-by-wandb"
        self.release.wait(30)
        os.environ["WANDB_LATE"] = "set-by-wandb-after-the-timeout"
        self.finished.set()


def test_timed_out_finish_restores_only_what_wandb_changed(monkeypatch):
    monkeypatch.setenv("WANDB_SERVICE", "ours")
    monkeypatch.delenv("WANDB_X_NEW", raising=False)
    monkeypatch.delenv("WANDB_LATE", raising=False)
    monkeypatch.delenv("WANDB_PROJECT", raising=False)
    run = FakeRun()
    with pytest.warns(UserWarning, match="did not finish within 0 s"):
        _wandb_run.finish(run, 0, timeout=0.2)
    # the training thread moves on and sets variables of its own while wandb is still finishing
    os.environ["WANDB_PROJECT"] = "set-by-training"
    os.environ["WANDB_X_NEW"] = "changed-by-training"
    os.environ["UNRELATED"] = "kept"
    run.release.set()
    assert run.finished.wait(10)
    [thread] = [t for t in threading.enumerate() if t.name == "lightning-monitor-wandb-finish"] or [None]
    if thread is not None:
        thread.join(10)
    assert os.environ["WANDB_SERVICE"] == "ours"  # wandb's change, undone
    assert os.environ["WANDB_PROJECT"] == "set-by-training"  # set by others: never touched
    assert os.environ["WANDB_X_NEW"] == "changed-by-training"  # wandb's, but changed again since: kept
    assert os.environ["UNRELATED"] == "kept"
    # made after we stopped waiting: it cannot be told from a change of the training thread, so it stays
    assert os.environ.pop("WANDB_LATE") == "set-by-wandb-after-the-timeout"
    del os.environ["UNRELATED"], os.environ["WANDB_X_NEW"]


def test_finish_in_time_restores_wandb_changes(monkeypatch):
    monkeypatch.setenv("WANDB_SERVICE", "ours")
    monkeypatch.delenv("WANDB_X_NEW", raising=False)
    run = FakeRun()
    run.release.set()
    _wandb_run.finish(run, 0, timeout=10)
    assert os.environ["WANDB_SERVICE"] == "ours" and "WANDB_X_NEW" not in os.environ
    os.environ.pop("WANDB_LATE", None)


# ---------------------------------------------------------------------- resume="must" offline
def test_resume_must_with_unknown_id_offline_warns(tmp_path):
    # reinit as MultiLogger passes it: a run another test left open does not get in the way
    init = {"dir": str(tmp_path), "id": "never-seen", "resume": "must", "project": "p", "reinit": "create_new"}
    with pytest.warns(UserWarning, match=r"resume=\"must\"` asks to continue run 'never-seen'.*holds no earlier"):
        run = _wandb_run.start(dict(init), "offline", "test")
    assert run is not None and run.id == "never-seen"
    _wandb_run.finish(run, 0)
    # the second job resuming it finds the first segment: no warning
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        _wandb_run._check_resume(init)


class _FakeRun:
    id, dir, step, url = "fake-id", "/tmp/fake/wandb/run/files", 0, "https://wandb.example/p/runs/fake-id"

    def define_metric(self, *args: Any, **kwargs: Any) -> None:
        pass


def _started_settings(monkeypatch: Any, settings: Any, mode: str = "offline") -> Any:
    """The settings ``wandb_start.start`` hands to ``wandb.init`` (faked: nothing starts)."""
    import wandb

    seen: dict[str, Any] = {}

    def init(**kwargs: Any) -> _FakeRun:
        seen.update(kwargs)
        return _FakeRun()

    monkeypatch.setattr(wandb, "init", init)
    init_args = {"id": "fake-id", "dir": "/tmp/fake"} | ({"settings": settings} if settings is not None else {})
    _wandb_run.start(init_args, mode, "")
    return seen["settings"]


def test_wandb_is_silent_unless_the_user_says_otherwise(monkeypatch):
    """wandb's banners, history blocks and sync footer are ours to replace (one line); a user's own choice stays."""
    import wandb

    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.delenv("WANDB_QUIET", raising=False)
    assert _started_settings(monkeypatch, None)["silent"] is True
    assert _started_settings(monkeypatch, {"silent": False})["silent"] is False
    assert "silent" not in _started_settings(monkeypatch, {"quiet": True})
    own = wandb.Settings(silent=False)
    assert _started_settings(monkeypatch, own) is own
    monkeypatch.setenv("WANDB_SILENT", "false")
    assert "silent" not in _started_settings(monkeypatch, None)


def test_a_silenced_online_run_says_its_url_once(monkeypatch, caplog):
    monkeypatch.delenv("WANDB_SILENT", raising=False)
    monkeypatch.delenv("WANDB_QUIET", raising=False)
    with caplog.at_level("INFO"):
        _started_settings(monkeypatch, None, mode="online")
        _started_settings(monkeypatch, None, mode="online")  # test() resuming the run: no second line
    lines = [r.getMessage() for r in caplog.records if "wandb is logging online" in r.getMessage()]
    assert lines == [f"wandb is logging online: {_FakeRun.url}"]
