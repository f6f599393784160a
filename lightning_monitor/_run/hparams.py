"""The run's HParams experiment summary: one small event file in the run directory, replaced at each segment's end.

TensorBoard's HParams tab reads a run's metric columns from its ``_hparams_/experiment`` summary, and its event
reader keeps the FIRST summary metadata of a tag it meets in a run directory (``plugin_event_accumulator``: "We only
store the first instance of the metadata"). Written into each segment's own event file, as before, the experiment
of ``fit`` hid the one of a later ``test``: the test metrics never became columns. So the experiment summary (with
the session's end and status) lives in one file of its own, :data:`FILE_NAME`, rewritten at the end of every
segment with the union of the metric columns of every segment so far (read back from the file it replaces), and
replaced atomically (``os.replace``): a fresh read of the run directory finds exactly one experiment summary.

Its name sorts before every ``events.out.tfevents.*`` file, and does not match that pattern: TensorBoard's
directory watcher reads a run's files in name order and never goes back, so a live TensorBoard reads it first and
still follows every later segment's file (a live TensorBoard that read an earlier version keeps that one until it
restarts); and the segments' own event files (one per segment and writer) are still counted by their pattern.
"""

from __future__ import annotations

import os
from typing import Any

#: the experiment summary's file in the run directory ("tfevents" in the name: TensorBoard reads it)
FILE_NAME = "events.hparams.tfevents"
EXPERIMENT_TAG = "_hparams_/experiment"


def metric_tags(path: str) -> list[str]:
    """The metric columns named by the experiment summary in the event file ``path`` (empty when there is none)."""
    from tensorboard.backend.event_processing.event_file_loader import EventFileLoader
    from tensorboard.plugins.hparams import plugin_data_pb2

    if not os.path.isfile(path):
        return []
    tags: list[str] = []
    try:
        for event in EventFileLoader(path).Load():
            for value in event.summary.value:
                if value.tag == EXPERIMENT_TAG:
                    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
                    tags += [m.name.tag for m in data.experiment.metric_infos]
    except Exception:  # noqa: BLE001 - an unreadable earlier file loses its columns, not the run's end
        return tags
    return tags


def with_metrics(experiment: Any, earlier: list[str]) -> Any:
    """The experiment ``Summary`` with the metric columns of the ``earlier`` segments first (in their order), then
    its own that they did not name."""
    from tensorboard.plugins.hparams import api_pb2, plugin_data_pb2

    value = experiment.value[0]
    data = plugin_data_pb2.HParamsPluginData.FromString(value.metadata.plugin_data.content)
    tags = list(dict.fromkeys([*earlier, *(m.name.tag for m in data.experiment.metric_infos)]))
    del data.experiment.metric_infos[:]
    data.experiment.metric_infos.extend(api_pb2.MetricInfo(name=api_pb2.MetricName(tag=tag)) for tag in tags)
    value.metadata.plugin_data.content = data.SerializeToString()
    return experiment


def write(log_dir: str, experiment: Any, session_end: Any, step: int) -> str:
    """Replace the run's experiment file with ``experiment`` (its metric columns united with the file's) and
    ``session_end``, both ``Summary`` protos, at ``step``; the path written."""
    import time

    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.summary.writer.record_writer import RecordWriter

    path = os.path.join(log_dir, FILE_NAME)
    experiment = with_metrics(experiment, metric_tags(path))
    partial = os.path.join(log_dir, ".hparams.partial")  # not "tfevents": TensorBoard skips it half-written
    now = time.time()
    with open(partial, "wb") as f:
        records = RecordWriter(f)
        records.write(Event(wall_time=now, file_version="brain.Event:2").SerializeToString())
        for summary in (experiment, session_end):
            records.write(Event(wall_time=now, step=step, summary=summary).SerializeToString())
        records.flush()
    os.replace(partial, path)
    return path
