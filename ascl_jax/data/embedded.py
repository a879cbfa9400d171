"""The embedded dataset: a class-balanced Fashion-MNIST subset shipped inside the package.

Fashion-MNIST is Copyright (c) 2017 Zalando SE, MIT licence; the notice is in embedded/LICENSE.
experiments/make_embedded_subset.py builds the file from the official IDX files.
"""

import importlib.resources

import numpy as np

from ascl_jax.data.base import ArraySource, ImageSource, concatenate_sources, parse_split

EMBEDDED_FILE = "fashion_mnist_subset.npz"
EMBEDDED_SPLITS = ("train", "test")


def embedded_path() -> str:
    """Return the file system path of the embedded .npz."""
    return str(importlib.resources.files("ascl_jax.data") / "embedded" / EMBEDDED_FILE)


def load_embedded(split: str) -> ImageSource:
    """Load the embedded Fashion-MNIST subset: "train" (10,000 images) or "test" (2,000).

    Images are uint8 [N, 28, 28, 1]; each class has the same number of examples.
    """
    parts = parse_split(split)
    unknown = [part for part in parts if part not in EMBEDDED_SPLITS]
    if unknown:
        raise ValueError(
            f"the embedded dataset has no split {unknown[0]!r}; use one of {EMBEDDED_SPLITS} "
            "or several joined by '+'."
        )
    path = embedded_path()
    try:
        archive = np.load(path, allow_pickle=False)
    except FileNotFoundError as error:
        raise FileNotFoundError(
            f"embedded dataset file {path} not found; the package was installed without its "
            "data files. Rebuild it with `python -m experiments.make_embedded_subset`."
        ) from error
    with archive:
        class_names = tuple(str(name) for name in archive["class_names"])
        sources = [
            ArraySource(archive[f"{part}_images"], archive[f"{part}_labels"], class_names)
            for part in parts
        ]
    return concatenate_sources(sources)
