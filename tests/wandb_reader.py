"""A small reader of wandb's offline run file (``run-<id>.wandb``), which the wandb package cannot read back.

Format: a 7-byte header (``:W&B``, a 2-byte magic, a 1-byte version), then 32 KiB blocks of LevelDB-style
records, each with a 7-byte header (crc32 uint32, length uint16, type uint8: 1 full, 2 first, 3 middle, 4 last).
A block's tail shorter than a record header is padding. Each reassembled payload is a
``wandb.proto.wandb_internal_pb2.Record``.
"""

from __future__ import annotations

import glob
import json
import os
import struct
import time
from dataclasses import dataclass, field
from typing import Any

BLOCK = 32 * 1024
HEADER = 7
FULL, FIRST, MIDDLE, LAST = 1, 2, 3, 4


def read_records(path: str) -> list[Any]:
    from wandb.proto import wandb_internal_pb2

    with open(path, "rb") as f:
        data = f.read()
    assert data[:4] == b":W&B", f"{path} is not a wandb run file"
    records, pending = [], b""
    offset = HEADER
    while offset + HEADER <= len(data):
        block_left = BLOCK - (offset % BLOCK)
        if block_left < HEADER:
            offset += block_left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[offset : offset + HEADER])
        if offset + HEADER + length > len(data):  # a record still being written (or cut off by a kill)
            break
        payload = data[offset + HEADER : offset + HEADER + length]
        offset += HEADER + length
        if kind == 0 and length == 0:  # zero padding at the end of a partly written block
            offset += BLOCK - (offset % BLOCK) if offset % BLOCK else 0
            continue
        if kind == FULL:
            pending = payload
        elif kind == FIRST:
            pending = payload
            continue
        elif kind == MIDDLE:
            pending += payload
            continue
        elif kind == LAST:
            pending += payload
        else:
            raise ValueError(f"{path}: unknown record type {kind} at {offset}")
        record = wandb_internal_pb2.Record()
        record.ParseFromString(pending)
        records.append(record)
        pending = b""
    return records


@dataclass
class WandbRun:
    path: str
    run_id: str = ""
    name: str = ""
    project: str = ""
    history: list[dict[str, Any]] = field(default_factory=list)
    config: dict[str, Any] = field(default_factory=dict)
    exit_code: int | None = None
    #: the run summary (``run.summary``) as its ``summary`` records leave it: wandb's last value of each history
    #: key plus what was set with ``run.summary.update`` (nested keys joined with ``/``)
    summary: dict[str, Any] = field(default_factory=dict)
    start_time: float = 0.0
    #: ``(run id, _step)`` this run continues after (``resume_from="id?_step=k"``): rows after it are replaced
    rewound_to: tuple[str, int] | None = None

    def series(self, key: str, step_key: str = "trainer/global_step") -> list[tuple[Any, Any]]:
        """(step, value) for every history row that holds ``key``."""
        return [(row.get(step_key), row[key]) for row in self.history if key in row]

    def keys(self) -> set[str]:
        return {k for row in self.history for k in row if not k.startswith("_")}


def read_run(path: str) -> WandbRun:
    run = WandbRun(path=path)
    for record in read_records(path):
        kind = record.WhichOneof("record_type")
        if kind == "run":
            run.run_id, run.name, run.project = record.run.run_id, record.run.display_name, record.run.project
            run.start_time = record.run.start_time.seconds + record.run.start_time.nanos / 1e9
            if record.run.HasField("branch_point") and record.run.branch_point.run:
                run.rewound_to = (record.run.branch_point.run, int(record.run.branch_point.value))
            for item in record.run.config.update:
                run.config[item.key] = json.loads(item.value_json)
        elif kind == "history":
            row: dict[str, Any] = {}
            for item in record.history.item:
                value = json.loads(item.value_json)
                if item.key:
                    row[item.key] = value
                elif len(item.nested_key) == 1:
                    row[item.nested_key[0]] = value
                else:  # a media value (histogram, image, table): rebuild it as a dict under its key
                    node = row.setdefault(item.nested_key[0], {})
                    for part in item.nested_key[1:-1]:
                        node = node.setdefault(part, {})
                    node[item.nested_key[-1]] = value
            run.history.append(row)
        elif kind == "config":
            for item in record.config.update:
                run.config[item.key if item.key else "/".join(item.nested_key)] = json.loads(item.value_json)
        elif kind == "summary":
            for item in record.summary.update:
                run.summary[item.key if item.key else "/".join(item.nested_key)] = json.loads(item.value_json)
            for item in record.summary.remove:
                run.summary.pop(item.key if item.key else "/".join(item.nested_key), None)
        elif kind == "exit":
            run.exit_code = record.exit.exit_code
    return run


def find_runs(root: str, wait_finished: float = 30.0) -> list[WandbRun]:
    """Every offline run under ``root`` (searched recursively), in the order they started.

    ``run.finish()`` returns before wandb's service process has written the run file to the end, so by default
    this waits (up to ``wait_finished`` seconds) until every run file holds its exit record. Pass 0 to read the
    files as they are (e.g. after the writer was killed).
    """
    deadline = time.monotonic() + wait_finished
    while True:
        paths = sorted(glob.glob(os.path.join(str(root), "**", "offline-run-*", "run-*.wandb"), recursive=True))
        runs = [read_run(p) for p in paths]
        if all(run.exit_code is not None for run in runs) or time.monotonic() >= deadline:
            return sorted(runs, key=lambda run: (run.start_time, run.path))
        time.sleep(0.2)


def synced_series(runs: list[WandbRun], key: str, step_key: str = "trainer/global_step") -> list[tuple[Any, Any]]:
    """The series ``key`` as wandb's server will hold it once the offline runs (of one run id, in the order they
    started) are synced: a run that was rewound to ``_step`` k replaces every earlier row after k."""
    rows: list[dict[str, Any]] = []
    for run in runs:
        if run.rewound_to is not None:
            rows = [row for row in rows if row.get("_step", -1) <= run.rewound_to[1]]
        rows.extend(run.history)
    return [(row.get(step_key), row[key]) for row in rows if key in row]
