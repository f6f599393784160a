"""The contract every public class keeps, checked over ``lightning_monitor.__all__``.

Constructible with defaults; picklable before and after a real fit (``ddp_spawn`` pickles callbacks and the
logger); the docstring's key table is generated from ``LOGGED_KEYS`` (the one source of every key); keys named by
DESIGN.md's rules; ``state_dict`` round-trips through a checkpoint; ``import lightning_monitor`` imports no optional
package; and one real fit with every callback where every key TensorBoard and wandb received is documented and every
always-on key shows up. The key-name rules and the ``{placeholder}`` matching live here, outside the package.
"""

from __future__ import annotations

import fnmatch
import importlib.util
import inspect
import io
import json
import os
import pickle
import re
import subprocess
import sys
from collections.abc import Iterable
from functools import cache
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from helpers import event_files, find_runs, fit_tiny, tb_accumulator
from lightning.pytorch.callbacks import Callback

import lightning_monitor
from lightning_monitor import (
    ActivationMonitor,
    GradientMonitor,
    HealthMonitor,
    MemoryMonitor,
    MultiLogger,
    PredictionGridMonitor,
    RunSummary,
    SpeedMonitor,
    StallMonitor,
)
from lightning_monitor._core.keys import PLACEHOLDER, document_keys, keys_table
from lightning_monitor._writers.layout import LAYOUT_TAG

REPO = Path(__file__).resolve().parents[1]
_spec = importlib.util.spec_from_file_location("keys_table", REPO / "scripts" / "keys_table.py")
assert _spec is not None and _spec.loader is not None
keys_script = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(keys_script)
markdown_table = keys_script.markdown_table
CLASSES = [getattr(lightning_monitor, name) for name in lightning_monitor.__all__]
CALLBACKS = [cls for cls in CLASSES if cls is not MultiLogger]
# keys Lightning itself logs in these fits: the model's self.log calls and the trainer's epoch counter
LIGHTNING_KEYS = {"train/loss", "val/loss", "epoch"}
# wandb's own bookkeeping columns in every history row
WANDB_COLUMNS = {"_runtime", "_step", "_timestamp", "trainer/global_step"}

ALL = pytest.mark.parametrize("cls", CLASSES, ids=lambda c: c.__name__)
CBS = pytest.mark.parametrize("cls", CALLBACKS, ids=lambda c: c.__name__)


# ------------------------------------------------------------------------------ key names, patterns, tables

#: The first segment of every key (DESIGN.md "Logged keys").
AREAS = ("grad", "param", "optim", "act", "memory", "throughput", "time", "predictions", "run", "summary", "health")
_PLACEHOLDER = re.compile(r"\{[a-z_]+\}")
_SEGMENT = re.compile(r"^[a-z][a-z0-9_]*$")
# Units the key must spell as _gib / _sec / _per_sec (tokens between underscores of a key's last segment).
_WRONG_UNITS = {
    "b", "byte", "bytes", "kb", "kib", "mb", "mib", "gb", "tb", "tib",
    "s", "secs", "second", "seconds", "ms", "us", "ns", "minute", "minutes", "hour", "hours",
}


@cache
def _pattern_regex(pattern: str) -> re.Pattern:
    parts = _PLACEHOLDER.split(pattern)
    # a placeholder is a name taken verbatim: any non-empty text, '/' and '.' included (``memory/{name}_max``
    # stands for ``memory/host/rss_gib_max``, ``grad/hist/{name}`` for ``grad/hist/conv.weight``)
    return re.compile("^" + "(.+)".join(re.escape(p) for p in parts) + "$")


def key_matches(pattern: str, key: str) -> bool:
    """Whether the logged ``key`` is an instance of the documented ``pattern`` (``{placeholder}`` = any name)."""
    return _pattern_regex(pattern).match(key) is not None


def match_key(key: str, patterns: Iterable[str]) -> Optional[str]:
    """The first pattern in ``patterns`` that ``key`` matches, else ``None``. Literal patterns are tried first."""
    ordered = sorted(patterns, key=lambda p: "{" in p)
    return next((p for p in ordered if key_matches(p, key)), None)


#: the public classes' names in snake_case (``gradient_monitor``): no key embeds them (``time/monitor_share``, the
#: monitors' own cost, names no class)
_CLASS_NAMES = [re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower() for name in lightning_monitor.__all__]


def naming_problems(pattern: str) -> list[str]:
    """What is wrong with a documented key pattern under DESIGN.md "Logged keys" (empty list: nothing).

    ``<area>/<metric>``, ``/`` the only separator, every segment lower_snake_case, the area one of :data:`AREAS`,
    placeholders only in the last segment (names go last), bytes in ``_gib``, times in ``_sec``, rates ``_per_sec``.
    """
    problems = []
    segments = pattern.split("/")
    if len(segments) < 2:
        problems.append("needs at least `<area>/<metric>`")
    if segments[0] not in AREAS:
        problems.append(f"area {segments[0]!r} is not one of {AREAS}")
    for i, segment in enumerate(segments):
        if _PLACEHOLDER.search(segment) and i != len(segments) - 1:
            problems.append(f"placeholder in {segment!r} is not in the last segment (names go last)")
        plain = _PLACEHOLDER.sub("x", segment)
        if not _SEGMENT.match(plain) or "__" in plain or plain.endswith("_"):
            problems.append(f"segment {segment!r} is not lower_snake_case")
        if any(name in plain for name in _CLASS_NAMES) or "logger" in plain or plain.startswith("on_"):
            problems.append(f"segment {segment!r} embeds a class or hook name")
    tokens = _PLACEHOLDER.sub("x", segments[-1]).split("_")
    wrong = sorted(set(tokens) & _WRONG_UNITS)
    if wrong:
        problems.append(f"unit {wrong} in {segments[-1]!r}: bytes are `_gib`, times `_sec`, rates `_per_sec`")
    return problems


def docstring_table(doc: str) -> dict[str, str]:
    """The rows of the RST simple table ``key | meaning`` in ``doc`` (keys without their ``code`` quotes)."""
    lines = doc.splitlines()
    borders = [i for i, line in enumerate(lines) if re.fullmatch(r"\s*=+\s+=+\s*", line)]
    header = next(i for i in borders if lines[i + 1].split() == ["key", "meaning"])
    end = next(i for i in borders if i > header + 2)
    rows = [line.strip().split(None, 1) for line in lines[header + 3 : end]]
    return {key.strip("`"): meaning for key, meaning in rows}


def _same(a: Any, b: Any) -> bool:
    """Deep equality that compares tensors by value."""
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.dtype == b.dtype \
            and torch.equal(a, b)
    if isinstance(a, dict):
        return isinstance(b, dict) and a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b, strict=True))
    return a == b


# ----------------------------------------------------------------------------------------------- the helpers


def test_key_matches_placeholders():
    assert key_matches("grad/norm_total", "grad/norm_total")
    assert key_matches("grad/hist/{name}", "grad/hist/conv.weight")
    assert key_matches("memory/{name}_max", "memory/host/rss_gib_max")  # a placeholder may span '/'
    assert key_matches("memory/{name}_max_rank", "memory/host/rss_gib_max_rank")
    assert not key_matches("memory/{name}_max", "memory/host/rss_gib_max_rank")
    assert not key_matches("grad/norm/{group}", "grad/norm_total")
    assert not key_matches("grad/norm/{group}", "grad/norm/")  # a name is never empty
    assert not key_matches("grad/norm_total", "grad/norm_total_x")
    assert match_key("grad/norm_total", GradientMonitor.LOGGED_KEYS) == "grad/norm_total"
    assert match_key("param/update_ratio/head", GradientMonitor.LOGGED_KEYS) == "param/update_ratio/{group}"
    assert match_key("grad/other", GradientMonitor.LOGGED_KEYS) is None


def test_naming_rules_catch_bad_keys():
    for good in ("memory/cuda/peak_allocated_gib", "throughput/device/samples_per_sec", "memory/{name}_max_rank"):
        assert naming_problems(good) == [], good
    for bad in ("Grad/norm", "grad-norm", "grad", "loss/total", "grad/Norm", "grad/norm.total", "memory/peak_mb",
                "time/step_ms", "throughput/samples_per_s", "memory/rss_bytes", "grad/{name}/norm",
                "speed_monitor/x", "time/on_train_batch_end_sec", "grad/norm__total", "time/share/gradient_monitor"):
        assert naming_problems(bad), bad


def test_document_keys_fills_the_placeholder_and_refuses_a_docstring_without_one():
    class Documented:
        """Summary.

        Logged keys:

        {logged_keys}

        Args:
            x: nothing.
        """

        LOGGED_KEYS = {"grad/norm_total": "L2 norm of all gradients", "grad/hist/{name}": "a histogram (``x``)"}

    assert document_keys(Documented) is Documented
    doc = Documented.__doc__ or ""
    assert PLACEHOLDER not in doc
    assert docstring_table(doc) == Documented.LOGGED_KEYS
    assert keys_table(Documented.LOGGED_KEYS, "        ") in doc  # indented like the line it replaced
    assert "        ``grad/hist/{name}``  a histogram (``x``)" in doc.splitlines()

    with pytest.raises(ValueError, match="NoTable's docstring has no '{logged_keys}' line"):
        document_keys(type("NoTable", (), {"__doc__": "Summary.", "LOGGED_KEYS": {"a/b": "c"}}))


# ----------------------------------------------------------------------------------------- per public class


def test_all_lists_the_public_classes():
    assert lightning_monitor.__all__ == [
        "MultiLogger", "GradientMonitor", "MemoryMonitor", "SpeedMonitor", "PredictionGridMonitor", "RunSummary",
        "HealthMonitor", "StallMonitor", "ActivationMonitor"]


@ALL
def test_constructible_with_defaults_and_picklable(cls):
    obj = cls()
    copy = pickle.loads(pickle.dumps(obj))
    assert type(copy) is cls
    if cls is not MultiLogger:
        public = {k: v for k, v in vars(obj).items() if not k.startswith("_")}
        assert _same(public, {k: v for k, v in vars(copy).items() if not k.startswith("_")})


@ALL
def test_docstring_documents_every_logged_key(cls):
    assert isinstance(cls.LOGGED_KEYS, dict) and cls.LOGGED_KEYS
    doc = cls.__doc__ or ""
    # filled means generated from LOGGED_KEYS by document_keys, whose table the test above checks row for row
    assert PLACEHOLDER not in doc, "the key table placeholder was not filled: decorate the class with document_keys"


@ALL
def test_keys_follow_the_naming_rules(cls):
    problems = {key: naming_problems(key) for key in cls.LOGGED_KEYS}
    assert not {k: p for k, p in problems.items() if p}


@ALL
def test_options_after_the_first_two_are_keyword_only(cls):
    params = list(inspect.signature(cls).parameters.values())
    positional = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    assert len(positional) <= 2, f"{cls.__name__}: {positional[2:]} should be keyword-only"
    assert all(not p.name.startswith("_") and p.name != "clock" for p in params), "a test hook in the CLI surface"


@CBS
def test_setup_refuses_a_trainer_without_logger_and_a_sharding_strategy(cls):
    from lightning.pytorch.strategies import FSDPStrategy
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    class Trainer:  # what setup reads of a trainer, without building FSDP (it needs a process group)
        def __init__(self, loggers: list, strategy: Any) -> None:
            self.loggers, self.strategy = loggers, strategy

    with pytest.raises(MisconfigurationException, match=f"{cls.__name__} needs a logger"):
        cls().setup(Trainer([], None), None, "fit")
    fsdp = FSDPStrategy.__new__(FSDPStrategy)
    if getattr(cls, "FLAT_SHARDS_UNSUPPORTED", ""):  # RunSummary is no Monitor: it reads what the monitors logged
        with pytest.raises(MisconfigurationException, match=f"{cls.__name__} cannot run under FSDPStrategy: "
                                                             "FSDPStrategy .*; use ModelParallelStrategy with FSDP2"):
            cls().setup(Trainer([object()], fsdp), None, "fit")
    if cls is GradientMonitor:  # raise/skip still act on NaN/Inf without a logger
        GradientMonitor(nonfinite="raise").setup(Trainer([], None), None, "fit")


def test_no_key_is_claimed_by_two_classes():
    owners: dict[str, str] = {}
    for cls in CLASSES:
        for key in cls.LOGGED_KEYS:
            assert key not in owners, f"{key} in {owners.get(key)} and {cls.__name__}"
            owners[key] = cls.__name__


@ALL
def test_picklable_after_a_real_fit_and_state_round_trips(cls):
    if cls is MultiLogger:  # the real thing: TensorBoard + offline wandb
        obj = logger = MultiLogger(save_dir="runs", name="contract")
        callbacks: list[Any] = []
    else:
        obj = cls()
        logger, callbacks = MultiLogger(save_dir="runs", name="contract", wandb=False), [obj]
    fit_tiny(callbacks, logger, max_steps=4, val_check_interval=2)
    copy = pickle.loads(pickle.dumps(obj))  # what ddp_spawn does to a callback and the logger it is given
    assert type(copy) is cls
    if cls is MultiLogger:
        assert copy.log_dir == obj.log_dir
        return
    state = obj.state_dict()
    if type(obj).state_dict is Callback.state_dict:  # keeps nothing worth resuming
        assert state == {}
        return
    # through a checkpoint file as Lightning writes and reads it (weights_only: only plain containers, tensors)
    buffer = io.BytesIO()
    torch.save({"callbacks": {cls.__name__: state}}, buffer)
    buffer.seek(0)
    loaded = torch.load(buffer, weights_only=True)["callbacks"][cls.__name__]
    fresh = cls()
    fresh.load_state_dict(loaded)
    assert _same(fresh.state_dict(), state)
    assert _same(copy.state_dict(), state)


def test_import_pulls_in_no_optional_package():
    code = (
        "import sys, json\n"
        "import lightning.pytorch\n"
        "before = {m.split('.')[0] for m in sys.modules}\n"
        "import lightning_monitor\n"
        "after = {m.split('.')[0] for m in sys.modules}\n"
        "print(json.dumps({'added': sorted(after - before), 'all': sorted(after)}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=True)
    modules = json.loads(out.stdout.strip().splitlines()[-1])
    # wandb (heavy, starts nothing until MultiLogger needs it) and NVML (the `nvml` extra) are never imported
    assert not {"wandb", "pynvml"} & set(modules["all"]), modules["all"]
    # Lightning itself already imports torchvision and torchmetrics; we add no extra or backend on top
    assert not {"jsonargparse", "torchmetrics", "tensorboard", "tensorboardX", "torchvision"} & set(modules["added"])
    # beyond Lightning's own imports, only our package and light dependencies (psutil, stdlib)
    assert set(modules["added"]) <= {"lightning_monitor", "psutil", "netrc", "resource", "_psutil_linux"}, \
        modules["added"]


# ----------------------------------------------------------------------------------- one fit, every callback


def _items(batch: Any) -> int:
    return batch[0].numel()


def _conditional(device: str) -> dict[str, str]:
    """Documented keys a one-process fit of the test below need not log, and why."""
    reasons = {
        "run/status": "only when a run ends with a status other than success",
        "grad/nonfinite/{name}": "only for parameters whose gradients had NaN/Inf",
        "grad/nonfinite_count": "from the first logging step that saw a NaN/Inf on (no chart of zeros)",
        "grad/nonfinite_steps": "from the first logging step that saw a NaN/Inf on (no chart of zeros)",
        "memory/host/available_gib": "host-wide: once the host's available memory moved by 1 % of its total",
        "memory/gpu/utilization_percent": "CUDA with nvidia-ml-py (NVML) only",
        "memory/gpu/power_watts": "CUDA with nvidia-ml-py (NVML) only",
        "memory/gpu/temperature_celsius": "CUDA with nvidia-ml-py (NVML) only",
        "memory/cuda/test_peak_allocated_gib": "CUDA only, and only after a test run (trainer.test)",
        "memory/cuda/test_peak_reserved_gib": "CUDA only, and only after a test run (trainer.test)",
    }
    for suffix in ("min", "mean", "max", "max_rank"):
        reasons[f"memory/{{name}}_{suffix}"] = "cross-rank aggregate: world size > 1 only"
        reasons[f"time/pre_sync_sec_{suffix}"] = "DDP straggler timing: world size > 1 only"
    reasons["time/straggler_ratio"] = "DDP straggler timing: world size > 1 only"
    reasons["throughput/device/samples_per_sec"] = "per-device rate: world size > 1 only (else the global one)"
    reasons["memory/host/workers_uss_gib"] = "runs with DataLoader workers only"
    reasons["memory/host/worker_processes"] = "runs with DataLoader workers only"
    reasons["grad/optimizer_norm/{index}"] = "per-optimizer series: more than one optimizer only"
    reasons["grad/optimizer_nonfinite_count/{index}"] = "per-optimizer series: more than one optimizer only"
    for key in GradientMonitor.LOGGED_KEYS:
        if key.startswith("optim/"):
            reasons[key] = "optimizer_state=True with an Adam-style optimizer only (tests/test_optimizer_state.py)"
    for key in HealthMonitor.LOGGED_KEYS:
        reasons[key] = "HealthMonitor logs only after an alert (and is not in this fit)"
    for key in StallMonitor.LOGGED_KEYS:
        reasons.setdefault(key, "StallMonitor logs only after a stall (and is not in this fit)")
    for key in RunSummary.LOGGED_KEYS:
        if key.startswith(("summary/alert", "summary/stall")):
            reasons[key] = "only when HealthMonitor or StallMonitor raised an alert"
    reasons["summary/cuda_{phase}_peak_allocated_gib_max"] = "CUDA only (MemoryMonitor's per-phase peaks)"
    reasons["summary/cuda_{phase}_peak_allocated_gib_max_rank"] = "CUDA only (MemoryMonitor's per-phase peaks)"
    if "time/monitor_share" not in SpeedMonitor.LOGGED_KEYS:
        reasons["summary/overhead_share_mean"] = "only once SpeedMonitor logs time/monitor_share"
    if device != "cuda":
        for key in MemoryMonitor.LOGGED_KEYS:
            if key.startswith("memory/cuda/"):
                reasons.setdefault(key, "CUDA device only")
    return reasons


def _tb_keys(log_dir: str) -> set[str]:
    """Every scalar, histogram, image and text tag in every TensorBoard event file under ``log_dir``."""
    keys: set[str] = set()
    for directory in sorted({os.path.dirname(f) for f in event_files(log_dir)}):
        tags = tb_accumulator(directory).Tags()
        keys |= set(tags["scalars"]) | set(tags["histograms"]) | set(tags["images"])
        keys |= {t.removesuffix("/text_summary") for t in tags["tensors"]
                 if not t.startswith("_hparams_/") and t != LAYOUT_TAG}  # the dashboard's layout is no key
    return keys


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
def test_every_logged_key_is_documented_and_every_always_on_key_is_logged(device):
    callbacks = [
        # every option that adds keys switched on, so only the keys listed in _conditional may be missing
        GradientMonitor(per_param_norms=True, param_norms=True, update_ratio=True, param_histograms=True),
        ActivationMonitor(histograms=True),
        MemoryMonitor(),
        SpeedMonitor(peak_flops_per_sec=1e12, items_fn=_items),
        PredictionGridMonitor(num_samples=8),
        RunSummary(),
    ]
    logger = MultiLogger(save_dir="runs", name="contract")
    fit_tiny(callbacks, logger, accelerator=device, max_steps=6, val_check_interval=3)
    documented = {key: cls.__name__ for cls in CLASSES for key in cls.LOGGED_KEYS}

    tb = _tb_keys(logger.log_dir)
    runs = find_runs("runs")
    assert len(runs) == 1
    wb = {k for row in runs[0].history for k in row} - WANDB_COLUMNS
    wb |= {k for k in runs[0].summary if k.startswith("summary/")}  # RunSummary's values: the run summary
    for backend, keys in (("TensorBoard", tb), ("wandb", wb)):
        unknown = sorted(k for k in keys - LIGHTNING_KEYS if match_key(k, documented) is None)
        assert not unknown, f"{backend} got keys no class documents: {unknown}"
        assert LIGHTNING_KEYS <= keys, f"{backend} lacks Lightning's own {LIGHTNING_KEYS - keys}"
    # the same keys, but for RunSummary's: every value in wandb's run summary, in TensorBoard a card (and only the
    # headline numbers as scalars)
    from lightning_monitor._summary.numbers import HEADLINE

    card_only = {k for k in wb if k.startswith("summary/") and k not in HEADLINE}
    assert tb - {RunSummary.CARD_KEY} == wb - card_only, "TensorBoard and wandb got the same keys"

    conditional = _conditional(device)
    assert set(conditional) <= set(documented), "a conditional key that no class documents"
    missing = {
        f"{documented[pattern]}: {pattern}"
        for pattern in documented
        if pattern not in conditional and not any(key_matches(pattern, k) for k in tb | wb)
    }
    assert not missing, f"always-on keys never logged: {sorted(missing)}"


def _fit_keys(root: str, exclude: dict[type, list[str]]) -> tuple[set[str], set[str]]:
    """Keys TensorBoard and the offline wandb run received from a fit with every monitor (``exclude``: the
    ``exclude_keys`` of each monitor class)."""
    callbacks = [
        GradientMonitor(histograms=True, exclude_keys=exclude.get(GradientMonitor)),
        MemoryMonitor(exclude_keys=exclude.get(MemoryMonitor)),
        SpeedMonitor(exclude_keys=exclude.get(SpeedMonitor)),
        PredictionGridMonitor(num_samples=8, exclude_keys=exclude.get(PredictionGridMonitor)),
    ]
    logger = MultiLogger(save_dir=root, name="exclude")
    fit_tiny(callbacks, logger, max_steps=4, val_check_interval=2)
    (run,) = find_runs(root)
    return _tb_keys(logger.log_dir), {k for row in run.history for k in row} - WANDB_COLUMNS


def test_exclude_keys_leaves_out_a_family_from_both_backends_and_nothing_else():
    exclude = {SpeedMonitor: ["time/*"], GradientMonitor: ["grad/hist/*"], MemoryMonitor: ["memory/host/rss_gib"],
               PredictionGridMonitor: ["predictions/grid"]}
    patterns = [p for ps in exclude.values() for p in ps]
    full = _fit_keys("full", {})
    trimmed = _fit_keys("trimmed", exclude)
    for backend, everything, kept in zip(("TensorBoard", "wandb"), full, trimmed, strict=True):
        left_out = {k for k in everything if any(fnmatch.fnmatchcase(k, p) for p in patterns)}
        # every pattern matched something in the full run (so the test can fail), then nothing of it came through
        assert all(any(fnmatch.fnmatchcase(k, p) for k in everything) for p in patterns), backend
        assert kept == everything - left_out, f"{backend}: {sorted(kept ^ (everything - left_out))}"


# ------------------------------------------------------------------------------------------ the README table


def test_keys_table_script_prints_the_generated_table():
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "keys_table.py")], capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout == markdown_table(CLASSES)
    rows = out.stdout.strip().splitlines()[2:]
    assert len(rows) == sum(len(cls.LOGGED_KEYS) for cls in CLASSES)
    expected = [["|", f"`{cls.__name__}`", "|", f"`{key}`"] for cls in CLASSES for key in cls.LOGGED_KEYS]
    assert [row.split(" ", 4)[:4] for row in rows] == expected


def test_readme_holds_the_generated_key_table():
    page = Path(getattr(keys_script, "PAGE", REPO / "README.md"))  # the page the script keeps the table in
    text = page.read_text(encoding="utf-8") if page.exists() else ""
    start, end = "<!-- keys:start -->", "<!-- keys:end -->"
    if start not in text or end not in text:
        pytest.skip(f"{page.name} has no {start} ... {end} block yet; paste `python scripts/keys_table.py` there")
    block = text.split(start, 1)[1].split(end, 1)[0]
    assert block.strip() == markdown_table(CLASSES).strip(), (
        f"the key table in {page.name} is stale: run `python scripts/keys_table.py --update`"
    )


# ---------------------------------------------------------------------------------------- the options table
_ospec = importlib.util.spec_from_file_location("options_table", REPO / "scripts" / "options_table.py")
assert _ospec is not None and _ospec.loader is not None
options_script = importlib.util.module_from_spec(_ospec)
_ospec.loader.exec_module(options_script)


@ALL
def test_every_option_is_documented_with_its_default(cls):
    """Each ``__init__`` option has an ``Args:`` entry (the options table's meaning) and a row with its default."""
    params = [p for p in inspect.signature(cls.__init__).parameters.values()
              if p.name != "self" and p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)]
    rows = options_script.options(cls)
    assert [name for name, _, _ in rows] == [p.name for p in params]
    undocumented = [name for name, _, meaning in rows if not meaning]
    assert not undocumented, f"{cls.__name__}: options with no `Args:` entry: {undocumented}"
    for (name, default, _), param in zip(rows, params, strict=True):
        assert default == ("required" if param.default is param.empty else f"`{param.default!r}`"), name


def test_options_table_parses_google_args():
    doc = """Summary.

    Args:
        alpha: the first one. More about it
            on a second line.
        beta (int): the second, e.g. ``2``. Then more.

    Raises:
        ValueError: not an option.
    """
    assert options_script.documented_args(doc) == {
        "alpha": "the first one. More about it on a second line.", "beta": "the second, e.g. ``2``. Then more."}
    assert options_script.first_sentence("the second, e.g. ``2``. Then more.") == "the second, e.g. ``2``."


def test_readme_holds_the_generated_options_table():
    page = Path(getattr(options_script, "PAGE", REPO / "README.md"))  # the page the script keeps the table in
    text = page.read_text(encoding="utf-8")
    start, end = options_script.START, options_script.END
    assert start in text and end in text, f"{page.name} lacks the {start} ... {end} block"
    block = text.split(start, 1)[1].split(end, 1)[0]
    assert block.strip() == options_script.table().strip(), (
        f"{page.name}'s options table is stale: run `python scripts/options_table.py --update`")
    out = subprocess.run([sys.executable, str(REPO / "scripts" / "options_table.py")], capture_output=True,
                         text=True, timeout=120, check=True)
    assert out.stdout == options_script.table()
