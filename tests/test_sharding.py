"""Test data-parallel training: the sharded step gives the one-device result on any device count.

Runs on the 8 fake CPU devices of `tests/conftest.py`. The reference is the unsharded step of
`ascl_jax.train_step` on one device; the sharded runs use meshes over the first 1, 2, 4 or 8
devices. After each of 3 steps the loss, the metrics, the parameters, the BatchNorm statistics
and the queue (row for row, so also as a set) must match within float32 tolerance.
"""

import functools
import math
import os

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ascl_jax import losses, models, sharding
from ascl_jax import queue as queue_lib
from ascl_jax import train_state as state_lib
from ascl_jax import train_step as step_lib
from ascl_jax.data import pipeline
from ascl_jax.models.batch_norm import SplitBatchNorm, with_batch_norm_axis
from experiments.configs import imagenet
from tests import sharded_setup

# Every (kind, BN mode) runs on 4 devices, and "ascl" in both BN modes on 1, 2 and 8 devices.
# ASCL_JAX_FULL_SHARDING_TESTS=1 runs every kind and BN mode on every device count.
BN_MODES = {"plain_bn": 1, "split_bn": 4}
if os.environ.get("ASCL_JAX_FULL_SHARDING_TESTS") == "1":
    STEP_CASES = [(kind, mode, devices) for kind in losses.KINDS for mode in BN_MODES
                  for devices in (1, 2, 4, 8)]
else:
    STEP_CASES = [(kind, mode, 4) for kind in losses.KINDS for mode in BN_MODES]
    STEP_CASES += [("ascl", mode, devices) for mode in BN_MODES for devices in (1, 2, 8)]


def _mesh(num_devices: int) -> Mesh:
    return sharding.create_mesh(jax.devices()[:num_devices])


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------


def test_check_accepts_fitting_sizes():
    sharding.check_batch_and_queue(batch_size=256, queue_size=65536, num_devices=8, bn_groups=8)
    sharding.check_batch_and_queue(batch_size=16, queue_size=64, num_devices=16, bn_groups=1)


def test_check_rejects_batch_not_divisible_by_devices():
    with pytest.raises(ValueError, match=r"batch_size=100 for 8 devices.*96 or 104"):
        sharding.check_batch_and_queue(batch_size=100, queue_size=400, num_devices=8)


def test_check_rejects_batch_smaller_than_devices():
    with pytest.raises(ValueError, match=r"batch_size=4 for 8 devices.*8 or 16"):
        sharding.check_batch_and_queue(batch_size=4, queue_size=64, num_devices=8)


def test_check_rejects_queue_not_multiple_of_batch():
    with pytest.raises(ValueError, match=r"queue_size=100.*batch_size=32.*96 or 128"):
        sharding.check_batch_and_queue(batch_size=32, queue_size=100, num_devices=4)


def test_check_rejects_bn_groups_not_dividing_batch():
    with pytest.raises(ValueError, match=r"bn_groups=3 for the global batch_size=16"):
        sharding.check_batch_and_queue(batch_size=16, queue_size=64, num_devices=4, bn_groups=3)


# ---------------------------------------------------------------------------
# Mesh, shardings and input assembly.
# ---------------------------------------------------------------------------


def test_mesh_spans_requested_devices():
    mesh = _mesh(4)
    assert mesh.axis_names == (sharding.DATA_AXIS,)
    assert mesh.size == 4
    assert sharding.create_mesh().size == jax.device_count()


def test_describe_counts_processes_and_devices():
    summary = sharding.describe(_mesh(4))
    assert summary == {"process_index": 0, "process_count": 1, "local_devices": 8,
                       "devices": 4, "platform": "cpu"}


def test_state_specs_shard_only_the_queue():
    create_state, _ = sharded_setup.build(sharded_setup.tiny_config())
    specs = sharding.state_partition_specs(jax.eval_shape(create_state))
    assert specs.queue.keys == P(sharding.DATA_AXIS, None)
    assert specs.queue.labels == P(sharding.DATA_AXIS)
    assert specs.queue.pointer == P()
    others = jax.tree.leaves(specs.replace(queue=None), is_leaf=lambda node: isinstance(node, P))
    assert others and all(spec == P() for spec in others)


def test_sharded_state_holds_queue_rows_per_device():
    create_state, _ = sharded_setup.build(sharded_setup.tiny_config())
    state = sharding.create_sharded_state(create_state, _mesh(4))
    expected = jax.jit(create_state)()
    rows = sharded_setup.QUEUE_SIZE // 4
    for shard in state.queue.keys.addressable_shards:
        chex.assert_shape(shard.data, (rows, sharded_setup.PROJECTION_DIM))
        start = shard.index[0].start
        np.testing.assert_array_equal(shard.data, expected.queue.keys[start:start + rows])
    assert state.params["Dense_0"]["kernel"].sharding.is_fully_replicated


def test_process_batch_rows_single_process_is_everything():
    np.testing.assert_array_equal(sharding.process_batch_rows(_mesh(8), 32), np.arange(32))


def test_global_batch_places_rows_on_devices():
    mesh = _mesh(4)
    images = np.arange(8 * 2 * 2 * 1, dtype=np.uint8).reshape(8, 2, 2, 1)
    labels = np.arange(8, dtype=np.int32)
    global_images, global_labels = sharding.global_batch(mesh, images, labels, batch_size=8)
    assert global_images.sharding.spec == P(sharding.DATA_AXIS)
    for shard in global_labels.addressable_shards:
        start = shard.index[0].start
        np.testing.assert_array_equal(shard.data, labels[start:start + 2])
    np.testing.assert_array_equal(np.asarray(global_images), images)


def test_global_batch_rejects_wrong_row_count():
    with pytest.raises(ValueError, match="take 8 rows of the global batch of 8, but got 6"):
        sharding.global_batch(_mesh(4), np.zeros((6, 2, 2, 1), np.uint8),
                              np.zeros(6, np.int32), batch_size=8)


def test_shard_feature_fn_matches_unsharded():
    state = sharded_setup.initial_state()
    images, _ = sharded_setup.batches()[0]
    feature_fn = sharded_setup.feature_fn()
    mesh = _mesh(8)
    features = sharding.shard_feature_fn(feature_fn, mesh, state)(
        sharding.put_state(state, mesh), images
    )
    assert features.sharding.is_fully_replicated
    np.testing.assert_allclose(features, jax.jit(feature_fn)(state, images), rtol=1e-5,
                               atol=1e-6)


def test_shard_feature_fn_rejects_uneven_batch():
    state = sharded_setup.initial_state()
    mesh = _mesh(8)
    apply = sharding.shard_feature_fn(sharded_setup.feature_fn(), mesh, state)
    with pytest.raises(ValueError, match="batch of 12 images for 8 devices.*8 or 16"):
        apply(state, np.zeros((12, 28, 28, 1), np.uint8))


def test_initialize_distributed_without_request_does_nothing():
    assert not sharding.initialize_distributed(enabled=False, environ={})


def test_initialize_distributed_rejects_partial_environment():
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES=None"):
        sharding.initialize_distributed(environ={"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1"})


def test_initialize_distributed_rejects_non_integer_ids():
    environ = {"JAX_COORDINATOR_ADDRESS": "127.0.0.1:1", "JAX_NUM_PROCESSES": "two",
               "JAX_PROCESS_ID": "0"}
    with pytest.raises(ValueError, match="JAX_NUM_PROCESSES='two'"):
        sharding.initialize_distributed(environ=environ)


# ---------------------------------------------------------------------------
# SplitBatchNorm over a sharded batch.
# ---------------------------------------------------------------------------

# (global batch, groups, devices): whole groups per device, groups spanning devices, and
# groups that neither contain nor fit into a device shard (24 / 3 = 8 per group, 12 or 6 per
# device).
BN_CASES = [(16, 4, 4), (16, 8, 4), (16, 1, 4), (16, 2, 8), (24, 3, 2), (24, 3, 4), (24, 4, 8)]


@pytest.mark.parametrize("batch,groups,devices", BN_CASES)
def test_split_bn_sharded_matches_unsharded(batch, groups, devices):
    rng = np.random.default_rng(batch * groups + devices)
    x = rng.normal(2.0, 3.0, (batch, 3, 3, 5)).astype(np.float32)
    layer = SplitBatchNorm(num_groups=groups)
    variables = layer.init(jax.random.PRNGKey(0), x, use_running_average=False)
    variables = jax.tree.map(lambda v: v + 0.3, variables)
    sharded_layer = layer.clone(axis_name="batch")

    def loss_and_stats(apply_layer, variables, x):
        def loss(params, x):
            y, updates = apply_layer.apply(
                {"params": params, "batch_stats": variables["batch_stats"]}, x,
                use_running_average=False, mutable=["batch_stats"],
            )
            return jnp.sum(jnp.sin(y)), (y, updates["batch_stats"])

        (_, (y, stats)), grads = jax.value_and_grad(loss, argnums=(0, 1), has_aux=True)(
            variables["params"], x
        )
        return y, stats, grads

    expected_y, expected_stats, expected_grads = jax.jit(
        functools.partial(loss_and_stats, layer)
    )(variables, x)

    def per_device(variables, x_shard):
        y, stats, (param_grads, x_grads) = loss_and_stats(sharded_layer, variables, x_shard)
        return y, stats, param_grads, x_grads

    mesh = Mesh(np.array(jax.devices()[:devices]), ("batch",))
    mapped = jax.jit(jax.shard_map(
        per_device, mesh=mesh, in_specs=(P(), P("batch")),
        out_specs=(P("batch"), P(), P(), P("batch")),
    ))
    y, stats, param_grads, x_grads = mapped(variables, x)
    np.testing.assert_allclose(y, expected_y, rtol=1e-5, atol=1e-5)
    chex.assert_trees_all_close(stats, expected_stats, rtol=1e-5, atol=1e-6)
    chex.assert_trees_all_close(param_grads, expected_grads[0], rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(x_grads, expected_grads[1], rtol=1e-4, atol=1e-5)


def test_with_batch_norm_axis_reaches_resnet_backbone():
    model = models.create_encoder("resnet10", width=4, hidden_dim=8, projection_dim=4)
    sharded = with_batch_norm_axis(model, "data")
    assert sharded.backbone.bn_axis_name == "data"
    assert model.backbone.bn_axis_name is None


def test_with_batch_norm_axis_rejects_model_without_field():
    with pytest.raises(ValueError, match="Projector has no 'bn_axis_name' field"):
        with_batch_norm_axis(models.Projector(), "data")


# ---------------------------------------------------------------------------
# Queue.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("devices", [2, 4, 8])
def test_sharded_enqueue_matches_unsharded(devices):
    queue_size, batch_size, dim = 64, 16, 3
    queue = queue_lib.init_queue(jax.random.PRNGKey(1), queue_size, dim)
    mesh = _mesh(devices)
    queue_specs = queue_lib.Queue(keys=P("data", None), labels=P("data"), pointer=P())
    mapped = jax.jit(jax.shard_map(
        functools.partial(queue_lib.enqueue, axis_name="data"), mesh=mesh,
        in_specs=(queue_specs, P(), P()), out_specs=queue_specs,
    ))
    expected = queue
    for step in range(queue_size // batch_size + 1):
        keys = jnp.full((batch_size, dim), step + 1.0) + jnp.arange(batch_size)[:, None]
        labels = jnp.arange(batch_size, dtype=jnp.int32) + 100 * step
        queue = mapped(queue, keys, labels)
        expected = queue_lib.enqueue(expected, keys, labels)
        np.testing.assert_array_equal(queue.keys, expected.keys)
        np.testing.assert_array_equal(queue.labels, expected.labels)
        assert int(queue.pointer) == int(expected.pointer)


# ---------------------------------------------------------------------------
# The train step on 1, 2, 4 and 8 devices.
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def _one_device_run(kind: str, bn_groups: int, shuffle_bn: bool):
    config = sharded_setup.tiny_config(kind=kind, bn_groups=bn_groups, shuffle_bn=shuffle_bn)
    return sharded_setup.run_one_device(config)


def assert_same_run(actual, expected, label: str) -> None:
    """Check two lists of per-step summaries for equality within float32 tolerance.

    The queue is compared row for row, and also as a set of rows rounded to 4 decimals,
    which is what data-parallel MoCo needs at the least.
    """
    for step, (got, want) in enumerate(zip(actual, expected, strict=True)):
        where = f"{label}, step {step + 1}"
        for name in want:
            if name.startswith("metric_"):
                np.testing.assert_allclose(got[name], want[name], rtol=1e-4, atol=1e-6,
                                           err_msg=f"{name} ({where})")
        np.testing.assert_allclose(got["queue_keys"], want["queue_keys"], atol=1e-5,
                                   err_msg=f"queue keys ({where})")
        got_rows = sorted(map(tuple, np.round(got["queue_keys"], 4)))
        want_rows = sorted(map(tuple, np.round(want["queue_keys"], 4)))
        assert got_rows == want_rows, f"queue rows as a set ({where})"
        np.testing.assert_array_equal(got["queue_labels"], want["queue_labels"],
                                      err_msg=f"queue labels ({where})")
        assert int(got["queue_pointer"]) == int(want["queue_pointer"]), where
        np.testing.assert_allclose(got["params"], want["params"], rtol=1e-4, atol=1e-5,
                                   err_msg=f"parameters ({where})")
        np.testing.assert_allclose(got["batch_stats"], want["batch_stats"], rtol=1e-4,
                                   atol=1e-5, err_msg=f"BN statistics ({where})")


@pytest.mark.parametrize("kind,bn_mode,devices", STEP_CASES)
def test_sharded_step_matches_one_device(kind, bn_mode, devices):
    bn_groups = BN_MODES[bn_mode]
    expected = _one_device_run(kind, bn_groups, True)
    config = sharded_setup.tiny_config(kind=kind, bn_groups=bn_groups)
    actual = sharded_setup.run_sharded(config, _mesh(devices))
    assert_same_run(actual, expected, f"{kind}, {bn_mode}, {devices} devices")


def test_sharded_step_without_shuffle_bn_matches_one_device():
    expected = _one_device_run("ascl", 4, False)
    config = sharded_setup.tiny_config(kind="ascl", bn_groups=4, shuffle_bn=False)
    actual = sharded_setup.run_sharded(config, _mesh(4))
    assert_same_run(actual, expected, "ascl, split_bn, no shuffle, 4 devices")



# ---------------------------------------------------------------------------
# Input pipeline: each process loads its own rows.
# ---------------------------------------------------------------------------


def test_train_batches_with_rows_loads_those_rows():
    source = sharded_setup.data_lib.load_source("embedded", "train")
    rows = np.array([4, 5, 6, 7])
    full = pipeline.train_batches(source, batch_size=8, seed=3, num_steps=2, prefetch=0)
    part = pipeline.train_batches(source, batch_size=8, seed=3, num_steps=2, prefetch=0,
                                  rows=rows)
    for whole, piece in zip(full, part, strict=True):
        assert piece.step == whole.step
        np.testing.assert_array_equal(piece.images, whole.images[rows])
        np.testing.assert_array_equal(piece.labels, whole.labels[rows])


@pytest.mark.parametrize("rows", [[8], [-1], [1, 1], []])
def test_train_batches_rejects_invalid_rows(rows):
    source = sharded_setup.data_lib.load_source("embedded", "train")
    with pytest.raises(ValueError, match="rows"):
        pipeline.train_batches(source, batch_size=8, seed=0, prefetch=0, rows=np.array(rows))


# ---------------------------------------------------------------------------
# ImageNet recipe at a tiny image size.
# ---------------------------------------------------------------------------


def test_imagenet_resnet50_step_runs_sharded():
    """ResNet-50 with the ImageNet recipe's queue (65536 x 128) runs one step on 8 devices."""
    config = imagenet.get_config()
    config.image_size = 32
    config.width = 4
    config.hidden_dim = 32
    config.batch_size = 16
    num_devices = jax.device_count()
    sharding.check_batch_and_queue(
        batch_size=config.batch_size, queue_size=config.queue_size, num_devices=num_devices,
        bn_groups=config.bn_groups,
    )
    assert (config.queue_size, config.ema_momentum, config.num_neighbors) == (65536, 0.999, 1)

    model = models.create_encoder(
        config.model, width=config.width, stem=config.stem, bn_groups=config.bn_groups,
        hidden_dim=config.hidden_dim, projection_dim=config.projection_dim,
    )
    schedule = state_lib.learning_rate_schedule(config.learning_rate, warmup_steps=0,
                                                total_steps=10)
    tx = state_lib.make_optimizer(schedule, momentum=0.9, weight_decay=config.weight_decay)
    mesh = sharding.create_mesh()
    create_state = functools.partial(
        state_lib.create_train_state, jax.random.PRNGKey(0), model, image_shape=(32, 32, 3),
        tx=tx, queue_size=config.queue_size, projection_dim=config.projection_dim,
    )
    state = sharding.create_sharded_state(create_state, mesh)
    step_fn = step_lib.make_train_step(config, model, schedule, mean=config.mean, std=config.std,
                                       axis_name=sharding.DATA_AXIS)
    step = sharding.shard_train_step(step_fn, mesh, state)

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (config.batch_size, 36, 36, 3), dtype=np.uint8)
    labels = rng.integers(0, 1000, config.batch_size).astype(np.int32)
    state, metrics = step(state, *sharding.global_batch(mesh, images, labels,
                                                        batch_size=config.batch_size))
    metrics = jax.device_get(metrics)
    for name, value in metrics.items():
        assert math.isfinite(float(value)), f"{name} = {value}"
    assert int(state.queue.pointer) == config.batch_size
    chex.assert_shape(state.queue.keys, (65536, 128))
    shard_rows = {shard.data.shape[0] for shard in state.queue.keys.addressable_shards}
    assert shard_rows == {65536 // num_devices}
