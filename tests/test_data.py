"""Tests of the data sources (embedded, folder, tar, tfds) and the batch pipeline."""

import gc
import gzip
import logging
import os
import tarfile
import threading
import time

import numpy as np
import pytest
from PIL import Image

from ascl_jax.data import (
    DATASET_STATS,
    UNLABELLED,
    ArraySource,
    ConcatSource,
    ImageDecodeError,
    channel_stats,
    epoch_permutation,
    eval_batches,
    load_source,
    normalization_stats,
    resize_and_center_crop,
    steps_per_epoch,
    train_batches,
)
from ascl_jax.data import folder as folder_module
from ascl_jax.data.embedded import embedded_path

FASHION_MNIST_DIR = "/usr/share/datasets/fashion-mnist"
FASHION_MNIST_CLASSES = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)
CIFAR10_CLASSES = (
    "airplane",
    "automobile",
    "bird",
    "cat",
    "deer",
    "dog",
    "frog",
    "horse",
    "ship",
    "truck",
)


# ---------------------------------------------------------------------------------------------
# Embedded Fashion-MNIST subset


def test_embedded_train_shapes_and_balance():
    source = load_source("embedded", "train")
    images, labels = source.get(np.arange(len(source)))
    assert len(source) == 10000
    assert source.image_shape == (28, 28, 1)
    assert images.shape == (10000, 28, 28, 1)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int32
    assert source.class_names == FASHION_MNIST_CLASSES
    assert source.num_classes == 10
    np.testing.assert_array_equal(np.bincount(labels, minlength=10), np.full(10, 1000))


def test_embedded_test_split_and_join():
    test = load_source("embedded", "test")
    joined = load_source("embedded", "train+test")
    assert len(test) == 2000
    np.testing.assert_array_equal(np.bincount(test.get(np.arange(2000))[1]), np.full(10, 200))
    assert len(joined) == 12000
    np.testing.assert_array_equal(joined.get(np.arange(10000, 12000))[0], test.get(np.arange(2000))[0])


def test_embedded_unknown_split_rejected():
    with pytest.raises(ValueError, match="validation"):
        load_source("embedded", "validation")


def test_embedded_licence_present():
    licence = os.path.join(os.path.dirname(embedded_path()), "LICENSE")
    with open(licence) as file:
        text = file.read()
    assert "Copyright (c) 2017 Zalando SE" in text
    assert "The MIT License" in text
    assert os.path.getsize(embedded_path()) < 6e6


def _read_idx_reference(path: str, header_bytes: int) -> np.ndarray:
    with gzip.open(path, "rb") as file:
        return np.frombuffer(file.read(), np.uint8, offset=header_bytes)


@pytest.mark.skipif(not os.path.isdir(FASHION_MNIST_DIR), reason="Fashion-MNIST IDX files absent")
def test_embedded_matches_first_per_class():
    images = _read_idx_reference(f"{FASHION_MNIST_DIR}/t10k-images-idx3-ubyte.gz", 16)
    labels = _read_idx_reference(f"{FASHION_MNIST_DIR}/t10k-labels-idx1-ubyte.gz", 8)
    images = images.reshape(-1, 28, 28, 1)
    source = load_source("embedded", "test")
    got_images, got_labels = source.get(np.arange(len(source)))
    for label in range(10):
        expected = images[labels == label][:200]
        np.testing.assert_array_equal(got_images[got_labels == label], expected)


def test_embedded_stats_match_data():
    source = load_source("embedded", "train")
    pixels = source.get(np.arange(len(source)))[0].astype(np.float64) / 255.0
    mean, std = DATASET_STATS["embedded"]
    assert mean[0] == pytest.approx(pixels.mean(), abs=1e-4)
    assert std[0] == pytest.approx(pixels.std(), abs=1e-4)


def test_embedded_resized_when_image_size_differs():
    source = load_source("embedded", "test", image_size=14)
    assert source.image_shape == (14, 14, 1)
    assert len(source) == 2000


# ---------------------------------------------------------------------------------------------
# Sources built from arrays, resizing, statistics


def test_array_source_rejects_bad_input():
    images = np.zeros((4, 5, 5, 3), np.uint8)
    with pytest.raises(ValueError, match="uint8"):
        ArraySource(images.astype(np.float32), np.zeros(4, np.int32), ["a"])
    with pytest.raises(ValueError, match=r"shape \[4\]"):
        ArraySource(images, np.zeros(3, np.int32), ["a"])
    with pytest.raises(ValueError, match="labels span"):
        ArraySource(images, np.array([0, 1, 2, 0]), ["a", "b"])
    source = ArraySource(images, np.array([0, 1, -1, 0]), ["a", "b"])
    with pytest.raises(ValueError, match="out of range"):
        source.get(np.array([0, 4]))


def test_concat_source_gathers_across_parts():
    rng = np.random.default_rng(0)
    first = ArraySource(rng.integers(0, 256, (3, 4, 4, 3), np.uint8), np.array([0, 1, 0]), "ab")
    second = ArraySource(rng.integers(0, 256, (5, 4, 4, 3), np.uint8), np.full(5, -1), "ab")
    joined = ConcatSource([first, second])
    all_images = np.concatenate([first.images, second.images])
    all_labels = np.concatenate([first.labels, second.labels])
    indices = np.array([7, 0, 3, 2, 5, 0])
    images, labels = joined.get(indices)
    assert len(joined) == 8
    np.testing.assert_array_equal(images, all_images[indices])
    np.testing.assert_array_equal(labels, all_labels[indices])


def test_resize_crops_center_of_long_side():
    # 16 rows x 8 columns: rows 0-3 red, 4-11 green, 12-15 blue. The shorter side is already 8,
    # so the result is the central 8 rows: all green.
    image = np.zeros((16, 8, 3), np.uint8)
    image[:4, :, 0] = 255
    image[4:12, :, 1] = 255
    image[12:, :, 2] = 255
    expected = np.zeros((8, 8, 3), np.uint8)
    expected[..., 1] = 255
    np.testing.assert_array_equal(resize_and_center_crop(image, 8), expected)


def test_resize_scales_shorter_side():
    constant = np.full((12, 30, 1), 77, np.uint8)
    resized = resize_and_center_crop(constant, 6)
    assert resized.shape == (6, 6, 1)
    np.testing.assert_array_equal(resized, np.full((6, 6, 1), 77, np.uint8))
    unchanged = np.arange(48, dtype=np.uint8).reshape(4, 4, 3)
    assert resize_and_center_crop(unchanged, 4) is unchanged


def test_channel_stats_matches_numpy():
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, (50, 6, 6, 3), np.uint8)
    images[..., 2] //= 4
    source = ArraySource(images, np.zeros(50, np.int32), ["only"])
    mean, std = channel_stats(source, max_examples=1000)
    pixels = images.reshape(-1, 3) / 255.0
    np.testing.assert_allclose(mean, pixels.mean(axis=0), atol=1e-12)
    np.testing.assert_allclose(std, pixels.std(axis=0), atol=1e-12)


def test_normalization_stats_known_and_computed():
    images = np.full((4, 2, 2, 3), 51, np.uint8)
    source = ArraySource(images, np.zeros(4, np.int32), ["only"])
    assert normalization_stats("tfds:cifar10", source) == DATASET_STATS["cifar10"]
    assert normalization_stats("tfds:imagenet2012", source) == DATASET_STATS["imagenet"]
    mean, std = normalization_stats("folder", source)
    np.testing.assert_allclose(mean, [0.2] * 3)
    np.testing.assert_allclose(std, [0.0] * 3, atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Image folders and tar archives

# Pixel contents by file: (class, file name) -> uint8 array. Smooth images keep JPEG error small.


def _gradient(height: int, width: int, channels: int, offset: int) -> np.ndarray:
    rows = np.linspace(0, 200, height)[:, None, None]
    cols = np.linspace(0, 50, width)[None, :, None]
    image = rows + cols + offset + np.zeros((1, 1, channels))
    return image.astype(np.uint8)


def _tiny_dataset() -> dict[tuple[str, str], np.ndarray]:
    """Return the images of a 3-class split: PNG and JPEG, one greyscale, one 16x16."""
    return {
        ("cat", "a.png"): _gradient(8, 8, 3, 0),
        ("cat", "b.jpg"): _gradient(8, 8, 3, 5),
        ("dog", "c.png"): _gradient(8, 8, 1, 10),
        ("dog", "d.jpeg"): _gradient(8, 8, 3, 3),
        ("emu", "e.png"): _gradient(16, 16, 3, 1),
    }


def _encode(array: np.ndarray, name: str) -> bytes:
    import io

    image = Image.fromarray(array[..., 0] if array.shape[-1] == 1 else array)
    buffer = io.BytesIO()
    image.save(buffer, format="PNG" if name.endswith(".png") else "JPEG", quality=95)
    return buffer.getvalue()


def _write_folder(root, split: str, files: dict[tuple[str, str], np.ndarray]) -> None:
    for (class_name, name), array in files.items():
        directory = root / split / class_name
        directory.mkdir(parents=True, exist_ok=True)
        (directory / name).write_bytes(_encode(array, name))


def _write_tar(root, split: str, files: dict[tuple[str, str], np.ndarray]) -> None:
    import io

    root.mkdir(parents=True, exist_ok=True)
    with tarfile.open(root / f"{split}.tar", "w") as tar:
        for (class_name, name), array in files.items():
            data = _encode(array, name)
            info = tarfile.TarInfo(f"{split}/{class_name}/{name}")
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))


@pytest.fixture
def cache_dir(tmp_path, monkeypatch):
    directory = tmp_path / "cache"
    monkeypatch.setenv("ASCL_JAX_CACHE", str(directory))
    return directory


def _expected_labels(files) -> np.ndarray:
    classes = sorted({class_name for class_name, _ in files})
    ordered = sorted(files)
    return np.array([classes.index(class_name) for class_name, _ in ordered], np.int32)


def test_folder_loads_resized_rgb(tmp_path, cache_dir):
    files = _tiny_dataset()
    _write_folder(tmp_path / "data", "train", files)
    source = load_source("folder", "train", data_dir=str(tmp_path / "data"), image_size=8)
    images, labels = source.get(np.arange(len(source)))

    assert source.class_names == ("cat", "dog", "emu")
    assert source.image_shape == (8, 8, 3)
    assert images.dtype == np.uint8
    np.testing.assert_array_equal(labels, _expected_labels(files))
    # Files are ordered by class, then name: a.png, b.jpg, c.png, d.jpeg, e.png.
    np.testing.assert_array_equal(images[0], files[("cat", "a.png")])
    np.testing.assert_array_equal(images[2], np.repeat(files[("dog", "c.png")], 3, axis=-1))
    jpeg_error = np.abs(images[1].astype(int) - files[("cat", "b.jpg")].astype(int)).mean()
    assert jpeg_error < 3.0
    # The 16x16 gradient shrunk to 8x8 spans about the same range of values.
    assert abs(int(images[4].min()) - int(files[("emu", "e.png")].min())) < 20
    assert abs(int(images[4].max()) - int(files[("emu", "e.png")].max())) < 20


def test_folder_size_mismatch_names_file(tmp_path, cache_dir):
    _write_folder(tmp_path / "data", "train", _tiny_dataset())
    with pytest.raises(ValueError, match=r"e\.png is 16x16") as error:
        load_source("folder", "train", data_dir=str(tmp_path / "data"))
    assert "image_size" in str(error.value)


def test_folder_all_grey_keeps_one_channel(tmp_path, cache_dir):
    files = {("a", "x.png"): _gradient(6, 6, 1, 0), ("b", "y.png"): _gradient(6, 6, 1, 9)}
    _write_folder(tmp_path / "data", "test", files)
    source = load_source("folder", "test", data_dir=str(tmp_path / "data"))
    images, labels = source.get(np.arange(2))
    assert source.image_shape == (6, 6, 1)
    np.testing.assert_array_equal(images[1], files[("b", "y.png")])
    np.testing.assert_array_equal(labels, [0, 1])


def test_tar_matches_folder(tmp_path, cache_dir):
    files = _tiny_dataset()
    _write_folder(tmp_path / "as_folder", "train", files)
    _write_tar(tmp_path / "as_tar", "train", files)
    from_folder = load_source("folder", "train", data_dir=str(tmp_path / "as_folder"), image_size=8)
    from_tar = load_source("folder", "train", data_dir=str(tmp_path / "as_tar"), image_size=8)
    assert from_tar.class_names == from_folder.class_names
    np.testing.assert_array_equal(from_tar.get(np.arange(5))[0], from_folder.get(np.arange(5))[0])
    np.testing.assert_array_equal(from_tar.get(np.arange(5))[1], _expected_labels(files))


@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_corrupt_image_named_or_skipped(tmp_path, cache_dir, caplog, layout):
    files = _tiny_dataset()
    root = tmp_path / "data"
    (_write_folder if layout == "folder" else _write_tar)(root, "train", files)
    if layout == "folder":
        (root / "train" / "dog" / "broken.jpg").write_bytes(b"\xff\xd8 this is not a JPEG")
    else:
        import io

        with tarfile.open(root / "train.tar", "a") as tar:
            info = tarfile.TarInfo("train/dog/broken.jpg")
            info.size = 5
            tar.addfile(info, io.BytesIO(b"\x00\x01\x02\x03\x04"))

    with pytest.raises(ImageDecodeError, match="broken.jpg"):
        load_source("folder", "train", data_dir=str(root), image_size=8)
    with caplog.at_level(logging.WARNING, logger="ascl_jax.data.folder"):
        source = load_source("folder", "train", data_dir=str(root), image_size=8, skip_corrupt=True)
    assert len(source) == len(files)
    assert "Skipped 1 undecodable images" in caplog.text
    assert "broken.jpg" in caplog.text


@pytest.mark.parametrize("layout", ["folder", "tar"])
def test_second_load_hits_cache(tmp_path, cache_dir, monkeypatch, layout):
    files = _tiny_dataset()
    root = tmp_path / "data"
    (_write_folder if layout == "folder" else _write_tar)(root, "train", files)
    first = load_source("folder", "train", data_dir=str(root), image_size=8)
    assert len(list((cache_dir / "folder").glob("*.npz"))) == 1

    def fail(*args, **kwargs):
        raise AssertionError("decoded again despite a cache entry")

    monkeypatch.setattr(folder_module, "_decode_entries", fail)
    second = load_source("folder", "train", data_dir=str(root), image_size=8)
    np.testing.assert_array_equal(second.get(np.arange(5))[0], first.get(np.arange(5))[0])
    np.testing.assert_array_equal(second.get(np.arange(5))[1], first.get(np.arange(5))[1])
    assert second.class_names == first.class_names
    # Another image_size is another cache entry, so it must decode.
    with pytest.raises(AssertionError, match="decoded again"):
        load_source("folder", "train", data_dir=str(root), image_size=4)


def test_changed_file_invalidates_cache(tmp_path, cache_dir, monkeypatch):
    files = _tiny_dataset()
    root = tmp_path / "data"
    _write_folder(root, "train", files)
    load_source("folder", "train", data_dir=str(root), image_size=8)
    changed = root / "train" / "cat" / "a.png"
    changed.write_bytes(_encode(np.zeros((8, 8, 3), np.uint8), "a.png"))
    os.utime(changed, ns=(time.time_ns(), time.time_ns() + 10**9))
    source = load_source("folder", "train", data_dir=str(root), image_size=8)
    np.testing.assert_array_equal(source.get(np.array([0]))[0][0], np.zeros((8, 8, 3)))


def test_missing_folder_and_split_messages(tmp_path, cache_dir):
    missing = tmp_path / "nowhere"
    with pytest.raises(FileNotFoundError, match=str(missing)):
        load_source("folder", "train", data_dir=str(missing))
    _write_folder(tmp_path / "data", "train", _tiny_dataset())
    with pytest.raises(FileNotFoundError) as error:
        load_source("folder", "test", data_dir=str(tmp_path / "data"))
    message = str(error.value)
    assert str(tmp_path / "data" / "test") in message
    assert "test.tar" in message
    assert "['train']" in message
    with pytest.raises(ValueError, match="data_dir"):
        load_source("folder", "train")


def test_folder_join_and_unlabelled_split(tmp_path, cache_dir):
    root = tmp_path / "data"
    files = {("a", "x.png"): _gradient(6, 6, 3, 0), ("b", "y.png"): _gradient(6, 6, 3, 9)}
    _write_folder(root, "train", files)
    (root / "unlabelled").mkdir()
    for i in range(3):
        (root / "unlabelled" / f"u{i}.png").write_bytes(_encode(_gradient(6, 6, 3, 20 + i), ".png"))
    source = load_source("folder", "train+unlabelled", data_dir=str(root))
    images, labels = source.get(np.arange(len(source)))
    assert len(source) == 5
    assert source.class_names == ("a", "b")
    np.testing.assert_array_equal(labels, [0, 1, UNLABELLED, UNLABELLED, UNLABELLED])
    np.testing.assert_array_equal(images[3], _gradient(6, 6, 3, 21))


def test_worker_processes_match_in_process(tmp_path):
    files = _tiny_dataset()
    _write_tar(tmp_path / "data", "train", files)
    kwargs = dict(image_size=8, cache_dir=str(tmp_path / "cache_a"))
    serial = folder_module.load_folder(str(tmp_path / "data"), "train", num_workers=0, **kwargs)
    kwargs["cache_dir"] = str(tmp_path / "cache_b")
    parallel = folder_module.load_folder(str(tmp_path / "data"), "train", num_workers=2, **kwargs)
    np.testing.assert_array_equal(parallel.images, serial.images)
    np.testing.assert_array_equal(parallel.labels, serial.labels)


@pytest.mark.skipif(
    not os.environ.get("ASCL_JAX_CIFAR10_DIR"), reason="set ASCL_JAX_CIFAR10_DIR to the CIFAR-10 tars"
)
def test_cifar10_jpeg_tar():
    data_dir = os.environ["ASCL_JAX_CIFAR10_DIR"]
    for split, size in (("train", 50000), ("test", 10000)):
        source = load_source("folder", split, data_dir=data_dir, image_size=32)
        images, labels = source.get(np.arange(len(source)))
        assert len(source) == size
        assert source.image_shape == (32, 32, 3)
        assert source.class_names == CIFAR10_CLASSES
        np.testing.assert_array_equal(np.bincount(labels), np.full(10, size // 10))
        mean = images.reshape(-1, 3).mean(axis=0) / 255.0
        np.testing.assert_allclose(mean, DATASET_STATS["cifar10"][0], atol=0.01)


# ---------------------------------------------------------------------------------------------
# tensorflow-datasets (mocked: nothing is downloaded)


@pytest.fixture(scope="module")
def tfds():
    return pytest.importorskip("tensorflow_datasets")


def test_tfds_in_memory_shapes(tfds, tmp_path):
    with tfds.testing.mock_data(num_examples=6, policy=tfds.testing.MockPolicy.USE_CODE):
        source = load_source("tfds:cifar10", "train", data_dir=str(tmp_path))
    images, labels = source.get(np.arange(6))
    assert isinstance(source, ArraySource)
    assert images.shape == (6, 32, 32, 3)
    assert images.dtype == np.uint8
    assert labels.dtype == np.int32
    assert source.num_classes == 10
    assert np.all((labels >= 0) & (labels < 10))


def test_tfds_join_with_unlabelled(tfds, tmp_path):
    with tfds.testing.mock_data(num_examples=5, policy=tfds.testing.MockPolicy.USE_CODE):
        train = load_source("tfds:stl10", "train", data_dir=str(tmp_path), image_size=64)
        joined = load_source("tfds:stl10", "train+unlabelled", data_dir=str(tmp_path), image_size=64)
    images, labels = joined.get(np.arange(10))
    assert joined.image_shape == (64, 64, 3)
    assert len(joined) == 10
    np.testing.assert_array_equal(labels[5:], np.full(5, UNLABELLED))
    np.testing.assert_array_equal(labels[:5], train.get(np.arange(5))[1])
    assert np.all(labels[:5] >= 0)


def test_tfds_random_access_resizes(tfds, tmp_path):
    with tfds.testing.mock_data(num_examples=4, policy=tfds.testing.MockPolicy.USE_CODE):
        source = load_source(
            "tfds:imagenet2012", "validation", data_dir=str(tmp_path), image_size=24, in_memory=False
        )
        images, labels = source.get(np.array([3, 0, 3]))
    assert len(source) == 4
    assert source.image_shape == (24, 24, 3)
    assert images.shape == (3, 24, 24, 3)
    np.testing.assert_array_equal(images[0], images[2])
    assert labels[0] == labels[2]
    assert source.num_classes == 1000


def test_tfds_missing_dataset_message(tfds, tmp_path):
    with pytest.raises(FileNotFoundError) as error:
        load_source("tfds:cifar10", "train", data_dir=str(tmp_path))
    assert str(tmp_path) in str(error.value)
    assert "tfds build cifar10" in str(error.value)
    with pytest.raises(ValueError, match="no dataset 'not_a_dataset'"):
        load_source("tfds:not_a_dataset", "train", data_dir=str(tmp_path))


def test_unknown_dataset_rejected():
    with pytest.raises(ValueError, match="unknown dataset 'cifar10'"):
        load_source("cifar10", "train")


# ---------------------------------------------------------------------------------------------
# Pipeline


def _indexed_source(num_examples: int, image_side: int = 2) -> ArraySource:
    """Return a source whose label of example i is i, so batches reveal their indices."""
    images = np.broadcast_to(
        (np.arange(num_examples) % 256).astype(np.uint8)[:, None, None, None],
        (num_examples, image_side, image_side, 1),
    ).copy()
    return ArraySource(images, np.arange(num_examples), [str(i) for i in range(num_examples)])


def test_steps_per_epoch_drops_last_and_rejects_small():
    assert steps_per_epoch(10, 4) == 2
    assert steps_per_epoch(8, 4) == 2
    with pytest.raises(ValueError, match="3 examples.*batch of 4"):
        steps_per_epoch(3, 4)
    with pytest.raises(ValueError, match="batch_size"):
        steps_per_epoch(3, 0)


def test_epoch_permutation_deterministic():
    first = epoch_permutation(7, 3, 100)
    np.testing.assert_array_equal(first, epoch_permutation(7, 3, 100))
    np.testing.assert_array_equal(np.sort(first), np.arange(100))
    assert not np.array_equal(first, epoch_permutation(7, 4, 100))
    assert not np.array_equal(first, epoch_permutation(8, 3, 100))
    with pytest.raises(ValueError, match="non-negative"):
        epoch_permutation(-1, 0, 10)


def test_epoch_visits_each_example_once():
    source = _indexed_source(10)
    batches = list(train_batches(source, batch_size=4, seed=1, num_steps=6))
    assert [batch.step for batch in batches] == list(range(6))
    assert [batch.epoch for batch in batches] == [0, 0, 1, 1, 2, 2]
    for epoch in range(3):
        seen = np.concatenate([b.labels for b in batches if b.epoch == epoch])
        assert seen.size == 8
        assert np.unique(seen).size == 8
        # Drop-last: the two examples left out are the last two of the epoch's permutation.
        np.testing.assert_array_equal(seen, epoch_permutation(1, epoch, 10)[:8])
    np.testing.assert_array_equal(batches[0].images[:, 0, 0, 0], batches[0].labels)


def test_resume_equals_uninterrupted():
    source = _indexed_source(23)
    uninterrupted = list(train_batches(source, batch_size=5, seed=3, num_steps=17))
    resumed = list(train_batches(source, batch_size=5, seed=3, start_step=6, num_steps=11))
    assert len(resumed) == 11
    for expected, got in zip(uninterrupted[6:], resumed):
        assert got.step == expected.step
        assert got.epoch == expected.epoch
        np.testing.assert_array_equal(got.labels, expected.labels)
        np.testing.assert_array_equal(got.images, expected.images)


def test_prefetch_zero_matches_background():
    source = _indexed_source(12)
    direct = list(train_batches(source, batch_size=3, seed=0, num_steps=9, prefetch=0))
    background = list(train_batches(source, batch_size=3, seed=0, num_steps=9, prefetch=3))
    for a, b in zip(direct, background, strict=True):
        np.testing.assert_array_equal(a.labels, b.labels)


class _FailingSource(ArraySource):
    """Source whose get() raises on the third call."""

    def __init__(self) -> None:
        base = _indexed_source(16)
        super().__init__(base.images, base.labels, base.class_names)
        self.calls = 0

    def get(self, indices):
        self.calls += 1
        if self.calls == 3:
            raise OSError("disk read failed on call 3")
        return super().get(indices)


def test_thread_exception_reaches_consumer():
    iterator = train_batches(_FailingSource(), batch_size=4, seed=0, num_steps=10)
    next(iterator)
    next(iterator)
    with pytest.raises(OSError, match="disk read failed on call 3"):
        next(iterator)
    with pytest.raises(StopIteration):
        next(iterator)


def test_close_stops_thread():
    before = threading.active_count()
    iterator = train_batches(_indexed_source(16), batch_size=4, seed=0, prefetch=2)
    next(iterator)
    iterator.close()
    assert not iterator.thread_alive
    assert threading.active_count() == before
    with pytest.raises(StopIteration):
        next(iterator)
    with train_batches(_indexed_source(16), batch_size=4, seed=0) as context_iterator:
        next(context_iterator)
    assert not context_iterator.thread_alive


def test_abandoned_iterator_stops_thread():
    before = threading.active_count()
    iterator = train_batches(_indexed_source(16), batch_size=4, seed=0, prefetch=1)
    next(iterator)
    del iterator
    gc.collect()
    deadline = time.monotonic() + 5.0
    while threading.active_count() > before and time.monotonic() < deadline:
        time.sleep(0.05)
    assert threading.active_count() == before


def test_eval_batches_pad_last():
    source = _indexed_source(10)
    batches = list(eval_batches(source, batch_size=4))
    assert len(batches) == 3
    for batch in batches:
        assert batch.images.shape == (4, 2, 2, 1)
        assert batch.labels.shape == (4,)
    np.testing.assert_array_equal(batches[2].mask, [True, True, False, False])
    np.testing.assert_array_equal(batches[2].labels, [8, 9, UNLABELLED, UNLABELLED])
    np.testing.assert_array_equal(batches[2].images[2:], 0)
    labels = np.concatenate([b.labels[b.mask] for b in batches])
    np.testing.assert_array_equal(labels, np.arange(10))
    assert all(b.mask.all() for b in batches[:2])
