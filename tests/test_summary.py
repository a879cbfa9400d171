"""TensorBoard event files mirror metrics.jsonl, also across a resume."""

import glob
import os

from tensorboard.backend.event_processing import event_accumulator

from ascl_jax import summary
from ascl_jax import train


def _scalars(logdir):
    accumulator = event_accumulator.EventAccumulator(logdir)
    accumulator.Reload()
    return {
        tag: [(event.step, event.value) for event in accumulator.Scalars(tag)]
        for tag in accumulator.Tags()["scalars"]
    }


def test_scalar_values_keeps_numbers_only():
    record = {"step": 3, "loss": 2.5, "kind": "ascl", "finished": True, "count": 4}
    assert summary.scalar_values(record) == {"loss": 2.5, "count": 4.0}


def test_metric_writer_writes_events(tmp_path):
    writer = train.MetricWriter(str(tmp_path))
    writer.write({"step": 0, "epoch": 0.0, "knn_top1": 0.25})
    writer.write({"step": 10, "epoch": 0.5, "loss": 3.5, "confidence": 0.75})
    writer.close()
    scalars = _scalars(os.path.join(tmp_path, summary.TENSORBOARD_DIR))
    assert scalars["knn_top1"] == [(0, 0.25)]
    assert scalars["loss"] == [(10, 3.5)]
    assert scalars["confidence"] == [(10, 0.75)]
    assert scalars["epoch"] == [(0, 0.0), (10, 0.5)]


def test_resume_rewrites_one_event_file(tmp_path):
    logdir = os.path.join(tmp_path, summary.TENSORBOARD_DIR)
    first = summary.EventWriter(logdir)
    for step in (10, 20, 30):
        first.write({"step": step, "loss": float(step)})
    first.close()
    # The resumed process keeps the records up to its checkpoint's step, 20, and goes on.
    second = summary.EventWriter(logdir, [{"step": 10, "loss": 10.0}, {"step": 20, "loss": 20.0}])
    second.write({"step": 30, "loss": 29.0})
    second.close()
    assert len(glob.glob(os.path.join(logdir, "events.out.tfevents.*"))) == 1
    assert _scalars(logdir)["loss"] == [(10, 10.0), (20, 20.0), (30, 29.0)]


def test_disabled_writer_creates_nothing(tmp_path):
    writer = train.MetricWriter(str(tmp_path), enabled=False)
    writer.write({"step": 0, "loss": 1.0})
    writer.close()
    assert os.listdir(tmp_path) == []
