"""TensorBoard event files that mirror `metrics.jsonl`.

Every numeric field of a metrics record becomes a scalar under its own tag at the record's step,
so `tensorboard --logdir WORKDIR/tensorboard` shows the same curves that `experiments/plot.py`
draws. The writer uses the `tensorboard` package alone; TensorFlow is not imported.

The event files are derived data. When a run resumes, `metrics.jsonl` is first cut back to the
checkpoint's step. `EventWriter` then writes the kept records into a new event file and removes
the older files, so TensorBoard shows one value per step.
"""

import glob
import os
import time
from collections.abc import Iterable, Mapping
from typing import Any

from tensorboard.compat.proto import event_pb2, summary_pb2
from tensorboard.summary.writer.event_file_writer import EventFileWriter

TENSORBOARD_DIR = "tensorboard"
# Fields of a metrics record that are not curves.
_NOT_SCALARS = ("step",)


def scalar_values(record: Mapping[str, Any]) -> dict[str, float]:
    """Return the numeric fields of `record` as floats; NaN and infinities are kept."""
    values = {}
    for key, value in record.items():
        if key in _NOT_SCALARS or isinstance(value, bool):
            continue
        if isinstance(value, (int, float)):
            values[key] = float(value)
    return values


class EventWriter:
    """Writer of metrics records as TensorBoard scalars in `logdir`.

    `previous_records` are the records already in `metrics.jsonl`. They go first into a new file,
    and the older event files in `logdir` are deleted once that file is flushed.
    """

    def __init__(self, logdir: str, previous_records: Iterable[Mapping[str, Any]] = ()):
        os.makedirs(logdir, exist_ok=True)
        old_files = set(glob.glob(os.path.join(logdir, "events.out.tfevents.*")))
        self._writer = EventFileWriter(logdir)
        for record in previous_records:
            self.write(record, flush=False)
        self._writer.flush()
        # The new file has a name of its own (time stamp, host, process id and a counter).
        for path in old_files:
            os.remove(path)

    def write(self, record: Mapping[str, Any], *, flush: bool = True) -> None:
        """Write the numeric fields of `record` at `record["step"]`."""
        if "step" not in record:
            return
        values = [
            summary_pb2.Summary.Value(tag=key, simple_value=value)
            for key, value in sorted(scalar_values(record).items())
        ]
        if not values:
            return
        event = event_pb2.Event(
            wall_time=time.time(), step=int(record["step"]), summary=summary_pb2.Summary(value=values)
        )
        self._writer.add_event(event)
        if flush:
            self._writer.flush()

    def close(self) -> None:
        self._writer.close()
