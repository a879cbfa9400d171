"""Flax linen models: ResNet backbones with split BatchNorm, the projector and the encoder."""

from __future__ import annotations

from typing import Any

import jax.numpy as jnp

from ascl_jax.models.batch_norm import SplitBatchNorm
from ascl_jax.models.encoder import Encoder
from ascl_jax.models.projector import Projector
from ascl_jax.models.resnet import RESNET_SPECS, STEMS, ResNet, resnet, resnet_feature_dim

MODELS: tuple[str, ...] = tuple(RESNET_SPECS)

# Computation dtypes by config name (config.compute_dtype). Parameters stay float32 in both.
COMPUTE_DTYPES: dict[str, Any] = {"float32": jnp.float32, "bfloat16": jnp.bfloat16}

__all__ = [
    "MODELS",
    "STEMS",
    "COMPUTE_DTYPES",
    "Encoder",
    "Projector",
    "ResNet",
    "SplitBatchNorm",
    "compute_dtype",
    "create_encoder",
    "feature_dim",
]


def _check_model(model: str) -> None:
    if model not in RESNET_SPECS:
        raise ValueError(f"Unknown model {model!r}. Valid models: {', '.join(MODELS)}.")


def _check_positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def compute_dtype(name: str) -> Any:
    """Return the jnp dtype of the computation dtype called ``name`` ("float32", "bfloat16").

    Raises:
        ValueError: for any other name.
    """
    if name not in COMPUTE_DTYPES:
        raise ValueError(
            f"Unknown compute dtype {name!r}. Valid compute dtypes: {', '.join(COMPUTE_DTYPES)}."
        )
    return COMPUTE_DTYPES[name]


def feature_dim(model: str, width: int = 64) -> int:
    """Return the size of the pooled features of ``model`` at base width ``width``.

    This is ``8 * width`` for basic-block models and ``32 * width`` for resnet50.
    """
    _check_model(model)
    _check_positive("width", width)
    return resnet_feature_dim(RESNET_SPECS[model].block, width,
                              len(RESNET_SPECS[model].stage_sizes))


def create_encoder(
    model: str,
    *,
    width: int = 64,
    stem: str = "cifar",
    bn_groups: int = 1,
    hidden_dim: int = 2048,
    projection_dim: int = 128,
    dtype: Any = jnp.float32,
) -> Encoder:
    """Build an Encoder: the named ResNet backbone and a Linear-ReLU-Linear projector.

    Parameters are float32 whatever ``dtype`` is, and ``dtype`` sets the computation dtype of
    backbone and projector. The reference CIFAR set-up is
    ``create_encoder("resnet18", stem="cifar", bn_groups=8)``.

    Raises:
        ValueError: for an unknown model or stem, or a non-positive size or group count.
    """
    _check_model(model)
    if stem not in STEMS:
        raise ValueError(f"Unknown stem {stem!r}. Valid stems: {', '.join(STEMS)}.")
    _check_positive("width", width)
    _check_positive("bn_groups", bn_groups)
    _check_positive("hidden_dim", hidden_dim)
    _check_positive("projection_dim", projection_dim)

    backbone = resnet(model, width=width, stem=stem, bn_groups=bn_groups, dtype=dtype,
                      param_dtype=jnp.float32)
    projector = Projector(hidden_dim=hidden_dim, out_dim=projection_dim, dtype=dtype,
                          param_dtype=jnp.float32)
    return Encoder(backbone=backbone, projector=projector)
