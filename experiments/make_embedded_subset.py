"""Build the Fashion-MNIST subset that ships inside the package as the "embedded" dataset.

Reads the four official IDX files (gzip-compressed) and keeps the first N images of every class
in the official order: 1,000 per class from the training set and 200 per class from the test set
by default. The chosen examples keep their official relative order, so classes are interleaved.
The output is a zip-compressed .npz with fixed entry timestamps, so running the script twice
writes identical bytes.

Fashion-MNIST is Copyright (c) 2017 Zalando SE and released under the MIT licence. The licence
notice travels next to the .npz as LICENSE.

Command (the Debian package dataset-fashion-mnist installs the IDX files):
    python -m experiments.make_embedded_subset --source_dir=/usr/share/datasets/fashion-mnist
"""

import argparse
import gzip
import io
import os
import zipfile

import numpy as np

# Label order of Fashion-MNIST, from the dataset's README (label 0 to 9).
CLASS_NAMES = (
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

# IDX magic numbers: two zero bytes, the element type (0x08 = unsigned byte), the number of dims.
_IDX_UBYTE_LABELS = 0x00000801
_IDX_UBYTE_IMAGES = 0x00000803

_DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    "ascl_jax",
    "data",
    "embedded",
    "fashion_mnist_subset.npz",
)

# 1980-01-01, the earliest time a zip entry can store; fixed so that the output is reproducible.
_ZIP_DATE_TIME = (1980, 1, 1, 0, 0, 0)


def read_idx(path: str) -> np.ndarray:
    """Read a gzip-compressed IDX file of unsigned bytes into an array.

    The IDX header is a big-endian int32 magic number (0x0801 for a vector, 0x0803 for a stack
    of 2-D images) followed by one big-endian int32 size per dimension, then the raw bytes.
    """
    with gzip.open(path, "rb") as f:
        data = f.read()
    if len(data) < 4:
        raise ValueError(f"{path} is too short ({len(data)} bytes) to be an IDX file.")
    magic = int.from_bytes(data[:4], "big")
    if magic not in (_IDX_UBYTE_LABELS, _IDX_UBYTE_IMAGES):
        raise ValueError(
            f"{path} has IDX magic number {magic:#010x}; expected {_IDX_UBYTE_LABELS:#010x} "
            f"(labels) or {_IDX_UBYTE_IMAGES:#010x} (images) of unsigned bytes."
        )
    num_dims = magic & 0xFF
    header_size = 4 + 4 * num_dims
    shape = tuple(int(d) for d in np.frombuffer(data, dtype=">i4", count=num_dims, offset=4))
    expected = header_size + int(np.prod(shape))
    if len(data) != expected:
        raise ValueError(
            f"{path} has {len(data)} bytes but its header {shape} implies {expected}; "
            "the file is truncated or corrupt."
        )
    return np.frombuffer(data, dtype=np.uint8, offset=header_size).reshape(shape)


def first_per_class(labels: np.ndarray, per_class: int, num_classes: int) -> np.ndarray:
    """Return the sorted positions of the first `per_class` examples of each class."""
    chosen = []
    for label in range(num_classes):
        positions = np.flatnonzero(labels == label)
        if positions.size < per_class:
            raise ValueError(
                f"class {label} has {positions.size} examples, fewer than the {per_class} requested."
            )
        chosen.append(positions[:per_class])
    return np.sort(np.concatenate(chosen))


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """Write arrays as a deflate-compressed .npz whose bytes depend only on the arrays."""
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary_path = path + ".tmp"
    with zipfile.ZipFile(temporary_path, "w") as archive:
        for name, array in arrays.items():
            buffer = io.BytesIO()
            np.lib.format.write_array(buffer, np.ascontiguousarray(array), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=_ZIP_DATE_TIME)
            info.compress_type = zipfile.ZIP_DEFLATED
            archive.writestr(info, buffer.getvalue(), compresslevel=9)
    os.replace(temporary_path, path)


def build_subset(source_dir: str, train_per_class: int, test_per_class: int) -> dict[str, np.ndarray]:
    """Select the class-balanced subset and return the arrays stored in the .npz."""
    arrays = {}
    for split, prefix, per_class in (
        ("train", "train", train_per_class),
        ("test", "t10k", test_per_class),
    ):
        images = read_idx(os.path.join(source_dir, f"{prefix}-images-idx3-ubyte.gz"))
        labels = read_idx(os.path.join(source_dir, f"{prefix}-labels-idx1-ubyte.gz"))
        if images.ndim != 3 or images.shape[0] != labels.shape[0]:
            raise ValueError(
                f"{split}: images of shape {images.shape} do not match labels of shape "
                f"{labels.shape}; expected [N, 28, 28] and [N]."
            )
        positions = first_per_class(labels, per_class, len(CLASS_NAMES))
        arrays[f"{split}_images"] = images[positions][..., None]
        arrays[f"{split}_labels"] = labels[positions].astype(np.int32)
        # Position of each kept example in the official file, for provenance.
        arrays[f"{split}_source_index"] = positions.astype(np.int32)
    arrays["class_names"] = np.array(CLASS_NAMES)
    return arrays


def main() -> None:
    """Parse the command line, build the subset and write it."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--source_dir",
        default="/usr/share/datasets/fashion-mnist",
        help="folder with the four Fashion-MNIST *-idx?-ubyte.gz files",
    )
    parser.add_argument("--output", default=_DEFAULT_OUTPUT, help="path of the .npz to write")
    parser.add_argument("--train_per_class", type=int, default=1000, help="training images per class")
    parser.add_argument("--test_per_class", type=int, default=200, help="test images per class")
    args = parser.parse_args()

    arrays = build_subset(args.source_dir, args.train_per_class, args.test_per_class)
    write_npz(args.output, arrays)
    size_mb = os.path.getsize(args.output) / 1e6
    print(
        f"wrote {args.output}: {len(arrays['train_labels'])} train and "
        f"{len(arrays['test_labels'])} test images, {size_mb:.2f} MB"
    )


if __name__ == "__main__":
    main()
