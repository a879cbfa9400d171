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
"""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp
from jax import lax

Dtype = Any


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

    Attributes:
        num_groups: number of groups G the batch is split into in training mode.
            The batch size must be divisible by G.
        momentum: decay of the running statistics, flax convention (0.9 equals PyTorch 0.1).
        epsilon: constant added to the variance before the square root.
        unbiased_running_var: store the unbiased (n - 1) variance in the running statistics.
        dtype: dtype of the output, or None for the result type of the input and the params.
        param_dtype: dtype of ``scale`` and ``bias``.
    """

    num_groups: int = 1
    momentum: float = 0.9
    epsilon: float = 1e-5
    unbiased_running_var: bool = True
    dtype: Dtype | None = None
    param_dtype: Dtype = jnp.float32

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

        batch_size = x.shape[0]
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
                f"group, got input shape {x.shape} with num_groups {self.num_groups}. "
                f"Use a larger batch or fewer groups."
            )

        # [N, ..., C] -> [G, N/G, ..., C], then statistics over all axes but the group and C.
        grouped = x.astype(stats_dtype).reshape((self.num_groups, group_size) + x.shape[1:])
        reduction_axes = tuple(range(1, grouped.ndim - 1))
        group_mean = jnp.mean(grouped, axis=reduction_axes, keepdims=True)
        group_var = jnp.mean(jnp.square(grouped - group_mean), axis=reduction_axes,
                             keepdims=True)
        y = _normalize(grouped, group_mean, group_var, scale, bias, self.epsilon)

        if not self.is_initializing():
            mean_update = jnp.mean(group_mean.reshape(self.num_groups, num_features), axis=0)
            var_update = jnp.mean(group_var.reshape(self.num_groups, num_features), axis=0)
            if self.unbiased_running_var:
                var_update = var_update * (values_per_group / (values_per_group - 1))
            running_mean.value = (self.momentum * running_mean.value
                                  + (1.0 - self.momentum) * mean_update)
            running_var.value = (self.momentum * running_var.value
                                 + (1.0 - self.momentum) * var_update)

        return y.reshape(x.shape).astype(out_dtype)


def _normalize(x: jnp.ndarray, mean: jnp.ndarray, var: jnp.ndarray, scale: jnp.ndarray,
               bias: jnp.ndarray, epsilon: float) -> jnp.ndarray:
    """Compute ``(x - mean) * rsqrt(var + epsilon) * scale + bias`` with broadcasting on C."""
    multiplier = lax.rsqrt(var + epsilon) * scale
    return (x - mean) * multiplier + bias
