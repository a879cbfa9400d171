"""ResNet backbones (He et al., 2016) in the torchvision layout, returning pooled features.

The layers follow torchvision's ``resnet*`` models: convolutions without bias, kaiming-normal
(fan_out, ReLU gain) convolution kernels, BatchNorm scale 1 and bias 0, and the stride of a
bottleneck block on its 3x3 convolution ("ResNet v1.5"). Padding is explicit and symmetric, as in
PyTorch, and not XLA's "SAME", which pads strided convolutions asymmetrically. There is no
classifier head, so the network returns the global average pool of the last stage.

Three stems are available:

* ``"cifar"``: 3x3 convolution with stride 1 and no max-pool, for 32x32 inputs and smaller.
* ``"cifar_maxpool"``: the same convolution followed by a 3x3 max-pool with stride 2, the ASCL
  recipe's stem for 64x64 inputs (STL-10, Tiny ImageNet).
* ``"imagenet"``: 7x7 convolution with stride 2, then a 3x3 max-pool with stride 2.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from ascl_jax.models.batch_norm import SplitBatchNorm

Dtype = Any

BLOCKS = ("basic", "bottleneck")
STEMS = ("cifar", "cifar_maxpool", "imagenet")

# Kaiming-normal with fan_out = out_channels * kh * kw and gain sqrt(2), not truncated, as
# torch.nn.init.kaiming_normal_(mode="fan_out", nonlinearity="relu").
conv_kernel_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


@dataclasses.dataclass(frozen=True)
class ResNetSpec:
    """Depth layout of a named ResNet: blocks per stage and the block type."""

    stage_sizes: tuple[int, ...]
    block: str


RESNET_SPECS: dict[str, ResNetSpec] = {
    "resnet10": ResNetSpec((1, 1, 1, 1), "basic"),
    "resnet18": ResNetSpec((2, 2, 2, 2), "basic"),
    "resnet34": ResNetSpec((3, 4, 6, 3), "basic"),
    "resnet50": ResNetSpec((3, 4, 6, 3), "bottleneck"),
}


def block_expansion(block: str) -> int:
    """Return the ratio of a block's output channels to its base channels (1 or 4)."""
    if block not in BLOCKS:
        raise ValueError(f"Unknown ResNet block {block!r}. Valid blocks: {', '.join(BLOCKS)}.")
    return 4 if block == "bottleneck" else 1


def resnet_feature_dim(block: str, width: int, num_stages: int = 4) -> int:
    """Return the pooled feature size: ``width * 2**(num_stages - 1) * expansion``."""
    return width * 2 ** (num_stages - 1) * block_expansion(block)


class _ConvBN(nn.Module):
    """Convolution without bias followed by SplitBatchNorm."""

    features: int
    kernel_size: int
    strides: int
    bn_groups: int
    bn_momentum: float
    bn_epsilon: float
    dtype: Dtype
    param_dtype: Dtype
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        padding = self.kernel_size // 2
        x = nn.Conv(
            self.features,
            (self.kernel_size, self.kernel_size),
            strides=(self.strides, self.strides),
            padding=((padding, padding), (padding, padding)),
            use_bias=False,
            kernel_init=conv_kernel_init,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            name="conv",
        )(x)
        return SplitBatchNorm(
            num_groups=self.bn_groups,
            momentum=self.bn_momentum,
            epsilon=self.bn_epsilon,
            dtype=self.dtype,
            param_dtype=self.param_dtype,
            axis_name=self.bn_axis_name,
            name="bn",
        )(x, use_running_average=not train)


class BasicBlock(nn.Module):
    """Two 3x3 convolutions with an identity or 1x1-projection shortcut (ResNet-18/34)."""

    features: int
    strides: int
    bn_groups: int
    bn_momentum: float
    bn_epsilon: float
    dtype: Dtype
    param_dtype: Dtype
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        conv_bn = _conv_bn_factory(self)
        residual = x
        y = nn.relu(conv_bn(self.features, 3, self.strides, name="conv_bn1")(x, train=train))
        y = conv_bn(self.features, 3, 1, name="conv_bn2")(y, train=train)
        if self.strides != 1 or x.shape[-1] != self.features:
            residual = conv_bn(self.features, 1, self.strides, name="shortcut")(x, train=train)
        return nn.relu(y + residual)


class BottleneckBlock(nn.Module):
    """1x1 -> 3x3 (strided) -> 1x1 convolutions with 4x output channels (ResNet-50)."""

    features: int
    strides: int
    bn_groups: int
    bn_momentum: float
    bn_epsilon: float
    dtype: Dtype
    param_dtype: Dtype
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        conv_bn = _conv_bn_factory(self)
        out_features = self.features * 4
        residual = x
        y = nn.relu(conv_bn(self.features, 1, 1, name="conv_bn1")(x, train=train))
        y = nn.relu(conv_bn(self.features, 3, self.strides, name="conv_bn2")(y, train=train))
        y = conv_bn(out_features, 1, 1, name="conv_bn3")(y, train=train)
        if self.strides != 1 or x.shape[-1] != out_features:
            residual = conv_bn(out_features, 1, self.strides, name="shortcut")(x, train=train)
        return nn.relu(y + residual)


def _conv_bn_factory(block: BasicBlock | BottleneckBlock):
    """Return a constructor of ``_ConvBN`` layers that share the block's BN and dtype settings."""

    def make(features: int, kernel_size: int, strides: int, *, name: str) -> _ConvBN:
        return _ConvBN(
            features=features,
            kernel_size=kernel_size,
            strides=strides,
            bn_groups=block.bn_groups,
            bn_momentum=block.bn_momentum,
            bn_epsilon=block.bn_epsilon,
            dtype=block.dtype,
            param_dtype=block.param_dtype,
            bn_axis_name=block.bn_axis_name,
            name=name,
        )

    return make


class ResNet(nn.Module):
    """ResNet backbone mapping images [N, H, W, C] to pooled features [N, feature_dim].

    Stage i (0-based) has ``stage_sizes[i]`` blocks with ``width * 2**i`` base channels, and
    every stage after the first halves the spatial size with stride 2 in its first block. The
    feature size is ``width * 2**(len(stage_sizes) - 1)``, times 4 for bottleneck blocks: 512
    for ResNet-18 and 2048 for ResNet-50 at the standard width 64. Any number of input
    channels works (1 for greyscale, 3 for RGB).

    Attributes:
        stage_sizes: number of blocks in each stage, e.g. (2, 2, 2, 2) for ResNet-18.
        block: "basic" (two 3x3 convolutions) or "bottleneck" (1x1, 3x3, 1x1, 4x expansion).
        width: base channel count of the first stage (64 in the standard ResNets).
        stem: "cifar" (3x3 conv, stride 1, no max-pool), "cifar_maxpool" (the same with a 3x3
            max-pool of stride 2) or "imagenet" (7x7 conv, stride 2, 3x3 max-pool of stride 2).
        bn_groups: number of SplitBatchNorm groups used in training mode.
        bn_momentum: running-statistics momentum, flax convention (0.9 equals PyTorch 0.1).
        bn_epsilon: BatchNorm epsilon.
        dtype: computation dtype of convolutions and normalisation outputs (e.g. bfloat16).
        param_dtype: dtype of the parameters.
        bn_axis_name: mapped axis along which the batch is sharded in training mode (inside
            ``jax.shard_map``), or None. ``bn_groups`` then counts the groups of the global
            batch; see ``SplitBatchNorm``.
    """

    stage_sizes: Sequence[int]
    block: str = "basic"
    width: int = 64
    stem: str = "cifar"
    bn_groups: int = 1
    bn_momentum: float = 0.9
    bn_epsilon: float = 1e-5
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32
    bn_axis_name: str | None = None

    @nn.compact
    def __call__(self, x: jnp.ndarray, *, train: bool) -> jnp.ndarray:
        """Compute pooled features, float32 whatever the computation dtype.

        In training mode BatchNorm uses the statistics of each of the ``bn_groups`` groups and
        updates the ``batch_stats`` collection, so apply with ``mutable=["batch_stats"]``. In
        evaluation mode it uses the running statistics.
        """
        self._check_config(x)
        block_cls = BottleneckBlock if self.block == "bottleneck" else BasicBlock
        bn_kwargs = dict(bn_groups=self.bn_groups, bn_momentum=self.bn_momentum,
                         bn_epsilon=self.bn_epsilon, dtype=self.dtype,
                         param_dtype=self.param_dtype, bn_axis_name=self.bn_axis_name)

        x = jnp.asarray(x, self.dtype)
        if self.stem in ("cifar", "cifar_maxpool"):
            x = _ConvBN(features=self.width, kernel_size=3, strides=1, name="stem",
                        **bn_kwargs)(x, train=train)
            x = nn.relu(x)
            if self.stem == "cifar_maxpool":
                x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
        else:
            x = _ConvBN(features=self.width, kernel_size=7, strides=2, name="stem",
                        **bn_kwargs)(x, train=train)
            x = nn.relu(x)
            x = nn.max_pool(x, (3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))

        for stage, num_blocks in enumerate(self.stage_sizes):
            for index in range(num_blocks):
                strides = 2 if stage > 0 and index == 0 else 1
                x = block_cls(features=self.width * 2**stage, strides=strides,
                              name=f"stage{stage + 1}_block{index + 1}",
                              **bn_kwargs)(x, train=train)

        return jnp.mean(x.astype(jnp.float32), axis=(1, 2))

    def _check_config(self, x: jnp.ndarray) -> None:
        """Raise ValueError for an unknown stem or block, bad sizes or a non-image input."""
        if self.stem not in STEMS:
            raise ValueError(f"Unknown ResNet stem {self.stem!r}. Valid stems: {', '.join(STEMS)}.")
        if self.block not in BLOCKS:
            raise ValueError(
                f"Unknown ResNet block {self.block!r}. Valid blocks: {', '.join(BLOCKS)}."
            )
        if self.width < 1:
            raise ValueError(f"ResNet width must be a positive integer, got {self.width}.")
        if not self.stage_sizes or any(size < 1 for size in self.stage_sizes):
            raise ValueError(
                f"ResNet stage_sizes must be a non-empty sequence of positive integers, "
                f"got {tuple(self.stage_sizes)}."
            )
        if x.ndim != 4:
            raise ValueError(
                f"ResNet expects images of shape [N, H, W, C], got shape {x.shape}."
            )


def resnet(name: str, **kwargs: Any) -> ResNet:
    """Build the named ResNet from ``RESNET_SPECS``, with ``kwargs`` setting the other fields."""
    if name not in RESNET_SPECS:
        raise ValueError(
            f"Unknown model {name!r}. Valid models: {', '.join(RESNET_SPECS)}."
        )
    spec = RESNET_SPECS[name]
    return ResNet(stage_sizes=spec.stage_sizes, block=spec.block, **kwargs)


def resnet10(**kwargs: Any) -> ResNet:
    """Build ResNet-10: basic blocks, stages (1, 1, 1, 1), a small model for tests and CPU runs."""
    return resnet("resnet10", **kwargs)


def resnet18(**kwargs: Any) -> ResNet:
    """Build ResNet-18: basic blocks, stages (2, 2, 2, 2)."""
    return resnet("resnet18", **kwargs)


def resnet34(**kwargs: Any) -> ResNet:
    """Build ResNet-34: basic blocks, stages (3, 4, 6, 3)."""
    return resnet("resnet34", **kwargs)


def resnet50(**kwargs: Any) -> ResNet:
    """Build ResNet-50: bottleneck blocks, stages (3, 4, 6, 3)."""
    return resnet("resnet50", **kwargs)
