"""Random-access image sources: the interface every dataset implements, and its building blocks.

A source maps an example index to a uint8 image [H, W, C] and an int32 label. Training order is
a function of (seed, step) alone (see pipeline.py), so a source must return the same example for
the same index every time it is loaded.
"""

import abc
import concurrent.futures
import os
from collections.abc import Sequence

import numpy as np
from PIL import Image

# Label of an example without a class, such as STL-10's "unlabelled" split.
UNLABELLED = -1

# Split names whose examples carry no label; their labels are set to UNLABELLED.
UNLABELLED_SPLITS = frozenset({"unlabelled", "unlabeled"})


class ImageSource(abc.ABC):
    """Dataset with random access by example index.

    Attributes:
        class_names: Name of each class; label i is class_names[i].
        image_shape: (H, W, C) of every image, C = 1 (greyscale) or 3 (RGB).
    """

    class_names: tuple[str, ...]
    image_shape: tuple[int, int, int]

    @abc.abstractmethod
    def __len__(self) -> int:
        """Return the number of examples."""

    @abc.abstractmethod
    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Gather examples by index.

        Args:
            indices: int array [k] with values in [0, len(self)), in any order, repeats allowed.

        Returns:
            images: uint8 [k, H, W, C], in the order of `indices`.
            labels: int32 [k], in [0, num_classes) or UNLABELLED (-1).
        """

    @property
    def num_classes(self) -> int:
        """Number of classes (0 for a source whose examples are all unlabelled)."""
        return len(self.class_names)


def check_indices(indices: np.ndarray, num_examples: int) -> np.ndarray:
    """Return `indices` as a 1-D int64 array, raising ValueError if any is out of range."""
    indices = np.asarray(indices)
    if indices.ndim != 1:
        raise ValueError(f"indices must be a 1-D array; got shape {indices.shape}.")
    if indices.size and not np.issubdtype(indices.dtype, np.integer):
        raise ValueError(f"indices must be integers; got dtype {indices.dtype}.")
    indices = indices.astype(np.int64, copy=False)
    if indices.size and (indices.min() < 0 or indices.max() >= num_examples):
        bad = indices[(indices < 0) | (indices >= num_examples)][0]
        raise ValueError(f"index {bad} is out of range for a source of {num_examples} examples.")
    return indices


class ArraySource(ImageSource):
    """Source whose images and labels are held in memory as numpy arrays."""

    def __init__(
        self,
        images: np.ndarray,
        labels: np.ndarray,
        class_names: Sequence[str],
    ) -> None:
        """Wrap uint8 images [N, H, W, C] and integer labels [N] in [-1, len(class_names))."""
        images = np.asarray(images)
        labels = np.asarray(labels)
        if images.dtype != np.uint8:
            raise ValueError(f"images must be uint8; got {images.dtype}.")
        if images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise ValueError(
                f"images must have shape [N, H, W, C] with C = 1 or 3; got {images.shape}."
            )
        if labels.shape != images.shape[:1]:
            raise ValueError(
                f"labels must have shape [{images.shape[0]}] to match the images; got {labels.shape}."
            )
        if labels.size and not np.issubdtype(labels.dtype, np.integer):
            raise ValueError(f"labels must be integers; got dtype {labels.dtype}.")
        class_names = tuple(str(name) for name in class_names)
        if labels.size and (labels.min() < UNLABELLED or labels.max() >= len(class_names)):
            raise ValueError(
                f"labels span [{labels.min()}, {labels.max()}] but must lie in "
                f"[{UNLABELLED}, {len(class_names) - 1}] for {len(class_names)} classes "
                f"({UNLABELLED} marks an unlabelled example)."
            )
        self.images = images
        self.labels = labels.astype(np.int32, copy=False)
        self.class_names = class_names
        self.image_shape = tuple(int(d) for d in images.shape[1:])

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = check_indices(indices, len(self))
        return self.images[indices], self.labels[indices]


class ConcatSource(ImageSource):
    """Source that chains several sources with the same image shape and classes."""

    def __init__(self, parts: Sequence[ImageSource]) -> None:
        """Chain `parts`: index i of the result is the i-th example counting through parts in order."""
        if not parts:
            raise ValueError("ConcatSource needs at least one part.")
        shapes = {part.image_shape for part in parts}
        if len(shapes) != 1:
            raise ValueError(f"parts must share one image shape; got {sorted(shapes)}.")
        labelled_names = {part.class_names for part in parts if part.class_names}
        if len(labelled_names) > 1:
            raise ValueError(f"parts must share their class names; got {sorted(labelled_names)}.")
        self.parts = tuple(parts)
        self.class_names = next(iter(labelled_names), ())
        self.image_shape = parts[0].image_shape
        # offsets[j] is the global index of the first example of part j.
        self.offsets = np.cumsum([0] + [len(part) for part in parts])

    def __len__(self) -> int:
        return int(self.offsets[-1])

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = check_indices(indices, len(self))
        images = np.empty((indices.size, *self.image_shape), np.uint8)
        labels = np.empty((indices.size,), np.int32)
        part_of_index = np.searchsorted(self.offsets, indices, side="right") - 1
        for j, part in enumerate(self.parts):
            selected = np.flatnonzero(part_of_index == j)
            if selected.size:
                images[selected], labels[selected] = part.get(indices[selected] - self.offsets[j])
        return images, labels


def concatenate_sources(parts: Sequence[ImageSource]) -> ImageSource:
    """Join sources end to end; in-memory parts become one ArraySource, others a ConcatSource.

    Greyscale parts are converted to RGB when another part is RGB.
    """
    if len(parts) == 1:
        return parts[0]
    if any(part.image_shape[-1] == 3 for part in parts):
        parts = [grey_to_rgb(part) if part.image_shape[-1] == 1 else part for part in parts]
    if all(isinstance(part, ArraySource) for part in parts):
        labelled_names = {part.class_names for part in parts if part.class_names}
        if len(labelled_names) > 1:
            raise ValueError(f"parts must share their class names; got {sorted(labelled_names)}.")
        shapes = {part.image_shape for part in parts}
        if len(shapes) != 1:
            raise ValueError(f"parts must share one image shape; got {sorted(shapes)}.")
        return ArraySource(
            np.concatenate([part.images for part in parts]),
            np.concatenate([part.labels for part in parts]),
            next(iter(labelled_names), ()),
        )
    return ConcatSource(parts)


def grey_to_rgb(source: ImageSource) -> ImageSource:
    """Return an RGB version of a greyscale source (the grey channel repeated three times)."""
    if not isinstance(source, ArraySource):
        raise ValueError(
            f"cannot convert a {type(source).__name__} from greyscale to RGB; "
            "only in-memory sources support the conversion."
        )
    return ArraySource(np.repeat(source.images, 3, axis=-1), source.labels, source.class_names)


def parse_split(split: str) -> list[str]:
    """Split a "+"-joined split string ("train+unlabelled") into its parts."""
    parts = [part.strip() for part in split.split("+")]
    if not split or any(not part for part in parts):
        raise ValueError(
            f"invalid split {split!r}: expected a split name or names joined by '+', "
            "for example 'train' or 'train+unlabelled'."
        )
    return parts


def is_unlabelled_split(part: str) -> bool:
    """Return whether a split name (optionally with a tfds slice such as "[:10%]") is unlabelled."""
    return part.split("[", 1)[0].strip().lower() in UNLABELLED_SPLITS


def resize_and_center_crop(image: np.ndarray, size: int) -> np.ndarray:
    """Resize an image [H, W, C] so its shorter side is `size`, then crop the central size x size.

    The longer side becomes int(size * long / short) pixels (bilinear, antialiased by PIL when
    shrinking) and the crop starts at round((long_new - size) / 2). An image that already is
    size x size is returned unchanged.
    """
    height, width, channels = image.shape
    if (height, width) == (size, size):
        return image
    if height <= width:
        new_height, new_width = size, int(size * width / height)
    else:
        new_height, new_width = int(size * height / width), size
    pil_image = Image.fromarray(image[..., 0] if channels == 1 else image)
    resized = np.asarray(pil_image.resize((new_width, new_height), Image.BILINEAR))
    top = int(round((new_height - size) / 2.0))
    left = int(round((new_width - size) / 2.0))
    cropped = resized[top : top + size, left : left + size]
    return cropped[..., None] if channels == 1 else cropped


def resize_images(images: np.ndarray, size: int, num_threads: int | None = None) -> np.ndarray:
    """Apply resize_and_center_crop to every image of a batch [N, H, W, C] in a thread pool."""
    if images.shape[1:3] == (size, size):
        return images
    output = np.empty((images.shape[0], size, size, images.shape[-1]), np.uint8)
    num_threads = num_threads or min(8, os.cpu_count() or 1)

    def resize_one(i: int) -> None:
        output[i] = resize_and_center_crop(images[i], size)

    with concurrent.futures.ThreadPoolExecutor(num_threads) as executor:
        list(executor.map(resize_one, range(images.shape[0])))
    return output


def resize_source(source: ArraySource, size: int) -> ArraySource:
    """Return `source` with every image resized and center-cropped to size x size."""
    if source.image_shape[:2] == (size, size):
        return source
    return ArraySource(resize_images(source.images, size), source.labels, source.class_names)
