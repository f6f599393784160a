"""The README guides a new user truthfully: its quick start commands, its complete script (run here for real), its
smoke-run summary block (held to the shape of a fresh smoke run's table), its links (each reference page once), and
the generated reference tables in docs/."""

from __future__ import annotations

import importlib.util
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import find_runs, tb_all_scalars

import lightning_monitor

REPO = Path(__file__).resolve().parents[1]
README = (REPO / "README.md").read_text(encoding="utf-8")


def _script(name: str):
    spec = importlib.util.spec_from_file_location(name, REPO / "scripts" / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.path.insert(0, str(REPO / "scripts"))  # options_table imports keys_table
    try:
        spec.loader.exec_module(module)
    finally:
        sys.path.remove(str(REPO / "scripts"))
    return module


smoke = _script("smoke_artifacts")
keys_script = _script("keys_table")
options_script = _script("options_table")


def _section(title: str) -> str:
    return README.split(f"\n## {title}\n", 1)[1].split("\n## ", 1)[0]


# ------------------------------------------------------------------------------------------- what the README says
def test_quick_start_is_exactly_three_commands():
    block = _section("Quick start").split("```bash\n", 1)[1].split("```", 1)[0]
    assert block.splitlines() == ['pip install -e ".[dev]"',
                                  "python examples/mnist/main.py fit --config configs/smoke.yaml",
                                  "python -m pytest -q"]


def test_install_section_names_no_package_index_and_the_cpu_torch_hint():
    install = _section("Install it into your project")
    assert 'pip install "lightning-monitor @ git+https://github.com/lightning-monitor/lightning-monitor"' in install
    assert "pip install -e ." in install
    assert "--index-url https://download.pytorch.org/whl/cpu" in install
    # no `pip install lightning-monitor[...]` that reads as a package on PyPI, anywhere in the README or docs/
    pages = [README, *(p.read_text(encoding="utf-8") for p in (REPO / "docs").glob("*.md"))]
    pypi = re.compile(r"pip install ['\"]?lightning-monitor(\[[a-z,]+\])?(?!\s*@)['\"]?(\s|`|$)")
    assert not any(pypi.search(page) for page in pages)
    # the extras it names are the ones pyproject.toml defines
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    extras = set(tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"])
    named = set(re.findall(r"`(\w+)` \(", install.split("Extras:", 1)[1]))
    assert named == extras


def test_every_reference_page_is_linked_once_and_exists():
    links = re.findall(r"\]\((docs/[^)#]+)\)", README)
    for link in links:
        assert (REPO / link).is_file(), link
    pages = [link for link in links if link.endswith(".md")]
    assert len(pages) == len(set(pages)), f"a docs page linked twice: {sorted(pages)}"
    assert {p.name for p in (REPO / "docs").glob("*.md")} == {Path(p).name for p in pages}  # and none left out


def test_no_changelog_and_no_lists_of_targets():
    for text in ("What made this round", "Targets of issue", "**met:**", "**missed", "This round"):
        assert text not in README, text
    assert len(README.splitlines()) < 250  # a guide, not the reference (which is in docs/)


# ------------------------------------------------------------------------------ the complete script, run for real
def test_the_complete_script_runs_and_writes_every_backend(tmp_path):
    source = README.split("<!-- minimal-script -->\n```python\n", 1)[1].split("```", 1)[0]
    assert "RunSummary()" in source
    (tmp_path / "train.py").write_text(source, encoding="utf-8")
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    out = subprocess.run([sys.executable, "train.py"], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300)
    assert out.returncode == 0, out.stdout[-3000:] + out.stderr[-3000:]
    assert "Run summary (success)" in out.stdout
    run_dir = tmp_path / "runs" / "minimal" / "version_0"
    assert (run_dir / "summary.json").is_file()
    scalars = tb_all_scalars(str(run_dir))
    # 2 epochs of 20 batches, logging every 5 steps: steps 4, 9, ..., 39
    assert [step for step, _ in scalars["grad/norm_total"]] == list(range(4, 40, 5))
    assert {"throughput/samples_per_sec", "memory/host/rss_gib", "predictions/accuracy"} <= set(scalars)
    (run,) = find_runs(str(run_dir))  # the offline wandb run: the same values at the same steps
    assert run.series("grad/norm_total") == [(step, pytest.approx(value, rel=1e-6))
                                             for step, value in scalars["grad/norm_total"]]


# ----------------------------------------------------------------------------------- the smoke run's summary block
RICH = """Run summary (success)
┌──────────────────┬──────────────────────────────┐
│ wall time, steps │ 27.0 s, 18 steps             │
│ step time        │ p50 916.8 ms, p95 1.0 s      │
│ monitoring cost  │ 10.9% of training time       │
│                  │ (gradient 8.4%)              │
└──────────────────┴──────────────────────────────┘
written to runs/mnist-smoke/version_0/summary.json"""
PLAIN = """Run summary (success)
  wall time, steps  23.7 s, 18 steps
  step time         p50 1.0 s, p95 1.3 s
  monitoring cost   9.1% of training time (gradient 8.2%)
  written to runs/mnist-smoke/version_0/summary.json"""


def test_table_shape_reads_rich_and_plain_tables_alike():
    expected = [("wall time, steps", "N <time>, N steps"), ("step time", "pN N <time>, pN N <time>"),
                ("monitoring cost", "N% of training time (gradient N%)")]
    assert smoke.table_shape(RICH) == expected
    assert smoke.table_shape(PLAIN)[:3] == expected
    assert smoke.summary_block(f"noise\n{RICH}\nEpoch 1/1 ...\n") == RICH
    assert smoke.table_shape(RICH.replace("18 steps", "18 steps, 3 NaN")) != expected  # a row that changed shows


@pytest.mark.slow
def test_the_readme_summary_block_has_the_shape_of_a_fresh_smoke_run(tmp_path):
    """The README's block came from the smoke run (``python scripts/smoke_artifacts.py``): a fresh run prints a
    table with the same rows, in the same order, with the same units; only the measured numbers may differ."""
    out = smoke.run_smoke(tmp_path)
    fresh = smoke.summary_block(out.stdout, tmp_path)
    documented = smoke.readme_block(README)
    assert smoke.table_shape(documented) == smoke.table_shape(fresh), (
        "README's smoke summary is stale: run `python scripts/smoke_artifacts.py`")
    steps = re.compile(r"(\d+) steps")
    assert steps.findall(documented)[:1] == steps.findall(fresh)[:1]  # the run makes as many steps as it says
    assert documented.splitlines()[-1] == fresh.splitlines()[-1] == "written to runs/mnist-smoke/version_0/summary.json"


# ------------------------------------------------------------------------------ the reference tables in docs/
def test_docs_keys_page_holds_the_generated_key_table():
    text = (REPO / "docs" / "keys.md").read_text(encoding="utf-8")
    block = text.split(keys_script.START, 1)[1].split(keys_script.END, 1)[0]
    classes = [getattr(lightning_monitor, name) for name in lightning_monitor.__all__]
    assert block.strip() == keys_script.markdown_table(classes).strip(), (
        "docs/keys.md is stale: run `python scripts/keys_table.py --update`")


def test_docs_options_page_holds_the_generated_options_table():
    text = (REPO / "docs" / "options.md").read_text(encoding="utf-8")
    block = text.split(options_script.START, 1)[1].split(options_script.END, 1)[0]
    assert block.strip() == options_script.table().strip(), (
        "docs/options.md is stale: run `python scripts/options_table.py --update`")
