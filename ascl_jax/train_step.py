"""One ASCL train step, in the order of the method.

1. EMA update of the target parameters from the online parameters.
2. Strong view through the online network, weak view through the target network (with the
   target batch shuffled around the target encoder, so a key rarely shares BatchNorm groups
   with its own query).
3. Soft labels from the queue as it was before this step.
4. Soft InfoNCE loss and an SGD update of the online parameters.
5. Enqueue the target embeddings of the batch.

The step is a pure function of (state, images, labels); `make_train_step` closes over the static
settings and the caller wraps the result in `jax.jit`.

Data parallelism. With `axis_name`, the same step is the per-device body of a `jax.shard_map`
over that axis (`ascl_jax.sharding.shard_train_step` builds it): each device gets a contiguous
shard of the global batch and of the queue, and everything else replicated. The body is
written so that the result is that of one device running the global batch:

- Per-example randomness: the augmentation keys are one split of the step key over the
  global batch, and each device takes the keys of its own examples.
- BatchNorm: `bn_groups` counts the groups of the global batch, and SplitBatchNorm combines
  the statistics of groups that span several devices.
- Shuffle BN: the target-side permutation is one permutation of the global batch. Every
  device gathers the raw uint8 batch and encodes the examples at its positions of the
  permutation, and the target embeddings are gathered and unshuffled on every device.
  NOTE: the gathered batch costs B * H * W * C bytes per device (38 MB for 256 ImageNet crops
  of 224 x 224), which grows with the global batch; a large pod with a very large batch may
  want shuffling within groups of devices instead, which changes the result with P.
- Labels and loss: every device relabels the whole batch against its queue shard. The softmax,
  the entropy and the top-K are global (see `ascl_jax.losses`). The query embeddings are
  gathered ([B, D], small), and the gradient of the replicated parameters is the sum over
  devices that `shard_map`'s automatic differentiation inserts.
- Enqueue: every device writes the rows of the global batch that fall into its queue shard.
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
from ascl_jax.evaluation.knn import l2_normalize
from ascl_jax.models.batch_norm import with_batch_norm_axis
from ascl_jax.train_state import TrainState

Metrics = dict[str, jax.Array]


def ema_update(target_params: Any, online_params: Any, momentum: float) -> Any:
    """Return theta_t <- m * theta_t + (1 - m) * theta_q for every leaf."""
    return jax.tree.map(
        lambda t, q: momentum * t + (1.0 - momentum) * q, target_params, online_params
    )


def _all_gather(x: jax.Array, axis_name: str | None) -> jax.Array:
    """Concatenate the shards of `x` along axis 0 in axis-index order (identity unsharded)."""
    return x if axis_name is None else jax.lax.all_gather(x, axis_name, tiled=True)


def _augment_examples(
    keys: jax.Array, images: jax.Array, view: Callable[..., jax.Array], **kwargs: Any
) -> jax.Array:
    """Apply `view` to each image with its own key, as `augment.augment_batch` does."""
    if images.ndim != 4:
        raise ValueError(
            f"images has shape {tuple(images.shape)}, but a batch of shape [B, H, W, C] is "
            "expected."
        )
    images = augment.to_float(images)
    return jax.vmap(lambda key, image: view(key, image, **kwargs))(keys, images)


def nearest_entry_same_class(
    target: jax.Array,
    bank: jax.Array,
    bank_labels: jax.Array,
    labels: jax.Array,
    *,
    axis_name: str | None = None,
) -> jax.Array:
    """Return the fraction of samples whose most similar bank entry has the sample's class.

    Ties go to the lowest bank index, as `jnp.argmax` does. With `axis_name`, `bank` and
    `bank_labels` are this device's shard and the nearest entry is the global one: the
    largest similarity over all shards, in the lowest shard that contains it.
    """
    similarities = losses.bank_similarities(target, bank)
    local_nearest = jnp.argmax(similarities, axis=-1)
    same_class = (bank_labels[local_nearest] == labels) & (labels >= 0)
    if axis_name is None:
        return jnp.mean(same_class.astype(jnp.float32))

    local_best = jnp.max(similarities, axis=-1)
    global_best = jax.lax.pmax(local_best, axis_name)
    shard = jax.lax.axis_index(axis_name)
    num_shards = jax.lax.axis_size(axis_name)
    winner = jax.lax.pmin(jnp.where(local_best == global_best, shard, num_shards), axis_name)
    same_class = jnp.where(shard == winner, same_class, False).astype(jnp.float32)
    return jnp.mean(jax.lax.psum(same_class, axis_name))


def make_train_step(
    config: Mapping[str, Any],
    model: nn.Module,
    schedule: optax.Schedule,
    *,
    mean: Sequence[float],
    std: Sequence[float],
    axis_name: str | None = None,
) -> Callable[[TrainState, jax.Array, jax.Array], tuple[TrainState, Metrics]]:
    """Build the train step for `config`; the result is to be wrapped in `jax.jit`.

    Args:
        config: run configuration (kind, num_neighbors, tau, tau_prime, ema_momentum,
            image_size, target_view, shuffle_bn).
        model: the encoder, returning `(features, projection)`.
        schedule: learning-rate schedule, evaluated at the step for the metrics.
        mean, std: per-channel normalisation of the input images.
        axis_name: None for one device. Otherwise the mesh axis along which the batch and
            the queue are sharded, and the result is the per-device body for
            `jax.shard_map` (see `ascl_jax.sharding.shard_train_step`). The model's
            BatchNorm then reduces over that axis (`models.batch_norm.with_batch_norm_axis`).

    The returned function maps `(state, images, labels)`, with uint8 images [B, H, W, C] and
    int32 dataset labels [B] (used only for the same-class diagnostic), to
    `(new_state, metrics)`. Under `shard_map`, `images`, `labels` and the queue rows are the
    device's shards and the metrics are equal on every device.
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
    if axis_name is not None:
        model = with_batch_norm_axis(model, axis_name)

    def encode(params, batch_stats, images):
        (_, projection), updates = model.apply(
            {"params": params, "batch_stats": batch_stats},
            images,
            train=True,
            mutable=["batch_stats"],
        )
        # The loss math runs in float32 whatever the model's computation dtype.
        return l2_normalize(projection.astype(jnp.float32)), updates["batch_stats"]

    def train_step(
        state: TrainState, images: jax.Array, labels: jax.Array
    ) -> tuple[TrainState, Metrics]:
        step_key = jax.random.fold_in(state.rng, state.step)
        query_key, target_key, shuffle_key = jax.random.split(step_key, 3)
        local_batch_size = images.shape[0]
        if axis_name is None:
            first_example = 0
            batch_size = local_batch_size
        else:
            first_example = jax.lax.axis_index(axis_name) * local_batch_size
            batch_size = local_batch_size * jax.lax.axis_size(axis_name)
        # Global indices of the examples in this device's shard of the batch.
        local_examples = first_example + jnp.arange(local_batch_size)

        # 1. EMA update of the target network (parameters only).
        target_params = ema_update(state.target_params, state.params, ema_momentum)

        # 2. Both views, each example with its own key from one split over the global batch.
        # The target side runs on a shuffled batch and is unshuffled after.
        query_keys = jax.random.split(query_key, batch_size)[local_examples]
        query_images = _augment_examples(query_keys, images, query_view, **view_kwargs)
        target_keys = jax.random.split(target_key, batch_size)
        if shuffle_bn:
            order = jax.random.permutation(shuffle_key, batch_size)
            target_examples = order[local_examples]
            target_inputs = _all_gather(images, axis_name)[target_examples]
        else:
            target_examples = local_examples
            target_inputs = images
        target_images = _augment_examples(
            target_keys[target_examples], target_inputs, target_view, **view_kwargs
        )
        target, target_batch_stats = encode(target_params, state.target_batch_stats, target_images)
        target = _all_gather(target, axis_name)
        if shuffle_bn:
            target = target[jnp.argsort(order)]
        target = jax.lax.stop_gradient(target)
        all_labels = _all_gather(labels, axis_name)

        # 3. Soft labels against the queue as it was before this step.
        bank = state.queue.keys
        soft_labels, confidence = losses.soft_labels(
            target, bank, kind=kind, num_neighbors=num_neighbors, tau_prime=tau_prime,
            axis_name=axis_name,
        )

        # 4. Loss and update of the online network; gradients flow only through the query.
        def loss_fn(params):
            query, batch_stats = encode(params, state.batch_stats, query_images)
            query = _all_gather(query, axis_name)
            loss = losses.soft_infonce(
                query, target, bank, soft_labels, tau=tau, axis_name=axis_name
            )
            return loss, batch_stats

        (loss, batch_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
        new_state = state.apply_gradients(
            grads=grads,
            batch_stats=batch_stats,
            target_params=target_params,
            target_batch_stats=target_batch_stats,
            # 5. Enqueue this step's target embeddings.
            queue=queue_lib.enqueue(state.queue, target, all_labels, axis_name=axis_name),
        )

        diagnostics = losses.label_diagnostics(
            soft_labels, all_labels, state.queue.labels, axis_name=axis_name
        )
        metrics = {
            "loss": loss,
            "learning_rate": jnp.asarray(schedule(state.step), jnp.float32),
            "confidence": jnp.mean(confidence),
            "positive_weight": diagnostics["positive_weight"],
            "same_class_rate": diagnostics["same_class_rate"],
            # Class agreement of each sample's nearest queue entry, a kind-independent measure
            # of how often the entry that ASCL weights most is a true positive (chance is about
            # 1 / classes).
            "neighbor_same_class": nearest_entry_same_class(
                target, bank, state.queue.labels, all_labels, axis_name=axis_name
            ),
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
