"""Datasets as random-access image sources, and the batches that training reads from them."""

from ascl_jax.data.base import (
    UNLABELLED,
    ArraySource,
    ConcatSource,
    ImageSource,
    resize_and_center_crop,
)
from ascl_jax.data.folder import ImageDecodeError, default_cache_dir
from ascl_jax.data.pipeline import (
    Batch,
    EvalBatch,
    epoch_permutation,
    eval_batches,
    steps_per_epoch,
    train_batches,
)
from ascl_jax.data.sources import load_source
from ascl_jax.data.stats import DATASET_STATS, channel_stats, known_stats, normalization_stats

__all__ = [
    "DATASET_STATS",
    "UNLABELLED",
    "ArraySource",
    "Batch",
    "ConcatSource",
    "EvalBatch",
    "ImageDecodeError",
    "ImageSource",
    "channel_stats",
    "default_cache_dir",
    "epoch_permutation",
    "eval_batches",
    "known_stats",
    "load_source",
    "normalization_stats",
    "resize_and_center_crop",
    "steps_per_epoch",
    "train_batches",
]
