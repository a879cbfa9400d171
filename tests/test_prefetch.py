"""Tests of the device prefetch (pipeline.prefetch_to_device) and of experiments/bench_input."""

import threading

import jax
import numpy as np
import pytest

from ascl_jax import sharding
from ascl_jax.data import ArraySource, train_batches
from ascl_jax.data.pipeline import prefetch_to_device
from experiments import bench_input

BATCH_SIZE = 8


def _indexed_source(num_examples: int) -> ArraySource:
    """Return a source whose example i has label i and pixel value i % 256."""
    images = np.broadcast_to(
        (np.arange(num_examples) % 256).astype(np.uint8)[:, None, None, None],
        (num_examples, 2, 2, 1),
    ).copy()
    return ArraySource(images, np.arange(num_examples), [str(i) for i in range(num_examples)])


def _mesh_put():
    """Return the mesh over every (fake) device and the put that the training loop uses."""
    mesh = sharding.create_mesh()
    rows = sharding.process_batch_rows(mesh, BATCH_SIZE)

    def put(images, labels):
        return sharding.global_batch(mesh, images, labels, batch_size=BATCH_SIZE)

    return mesh, rows, put


@pytest.mark.parametrize("size", [0, 1, 2, 5])
def test_prefetch_keeps_batches_and_order(size):
    source = _indexed_source(30)
    mesh, rows, put = _mesh_put()
    expected = list(train_batches(source, batch_size=BATCH_SIZE, seed=4, start_step=2,
                                  num_steps=9, prefetch=0, rows=rows))
    host = train_batches(source, batch_size=BATCH_SIZE, seed=4, start_step=2, num_steps=9,
                         rows=rows)
    with prefetch_to_device(host, put, size) as placed:
        got = list(placed)
    assert [batch.step for batch in got] == [batch.step for batch in expected]
    assert [batch.epoch for batch in got] == [batch.epoch for batch in expected]
    for want, batch in zip(expected, got, strict=True):
        assert isinstance(batch.images, jax.Array)
        assert batch.images.sharding == sharding.batch_sharding(mesh)
        np.testing.assert_array_equal(np.asarray(batch.images), want.images)
        np.testing.assert_array_equal(np.asarray(batch.labels), want.labels)


def test_prefetch_places_ahead():
    calls = []

    def put(images, labels):
        calls.append(int(labels[0]))
        return images, labels

    source = _indexed_source(40)
    host = train_batches(source, batch_size=4, seed=0, num_steps=10, prefetch=0)
    placed = prefetch_to_device(host, put, size=2)
    first = next(placed)
    # The batch handed out and the two behind it are placed.
    assert len(calls) == 3
    assert calls[0] == int(first.labels[0])
    next(placed)
    assert len(calls) == 4
    placed.close()


def test_prefetch_close_stops_host_thread():
    before = threading.active_count()
    _, rows, put = _mesh_put()
    host = train_batches(_indexed_source(64), batch_size=BATCH_SIZE, seed=0, rows=rows)
    placed = prefetch_to_device(host, put, size=2)
    next(placed)
    placed.close()
    assert not host.thread_alive
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(placed)


def test_prefetch_consumer_exit_stops_thread():
    _, rows, put = _mesh_put()
    host = train_batches(_indexed_source(64), batch_size=BATCH_SIZE, seed=0, rows=rows)
    with prefetch_to_device(host, put) as placed:
        for batch in placed:
            if batch.step == 1:
                break
    assert not host.thread_alive

    host = train_batches(_indexed_source(64), batch_size=BATCH_SIZE, seed=0, rows=rows)
    with pytest.raises(RuntimeError, match="consumer failed"):
        with prefetch_to_device(host, put) as placed:
            next(placed)
            raise RuntimeError("consumer failed")
    assert not host.thread_alive


class _FailingSource(ArraySource):
    """Source whose get() raises on the fourth call."""

    def __init__(self) -> None:
        base = _indexed_source(64)
        super().__init__(base.images, base.labels, base.class_names)
        self.calls = 0

    def get(self, indices):
        self.calls += 1
        if self.calls == 4:
            raise OSError("disk read failed on call 4")
        return super().get(indices)


def test_prefetch_error_after_earlier_batches():
    _, rows, put = _mesh_put()
    host = train_batches(_FailingSource(), batch_size=BATCH_SIZE, seed=0, rows=rows)
    placed = prefetch_to_device(host, put, size=2)
    # The three batches read before the failure arrive first, then the error, then the end.
    assert [next(placed).step for _ in range(3)] == [0, 1, 2]
    with pytest.raises(OSError, match="disk read failed on call 4"):
        next(placed)
    with pytest.raises(StopIteration):
        next(placed)
    placed.close()
    assert not host.thread_alive


def test_prefetch_put_error_reaches_caller():
    _, _, put = _mesh_put()
    # Host batches of 4 rows do not match the 8 rows that global_batch expects.
    host = train_batches(_indexed_source(16), batch_size=4, seed=0, num_steps=2, prefetch=0)
    placed = prefetch_to_device(host, put, size=1)
    with pytest.raises(ValueError, match="process-local batch"):
        next(placed)


def test_prefetch_rejects_negative_size():
    with pytest.raises(ValueError, match="size must be non-negative; got -1"):
        prefetch_to_device(iter([]), lambda images, labels: (images, labels), size=-1)


def test_bench_input_tiny_embedded():
    options = bench_input.Options(
        datasets=("embedded",), repeats=1, cold_repeats=0, num_batches=2, step_repeats=0,
        num_devices=1, overrides=bench_input.TINY_OVERRIDES,
    )
    rows = bench_input.run(options)
    parts = [row.part for row in rows]
    assert parts[0] == "load the embedded .npz"
    assert "train_batches + prefetch_to_device" in parts
    assert any(part.startswith("strong_view + weak_view") for part in parts)
    assert all(row.images_per_second > 0 for row in rows)
    table = bench_input.format_table(rows)
    assert len(table.splitlines()) == len(rows) + 1
    assert "n/a" in table


def test_bench_input_rejects_unknown_dataset():
    with pytest.raises(ValueError, match="unknown mnist"):
        bench_input.run(bench_input.Options(datasets=("mnist",)))
    with pytest.raises(ValueError, match="missing CIFAR-10 folder"):
        bench_input.run(bench_input.Options(datasets=("cifar10",), cifar10_dir=""))
