"""Split ("ghost") batch normalisation.

In training mode the batch is cut into ``num_groups`` groups and each group is normalised with its
own statistics, so one device running the whole batch behaves like ``num_groups`` devices each
running plain BatchNorm on its share.

Why MoCo-style methods need it: BatchNorm statistics are shared by every example that is
normalised together. Suppose a query and its positive key are normalised with statistics from
the same examples. Then the network can find the positive through those shared statistics
instead of through the image content, and the contrastive loss drops without the features
getting better.
Splitting the batch into groups, together with "shuffle BN" on the target side, breaks this
link. Shuffle BN permutes the key batch before the target encoder and applies the inverse
permutation after it, so each key is normalised in a different group from its query.
SplitBatchNorm itself only provides the groups, and the training step does the shuffling.

Data-parallel training. With ``axis_name`` set, the module runs inside ``jax.shard_map`` (or
``jax.pmap``) with the batch split into equal contiguous shards along that axis, and
``num_groups`` still counts the groups of the GLOBAL batch. Device i has the global examples
``[i * N_local, (i + 1) * N_local)``, and each example is normalised with the statistics of its
global group, wherever the group's other examples are. So the result does not depend on the
number of devices.
"""

from __future__ import annotations

import dataclasses
import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

Dtype = Any

# Field through which a model passes the sharded batch axis down to its SplitBatchNorm layers.
BN_AXIS_FIELD = "bn_axis_name"


def with_batch_norm_axis(module: nn.Module, axis_name: str | None) -> nn.Module:
    """Return a copy of ``module`` whose split BatchNorm reduces over the mapped ``axis_name``.

    Sets the field ``bn_axis_name`` on ``module`` and on every submodule held in one of its
    dataclass fields, recursively (for an ``Encoder``, its ``backbone``). Parameters and their
    names are unchanged, so variables of the original module apply to the copy.

    Raises:
        ValueError: if neither ``module`` nor any such submodule has a ``bn_axis_name`` field.
    """
    copy, found = _set_axis_field(module, axis_name)
    if not found:
        raise ValueError(
            f"{type(module).__name__} has no {BN_AXIS_FIELD!r} field, in itself or in a "
            "submodule, so its BatchNorm cannot use the statistics of a batch sharded over "
            f"devices. Add a field {BN_AXIS_FIELD}: str | None = None and pass it to "
            "SplitBatchNorm(axis_name=...)."
        )
    return copy


def _set_axis_field(module: nn.Module, axis_name: str | None) -> tuple[nn.Module, bool]:
    updates: dict[str, Any] = {}
    found = False
    for field in dataclasses.fields(module):
        if field.name in ("parent", "name"):
            continue
        value = getattr(module, field.name)
        if field.name == BN_AXIS_FIELD:
            updates[field.name] = axis_name
            found = True
        elif isinstance(value, nn.Module):
            updates[field.name], child_found = _set_axis_field(value, axis_name)
            found = found or child_found
    return module.clone(**updates), found


class SplitBatchNorm(nn.Module):
    """Batch normalisation over ``num_groups`` contiguous groups of the batch.

    Features are on the last axis, and statistics are taken over every other axis (for images
    [N, H, W, C]: examples, height and width). For an input of N examples, group g contains the
    examples ``g * N/G, ..., (g + 1) * N/G - 1`` with ``G = num_groups``.

    Training mode (``use_running_average=False``), for each group g with per-channel mean
    ``mu_g`` and biased variance ``var_g`` over the group's ``n = N/G * H * W`` values::

        y = (x - mu_g) / sqrt(var_g + epsilon) * scale + bias
        mean <- momentum * mean + (1 - momentum) * mean_over_g(mu_g)
        var  <- momentum * var  + (1 - momentum) * mean_over_g(var_g * n / (n - 1))

    The running variance uses the unbiased estimate ``var_g * n / (n - 1)``, as
    ``torch.nn.functional.batch_norm`` does, so the running statistics follow PyTorch
    BatchNorm2d with ``momentum = 1 - self.momentum``. Set ``unbiased_running_var=False`` to
    store the biased variance as ``flax.linen.BatchNorm`` does. The running statistics are not
    updated during ``Module.init``, also like ``flax.linen.BatchNorm``.

    Evaluation mode (``use_running_average=True``) is plain BatchNorm with the running
    statistics, for any batch size, and leaves them unchanged.

    Statistics are computed in at least float32. The variance is the two-pass
    ``mean((x - mu)^2)``, whereas ``flax.linen.BatchNorm`` defaults to ``E[x^2] - E[x]^2``, so
    with ``num_groups=1`` the two agree to float32 rounding, not bit for bit.

    The PyTorch SplitBatchNorm of the MoCo and ASCL CIFAR code reshapes [N, C, H, W] to
    [N/G, G*C, H, W], which puts example n in group ``n mod G`` (interleaved groups). This module
    uses contiguous groups instead. For a randomly ordered batch both choices give groups of
    independent examples, and contiguous groups line up with the per-device shards of a batch
    that is split across G devices.

    Sharded batch (``axis_name`` set, P devices along the axis, N = P * N_local): when G is a
    multiple of P, every device has G / P whole groups and normalises them locally, and only
    the running statistics are averaged over the devices (one ``pmean``). Otherwise groups and
    device shards overlap. Each device then cuts its shard into segments of
    ``gcd(N / G, N_local)`` examples, which lie in one group each, and the per-segment sums are
    combined across devices with a ``psum`` of a [N / segment, C] array. The group means come
    first, then the sums of squared deviations from them (two-pass variance, as above). Both
    paths give every device the same running statistics.

    Attributes:
        num_groups: number of groups G the batch is split into in training mode.
            The batch size must be divisible by G.
        momentum: decay of the running statistics, flax convention (0.9 equals PyTorch 0.1).
        epsilon: constant added to the variance before the square root.
        unbiased_running_var: store the unbiased (n - 1) variance in the running statistics.
        dtype: dtype of the output, or None for the result type of the input and the params.
        param_dtype: dtype of ``scale`` and ``bias``.
        axis_name: mapped axis along which the batch is sharded in training mode, or None for
            an unsharded batch.
    """

    num_groups: int = 1
    momentum: float = 0.9
    epsilon: float = 1e-5
    unbiased_running_var: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32
    axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, use_running_average: bool) -> jnp.ndarray:
        """Normalise ``x`` [N, ..., C] with group statistics or running statistics.

        Raises:
            ValueError: in training mode, if N is not divisible by ``num_groups`` or a group
                has a single value per channel.
        """
        if self.num_groups < 1:
            raise ValueError(f"num_groups must be a positive integer, got {self.num_groups}.")
        if x.ndim < 2:
            raise ValueError(
                f"SplitBatchNorm expects an input of shape [N, ..., C], got shape {x.shape}."
            )

        num_features = x.shape[-1]
        scale = self.param("scale", nn.initializers.ones, (num_features,), self.param_dtype)
        bias = self.param("bias", nn.initializers.zeros, (num_features,), self.param_dtype)
        running_mean = self.variable(
            "batch_stats", "mean", lambda: jnp.zeros((num_features,), jnp.float32)
        )
        running_var = self.variable(
            "batch_stats", "var", lambda: jnp.ones((num_features,), jnp.float32)
        )

        out_dtype = self.dtype
        if out_dtype is None:
            out_dtype = jnp.result_type(x.dtype, self.param_dtype)
        stats_dtype = jnp.promote_types(x.dtype, jnp.float32)

        if use_running_average:
            y = _normalize(x.astype(stats_dtype), running_mean.value, running_var.value,
                           scale, bias, self.epsilon)
            return y.astype(out_dtype)

        num_shards = 1 if self.axis_name is None else lax.axis_size(self.axis_name)
        batch_size = x.shape[0] * num_shards
        if batch_size % self.num_groups != 0:
            raise ValueError(
                f"SplitBatchNorm in training mode needs a batch size divisible by num_groups, "
                f"got batch size {batch_size} and num_groups {self.num_groups}. "
                f"Use a batch size that is a multiple of {self.num_groups}."
            )
        group_size = batch_size // self.num_groups
        values_per_group = group_size * math.prod(x.shape[1:-1])
        if values_per_group < 2:
            raise ValueError(
                f"SplitBatchNorm in training mode needs more than one value per channel in each "
                f"group, got input shape {x.shape} with num_groups {self.num_groups} "
                f"(global batch {batch_size}). Use a larger batch or fewer groups."
            )

        x = x.astype(stats_dtype)
        if self.num_groups % num_shards == 0:
            # Whole groups on every device: local statistics.
            y, group_mean, group_var = _normalize_local_groups(
                x, self.num_groups // num_shards, scale, bias, self.epsilon
            )
        else:
            y, group_mean, group_var = _normalize_shared_groups(
                x, self.num_groups, self.axis_name, scale, bias, self.epsilon
            )

        if not self.is_initializing():
            mean_update = jnp.mean(group_mean, axis=0)
            var_update = jnp.mean(group_var, axis=0)
            if self.axis_name is not None and self.num_groups % num_shards == 0:
                # Each device saw its own groups; all groups have the same size.
                mean_update = lax.pmean(mean_update, self.axis_name)
                var_update = lax.pmean(var_update, self.axis_name)
            if self.unbiased_running_var:
                var_update = var_update * (values_per_group / (values_per_group - 1))
            running_mean.value = (self.momentum * running_mean.value
                                  + (1.0 - self.momentum) * mean_update)
            running_var.value = (self.momentum * running_var.value
                                 + (1.0 - self.momentum) * var_update)

        return y.astype(out_dtype)


def _normalize_local_groups(
    x: jnp.ndarray, num_groups: int, scale: jnp.ndarray, bias: jnp.ndarray, epsilon: float
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Normalise ``num_groups`` contiguous groups of ``x`` with their own statistics.

    Returns the output (shape of ``x``) and the group means and biased variances [G, C].
    """
    num_features = x.shape[-1]
    # [N, ..., C] -> [G, N/G, ..., C], then statistics over all axes but the group and C.
    grouped = x.reshape((num_groups, x.shape[0] // num_groups) + x.shape[1:])
    reduction_axes = tuple(range(1, grouped.ndim - 1))
    group_mean = jnp.mean(grouped, axis=reduction_axes, keepdims=True)
    group_var = jnp.mean(jnp.square(grouped - group_mean), axis=reduction_axes, keepdims=True)
    y = _normalize(grouped, group_mean, group_var, scale, bias, epsilon)
    return (y.reshape(x.shape), group_mean.reshape(num_groups, num_features),
            group_var.reshape(num_groups, num_features))


def _normalize_shared_groups(
    x: jnp.ndarray,
    num_groups: int,
    axis_name: str,
    scale: jnp.ndarray,
    bias: jnp.ndarray,
    epsilon: float,
) -> tuple[jnp.ndarray, jnp.ndarray, jnp.ndarray]:
    """Normalise this device's shard of a global batch whose groups span several devices.

    ``x`` is the shard [N_local, ..., C] of device ``axis_index(axis_name)``. Returns the
    output (shape of ``x``) and the means and biased variances [G, C] of all global groups,
    equal on every device.
    """
    local_batch = x.shape[0]
    num_features = x.shape[-1]
    num_shards = lax.axis_size(axis_name)
    group_size = local_batch * num_shards // num_groups
    # Segments of this size never straddle a group or a device boundary.
    segment_size = math.gcd(group_size, local_batch)
    local_segments = local_batch // segment_size
    segments_per_group = group_size // segment_size
    num_segments_total = local_segments * num_shards
    first_segment = lax.axis_index(axis_name) * local_segments
    values_per_group = group_size * math.prod(x.shape[1:-1])

    segments = x.reshape((local_segments, segment_size) + x.shape[1:])
    reduction_axes = tuple(range(1, segments.ndim - 1))
    group_of_segment = (first_segment + jnp.arange(local_segments)) // segments_per_group
    broadcast_shape = (local_segments,) + (1,) * len(reduction_axes) + (num_features,)

    def group_sums(segment_sums: jnp.ndarray) -> jnp.ndarray:
        """Sum per-segment values [S_local, C] of all devices into per-group values [G, C]."""
        everything = jnp.zeros((num_segments_total, num_features), segment_sums.dtype)
        everything = lax.dynamic_update_slice(everything, segment_sums, (first_segment, 0))
        everything = lax.psum(everything, axis_name)
        return everything.reshape(num_groups, segments_per_group, num_features).sum(axis=1)

    group_mean = group_sums(jnp.sum(segments, axis=reduction_axes)) / values_per_group
    segment_mean = group_mean[group_of_segment].reshape(broadcast_shape)
    squared_deviations = jnp.sum(jnp.square(segments - segment_mean), axis=reduction_axes)
    group_var = group_sums(squared_deviations) / values_per_group
    segment_var = group_var[group_of_segment].reshape(broadcast_shape)
    y = _normalize(segments, segment_mean, segment_var, scale, bias, epsilon)
    return y.reshape(x.shape), group_mean, group_var


def _normalize(x: jnp.ndarray, mean: jnp.ndarray, var: jnp.ndarray, scale: jnp.ndarray,
               bias: jnp.ndarray, epsilon: float) -> jnp.ndarray:
    """Compute ``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with broadcasting on C."""
    multiplier = lax.rsqrt(var + epsilon) * scale
    return (x - mean) * multiplier + bias
