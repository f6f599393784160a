"""When RunSummary prints its table: last, after whatever follows the fit (a later stage's results, the next fit,
the program's exit), at once where there is no reliable exit (interactive, a spawned worker) or the fit failed."""

from __future__ import annotations

import os
import subprocess
import sys
from typing import Any

import pytest
from helpers import TinyImageModel, image_loader, make_trainer
from lightning.pytorch.loggers import CSVLogger

from lightning_monitor import RunSummary, SpeedMonitor, run_summary
from lightning_monitor._summary import numbers as _summary

FIT_ONLY = """
import sys
sys.path.insert(0, {tests!r})
from helpers import TinyImageModel, image_loader, make_trainer
from lightning.pytorch.loggers import CSVLogger
from lightning_monitor import RunSummary

def main():  # the trainer is a local: gone before exit, the table is not
    trainer = make_trainer(".", logger=CSVLogger("csv"), callbacks=[RunSummary(use_rich=False)], max_steps=2)
    trainer.fit(TinyImageModel(), image_loader(32))
    print("AFTER FIT", flush=True)

main()
"""


def test_a_fit_with_nothing_after_it_prints_at_exit_once(tmp_path):
    script = tmp_path / "fit_only.py"
    script.write_text(FIT_ONLY.format(tests=os.path.dirname(__file__)))
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert proc.stdout.count("Run summary (success)") == 1
    assert proc.stdout.index("AFTER FIT") < proc.stdout.index("Run summary (success)")  # the program's last words


def test_the_next_fit_prints_the_previous_table_first(capsys):
    summary = RunSummary(use_rich=False)
    trainer = make_trainer(".", logger=CSVLogger("csv"), callbacks=[SpeedMonitor(), summary], max_steps=2)
    trainer.fit(TinyImageModel(), image_loader(32))
    assert "Run summary" not in capsys.readouterr().out
    first = summary.summary
    trainer = make_trainer(".", logger=CSVLogger("csv"), callbacks=[SpeedMonitor(), summary], max_steps=4)
    trainer.fit(TinyImageModel(), image_loader(32))
    out = capsys.readouterr().out
    assert out.count("Run summary (success)") == 1 and "2 steps" in out  # the first fit's, before the second's
    assert summary.summary is not first and summary.summary["summary/steps"] == 4
    summary.print_now()
    assert "4 steps" in capsys.readouterr().out


def test_print_table_false_never_prints(capsys):
    summary = RunSummary(print_table=False)
    trainer = make_trainer(".", logger=CSVLogger("csv"), callbacks=[summary], max_steps=2)
    trainer.fit(TinyImageModel(), image_loader(32))
    trainer.test(TinyImageModel(), image_loader(32), verbose=False)
    summary.print_now()
    assert "Run summary" not in capsys.readouterr().out


@pytest.mark.parametrize("where", ["ps1", "worker"])
def test_interactive_sessions_and_spawned_workers_print_at_once(where, monkeypatch, capsys):
    if where == "ps1":
        monkeypatch.setattr(sys, "ps1", ">>> ", raising=False)
    else:
        monkeypatch.setattr(run_summary.multiprocessing, "parent_process", lambda: object())
    trainer = make_trainer(".", logger=CSVLogger("csv"), callbacks=[RunSummary(use_rich=False)], max_steps=2)
    trainer.fit(TinyImageModel(), image_loader(32))
    assert capsys.readouterr().out.count("Run summary (success)") == 1


def test_at_exit_a_table_made_for_another_stdout_is_dropped(capsys, monkeypatch):
    """Under pytest's capture the stream a table was made for is gone at exit: nothing is printed then."""
    summary = RunSummary(use_rich=False)
    trainer = make_trainer(".", logger=CSVLogger("csv"), callbacks=[summary], max_steps=2)
    trainer.fit(TinyImageModel(), image_loader(32))
    printed: list[Any] = []
    monkeypatch.setattr(run_summary.sys, "stdout", type("Other", (), {"write": printed.append, "flush": id})())
    summary.print_at_exit()
    assert printed == []
    summary.print_now()  # nothing held any more
    assert printed == []


def test_headline_keys_are_marked_in_the_key_table():
    assert {k for k, v in RunSummary.LOGGED_KEYS.items() if "(headline)" in v} == set(_summary.HEADLINE)
