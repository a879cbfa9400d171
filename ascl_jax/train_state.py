"""The training state of ASCL as one pytree, and the optimiser of the reference recipe.

Everything a resumed run needs lives in `TrainState`: online and EMA target parameters, the batch
statistics of both networks, the optimiser state, the queue with its labels and pointer, the step
and the base PRNG key. The per-step randomness is derived from (key, step), so no Python-side state
is needed to continue a run exactly.
"""

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax
from flax.training import train_state

from ascl_jax import queue as queue_lib


class TrainState(train_state.TrainState):
    """Flax TrainState extended with the target network, the BN statistics and the queue.

    Attributes:
        batch_stats: BatchNorm running statistics of the online encoder.
        target_params: EMA copy of `params`, never trained by gradient.
        target_batch_stats: BatchNorm running statistics of the target encoder, updated by its own
            forward passes (the EMA covers parameters only).
        queue: the ring buffer of target embeddings, their dataset labels and the write pointer.
        rng: base PRNG key; step t uses `jax.random.fold_in(rng, t)`.
    """

    batch_stats: Any
    target_params: Any
    target_batch_stats: Any
    queue: queue_lib.Queue
    rng: jax.Array


def learning_rate_schedule(
    learning_rate: float, *, warmup_steps: int, total_steps: int
) -> optax.Schedule:
    """Build the per-step schedule: linear warm-up from 0, then cosine decay to 0 at `total_steps`."""
    warmup_steps = min(warmup_steps, total_steps)
    if warmup_steps == total_steps:
        # A run no longer than its warm-up only ramps up.
        return optax.linear_schedule(0.0, learning_rate, transition_steps=max(total_steps, 1))
    if warmup_steps == 0:
        return optax.cosine_decay_schedule(learning_rate, decay_steps=total_steps)
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=learning_rate,
        warmup_steps=warmup_steps,
        decay_steps=total_steps,
        end_value=0.0,
    )


def make_optimizer(
    schedule: optax.Schedule, *, momentum: float, weight_decay: float
) -> optax.GradientTransformation:
    """Build SGD with momentum and coupled weight decay (decay added to the gradient).

    This is PyTorch's `SGD(momentum=m, weight_decay=wd)`: g <- g + wd * p, buf <- m * buf + g,
    p <- p - lr * buf, applied to every online parameter, BatchNorm scales and biases included.
    """
    return optax.chain(
        optax.add_decayed_weights(weight_decay),
        optax.sgd(schedule, momentum=momentum),
    )


def create_train_state(
    rng: jax.Array,
    model: nn.Module,
    *,
    image_shape: tuple[int, int, int],
    tx: optax.GradientTransformation,
    queue_size: int,
    projection_dim: int,
) -> TrainState:
    """Initialise the online network, copy it into the target network and fill a random queue.

    Args:
        rng: PRNG key; split into the initialisation, queue and training keys.
        model: the encoder; `model.apply(variables, images, train=...)` returns
            `(features, projection)`.
        image_shape: (height, width, channels) of the network's input.
        tx: the optimiser.
        queue_size: number of rows n of the queue.
        projection_dim: dimension D of the projection, the width of the queue.
    """
    init_key, queue_key, train_key = jax.random.split(rng, 3)
    dummy = jnp.zeros((2, *image_shape), jnp.float32)
    variables = model.init(init_key, dummy, train=False)
    params = variables["params"]
    batch_stats = variables.get("batch_stats", {})

    # The target starts as an exact copy of the online network.
    copy = lambda tree: jax.tree.map(jnp.array, tree)  # noqa: E731
    return TrainState.create(
        apply_fn=model.apply,
        params=params,
        tx=tx,
        batch_stats=batch_stats,
        target_params=copy(params),
        target_batch_stats=copy(batch_stats),
        queue=queue_lib.init_queue(queue_key, queue_size, projection_dim),
        rng=train_key,
    )
