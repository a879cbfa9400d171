"""Entry point that opens any supported dataset as an ImageSource."""

from ascl_jax.data.base import ImageSource, resize_source
from ascl_jax.data.embedded import load_embedded
from ascl_jax.data.folder import load_folder
from ascl_jax.data.tfds_source import load_tfds


def load_source(
    dataset: str,
    split: str,
    *,
    data_dir: str = "",
    image_size: int | None = None,
    skip_corrupt: bool = False,
    cache_dir: str | None = None,
    download: bool = False,
    in_memory: bool | None = None,
) -> ImageSource:
    """Open a split of a dataset for random access by index.

    Args:
        dataset: "embedded" (the Fashion-MNIST subset inside the package), "folder" (data_dir
            contains SPLIT/CLASS/*.jpg folders or SPLIT.tar archives) or "tfds:NAME".
        split: Split name; several joined by "+" are concatenated in order ("train+unlabelled").
            Examples of "unlabelled" splits have label -1.
        data_dir: Image folder, or tfds data directory; unused by "embedded".
        image_size: When set, images that are not image_size x image_size are resized (shorter
            side, bilinear) and center-cropped to it.
        skip_corrupt: "folder" only: skip undecodable images instead of raising.
        cache_dir: "folder" only: cache of decoded arrays; None means $ASCL_JAX_CACHE or
            ~/.cache/ascl_jax.
        download: "tfds:" only: download and prepare a missing dataset (network access).
        in_memory: "tfds:" only: force reading into memory (True) or random access (False).

    Raises:
        FileNotFoundError: the data is missing; the message names the path searched and how to
            provide the data.
        ValueError: an unknown dataset or split, or inconsistent images.
    """
    if dataset == "embedded":
        source = load_embedded(split)
        return resize_source(source, image_size) if image_size else source
    if dataset == "folder":
        return load_folder(
            data_dir, split, image_size=image_size, skip_corrupt=skip_corrupt, cache_dir=cache_dir
        )
    if dataset.startswith("tfds:") and len(dataset) > len("tfds:"):
        return load_tfds(
            dataset.removeprefix("tfds:"),
            split,
            data_dir=data_dir,
            image_size=image_size,
            download=download,
            in_memory=in_memory,
        )
    raise ValueError(
        f"unknown dataset {dataset!r}; use 'embedded', 'folder' (with data_dir) or 'tfds:NAME' "
        "such as 'tfds:cifar10'."
    )
