"""Regenerate what the README shows of the smoke run, from a fresh smoke run: the summary table block (between
``<!-- smoke-summary:start -->`` and ``<!-- smoke-summary:end -->``) and the two TensorBoard screenshots
(``docs/tensorboard_scalars.png``, ``docs/tensorboard_histograms.png``, taken from a real ``tensorboard --logdir`` on
127.0.0.1 with headless Chromium).

    python scripts/smoke_artifacts.py                  # run the smoke config in a temporary directory, rewrite both
    python scripts/smoke_artifacts.py --summary-only   # the README block only (no TensorBoard, no Chromium)
    python scripts/smoke_artifacts.py --check          # exit 1 when the README block lacks the shape of a fresh run's

The run is the README's ``python examples/mnist/main.py fit --config configs/smoke.yaml``, started in a temporary
directory (so its ``runs/`` is there, and the printed paths read ``runs/...`` as they do in a clone) with the
committed digits of ``tests/data``. ``tests/test_readme.py`` uses :func:`run_smoke`, :func:`summary_block` and
:func:`table_shape` to hold the README block to a fresh run's table: the same rows in the same order with the same
units; the numbers may differ.
"""

from __future__ import annotations

import argparse
import os
import re
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.parse
import urllib.request
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from keys_table import update_block  # noqa: E402  (the block writer the table scripts share)

REPO = Path(__file__).resolve().parents[1]
README = REPO / "README.md"
START, END = "<!-- smoke-summary:start -->", "<!-- smoke-summary:end -->"
#: the terminal width the table is drawn for (rich wraps a table wider than the terminal)
COLUMNS = 160
#: the screenshots: file name -> the tags TensorBoard's Time Series page shows (a regex, its tag filter)
SHOTS = {
    "tensorboard_scalars.png": "grad/norm_total|throughput/samples_per_sec|time/data_wait_share|memory/host/rss_gib"
                               "|param/update_ratio_total|train/loss",
    "tensorboard_histograms.png": "grad/hist/",
}
_NUMBER = re.compile(r"[-+]?\d+(?:[.,]\d+)*")
_TIME_UNIT = re.compile(r"\bN (?:ns|µs|us|ms|s|sec|min|h)\b")
_BYTES_UNIT = re.compile(r"\bN (?:B|KiB|MiB|GiB|TiB)\b")


def run_smoke(workdir: Path, timeout: float = 600) -> subprocess.CompletedProcess:
    """The README's smoke command run in ``workdir`` (its ``runs/`` lands there), output captured as text."""
    cmd = [sys.executable, str(REPO / "examples" / "mnist" / "main.py"), "fit",
           "--config", str(REPO / "configs" / "smoke.yaml"),
           "--data.data_dir", str(REPO / "tests" / "data"),
           "--trainer.enable_progress_bar", "false"]  # the progress bar's redraws are not part of the table
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "COLUMNS": str(COLUMNS)}
    # as on a fresh machine: wandb offline, the monitors' cost budget at its default (the tests turn it off)
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "WANDB_BASE_URL", "LIGHTNING_MONITOR_COST_BUDGET"):
        env.pop(var, None)
    out = subprocess.run(cmd, cwd=workdir, env=env, capture_output=True, text=True, timeout=timeout)
    if out.returncode != 0:
        raise RuntimeError(f"the smoke run failed ({out.returncode}):\n{out.stdout[-4000:]}\n{out.stderr[-4000:]}")
    return out


def summary_block(output: str, workdir: Path | None = None) -> str:
    """The summary table as the run printed it: from its ``Run summary (`` title through its last row and the
    ``written to ...`` line that follows, with ``workdir`` left out of the paths."""
    lines = output.splitlines()
    starts = [i for i, line in enumerate(lines) if line.startswith("Run summary (")]
    if not starts:
        raise ValueError("the output holds no 'Run summary (' table")
    block = [lines[starts[-1]]]
    for line in lines[starts[-1] + 1:]:
        if line.startswith(("┌", "│", "├", "└", "+", "|", "  ")) or line.startswith("written to "):
            block.append(line.rstrip())
            if line.startswith("written to "):
                break
        else:
            break
    text = "\n".join(block)
    if workdir is not None:
        text = text.replace(str(workdir) + os.sep, "")
    return text


def table_rows(block: str) -> list[tuple[str, str]]:
    """``(label, value)`` of every row of a summary table, drawn by rich (``│ label │ value │``, a wrapped value
    continues on rows with an empty label) or as plain text (``  label   value``, two spaces or more between)."""
    rows: list[tuple[str, str]] = []
    for line in block.splitlines()[1:]:
        if line.startswith(("│", "|")):
            cells = [cell.strip() for cell in line.replace("│", "|").split("|")[1:-1]]  # between the borders
            if len(cells) < 2:
                continue
            label, value = cells[0], " ".join(cells[1:]).strip()
            if not label and rows:
                rows[-1] = (rows[-1][0], f"{rows[-1][1]} {value}".strip())
            elif label:
                rows.append((label, value))
        elif line.startswith("  "):
            parts = re.split(r"\s{2,}", line.strip(), maxsplit=1)
            if len(parts) == 2:
                rows.append((parts[0], parts[1]))
    return rows


def table_shape(block: str) -> list[tuple[str, str]]:
    """The rows with their numbers replaced by ``N`` and time and byte units by one name each (``N <time>``,
    ``N <bytes>``: the table picks ``ms`` or ``s``, ``MiB`` or ``GiB`` by size), so two runs of the same
    configuration have the same shape whatever their numbers. The ``verdicts`` row keeps its label only: which
    verdicts a run gets follows from its numbers (a busy machine can push the monitoring cost past its threshold)."""
    shape = []
    for label, value in table_rows(block):
        if label == "verdicts":
            shape.append((label, "<verdicts>"))
            continue
        value = _NUMBER.sub("N", value)
        value = _BYTES_UNIT.sub("N <bytes>", _TIME_UNIT.sub("N <time>", value))
        shape.append((label, value))
    return shape


def readme_block(text: str) -> str:
    """The summary table held between the README's markers (inside its code fence)."""
    if START not in text or END not in text:
        raise ValueError(f"README.md has no {START} ... {END} block")
    inner = text.split(START, 1)[1].split(END, 1)[0].strip()
    return inner.removeprefix("```text").removeprefix("```").removesuffix("```").strip("\n")


def write_readme_block(block: str, readme: Path = README) -> None:
    update_block(readme, START, END, f"```text\n{block}\n```\n")  # keys_table's block writer


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _wait_for_tags(base: str, plugin: str, timeout: float = 120) -> None:
    """Until TensorBoard has loaded the run's tags of ``plugin`` (it reads the event files in the background)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            with urllib.request.urlopen(f"{base}/data/plugin/{plugin}/tags", timeout=5) as response:
                if len(response.read()) > 10:
                    return
        except OSError:
            pass
        time.sleep(1)
    raise TimeoutError(f"TensorBoard at {base} loaded no {plugin} tags in {timeout:.0f} s")


def chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable"):
        path = shutil.which(name)
        if path:
            return path
    return None


def _json_from(url: str, timeout: float = 30) -> object:
    import json

    deadline = time.monotonic() + timeout
    while True:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return json.loads(response.read())
        except OSError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.5)


async def _capture(ws_url: str, shots: dict[Path, str], settle_sec: float) -> None:
    """Through the DevTools protocol (aiohttp's websocket client; aiohttp comes with Lightning's ``fsspec[http]``):
    open each URL, wait in real time until its charts are drawn (TensorBoard draws them in a worker, which a
    virtual-time screenshot does not wait for), close the settings pane, and save a PNG."""
    import base64

    import aiohttp

    async with aiohttp.ClientSession() as session, session.ws_connect(ws_url, max_msg_size=0) as ws:
        ids = iter(range(1, 1 << 30))

        async def call(method: str, **params: object) -> dict:
            call_id = next(ids)
            await ws.send_json({"id": call_id, "method": method, "params": params})
            async for message in ws:
                data = message.json()
                if data.get("id") == call_id:
                    if "error" in data:
                        raise RuntimeError(f"{method}: {data['error']}")
                    return data.get("result", {})
            raise ConnectionError("Chromium closed the DevTools connection")

        import asyncio

        for target, url in shots.items():
            await call("Page.navigate", url=url)
            await asyncio.sleep(settle_sec)
            await call("Runtime.evaluate", expression=(  # the settings pane TensorBoard opens on wide windows
                "document.querySelectorAll('button[aria-label=\"Close side pane\"]').forEach(b => b.click())"))
            await asyncio.sleep(2)
            shot = await call("Page.captureScreenshot", format="png")
            target.write_bytes(base64.b64decode(shot["data"]))


def screenshots(logdir: Path, docs: Path, browser: str, settle_sec: float = 15) -> list[Path]:
    """Start ``tensorboard --logdir logdir`` on 127.0.0.1 and take each of :data:`SHOTS` with headless Chromium."""
    import asyncio

    port, cdp_port = _free_port(), _free_port()
    base = f"http://127.0.0.1:{port}"
    server = subprocess.Popen([sys.executable, "-m", "tensorboard.main", "--logdir", str(logdir), "--host",
                               "127.0.0.1", "--port", str(port), "--reload_interval", "1"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    profile = tempfile.TemporaryDirectory()
    chrome = subprocess.Popen([browser, "--headless", "--no-sandbox", "--hide-scrollbars",
                               f"--remote-debugging-port={cdp_port}", f"--user-data-dir={profile.name}",
                               "--window-size=1245,1100", "about:blank"],
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        _wait_for_tags(base, "scalars")
        _wait_for_tags(base, "histograms")
        pages = _json_from(f"http://127.0.0.1:{cdp_port}/json/list")
        assert isinstance(pages, list)
        ws_url = next(page["webSocketDebuggerUrl"] for page in pages if page.get("type") == "page")
        # the tag filter is a query parameter of TensorBoard's Time Series page
        shots = {docs / name: f"{base}/?darkMode=false&tagFilter={urllib.parse.quote(tags, safe='')}#timeseries"
                 for name, tags in SHOTS.items()}
        asyncio.run(_capture(ws_url, shots, settle_sec))
    finally:
        for process in (chrome, server):
            process.terminate()
            process.wait(timeout=30)
        profile.cleanup()
    return list(shots)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--summary-only", action="store_true", help="rewrite the README block only")
    mode.add_argument("--check", action="store_true", help="compare the README block's shape with a fresh run's")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="smoke-") as tmp:
        workdir = Path(tmp)
        out = run_smoke(workdir)
        block = summary_block(out.stdout, workdir)
        if args.check:
            want, have = table_shape(block), table_shape(readme_block(README.read_text(encoding="utf-8")))
            if want != have:
                sys.exit(f"README's summary block is stale: run `python scripts/smoke_artifacts.py`\n"
                         f"fresh run: {want}\nREADME:    {have}")
            print("README's summary block has the shape of a fresh run's table")
            return
        write_readme_block(block)
        print(f"README.md: summary block rewritten ({len(block.splitlines())} lines)")
        if args.summary_only:
            return
        browser = chromium()
        if browser is None:
            sys.exit("no Chromium found (apt-get install chromium): the screenshots were not regenerated")
        for path in screenshots(workdir / "runs", REPO / "docs", browser):
            print(f"{path.relative_to(REPO)}: written")


if __name__ == "__main__":
    main()
