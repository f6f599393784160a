"""The terminal of the smoke run as a new user sees it: our lines and Lightning's, none of wandb's own, one upload
command for every segment, the summary table after the test table, our warnings without an internal path."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _env() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}  # as a user's shell: not silenced
    env["NETRC"] = os.devnull
    env["PYTHONUNBUFFERED"] = "1"  # stdout and stderr in the order written
    return env


@pytest.mark.slow
@pytest.mark.timeout(240)
def test_smoke_run_terminal(tmp_path):
    proc = subprocess.run(
        [sys.executable, "examples/mnist/main.py", "fit", "--config", "configs/smoke.yaml",
         "--trainer.logger.init_args.save_dir", str(tmp_path / "runs"), "--trainer.default_root_dir", str(tmp_path)],
        cwd=REPO, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, timeout=230)
    out = proc.stdout
    assert proc.returncode == 0, out[-3000:]
    lines = out.splitlines()
    assert not [line for line in lines if line.startswith("wandb:")], out  # no banner, history, footer
    uploads = [line for line in lines if "wandb sync" in line]
    assert len(uploads) == 1, uploads  # fit and test are two segments: one line names both (a glob)
    assert re.search(r"wandb sync \S+/offline-run-\*-\S+\*$", uploads[0]), uploads[0]
    assert out.count("Run summary (success)") == 1
    assert out.index("Test metric") < out.index("Run summary (success)")  # the summary comes after the test table
    testing = [i for i, line in enumerate(lines) if line.startswith("Testing")]  # rich's last progress frame
    assert testing and max(testing) < lines.index("Run summary (success)"), lines[-20:]  # ... and the test bar
    assert "written to " in out[out.index("Run summary (success)"):]
    assert "lightning_monitor/" not in out and "lightning_monitor\\" not in out  # no internal path prefix


WARN_SCRIPT = """
import warnings
import lightning_monitor
from lightning_monitor._core.warn import WarnOnce
WarnOnce()("tag", "something to know")
warnings.warn("a user's own warning")
"""


def test_our_warnings_read_lightning_monitor_and_others_keep_their_format(tmp_path):
    proc = subprocess.run([sys.executable, "-W", "always", "-c", WARN_SCRIPT], cwd=tmp_path, env=_env(),
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert "lightning-monitor: something to know\n" in proc.stderr
    assert "warn.py" not in proc.stderr
    assert "<string>:6: UserWarning: a user's own warning" in proc.stderr  # Python's own format, untouched


def test_the_format_is_installed_once():
    import warnings

    import lightning_monitor  # noqa: F401 - installs it
    from lightning_monitor._core import warn as _warn

    installed = warnings.formatwarning
    _warn.install_warning_format()
    assert warnings.formatwarning is installed
    ours = os.path.join(_warn.PACKAGE_DIR, "_run", "writers.py")
    assert warnings.formatwarning("m", RuntimeWarning, ours, 3) == "lightning-monitor: RuntimeWarning: m\n"
    assert not _warn.is_ours(os.path.join(os.path.dirname(_warn.PACKAGE_DIR), "lightning_monitor_x", "a.py"))
