"""Tests of the jitted ASCL train step on real images from the embedded dataset."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascl_jax import data as data_lib
from ascl_jax import losses, models
from ascl_jax import queue as queue_lib
from ascl_jax import sharding
from ascl_jax import train_state as state_lib
from ascl_jax import train_step as step_lib
from experiments.configs import default

BATCH_SIZE = 16
QUEUE_SIZE = 64


def tiny_config(**overrides):
    config = default.get_config()
    config.model = "resnet10"
    config.width = 4
    config.hidden_dim = 16
    config.projection_dim = 8
    config.bn_groups = 4
    config.batch_size = BATCH_SIZE
    config.queue_size = QUEUE_SIZE
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.fixture(scope="module")
def images_and_labels():
    source = data_lib.load_source("embedded", "train")
    images, labels = source.get(np.arange(0, 10 * BATCH_SIZE, 10))
    return jnp.asarray(images), jnp.asarray(labels)


def build(config):
    model = models.create_encoder(
        config.model, width=config.width, stem=config.stem, bn_groups=config.bn_groups,
        hidden_dim=config.hidden_dim, projection_dim=config.projection_dim,
    )
    # No warm-up, so the first step already moves the parameters.
    schedule = state_lib.learning_rate_schedule(0.1, warmup_steps=0, total_steps=10)
    tx = state_lib.make_optimizer(schedule, momentum=0.9, weight_decay=5e-4)
    state = state_lib.create_train_state(
        jax.random.PRNGKey(0), model, image_shape=(28, 28, 1), tx=tx,
        queue_size=config.queue_size, projection_dim=config.projection_dim,
    )
    mean, std = data_lib.DATASET_STATS["embedded"]
    step = step_lib.make_train_step(config, model, schedule, mean=mean, std=std)
    return model, state, step


def test_target_starts_as_copy_of_online():
    _, state, _ = build(tiny_config())
    chex.assert_trees_all_equal(state.params, state.target_params)
    chex.assert_trees_all_equal(state.batch_stats, state.target_batch_stats)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_every_kind_trains_and_stays_finite(kind, images_and_labels):
    images, labels = images_and_labels
    _, state, step = build(tiny_config(kind=kind, num_neighbors=2))
    step = jax.jit(step)
    for _ in range(3):
        state, metrics = step(state, images, labels)
    metrics = jax.device_get(metrics)
    for name, value in metrics.items():
        assert np.isfinite(value), f"{name} = {value} for kind {kind}"
    assert int(state.step) == 3
    assert 0.0 <= metrics["confidence"] <= 1.0
    assert 0.0 < metrics["positive_weight"] <= 1.0
    assert 0.0 <= metrics["same_class_rate"] <= 1.0 - metrics["positive_weight"] + 1e-6
    assert 0.0 <= metrics["neighbor_same_class"] <= 1.0
    if kind == "normal":
        assert metrics["positive_weight"] == pytest.approx(1.0)


def test_step_updates_state_in_method_order(images_and_labels):
    images, labels = images_and_labels
    config = tiny_config()
    _, state, step = build(config)
    # Make the online network differ from the target so the EMA is visible.
    state = state.replace(params=jax.tree.map(lambda p: p * 1.5 + 0.01, state.params))
    new_state, _ = jax.jit(step)(state, images, labels)

    expected_target = jax.tree.map(
        lambda t, q: config.ema_momentum * t + (1 - config.ema_momentum) * q,
        state.target_params, state.params,
    )
    chex.assert_trees_all_close(new_state.target_params, expected_target, rtol=1e-6, atol=1e-7)
    changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), state.params, new_state.params)
    assert all(jax.tree.leaves(changed)), "some online parameters did not move"
    changed_stats = jax.tree.map(
        lambda a, b: bool(jnp.any(a != b)), state.target_batch_stats, new_state.target_batch_stats
    )
    assert all(jax.tree.leaves(changed_stats)), "target BN statistics were not updated"


def test_enqueue_writes_unit_keys_and_labels(images_and_labels):
    images, labels = images_and_labels
    _, state, step = build(tiny_config())
    step = jax.jit(step)
    old_keys = np.asarray(state.queue.keys)
    state, _ = step(state, images, labels)
    queue = jax.device_get(state.queue)
    assert int(queue.pointer) == BATCH_SIZE
    np.testing.assert_array_equal(queue.labels[:BATCH_SIZE], np.asarray(labels))
    assert np.all(queue.labels[BATCH_SIZE:] == queue_lib.EMPTY_LABEL)
    np.testing.assert_allclose(np.linalg.norm(queue.keys[:BATCH_SIZE], axis=1), 1.0, rtol=1e-5)
    np.testing.assert_array_equal(queue.keys[BATCH_SIZE:], old_keys[BATCH_SIZE:])
    assert not np.allclose(queue.keys[:BATCH_SIZE], old_keys[:BATCH_SIZE])


def test_queue_wraps_after_full_cycle(images_and_labels):
    images, labels = images_and_labels
    _, state, step = build(tiny_config())
    step = jax.jit(step)
    for _ in range(QUEUE_SIZE // BATCH_SIZE):
        state, _ = step(state, images, labels)
    assert int(state.queue.pointer) == 0
    assert np.all(np.asarray(state.queue.labels) >= 0)


def test_same_class_rate_positive_once_queue_has_labels(images_and_labels):
    images, labels = images_and_labels
    _, state, step = build(tiny_config(kind="hard", num_neighbors=4))
    step = jax.jit(step)
    state, first = step(state, images, labels)
    # The queue contained only random vectors, which carry no class.
    assert float(first["same_class_rate"]) == 0.0
    assert float(first["neighbor_same_class"]) == 0.0
    state, second = step(state, images, labels)
    assert float(second["same_class_rate"]) > 0.0
    # The queue now contains labelled keys of this batch, so some nearest entries share the class.
    assert float(second["neighbor_same_class"]) > 0.0


def test_step_is_deterministic(images_and_labels):
    images, labels = images_and_labels
    _, state, step = build(tiny_config())
    step = jax.jit(step)
    _, first = step(state, images, labels)
    _, second = step(state, images, labels)
    chex.assert_trees_all_equal(first, second)


def test_step_compiles_once(images_and_labels):
    images, labels = images_and_labels
    _, state, step = build(tiny_config())
    step = jax.jit(chex.assert_max_traces(step, n=1))
    for _ in range(3):
        state, _ = step(state, images, labels)


@pytest.mark.parametrize("shuffle_bn,target_view", [(False, "weak"), (True, "strong")])
def test_step_options_run(shuffle_bn, target_view, images_and_labels):
    images, labels = images_and_labels
    _, state, step = build(tiny_config(shuffle_bn=shuffle_bn, target_view=target_view))
    state, metrics = jax.jit(step)(state, images, labels)
    assert np.isfinite(float(metrics["loss"]))


def test_feature_fn_uses_running_statistics(images_and_labels):
    images, _ = images_and_labels
    config = tiny_config()
    model, state, _ = build(config)
    mean, std = data_lib.DATASET_STATS["embedded"]
    features = jax.jit(step_lib.make_feature_fn(model, image_size=28, mean=mean, std=std))
    full = np.asarray(features(state, images))
    half = np.asarray(features(state, images[: BATCH_SIZE // 2]))
    chex.assert_shape(full, (BATCH_SIZE, models.feature_dim("resnet10", 4)))
    np.testing.assert_allclose(np.linalg.norm(full, axis=1), 1.0, rtol=1e-5)
    # Eval-mode BN makes each example's features independent of the rest of the batch.
    np.testing.assert_allclose(full[: BATCH_SIZE // 2], half, rtol=1e-4, atol=1e-5)


def test_sharded_step_matches_one_device(images_and_labels):
    """ResNet-10 with the real views, sharded over 4 devices, gives the one-device result."""
    images, labels = images_and_labels
    config = tiny_config(kind="ascl", num_neighbors=2)
    model, state, step = build(config)
    host_state = jax.device_get(state)
    expected = []
    step = jax.jit(step)
    for _ in range(2):
        state, metrics = step(state, images, labels)
        expected.append((jax.device_get(metrics), jax.device_get(state)))

    mesh = sharding.create_mesh(jax.devices()[:4])
    schedule = state_lib.learning_rate_schedule(0.1, warmup_steps=0, total_steps=10)
    mean, std = data_lib.DATASET_STATS["embedded"]
    step_fn = step_lib.make_train_step(config, model, schedule, mean=mean, std=std,
                                       axis_name=sharding.DATA_AXIS)
    state = sharding.put_state(host_state, mesh)
    sharded_step = sharding.shard_train_step(step_fn, mesh, state)
    batch = sharding.global_batch(mesh, np.asarray(images), np.asarray(labels),
                                  batch_size=BATCH_SIZE)
    for expected_metrics, expected_state in expected:
        state, metrics = sharded_step(state, *batch)
        chex.assert_trees_all_close(jax.device_get(metrics), expected_metrics,
                                    rtol=1e-4, atol=1e-6)
        chex.assert_trees_all_close(jax.device_get(state.params), expected_state.params,
                                    rtol=1e-4, atol=1e-5)
        np.testing.assert_allclose(state.queue.keys, expected_state.queue.keys, atol=1e-5)
        np.testing.assert_array_equal(state.queue.labels, expected_state.queue.labels)
