"""Per-channel normalisation constants: known values per dataset, or computed from the data."""

import numpy as np

from ascl_jax.data.base import ImageSource

# (mean, std) per channel of pixel values scaled to [0, 1]. The CIFAR, STL-10 and Tiny ImageNet
# values are those of the ASCL authors' training recipe. The CIFAR-10 std is the widely copied
# (0.2023, 0.1994, 0.2010), although the pooled per-pixel std that channel_stats computes is
# (0.245, 0.243, 0.261) on a JPEG copy of the CIFAR-10 training set. ImageNet's are torchvision's. "embedded" was computed by channel_stats on the embedded train
# split (10,000 Fashion-MNIST images).
DATASET_STATS: dict[str, tuple[tuple[float, ...], tuple[float, ...]]] = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    "cifar100": ((0.5071, 0.4867, 0.4408), (0.2675, 0.2565, 0.2761)),
    "stl10": ((0.4408, 0.4279, 0.3867), (0.2682, 0.2610, 0.2686)),
    "tiny_imagenet": ((0.4802, 0.4481, 0.3975), (0.2302, 0.2265, 0.2262)),
    "imagenet": ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225)),
    "embedded": ((0.2867,), (0.3540,)),
}

# Other spellings of the keys above, including the tfds names.
_ALIASES = {
    "imagenet2012": "imagenet",
    "tiny-imagenet": "tiny_imagenet",
    "tinyimagenet": "tiny_imagenet",
    "tiny_imagenet200": "tiny_imagenet",
    "fashion_mnist_subset": "embedded",
}


def known_stats(dataset: str) -> tuple[tuple[float, ...], tuple[float, ...]] | None:
    """Return DATASET_STATS for a dataset name ("cifar10", "tfds:cifar10", ...), or None."""
    name = dataset.lower().removeprefix("tfds:").split("/", 1)[0]
    name = _ALIASES.get(name, name)
    return DATASET_STATS.get(name)


def channel_stats(
    source: ImageSource, max_examples: int = 10000, batch_size: int = 1000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Compute per-channel mean and std of pixel values in [0, 1] over up to max_examples images.

    The images are spread evenly over the source (indices round(linspace(0, N - 1, n))), so a
    source sorted by class still gives a class-balanced sample. With x the pixel values of one
    channel over all sampled images and pixels: mean = E[x], std = sqrt(E[x^2] - E[x]^2).
    """
    if len(source) == 0:
        raise ValueError("cannot compute channel statistics of an empty source.")
    if max_examples <= 0:
        raise ValueError(f"max_examples must be positive; got {max_examples}.")
    count = min(max_examples, len(source))
    indices = np.unique(np.round(np.linspace(0, len(source) - 1, count)).astype(np.int64))
    channels = source.image_shape[-1]
    total = np.zeros(channels, np.float64)
    total_squares = np.zeros(channels, np.float64)
    num_pixels = 0
    for start in range(0, indices.size, batch_size):
        images, _ = source.get(indices[start : start + batch_size])
        pixels = images.reshape(-1, channels).astype(np.float64) / 255.0
        total += pixels.sum(axis=0)
        total_squares += np.square(pixels).sum(axis=0)
        num_pixels += pixels.shape[0]
    mean = total / num_pixels
    std = np.sqrt(np.maximum(total_squares / num_pixels - np.square(mean), 0.0))
    return tuple(float(m) for m in mean), tuple(float(s) for s in std)


def normalization_stats(
    dataset: str, source: ImageSource, max_examples: int = 10000
) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Return the known (mean, std) of a dataset, or compute them from `source` if unknown.

    Known values are used only when their channel count matches the source's.
    """
    stats = known_stats(dataset)
    if stats is not None and len(stats[0]) == source.image_shape[-1]:
        return stats
    return channel_stats(source, max_examples)
