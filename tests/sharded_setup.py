"""A tiny encoder, cheap views and run helpers shared by the sharding tests and their workers.

The real strong and weak views take most of the compile time of a train step: about 8 s of
10 s for a one-layer encoder, measured on 2 shared CPU cores. The device-count tests therefore
use `cheap_view`, a random crop and a random brightness factor. It still draws from each
example's own key, so a device that used the wrong keys would change the result.
"""

from __future__ import annotations

import functools
from typing import Any
from unittest import mock

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import multihost_utils

from ascl_jax import augment, sharding
from ascl_jax import data as data_lib
from ascl_jax import train_state as state_lib
from ascl_jax import train_step as step_lib
from ascl_jax.models.batch_norm import SplitBatchNorm
from experiments.configs import default

BATCH_SIZE = 16
QUEUE_SIZE = 64
IMAGE_SIZE = 16
PROJECTION_DIM = 8
NUM_STEPS = 3


def cheap_view(key: jax.Array, image: jax.Array, *, size: int, mean, std, **unused: Any):
    """Return a random size x size crop of `image` times a random factor in [0.5, 1.5]."""
    del unused
    offset_key, scale_key = jax.random.split(key)
    offset = jax.random.randint(offset_key, (2,), 0, image.shape[0] - size + 1)
    crop = jax.lax.dynamic_slice(image, (offset[0], offset[1], 0), (size, size, image.shape[2]))
    crop = crop * jax.random.uniform(scale_key, (), minval=0.5, maxval=1.5)
    return (crop - jnp.asarray(mean)) / jnp.asarray(std)


class TinyEncoder(nn.Module):
    """One strided convolution, split BatchNorm, ReLU, average pool and a linear projection."""

    bn_groups: int = 1
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, images: jax.Array, *, train: bool) -> tuple[jax.Array, jax.Array]:
        x = nn.Conv(4, (3, 3), strides=2)(images)
        x = SplitBatchNorm(num_groups=self.bn_groups, axis_name=self.bn_axis_name)(
            x, use_running_average=not train
        )
        features = jnp.mean(nn.relu(x), axis=(1, 2))
        return features, nn.Dense(PROJECTION_DIM)(features)


def tiny_config(**overrides: Any):
    config = default.get_config()
    config.batch_size = BATCH_SIZE
    config.queue_size = QUEUE_SIZE
    config.image_size = IMAGE_SIZE
    config.projection_dim = PROJECTION_DIM
    config.num_neighbors = 2
    for key, value in overrides.items():
        config[key] = value
    return config


def batches() -> list[tuple[np.ndarray, np.ndarray]]:
    """Return NUM_STEPS global batches of embedded Fashion-MNIST images and their labels."""
    source = data_lib.load_source("embedded", "train")
    return [source.get(np.arange(step * BATCH_SIZE, (step + 1) * BATCH_SIZE))
            for step in range(NUM_STEPS)]


def build(config, *, axis_name: str | None = None, max_traces: int | None = None):
    """Return (create_state, step_fn) for the tiny encoder with cheap views.

    `create_state()` builds the initial state; `step_fn` is unjitted. With `max_traces`, the
    step raises if it is traced more often than that.
    """
    model = TinyEncoder(bn_groups=config.bn_groups)
    schedule = state_lib.learning_rate_schedule(0.1, warmup_steps=0, total_steps=10)
    tx = state_lib.make_optimizer(schedule, momentum=0.9, weight_decay=5e-4)
    create_state = functools.partial(
        state_lib.create_train_state, jax.random.PRNGKey(0), model, image_shape=(28, 28, 1),
        tx=tx, queue_size=config.queue_size, projection_dim=PROJECTION_DIM,
    )
    mean, std = data_lib.DATASET_STATS["embedded"]
    with mock.patch.dict(augment.VIEWS, {"strong": cheap_view, "weak": cheap_view}):
        step_fn = step_lib.make_train_step(
            config, model, schedule, mean=mean, std=std, axis_name=axis_name
        )
    if max_traces is not None:
        # chex counts traces per function code, so steps built earlier would count too.
        chex.clear_trace_counter()
        step_fn = chex.assert_max_traces(step_fn, n=max_traces)
    return create_state, step_fn


def feature_fn():
    """Return the unjitted kNN feature function of the tiny encoder (eval view, 16 x 16)."""
    mean, std = data_lib.DATASET_STATS["embedded"]
    return step_lib.make_feature_fn(TinyEncoder(), image_size=IMAGE_SIZE, mean=mean, std=std)


def summarize(state, metrics) -> dict[str, np.ndarray]:
    """Collect what the tests compare: metrics, queue, parameters and BN statistics."""
    flat_params = jax.tree.leaves(state.params)
    flat_stats = jax.tree.leaves(state.batch_stats) + jax.tree.leaves(state.target_batch_stats)
    summary = {f"metric_{name}": np.asarray(value) for name, value in metrics.items()}
    summary.update(
        queue_keys=np.asarray(state.queue.keys),
        queue_labels=np.asarray(state.queue.labels),
        queue_pointer=np.asarray(state.queue.pointer),
        params=np.concatenate([np.ravel(leaf) for leaf in flat_params]),
        batch_stats=np.concatenate([np.ravel(leaf) for leaf in flat_stats]),
    )
    return summary


@functools.lru_cache(maxsize=1)
def initial_state():
    """Return the initial train state on the host; kind and BN groups do not change it."""
    create_state, _ = build(tiny_config())
    return jax.device_get(jax.jit(create_state)())


def run_one_device(config) -> list[dict[str, np.ndarray]]:
    """Train NUM_STEPS unsharded steps; return the summary after each step."""
    _, step_fn = build(config)
    state = initial_state()
    step = jax.jit(step_fn)
    summaries = []
    for images, labels in batches():
        state, metrics = step(state, images, labels)
        summaries.append(summarize(state, jax.device_get(metrics)))
    return summaries


def run_sharded(config, mesh, *, create_on_mesh: bool = False) -> list[dict[str, np.ndarray]]:
    """Train NUM_STEPS steps sharded over `mesh`; return the summary after each step.

    Each process passes its own rows of each global batch, so this also runs in every
    process of a multi-process run. The step raises if it is traced more than once. With
    `create_on_mesh` the state is built by `sharding.create_sharded_state`, else the host
    copy of `initial_state()` is placed with `sharding.put_state`.
    """
    create_state, step_fn = build(config, axis_name=sharding.DATA_AXIS, max_traces=1)
    if create_on_mesh:
        state = sharding.create_sharded_state(create_state, mesh)
    else:
        state = sharding.put_state(initial_state(), mesh)
    step = sharding.shard_train_step(step_fn, mesh, state)
    rows = sharding.process_batch_rows(mesh, config.batch_size)
    summaries = []
    for images, labels in batches():
        global_images, global_labels = sharding.global_batch(
            mesh, images[rows], labels[rows], batch_size=config.batch_size
        )
        state, metrics = step(state, global_images, global_labels)
        gathered = multihost_utils.process_allgather(
            (state.params, state.batch_stats, state.target_batch_stats, state.queue), tiled=True
        )
        params, batch_stats, target_batch_stats, queue = gathered
        full_state = state.replace(params=params, batch_stats=batch_stats,
                                   target_batch_stats=target_batch_stats, queue=queue)
        summaries.append(summarize(full_state, jax.device_get(metrics)))
    return summaries
