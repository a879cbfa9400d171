"""Linear evaluation: a linear classifier trained on the features of a frozen backbone.

The protocol: the pretrained backbone runs in eval mode (running BatchNorm statistics) and
nothing in it is updated. A head Linear(feature_dim, classes) with weights ~ N(0, 0.01^2) and
bias 0 learns from the raw backbone features, before any L2 normalisation. It is trained by SGD
with learning rate 10, Nesterov momentum 0.9 and no weight decay, in batches of 256 for 100
epochs.
The learning rate is multiplied by 0.1 at 60% and 80% of the epochs (epochs 60 and 80 of 100).
Training images get RandomResizedCrop(scale 0.08-1) and a horizontal flip, test images the
test-time view. The result is the top-1 and top-5 test accuracy.

Two modes:

- "augmented" is the protocol. Every step augments a batch of uint8 images with one key per
  example, runs the frozen backbone and updates the head, in one jitted function whose batch is
  split over the devices of the mesh.
- "features" computes the features of every training image once, with the test-time view, and
  trains the head on those arrays without augmentation. An epoch then costs a few small matrix
  products instead of a backbone pass over the training set, which suits CPU budgets.

The reported test accuracy is that of the final epoch. With `holdout` > 0, that many labelled
training images (a fixed random subset) are held out of training, and the reported accuracy is
the test accuracy of the epoch with the best held-out top-1. The result names the rule it used
("reported"). Choosing the epoch by test accuracy would overstate it, so it is not offered.

Feature extraction splits each batch over the mesh as the kNN monitor does. The last batch is
padded and masked, so any number of images works on any number of devices.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax

from ascl_jax import augment
from ascl_jax import checkpoint as checkpoint_lib
from ascl_jax import data as data_lib
from ascl_jax import models
from ascl_jax import sharding
from ascl_jax.data import pipeline
from ascl_jax.data.base import check_indices
from ascl_jax.evaluation.knn import l2_normalize

logger = logging.getLogger("ascl_jax")

MODES = ("augmented", "features")
# RandomResizedCrop area fraction of the training images.
CROP_SCALE = (0.08, 1.0)
# The learning rate is multiplied by LR_DECAY at these fractions of the epochs.
MILESTONE_FRACTIONS = (0.6, 0.8)
LR_DECAY = 0.1
MOMENTUM = 0.9
HEAD_INIT_STD = 0.01
# Seed of the held-out images and of the subsets that max_train_examples and
# max_test_examples select. It does not follow `seed`, so runs that differ only in `seed`
# hold out the same images.
SELECTION_SEED = 0
RESULTS_FILE = "linear_eval.json"
CONFIG_FILE = "config.json"
# Settings that identify a result in RESULTS_FILE: a new result replaces the old one with the
# same values.
RESULT_KEYS = (
    "step", "mode", "epochs", "batch_size", "learning_rate", "holdout", "seed",
    "max_train_examples", "max_test_examples", "train_split", "test_split", "normalize_features",
)

Head = dict[str, jax.Array]


@dataclasses.dataclass(frozen=True)
class LinearEvalSettings:
    """Settings of a linear evaluation, with the protocol's values as defaults."""

    # "augmented" (the protocol) or "features" (precomputed features, no augmentation).
    mode: str = "augmented"
    epochs: int = 100
    batch_size: int = 256
    learning_rate: float = 10.0
    # Labelled training images held out to choose the reported epoch. 0 reports the final one.
    holdout: int = 0
    # Seed of the head's initialisation, the batch order and the augmentation.
    seed: int = 0
    # When > 0, a fixed random subset of this many labelled training (test) images is used.
    max_train_examples: int = 0
    max_test_examples: int = 0
    # L2-normalise the backbone features before the head, as the kNN monitor does. The protocol
    # feeds the raw features; a small backbone's raw features can make learning rate 10 diverge.
    normalize_features: bool = False

    def check(self) -> None:
        """Raise ValueError naming the first invalid setting and the values that would work."""
        if self.mode not in MODES:
            raise ValueError(
                f"Invalid mode={self.mode!r}: use 'augmented' (the protocol) or 'features' "
                "(precomputed features without augmentation, much faster on a CPU)."
            )
        for name in ("epochs", "batch_size"):
            value = getattr(self, name)
            if not _is_int(value) or value < 1:
                raise ValueError(f"Invalid {name}={value!r}: use a positive integer.")
        if not (isinstance(self.learning_rate, (int, float)) and math.isfinite(self.learning_rate)
                and self.learning_rate > 0):
            raise ValueError(
                f"Invalid learning_rate={self.learning_rate!r}: use a finite number > 0 "
                "(the protocol uses 10)."
            )
        for name in ("holdout", "seed", "max_train_examples", "max_test_examples"):
            value = getattr(self, name)
            if not _is_int(value) or value < 0:
                raise ValueError(f"Invalid {name}={value!r}: use an integer >= 0.")
        if not isinstance(self.normalize_features, (bool, np.bool_)):
            raise ValueError(
                f"Invalid normalize_features={self.normalize_features!r}: use True or False."
            )


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


# Schedule and optimiser.


def lr_milestones(epochs: int) -> tuple[int, ...]:
    """Return the epochs (0-based) from which the learning rate is decayed once more.

    Each is a fraction of MILESTONE_FRACTIONS times `epochs`, rounded half up: (60, 80) for 100
    epochs, (6, 8) for 10. Epoch e trains with the base rate times LR_DECAY to the power of the
    number of milestones <= e, as PyTorch's MultiStepLR stepped once per epoch.
    """
    return tuple(int(math.floor(fraction * epochs + 0.5)) for fraction in MILESTONE_FRACTIONS)


def learning_rate_at_epoch(learning_rate: float, epoch: int, milestones: Sequence[int]) -> float:
    """Return the learning rate of the 0-based `epoch`."""
    return learning_rate * LR_DECAY ** sum(epoch >= milestone for milestone in milestones)


def make_optimizer(
    learning_rate: float, milestones: Sequence[int], steps_per_epoch: int
) -> optax.GradientTransformation:
    """Build SGD with Nesterov momentum 0.9, no weight decay and the epoch-wise step schedule.

    optax's Nesterov update is PyTorch's SGD(nesterov=True): buf <- m * buf + g and
    p <- p - lr * (g + m * buf), with buf starting at 0.
    """
    boundaries = np.asarray([milestone * steps_per_epoch for milestone in milestones], np.int32)

    def schedule(count: jax.Array) -> jax.Array:
        decays = jnp.sum(count >= boundaries)
        return learning_rate * jnp.power(jnp.float32(LR_DECAY), decays)

    return optax.sgd(schedule, momentum=MOMENTUM, nesterov=True)


# The head.


def init_head(key: jax.Array, feature_dim: int, num_classes: int) -> Head:
    """Initialise Linear(feature_dim, num_classes): kernel ~ N(0, 0.01^2), bias 0."""
    kernel = HEAD_INIT_STD * jax.random.normal(key, (feature_dim, num_classes), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((num_classes,), jnp.float32)}


def head_logits(head: Head, features: jax.Array) -> jax.Array:
    """Compute features @ kernel + bias in float32."""
    # HIGHEST keeps float32 accuracy on accelerators whose default matmul uses TF32 or bf16.
    logits = jnp.dot(features.astype(jnp.float32), head["kernel"],
                     precision=jax.lax.Precision.HIGHEST)
    return logits + head["bias"]


def masked_cross_entropy(
    head: Head, features: jax.Array, labels: jax.Array
) -> tuple[jax.Array, jax.Array]:
    """Return (mean, sum) of the softmax cross-entropy over the rows with a label >= 0.

    Rows labelled -1 are padding and add nothing. The mean of a batch without labelled rows is 0.
    """
    valid = labels >= 0
    losses = optax.softmax_cross_entropy_with_integer_labels(
        head_logits(head, features), jnp.maximum(labels, 0)
    )
    total = jnp.sum(jnp.where(valid, losses, 0.0))
    return total / jnp.maximum(jnp.sum(valid), 1), total


def top_k_correct(logits: jax.Array, labels: jax.Array, k: int) -> jax.Array:
    """Return bool [N]: whether labels[i] is among the k largest logits of row i.

    Of equal logits, the lower class index ranks first (`jax.lax.top_k`).
    """
    _, top = jax.lax.top_k(logits, k)
    return jnp.any(top == labels[:, None], axis=1)


@jax.jit
def _count_correct(head: Head, features: jax.Array, labels: jax.Array) -> jax.Array:
    logits = head_logits(head, features)
    top5 = min(5, logits.shape[1])
    return jnp.stack([jnp.sum(top_k_correct(logits, labels, 1)),
                      jnp.sum(top_k_correct(logits, labels, top5))])


def accuracy(head: Head, features: np.ndarray, labels: np.ndarray) -> tuple[float, float]:
    """Return the (top-1, top-5) accuracy of the head, where top-5 means top-min(5, classes)."""
    if len(labels) == 0:
        raise ValueError("Cannot compute an accuracy over zero examples.")
    # A host copy of the head runs beside the features whether the head is on one device or
    # replicated over a mesh.
    head = jax.device_get(head)
    correct = np.asarray(_count_correct(head, jnp.asarray(features), jnp.asarray(labels)))
    return float(correct[0] / len(labels)), float(correct[1] / len(labels))


# Batches.


def epoch_batches(
    seed: int, epoch: int, num_examples: int, batch_size: int, padded_size: int | None = None
) -> np.ndarray:
    """Return the batches of one epoch as example positions, int32 [num_batches, padded_size].

    Every example appears once per epoch, in the order of `pipeline.epoch_permutation(seed,
    epoch, num_examples)`, in batches of `batch_size`. The last batch keeps its remainder, as a
    PyTorch DataLoader without drop_last does. Unused places, and the columns from batch_size to
    padded_size (default batch_size), hold -1.
    """
    padded_size = batch_size if padded_size is None else padded_size
    order = pipeline.epoch_permutation(seed, epoch, num_examples)
    num_batches = -(-num_examples // batch_size)
    plan = np.full((num_batches * batch_size,), -1, np.int32)
    plan[:num_examples] = order
    plan = plan.reshape(num_batches, batch_size)
    return np.pad(plan, ((0, 0), (0, padded_size - batch_size)), constant_values=-1)


class IndexedSource(data_lib.ImageSource):
    """The examples of `source` at `indices`, in that order, as a source of its own."""

    def __init__(self, source: data_lib.ImageSource, indices: np.ndarray) -> None:
        self.source = source
        self.indices = check_indices(indices, len(source))
        self.class_names = source.class_names
        self.image_shape = source.image_shape

    def __len__(self) -> int:
        return int(self.indices.size)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        return self.source.get(self.indices[check_indices(indices, len(self))])


def source_labels(source: data_lib.ImageSource, chunk: int = 4096) -> np.ndarray:
    """Return the int32 labels of every example, reading through sources not held in memory."""
    if isinstance(source, data_lib.ArraySource):
        return source.labels
    parts = [source.get(np.arange(start, min(start + chunk, len(source))))[1]
             for start in range(0, len(source), chunk)]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int32)


def select_examples(
    labels: np.ndarray, *, holdout: int = 0, max_examples: int = 0, stream: int = 0
) -> tuple[np.ndarray, np.ndarray]:
    """Choose (train, held-out) example indices among the labelled ones, both sorted.

    With max_examples > 0, a fixed random subset of that many labelled examples is used first.
    `holdout` of them, again a fixed random choice, are held out. The choices depend on
    SELECTION_SEED and `stream` only.

    Raises:
        ValueError: no labelled example, or `holdout` leaves none for training.
    """
    labelled = np.flatnonzero(np.asarray(labels) >= 0)
    if labelled.size == 0:
        raise ValueError("The split has no labelled images, but linear evaluation needs labels.")
    if 0 < max_examples < labelled.size:
        subset = np.random.default_rng([SELECTION_SEED, stream, 0])
        labelled = np.sort(subset.choice(labelled, max_examples, replace=False))
    if holdout >= labelled.size:
        raise ValueError(
            f"Invalid holdout={holdout}: the training split has {labelled.size} labelled images "
            "here, and at least one must remain for training. Use a value in "
            f"[0, {labelled.size - 1}], for example {labelled.size // 10} (10%)."
        )
    order = np.random.default_rng([SELECTION_SEED, stream, 1]).permutation(labelled)
    return np.sort(order[holdout:]), np.sort(order[:holdout])


# Features of the frozen backbone.


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class BackboneFeatures:
    """Features of a frozen backbone on the test-time view, with batches split over a mesh.

    The backbone runs in eval mode and nothing in `variables` changes. Each batch is split over
    the devices of `mesh` and the features come back to every process, as in the kNN monitor.
    The batch size is rounded up to a multiple of the device count, and the last batch is
    padded and masked, so sources of any length work.
    """

    def __init__(
        self,
        backbone: nn.Module,
        variables: Mapping[str, Any],
        *,
        mesh: jax.sharding.Mesh,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        batch_size: int = 512,
        normalize: bool = False,
    ) -> None:
        """Place `variables` ({"params", "batch_stats"}) on every device of `mesh`.

        With `normalize`, the features are L2-normalised, as the kNN monitor uses them.
        """
        self.mesh = mesh
        self.batch_size = _round_up(batch_size, mesh.size)
        replicated = sharding.replicated_sharding(mesh)
        self._batch_sharding = sharding.batch_sharding(mesh)
        self.variables = jax.device_put(dict(variables), replicated)

        def features(variables: Any, images: jax.Array) -> jax.Array:
            inputs = augment.eval_view(images.astype(jnp.float32) / 255.0, size=image_size,
                                       mean=tuple(mean), std=tuple(std))
            outputs = backbone.apply(variables, inputs, train=False).astype(jnp.float32)
            return l2_normalize(outputs) if normalize else outputs

        self._features = jax.jit(
            features, in_shardings=(replicated, self._batch_sharding), out_shardings=replicated
        )

    def __call__(self, source: data_lib.ImageSource) -> tuple[np.ndarray, np.ndarray]:
        """Return (float32 features [N, D], int32 labels [N]) of every example, in index order."""
        rows = sharding.process_batch_rows(self.mesh, self.batch_size)
        chunks, labels = [], []
        # The features of a batch are copied to the host after the next batch is dispatched,
        # so loading and computing overlap.
        pending = None
        batches = pipeline.eval_batches(source, batch_size=self.batch_size)
        with contextlib.closing(batches):
            for images, batch_labels, mask in batches:
                global_images = jax.make_array_from_process_local_data(
                    self._batch_sharding, images[rows], images.shape
                )
                outputs = self._features(self.variables, global_images)
                if pending is not None:
                    chunks.append(np.asarray(pending[0])[pending[1]])
                pending = (outputs, mask)
                labels.append(batch_labels[mask])
        chunks.append(np.asarray(pending[0])[pending[1]])
        return np.concatenate(chunks), np.concatenate(labels)


# Training the head.


def _make_features_epoch(tx: optax.GradientTransformation) -> Callable:
    """Build the jitted epoch of "features" mode: a scan over the batches of a plan."""

    def epoch(head, opt_state, features, labels, plan):
        def step(carry, positions):
            head, opt_state = carry
            valid = positions >= 0
            safe = jnp.maximum(positions, 0)
            batch_labels = jnp.where(valid, labels[safe], -1)
            grads, loss_sum = jax.grad(masked_cross_entropy, has_aux=True)(
                head, features[safe], batch_labels
            )
            updates, opt_state = tx.update(grads, opt_state, head)
            return (optax.apply_updates(head, updates), opt_state), loss_sum

        (head, opt_state), loss_sums = jax.lax.scan(step, (head, opt_state), plan)
        return head, opt_state, jnp.sum(loss_sums)

    return jax.jit(epoch, donate_argnums=(0, 1))


def _make_augmented_step(
    tx: optax.GradientTransformation,
    backbone: nn.Module,
    mesh: jax.sharding.Mesh,
    *,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    normalize: bool = False,
) -> Callable:
    """Build the jitted step of "augmented" mode, with the batch split over `mesh`.

    step(head, opt_state, variables, images, labels, key) augments the uint8 images with one
    key per example, runs the frozen backbone in eval mode and updates the head. Rows labelled
    -1 are padding. The gradient reaches the head only, and `variables` is an input that the
    step does not return, so the backbone cannot change.
    """

    def step(head, opt_state, variables, images, labels, key):
        views = augment.augment_batch(key, images, augment.weak_view, size=image_size,
                                      mean=tuple(mean), std=tuple(std), scale=CROP_SCALE)
        features = backbone.apply(variables, views, train=False).astype(jnp.float32)
        if normalize:
            features = l2_normalize(features)
        grads, loss_sum = jax.grad(masked_cross_entropy, has_aux=True)(head, features, labels)
        updates, opt_state = tx.update(grads, opt_state, head)
        return optax.apply_updates(head, updates), opt_state, loss_sum

    replicated = sharding.replicated_sharding(mesh)
    batch = sharding.batch_sharding(mesh)
    return jax.jit(
        step,
        in_shardings=(replicated, replicated, replicated, batch, batch, replicated),
        out_shardings=(replicated, replicated, replicated),
        donate_argnums=(0, 1),
    )


def select_reported_epoch(history: Sequence[Mapping[str, Any]]) -> tuple[int, str]:
    """Return (index into history, rule) of the epoch whose test accuracy is reported.

    Without "holdout_top1" in the records this is the final epoch ("final_epoch"). With it,
    the first epoch of the highest held-out top-1 ("selected_on_holdout").
    """
    if not history:
        raise ValueError("The history is empty. Train at least one epoch.")
    if "holdout_top1" not in history[0]:
        return len(history) - 1, "final_epoch"
    scores = [record["holdout_top1"] for record in history]
    return int(np.argmax(scores)), "selected_on_holdout"


def _fit_head(
    train_epoch: Callable[[Head, Any, int], tuple[Head, Any, float]],
    head: Head,
    opt_state: Any,
    *,
    settings: LinearEvalSettings,
    eval_sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
) -> tuple[Head, list[dict[str, Any]]]:
    """Train for settings.epochs epochs, evaluating on `eval_sets` after each.

    `train_epoch(head, opt_state, epoch)` returns the new head, optimiser state and mean loss.
    `eval_sets` maps "test" and, optionally, "holdout" to (features, labels). Returns the final
    head and the history, one record per epoch.

    Raises:
        FloatingPointError: the training loss became NaN or infinite.
    """
    milestones = lr_milestones(settings.epochs)
    history = []
    for epoch in range(settings.epochs):
        head, opt_state, loss = train_epoch(head, opt_state, epoch)
        learning_rate = learning_rate_at_epoch(settings.learning_rate, epoch, milestones)
        if not math.isfinite(loss):
            raise FloatingPointError(
                f"Linear evaluation stopped in epoch {epoch + 1}: the training loss is {loss} at "
                f"learning rate {learning_rate:g}. Lower learning_rate."
            )
        record = {"epoch": epoch + 1, "learning_rate": learning_rate, "train_loss": loss}
        if "holdout" in eval_sets:
            record["holdout_top1"] = accuracy(head, *eval_sets["holdout"])[0]
        record["test_top1"], record["test_top5"] = accuracy(head, *eval_sets["test"])
        history.append(record)
        logger.info(
            "Linear evaluation epoch %d/%d: loss %.4f, test top-1 %.2f%%%s", epoch + 1,
            settings.epochs, loss, 100 * record["test_top1"],
            f", held-out top-1 {100 * record['holdout_top1']:.2f}%"
            if "holdout_top1" in record else "",
        )
    return head, history


def _start(
    settings: LinearEvalSettings, feature_dim: int, num_classes: int, steps_per_epoch: int
) -> tuple[optax.GradientTransformation, Head, Any]:
    tx = make_optimizer(settings.learning_rate, lr_milestones(settings.epochs), steps_per_epoch)
    head = init_head(jax.random.PRNGKey(settings.seed), feature_dim, num_classes)
    return tx, head, tx.init(head)


def train_on_features(
    train_features: np.ndarray,
    train_labels: np.ndarray,
    eval_sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    settings: LinearEvalSettings,
    num_classes: int,
) -> tuple[Head, list[dict[str, Any]]]:
    """Train the head on precomputed features ("features" mode), returning (head, history).

    `eval_sets` maps "test" and, optionally, "holdout" to (features, labels). The arrays live
    on the default device, and each epoch runs as one jitted scan over its batches.
    """
    settings.check()
    num_examples, feature_dim = train_features.shape
    plan_size = -(-num_examples // settings.batch_size)
    tx, head, opt_state = _start(settings, feature_dim, num_classes, plan_size)
    features = jnp.asarray(train_features, jnp.float32)
    labels = jnp.asarray(train_labels, jnp.int32)
    run_epoch = _make_features_epoch(tx)

    def train_epoch(head, opt_state, epoch):
        plan = epoch_batches(settings.seed, epoch, num_examples, settings.batch_size)
        head, opt_state, loss_sum = run_epoch(head, opt_state, features, labels, plan)
        return head, opt_state, float(loss_sum) / num_examples

    return _fit_head(train_epoch, head, opt_state, settings=settings, eval_sets=eval_sets)


def _augmented_batches(
    source: data_lib.ImageSource, plan: np.ndarray, rows: np.ndarray
) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """Yield this process's rows of each batch of `plan`: uint8 images and labels, -1 on padding."""
    for positions in plan:
        positions = positions[rows]
        valid = positions >= 0
        images = np.zeros((positions.size, *source.image_shape), np.uint8)
        labels = np.full((positions.size,), -1, np.int32)
        if valid.any():
            images[valid], labels[valid] = source.get(positions[valid])
        yield images, labels


def train_augmented(
    backbone: nn.Module,
    features: BackboneFeatures,
    train_source: data_lib.ImageSource,
    eval_sets: Mapping[str, tuple[np.ndarray, np.ndarray]],
    settings: LinearEvalSettings,
    *,
    num_classes: int,
    feature_dim: int,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
) -> tuple[Head, list[dict[str, Any]]]:
    """Train the head on augmented images through the frozen backbone ("augmented" mode).

    The backbone variables and the mesh are those of `features`. Each global batch is rounded
    up to a multiple of the device count with padding rows, so any batch size works.
    """
    settings.check()
    mesh = features.mesh
    num_examples = len(train_source)
    padded_size = _round_up(settings.batch_size, mesh.size)
    plan_size = -(-num_examples // settings.batch_size)
    tx, head, opt_state = _start(settings, feature_dim, num_classes, plan_size)
    replicated = sharding.replicated_sharding(mesh)
    head, opt_state = jax.device_put((head, opt_state), replicated)
    step = _make_augmented_step(tx, backbone, mesh, image_size=image_size, mean=mean, std=std,
                                normalize=settings.normalize_features)
    rows = sharding.process_batch_rows(mesh, padded_size)
    # Separate from the head's initialisation key, which is PRNGKey(seed) itself.
    augment_key = jax.random.fold_in(jax.random.PRNGKey(settings.seed), 1)
    global_step = 0

    def train_epoch(head, opt_state, epoch):
        nonlocal global_step
        plan = epoch_batches(settings.seed, epoch, num_examples, settings.batch_size, padded_size)
        loss_sums = []
        batches = pipeline.BackgroundIterator(
            lambda: _augmented_batches(train_source, plan, rows), 2
        )
        with batches:
            for images, labels in batches:
                images, labels = sharding.global_batch(mesh, images, labels,
                                                       batch_size=padded_size)
                key = jax.random.fold_in(augment_key, global_step)
                head, opt_state, loss_sum = step(head, opt_state, features.variables, images,
                                                 labels, key)
                loss_sums.append(loss_sum)
                global_step += 1
        return head, opt_state, float(np.sum(jax.device_get(loss_sums))) / num_examples

    return _fit_head(train_epoch, head, opt_state, settings=settings, eval_sets=eval_sets)


def linear_evaluation(
    backbone: nn.Module,
    variables: Mapping[str, Any],
    train_source: data_lib.ImageSource,
    test_source: data_lib.ImageSource,
    settings: LinearEvalSettings,
    *,
    mesh: jax.sharding.Mesh,
    image_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    eval_batch_size: int = 512,
) -> dict[str, Any]:
    """Run a linear evaluation of `backbone` with `variables` ({"params", "batch_stats"}).

    Training uses the labelled examples of `train_source` (minus the held-out ones) and the
    test accuracy all labelled examples of `test_source`. `mean` and `std` must be the
    normalisation the backbone was trained with.

    Returns:
        A JSON-ready dict with the settings and the example counts. "reported" names the rule
        ("final_epoch" or "selected_on_holdout"), and "epoch" (1-based), "test_top1" and
        "test_top5" give the reported epoch and its accuracy. "history" has one record per
        epoch (learning_rate, train_loss, holdout_top1 with a holdout, test_top1,
        test_top5), and "seconds" the wall time of feature extraction and training.

    Raises:
        ValueError: invalid settings, too few labelled images for `holdout`, or splits whose
            classes differ.
        FloatingPointError: the training loss became NaN or infinite.
    """
    settings.check()
    if train_source.class_names != test_source.class_names:
        raise ValueError(
            f"The training split has the classes {list(train_source.class_names)} but the test "
            f"split has {list(test_source.class_names)}. Give splits with the same classes."
        )
    num_classes = train_source.num_classes
    train_indices, holdout_indices = select_examples(
        source_labels(train_source), holdout=settings.holdout,
        max_examples=settings.max_train_examples, stream=0,
    )
    test_indices, _ = select_examples(
        source_labels(test_source), max_examples=settings.max_test_examples, stream=1
    )
    train_split = IndexedSource(train_source, train_indices)
    started = time.time()

    # Features of the test-time view: the test and held-out images, and in "features" mode
    # also the training images.
    logger.info("Computing the backbone features of %d test%s images.", len(test_indices),
                f", {len(holdout_indices)} held-out" if len(holdout_indices) else "")
    extract = BackboneFeatures(backbone, variables, mesh=mesh, image_size=image_size, mean=mean,
                               std=std, batch_size=eval_batch_size,
                               normalize=settings.normalize_features)
    eval_sets = {"test": extract(IndexedSource(test_source, test_indices))}
    if len(holdout_indices):
        eval_sets["holdout"] = extract(IndexedSource(train_source, holdout_indices))
    feature_dim = eval_sets["test"][0].shape[1]
    if settings.mode == "features":
        logger.info("Computing the backbone features of %d training images.", len(train_split))
        train_features, train_labels = extract(train_split)
    feature_seconds = time.time() - started

    started = time.time()
    logger.info("Training the linear head (%s mode, %d epochs).", settings.mode, settings.epochs)
    if settings.mode == "features":
        _, history = train_on_features(train_features, train_labels, eval_sets, settings,
                                       num_classes)
    else:
        _, history = train_augmented(
            backbone, extract, train_split, eval_sets, settings, num_classes=num_classes,
            feature_dim=feature_dim, image_size=image_size, mean=mean, std=std,
        )
    train_seconds = time.time() - started

    index, reported = select_reported_epoch(history)
    return {
        **dataclasses.asdict(settings),
        "momentum": MOMENTUM,
        "nesterov": True,
        "weight_decay": 0.0,
        "lr_milestones": list(lr_milestones(settings.epochs)),
        "num_train_examples": len(train_indices),
        "num_holdout_examples": len(holdout_indices),
        "num_test_examples": len(test_indices),
        "num_classes": num_classes,
        "feature_dim": int(feature_dim),
        "reported": reported,
        "epoch": history[index]["epoch"],
        "test_top1": history[index]["test_top1"],
        "test_top5": history[index]["test_top5"],
        "history": history,
        "seconds": {"features": feature_seconds, "training": train_seconds},
    }


# Inputs from a pretraining workdir, and the results file.


def read_run_config(workdir: str) -> dict[str, Any]:
    """Read WORKDIR/config.json, the configuration a pretraining run wrote.

    Raises:
        FileNotFoundError: the file is missing.
        ValueError: the file is not a JSON object.
    """
    path = os.path.join(workdir, CONFIG_FILE)
    if not os.path.isfile(path):
        raise FileNotFoundError(
            f"No {CONFIG_FILE} in {workdir}. Give the --workdir of a pretraining run."
        )
    with open(path, encoding="utf-8") as file:
        try:
            config = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"Cannot parse {path}: {error}.") from error
    if not isinstance(config, dict):
        raise ValueError(f"{path} does not contain a JSON object.")
    return config


def load_frozen_backbone(
    workdir: str, step: int | None = None
) -> tuple[dict[str, Any], nn.Module, dict[str, Any]]:
    """Load the online backbone of a checkpoint (default: the newest that reads).

    Returns:
        (model_config, backbone, variables): the model_config of `checkpoint.load_backbone`
        (with the normalisation `mean` and `std` and the `step`), the ResNet module, and
        {"params", "batch_stats"} as numpy arrays. The module computes in float32 whatever
        compute dtype the run trained with.
    """
    model_config, params, batch_stats = checkpoint_lib.load_backbone(workdir, step)
    backbone = models.resnet(
        model_config["model"], width=model_config["width"], stem=model_config["stem"],
        bn_groups=model_config["bn_groups"],
    )
    return model_config, backbone, {"params": params, "batch_stats": batch_stats}


def read_results(path: str) -> list[dict[str, Any]]:
    """Return the entries of a results file ({"entries": [...]}), or [] when it does not exist.

    Raises:
        ValueError: the file exists but is not such a results file.
    """
    if not os.path.exists(path):
        return []
    with open(path, encoding="utf-8") as file:
        try:
            content = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(
                f"Cannot parse the results file {path} ({error}). Move it away to start a new one."
            ) from error
    if not isinstance(content, dict) or not isinstance(content.get("entries"), list):
        raise ValueError(
            f"{path} is not a results file of this tool (a JSON object with a list under "
            "\"entries\"). Move it away to start a new one."
        )
    return content["entries"]


def write_result(path: str, entry: Mapping[str, Any], keys: Sequence[str]) -> list[dict]:
    """Add `entry` to the results file at `path`, replacing any entry with equal `keys` values.

    The file is written under a temporary name and renamed, so readers never see a partial
    file. Returns the entries written.
    """
    identity = {key: entry.get(key) for key in keys}
    entries = [old for old in read_results(path)
               if {key: old.get(key) for key in keys} != identity]
    entries.append(dict(entry))
    descriptor, temporary = tempfile.mkstemp(
        dir=os.path.dirname(os.path.abspath(path)), prefix=os.path.basename(path) + ".",
        suffix=".tmp",
    )
    try:
        with os.fdopen(descriptor, "w", encoding="utf-8") as file:
            json.dump({"entries": entries}, file, indent=2, sort_keys=True)
            file.write("\n")
        os.chmod(temporary, 0o644)
        os.replace(temporary, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.remove(temporary)
        raise
    return entries


def run_linear_eval(
    workdir: str,
    settings: LinearEvalSettings,
    *,
    step: int | None = None,
    train_split: str | None = None,
    test_split: str | None = None,
    mesh: jax.sharding.Mesh | None = None,
    write: bool = True,
) -> dict[str, Any]:
    """Run a linear evaluation of a pretraining workdir's checkpoint and record it.

    The dataset, its directory, the image size and the splits come from WORKDIR/config.json
    (`train_split` and `test_split` override the splits), the backbone and its normalisation
    from the checkpoint of `step` (default: the newest that reads). The entry, the result of
    `linear_evaluation` with the step and the data settings, is returned and, with `write`,
    added to WORKDIR/linear_eval.json by process 0.

    Raises:
        ValueError, FileNotFoundError, checkpoint.CheckpointError: bad settings or inputs,
            before anything is compiled.
        FloatingPointError: the training loss became NaN or infinite.
    """
    settings.check()
    config = read_run_config(workdir)
    results_path = os.path.join(workdir, RESULTS_FILE)
    read_results(results_path)
    train_split = config["train_split"] if train_split is None else train_split
    test_split = config["test_split"] if test_split is None else test_split

    model_config, backbone, variables = load_frozen_backbone(workdir, step)
    load = lambda split: data_lib.load_source(  # noqa: E731
        config["dataset"], split, data_dir=config.get("data_dir", ""),
        image_size=config["image_size"], skip_corrupt=config.get("skip_corrupt", False),
    )
    train_source, test_source = load(train_split), load(test_split)
    mesh = sharding.create_mesh() if mesh is None else mesh
    result = linear_evaluation(
        backbone, variables, train_source, test_source, settings, mesh=mesh,
        image_size=config["image_size"], mean=model_config["mean"], std=model_config["std"],
        eval_batch_size=config.get("eval_batch_size", 512),
    )
    entry = {
        "step": model_config["step"],
        "dataset": config["dataset"],
        "train_split": train_split,
        "test_split": test_split,
        "devices": mesh.size,
        **result,
    }
    if write and sharding.is_main_process():
        write_result(results_path, entry, RESULT_KEYS)
    return entry
