"""Encoder used for both the online and the target network: ResNet backbone + projector."""

from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from ascl_jax.models.projector import Projector
from ascl_jax.models.resnet import ResNet


class Encoder(nn.Module):
    """Backbone followed by a projection head.

    Parameters live under ``params/backbone`` and ``params/projector``, running BatchNorm
    statistics under ``batch_stats/backbone``.

    Attributes:
        backbone: ResNet returning pooled features [N, feature_dim].
        projector: MLP mapping the features to the projection [N, out_dim].
    """

    backbone: ResNet
    projector: Projector

    def __call__(self, images: jnp.ndarray, *, train: bool) -> tuple[jnp.ndarray, jnp.ndarray]:
        """Encode images [N, H, W, C] into ``(features, projection)``, both float32.

        ``features`` [N, feature_dim] are the pooled backbone output, used by kNN and linear
        evaluation. ``projection`` [N, out_dim] is the projector output, not L2-normalised.

        With ``train=True`` BatchNorm normalises each of the backbone's ``bn_groups`` groups
        with its own statistics and updates ``batch_stats``, so apply with
        ``mutable=["batch_stats"]``. With ``train=False`` it uses the running statistics and
        changes nothing.
        """
        features = self.backbone(images, train=train)
        projection = self.projector(features)
        return features, projection.astype(jnp.float32)
