"""Tests of the MoCo ring buffer."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascl_jax import queue as queue_lib


def test_init_rows_are_unit_vectors():
    queue = queue_lib.init_queue(jax.random.PRNGKey(0), 64, 16)
    chex.assert_shape(queue.keys, (64, 16))
    np.testing.assert_allclose(np.linalg.norm(queue.keys, axis=1), 1.0, rtol=1e-5)
    assert np.all(np.asarray(queue.labels) == queue_lib.EMPTY_LABEL)
    assert int(queue.pointer) == 0


def test_init_directions_are_spread():
    queue = queue_lib.init_queue(jax.random.PRNGKey(1), 4096, 8)
    mean_direction = np.asarray(queue.keys).mean(axis=0)
    assert np.linalg.norm(mean_direction) < 0.05


@pytest.mark.parametrize("jit", [False, True])
def test_enqueue_matches_reference_ring_buffer(jit):
    queue_size, batch_size, dim = 12, 4, 3
    queue = queue_lib.init_queue(jax.random.PRNGKey(0), queue_size, dim)
    reference_keys = np.asarray(queue.keys).copy()
    reference_labels = np.full(queue_size, -1)
    reference_pointer = 0
    enqueue = jax.jit(queue_lib.enqueue) if jit else queue_lib.enqueue
    rng = np.random.default_rng(0)
    for _ in range(7):
        keys = rng.normal(size=(batch_size, dim)).astype(np.float32)
        labels = rng.integers(0, 10, size=batch_size)
        queue = enqueue(queue, jnp.asarray(keys), jnp.asarray(labels))
        rows = np.arange(reference_pointer, reference_pointer + batch_size) % queue_size
        reference_keys[rows] = keys
        reference_labels[rows] = labels
        reference_pointer = (reference_pointer + batch_size) % queue_size
        np.testing.assert_array_equal(np.asarray(queue.keys), reference_keys)
        np.testing.assert_array_equal(np.asarray(queue.labels), reference_labels)
        assert int(queue.pointer) == reference_pointer


def test_enqueue_replaces_oldest_keys_first():
    queue = queue_lib.init_queue(jax.random.PRNGKey(0), 8, 2)
    for value in range(4):
        keys = jnp.full((2, 2), float(value))
        queue = queue_lib.enqueue(queue, keys, jnp.full((2,), value))
    np.testing.assert_array_equal(np.asarray(queue.labels), [0, 0, 1, 1, 2, 2, 3, 3])
    queue = queue_lib.enqueue(queue, jnp.full((2, 2), 9.0), jnp.full((2,), 9))
    np.testing.assert_array_equal(np.asarray(queue.labels), [9, 9, 1, 1, 2, 2, 3, 3])


def test_enqueue_blocks_gradient():
    queue = queue_lib.init_queue(jax.random.PRNGKey(0), 4, 2)

    def total(keys):
        return jnp.sum(queue_lib.enqueue(queue, keys, jnp.zeros((2,), jnp.int32)).keys)

    np.testing.assert_array_equal(jax.grad(total)(jnp.ones((2, 2))), 0.0)


def test_check_queue_size_names_both_numbers():
    with pytest.raises(ValueError, match=r"queue_size=1000.*batch_size=256.*768 or 1024"):
        queue_lib.check_queue_size(1000, 256)
    with pytest.raises(ValueError, match=r"queue_size=100.*batch_size=256.*256"):
        queue_lib.check_queue_size(100, 256)
    queue_lib.check_queue_size(4096, 256)


def test_enqueue_rejects_indivisible_batch():
    queue = queue_lib.init_queue(jax.random.PRNGKey(0), 10, 2)
    with pytest.raises(ValueError, match="batch of 4 keys into a queue of 10 rows"):
        queue_lib.enqueue(queue, jnp.ones((4, 2)), jnp.zeros((4,), jnp.int32))
