"""One ASCL train step, in the order of the method.

1. EMA update of the target parameters from the online parameters.
2. Strong view through the online network, weak view through the target network (with the
   target batch shuffled around the target encoder, so BatchNorm cannot leak the positive).
3. Soft labels from the queue as it was before this step.
4. Soft InfoNCE loss and an SGD update of the online parameters.
5. Enqueue the target embeddings of the batch.

The step is a pure function of (state, images, labels); `make_train_step` closes over the static
settings and the caller wraps the result in `jax.jit`.
"""

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from ascl_jax import augment
from ascl_jax import losses
from ascl_jax import queue as queue_lib
from ascl_jax.train_state import TrainState

Metrics = dict[str, jax.Array]


def l2_normalize(x: jax.Array, eps: float = 1e-12) -> jax.Array:
    """Scale each row of `x` to unit L2 norm, computed in float32."""
    x = x.astype(jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=-1, keepdims=True), eps * eps))


def ema_update(target_params: Any, online_params: Any, momentum: float) -> Any:
    """Return theta_t <- m * theta_t + (1 - m) * theta_q for every leaf."""
    return jax.tree.map(
        lambda t, q: momentum * t + (1.0 - momentum) * q, target_params, online_params
    )


def make_train_step(
    config: Mapping[str, Any],
    model: nn.Module,
    schedule: optax.Schedule,
    *,
    mean: Sequence[float],
    std: Sequence[float],
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """Build the train step for `config`; the result is to be wrapped in `jax.jit`.

    Args:
        config: run configuration (kind, num_neighbors, tau, tau_prime, ema_momentum,
            image_size, target_view, shuffle_bn).
        model: the encoder, returning `(features, projection)`.
        schedule: learning-rate schedule, evaluated at the step for the metrics.
        mean, std: per-channel normalisation of the input images.

    The returned function maps `(state, images, labels)`, with uint8 images [B, H, W, C] and
    int32 dataset labels [B] (used only for the same-class diagnostic), to
    `(new_state, metrics)`.
    """
    kind = config["kind"]
    num_neighbors = config["num_neighbors"]
    tau = config["tau"]
    tau_prime = config["tau_prime"]
    ema_momentum = config["ema_momentum"]
    shuffle_bn = config.get("shuffle_bn", True)
    view_kwargs = dict(size=config["image_size"], mean=tuple(mean), std=tuple(std))
    query_view = augment.VIEWS["strong"]
    target_view = augment.VIEWS[config.get("target_view", "weak")]

    def encode(params, batch_stats, images):
        (_, projection), updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        return l2_normalize(projection), updates["batch_stats"]

    def train_step(
        state: TrainState, images: jax.Array, labels: jax.Array
    ) -> tuple[TrainState, Metrics]:
        step_key = jax.random.fold_in(state.rng, state.step)
        query_key, target_key, shuffle_key = jax.random.split(step_key, 3)
        batch_size = images.shape[0]

        # 1. EMA update of the target network (parameters only).
        target_params = ema_update(state.target_params, state.params, ema_momentum)

        # 2. Both views; the target side runs on a shuffled batch and is unshuffled after.
        query_images = augment.augment_batch(query_key, images, query_view, **view_kwargs)
        target_images = augment.augment_batch(target_key, images, target_view, **view_kwargs)
        if shuffle_bn:
            order = jax.random.permutation(shuffle_key, batch_size)
            target_images = target_images[order]
        target, target_batch_stats = encode(target_params, state.target_batch_stats, target_images)
        if shuffle_bn:
            target = target[jnp.argsort(order)]
        target = jax.lax.stop_gradient(target)

        # 3. Soft labels against the queue as it was before this step.
        bank = state.queue.keys
        soft_labels, confidence = losses.soft_labels(
            target, bank, kind=kind, num_neighbors=num_neighbors, tau_prime=tau_prime
        )

        # 4. Loss and update of the online network; gradients flow only through the query.
        def loss_fn(params):
            query, batch_stats = encode(params, state.batch_stats, query_images)
            loss = losses.soft_infonce(query, target, bank, soft_labels, tau=tau)
            return loss, batch_stats

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(
            grads=grads,
            batch_stats=batch_stats,
            target_params=target_params,
            target_batch_stats=target_batch_stats,
            # 5. Enqueue this step's target embeddings.
            queue=queue_lib.enqueue(state.queue, target, labels),
        )

        diagnostics = losses.label_diagnostics(soft_labels, labels, state.queue.labels)
        # Class agreement of each sample's nearest queue entry, a kind-independent measure of how
        # often the entry that ASCL weights most is a true positive (chance is about 1 / classes).
        nearest = jnp.argmax(losses.bank_similarities(target, bank), axis=-1)
        nearest_same_class = (state.queue.labels[nearest] == labels) & (labels >= 0)
        metrics = {
            "loss": loss,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "confidence": jnp.mean(confidence),
            "positive_weight": diagnostics["positive_weight"],
            "same_class_rate": diagnostics["same_class_rate"],
            "neighbor_same_class": jnp.mean(nearest_same_class.astype(jnp.float32)),
            "grad_norm": optax.tree.norm(grads),
            "param_norm": optax.tree.norm(new_state.params),
        }
        return new_state, metrics

    return train_step


def make_feature_fn(
    model: nn.Module, *, image_size: int, mean: Sequence[float], std: Sequence[float]
) -> Callable[[TrainState, jax.Array], jax.Array]:
    """Build `features(state, images)`: L2-normalised backbone features of the online encoder.

    The encoder runs in eval mode (running BatchNorm statistics, nothing updated) on the
    test-time view of the uint8 images. The caller wraps the result in `jax.jit`.
    """

    def features(state: TrainState, images: jax.Array) -> jax.Array:
        inputs = augment.eval_view(
            images.astype(jnp.float32) / 255.0, size=image_size, mean=tuple(mean), std=tuple(std)
        )
        backbone_features, _ = model.apply(
            {"params": state.params, "batch_stats": state.batch_stats}, inputs, train=False
        )
        return l2_normalize(backbone_features)

    return features
