"""Datasets prepared with tensorflow-datasets (tfds), read without any download by default.

Small datasets (CIFAR, STL-10) are read once into memory as numpy arrays. Large ones (ImageNet)
are read example by example through tfds's random-access data source, which needs the dataset
prepared in the array_record format. Their images are resized on the host to a fixed size.
"""

import concurrent.futures
import logging
import os
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from ascl_jax.data.base import (
    UNLABELLED,
    ArraySource,
    ImageSource,
    check_indices,
    concatenate_sources,
    is_unlabelled_split,
    parse_split,
    resize_and_center_crop,
    resize_images,
)

logger = logging.getLogger(__name__)

# Largest decoded split, in bytes of uint8 pixels, that is read into memory when in_memory is
# None. Larger splits use random access. A default, not tuned on any machine.
IN_MEMORY_MAX_BYTES = 8 * 2**30

# Examples per tf.data batch while reading a split into memory.
_READ_BATCH_SIZE = 1024


def load_tfds(
    name: str,
    split: str,
    *,
    data_dir: str = "",
    image_size: int | None = None,
    download: bool = False,
    in_memory: bool | None = None,
    num_threads: int | None = None,
) -> ImageSource:
    """Load a split (or "+"-joined splits) of a tfds image classification dataset.

    Args:
        name: tfds dataset name, such as "cifar10", "stl10" or "imagenet2012".
        split: tfds split, slices allowed ("train[:10%]"), several joined by "+". Splits named
            "unlabelled" or "unlabeled" get label -1.
        data_dir: tfds data directory; empty means tfds's default (~/tensorflow_datasets or
            $TFDS_DATA_DIR).
        image_size: When set, every image that is not image_size x image_size is resized
            (shorter side, bilinear) and center-cropped. Required for datasets whose images
            vary in size.
        download: Download and prepare the dataset if it is missing (needs network access).
        in_memory: True reads the split into memory, False uses random access (array_record
            format only), None picks memory when the decoded split fits IN_MEMORY_MAX_BYTES.
        num_threads: Threads that decode images of a random-access source; None means up to 16.

    Raises:
        FileNotFoundError: the dataset is not prepared in data_dir. The message gives the
            `tfds build` command that prepares it.
        ValueError: unknown dataset or split, or variable-size images without image_size.
    """
    try:
        import tensorflow_datasets as tfds
    except ImportError as error:
        raise ImportError(
            f"dataset 'tfds:{name}' needs tensorflow-datasets: pip install tensorflow-datasets"
        ) from error

    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive; got {image_size}.")
    parts = parse_split(split)
    try:
        builder = tfds.builder(name, data_dir=data_dir or None)
    except tfds.core.registered.DatasetNotFoundError as error:
        raise ValueError(
            f"tensorflow-datasets has no dataset {name!r} (searched the registered builders "
            f"and data_dir {data_dir or 'default'}). Check the name in the tfds catalogue, "
            "for example 'cifar10' or 'imagenet2012'."
        ) from error
    if download:
        builder.download_and_prepare()

    features = builder.info.features
    if "image" not in features:
        raise ValueError(
            f"tfds dataset {name!r} has no 'image' feature; its features are {list(features)}."
        )
    label_feature = features["label"] if "label" in features else None
    class_names = tuple(getattr(label_feature, "names", None) or ())
    feature_shape = tuple(features["image"].shape)

    known_splits = builder.info.splits
    for part in parts:
        base_name = part.split("[", 1)[0]
        if known_splits and base_name not in known_splits:
            raise ValueError(
                f"tfds dataset {name!r} has no split {base_name!r}; its splits are "
                f"{sorted(known_splits)}."
            )
    if image_size is None and None in feature_shape[:2]:
        raise ValueError(
            f"images of tfds dataset {name!r} vary in size (shape {feature_shape}); pass "
            "image_size so they can be resized to one size."
        )

    sources = []
    for part in parts:
        num_examples = _num_examples(known_splits, part)
        height, width = (image_size, image_size) if image_size else feature_shape[:2]
        estimated_bytes = num_examples * height * width * (feature_shape[2] or 3)
        use_memory = in_memory if in_memory is not None else estimated_bytes <= IN_MEMORY_MAX_BYTES
        if use_memory:
            source = _read_into_memory(builder, part, class_names, image_size)
        else:
            records = _open_data_source(builder, part)
            source = RecordSource(
                records,
                class_names=class_names,
                image_shape=_record_image_shape(records, feature_shape, image_size),
                image_size=image_size,
                unlabelled=is_unlabelled_split(part) or label_feature is None,
                num_threads=num_threads,
            )
        sources.append(source)
    return concatenate_sources(sources)


def _num_examples(known_splits: Any, part: str) -> int:
    """Return the number of examples of a split (slices allowed), or 0 if tfds does not know it."""
    if not known_splits:
        return 0
    try:
        return int(known_splits[part].num_examples)
    except (KeyError, ValueError):
        return 0


def _not_prepared_error(builder: Any) -> FileNotFoundError:
    name = builder.name
    root = builder.data_dir_root
    return FileNotFoundError(
        f"tfds dataset {name!r} is not prepared in {root} ({builder.data_path} does not exist). "
        f"Prepare it on a machine with network access with `tfds build {name} --data_dir={root}`, "
        "adding --file_format=array_record for random access to large datasets, or pass "
        f"download=True. imagenet2012 also needs its archives in {root}/downloads/manual first."
    )


def _read_into_memory(
    builder: Any, part: str, class_names: tuple[str, ...], image_size: int | None
) -> ArraySource:
    """Read every example of a split into numpy arrays, in the dataset's stored order."""
    import tensorflow as tf
    import tensorflow_datasets as tfds

    try:
        dataset = builder.as_dataset(split=part, shuffle_files=False)
    except AssertionError as error:
        if "could not find data" in str(error):
            raise _not_prepared_error(builder) from error
        raise
    has_label = "label" in builder.info.features and not is_unlabelled_split(part)

    def select(example: dict) -> tuple:
        label = example["label"] if has_label else tf.constant(UNLABELLED, tf.int64)
        return example["image"], label

    dataset = dataset.map(select)
    fixed_shape = None not in tuple(builder.info.features["image"].shape)
    image_chunks = []
    label_chunks = []
    if fixed_shape:
        for images, labels in tfds.as_numpy(dataset.batch(_READ_BATCH_SIZE)):
            image_chunks.append(resize_images(images, image_size) if image_size else images)
            label_chunks.append(labels)
    else:
        for image, label in tfds.as_numpy(dataset):
            image_chunks.append(resize_and_center_crop(image, image_size)[None])
            label_chunks.append(np.asarray(label)[None])
    if not image_chunks:
        raise ValueError(f"split {part!r} of tfds dataset {builder.name!r} is empty.")
    return ArraySource(
        np.concatenate(image_chunks),
        np.concatenate(label_chunks).astype(np.int32),
        class_names,
    )


def _open_data_source(builder: Any, part: str) -> Sequence[dict]:
    """Open tfds's random-access data source of a split."""
    try:
        return builder.as_data_source(split=part)
    except (NotImplementedError, ValueError, FileNotFoundError) as error:
        if not builder.is_prepared():
            raise _not_prepared_error(builder) from error
        if isinstance(error, NotImplementedError):
            raise ValueError(
                f"tfds dataset {builder.name!r} in {builder.data_dir} is stored in a format "
                f"without random access. Prepare it again with `tfds build {builder.name} "
                f"--data_dir={builder.data_dir_root} --file_format=array_record`, or pass "
                "in_memory=True if the split fits in memory."
            ) from error
        raise


def _record_image_shape(
    records: Sequence[dict], feature_shape: tuple, image_size: int | None
) -> tuple[int, int, int]:
    """Return the (H, W, C) a RecordSource produces."""
    channels = feature_shape[2]
    if channels is None:
        channels = np.asarray(records[0]["image"]).shape[-1]
    if image_size:
        return (image_size, image_size, channels)
    return (feature_shape[0], feature_shape[1], channels)


class RecordSource(ImageSource):
    """Source over a random-access sequence of example dicts with "image" and "label" keys.

    Examples are decoded by the sequence (tfds decodes JPEGs on access) in a thread pool.
    """

    def __init__(
        self,
        records: Sequence[dict],
        *,
        class_names: Sequence[str],
        image_shape: tuple[int, int, int],
        image_size: int | None = None,
        unlabelled: bool = False,
        num_threads: int | None = None,
    ) -> None:
        """Wrap `records`; image_size resizes each image, unlabelled sets every label to -1."""
        self.records = records
        self.class_names = tuple(class_names)
        self.image_shape = tuple(image_shape)
        self.image_size = image_size
        self.unlabelled = unlabelled
        self.num_threads = num_threads or min(16, os.cpu_count() or 1)
        self._executor = None
        self._executor_lock = threading.Lock()

    def __len__(self) -> int:
        return len(self.records)

    def get(self, indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        indices = check_indices(indices, len(self))
        images = np.empty((indices.size, *self.image_shape), np.uint8)
        labels = np.empty((indices.size,), np.int32)

        def load(position: int) -> None:
            images[position], labels[position] = self._load_example(int(indices[position]))

        with self._executor_lock:
            if self._executor is None:
                self._executor = concurrent.futures.ThreadPoolExecutor(self.num_threads)
        list(self._executor.map(load, range(indices.size)))
        return images, labels

    def _load_example(self, index: int) -> tuple[np.ndarray, int]:
        example = self.records[index]
        image = np.asarray(example["image"], dtype=np.uint8)
        if image.ndim == 2:
            image = image[..., None]
        if self.image_size:
            image = resize_and_center_crop(image, self.image_size)
        if image.shape != self.image_shape:
            raise ValueError(
                f"example {index} has an image of shape {image.shape}; expected "
                f"{self.image_shape}. Pass image_size to resize images of varying size."
            )
        label = UNLABELLED if self.unlabelled else int(example["label"])
        return image, label
