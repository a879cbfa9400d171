"""Projection head: Linear - ReLU - Linear, without BatchNorm."""

from __future__ import annotations

import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# torch.nn.Linear initialises its weight with kaiming_uniform_(a=sqrt(5)), which is
# uniform(-b, b) with b = sqrt(6 / ((1 + 5) * fan_in)) = 1 / sqrt(fan_in). variance_scaling with
# scale 1/3 and "uniform" draws from uniform(-sqrt(3 * scale / fan_in), +...), the same bound.
torch_linear_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, "fan_in", "uniform")


def torch_linear_bias_init(fan_in: int) -> nn.initializers.Initializer:
    """Return an initializer drawing from uniform(-1/sqrt(fan_in), 1/sqrt(fan_in)) like torch."""
    bound = 1.0 / math.sqrt(fan_in)

    def init(key: jax.Array, shape: tuple[int, ...], dtype: Dtype = jnp.float32) -> jax.Array:
        return jax.random.uniform(key, shape, dtype, minval=-bound, maxval=bound)

    return init


class Projector(nn.Module):
    """MLP head mapping backbone features [N, D] to projections [N, out_dim].

    ``projection = W2 relu(W1 x + b1) + b2``, with PyTorch's default ``nn.Linear`` initialisation:
    weights and biases uniform in +-1/sqrt(fan_in). The output is not L2-normalised.

    Attributes:
        hidden_dim: size of the hidden layer.
        out_dim: size of the projection.
        dtype: computation dtype (e.g. bfloat16).
        param_dtype: dtype of the parameters.
    """

    hidden_dim: int = 2048
    out_dim: int = 128
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x: jnp.ndarray) -> jnp.ndarray:
        """Project ``x`` [N, D] to [N, out_dim] in the computation dtype."""
        if x.ndim != 2:
            raise ValueError(f"Projector expects features of shape [N, D], got shape {x.shape}.")
        x = self._linear(self.hidden_dim, x.shape[-1], "hidden")(x)
        x = nn.relu(x)
        return self._linear(self.out_dim, self.hidden_dim, "output")(x)

    def _linear(self, features: int, fan_in: int, name: str) -> nn.Dense:
        return nn.Dense(
            features,
            kernel_init=torch_linear_kernel_init,
            bias_init=torch_linear_bias_init(fan_in),
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name=name,
        )
