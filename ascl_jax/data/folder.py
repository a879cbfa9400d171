"""Image folders and tar archives of images, decoded once and cached as numpy arrays.

Layout under data_dir, for a split such as "train":

    data_dir/train/CLASS/*.{jpg,jpeg,png}        a folder per split, or
    data_dir/train.tar with members train/CLASS/*.{jpg,jpeg,png}   an uncompressed tar archive.

Classes are the sorted class folder names and get labels 0..C-1. Images placed directly in the
split folder (no class folder) are unlabelled (label -1). The folder wins when both exist.

The whole split is decoded into memory, in parallel worker processes, and the arrays are cached
as an uncompressed .npz under the cache directory (env ASCL_JAX_CACHE, else ~/.cache/ascl_jax).
The cache key is the absolute path plus the size and modification time of the archive, or of
every image file of the folder, plus image_size, so a changed dataset is decoded again.
"""

import concurrent.futures
import dataclasses
import hashlib
import io
import json
import logging
import multiprocessing
import os
import re
import tarfile
import tempfile

import numpy as np
from PIL import Image

from ascl_jax.data.base import (
    UNLABELLED,
    ArraySource,
    ImageSource,
    concatenate_sources,
    parse_split,
    resize_and_center_crop,
)

logger = logging.getLogger(__name__)

IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png")

# Bumped whenever decoding changes, so that caches written by older code are not reused.
_CACHE_FORMAT_VERSION = 1

# Below this many images, decoding in the calling process is faster than starting workers.
_MIN_IMAGES_FOR_WORKERS = 2048

# PIL modes that hold one grey channel; every other mode is converted to RGB.
_GREY_MODES = frozenset({"1", "L", "LA"})


class ImageDecodeError(ValueError):
    """Raised when an image file cannot be decoded; the message names the file."""


@dataclasses.dataclass(frozen=True)
class _ImageEntry:
    """One image of a split: where its bytes are and which class it belongs to."""

    # Path shown in messages: the file path, or "ARCHIVE:MEMBER" for a tar member.
    display_path: str
    # File to read: the image itself, or the tar archive.
    file_path: str
    # Byte range of a tar member inside the archive; offset -1 means the whole file.
    offset: int
    size: int
    # Class folder name, or None for an image directly in the split folder.
    class_name: str | None


@dataclasses.dataclass(frozen=True)
class _SplitListing:
    """The images and classes of one split."""

    location: str
    class_names: tuple[str, ...]
    entries: list[_ImageEntry]
    # [path, size, mtime_ns] of every image file; empty for a tar archive.
    file_stats: list[list] = dataclasses.field(default_factory=list)


def default_cache_dir() -> str:
    """Return the cache directory: $ASCL_JAX_CACHE, else ~/.cache/ascl_jax."""
    return os.environ.get("ASCL_JAX_CACHE") or os.path.join(
        os.path.expanduser("~"), ".cache", "ascl_jax"
    )


def load_folder(
    data_dir: str,
    split: str,
    *,
    image_size: int | None = None,
    skip_corrupt: bool = False,
    cache_dir: str | None = None,
    num_workers: int | None = None,
) -> ImageSource:
    """Load a split (or "+"-joined splits) of an image folder or tar archive into memory.

    Args:
        data_dir: Folder that contains SPLIT/ or SPLIT.tar.
        split: Split name, or names joined by "+".
        image_size: When set, every image that is not image_size x image_size is resized
            (shorter side to image_size, bilinear) and center-cropped. When None, all images
            must have one size.
        skip_corrupt: Skip images that fail to decode (and log their count) instead of raising.
        cache_dir: Cache directory; None means default_cache_dir().
        num_workers: Decoding processes; 0 decodes in this process, None uses one per CPU for
            splits of at least 2048 images.

    Returns:
        An ArraySource with uint8 images [N, H, W, C]: C = 1 if every image is greyscale,
        else C = 3.

    Raises:
        FileNotFoundError: data_dir or a split is missing; the message gives the layout.
        ImageDecodeError: an image cannot be decoded and skip_corrupt is False.
        ValueError: image sizes differ and image_size is None, or the splits' classes differ.
    """
    if not data_dir:
        raise ValueError(
            "the folder dataset needs data_dir: a folder containing SPLIT/CLASS/*.jpg "
            "or SPLIT.tar archives."
        )
    if image_size is not None and image_size <= 0:
        raise ValueError(f"image_size must be positive; got {image_size}.")
    root = os.path.abspath(os.path.expanduser(data_dir))
    if not os.path.isdir(root):
        raise FileNotFoundError(
            f"data_dir {root} does not exist or is not a folder; it must contain "
            "SPLIT/CLASS/*.jpg folders or SPLIT.tar archives."
        )
    parts = parse_split(split)
    # Locate every part before decoding any, so a missing split fails at once.
    locations = [_locate_split(root, part) for part in parts]
    cache_dir = default_cache_dir() if cache_dir is None else cache_dir
    sources = [
        _load_split(location, part, image_size, skip_corrupt, cache_dir, num_workers)
        for location, part in zip(locations, parts)
    ]
    return concatenate_sources(sources)


def _locate_split(root: str, split: str) -> str:
    """Return the folder or tar archive of a split, raising FileNotFoundError if neither exists."""
    if "/" in split or split in (".", ".."):
        raise ValueError(f"invalid split name {split!r}: it must be a plain folder name.")
    folder = os.path.join(root, split)
    archive = folder + ".tar"
    if os.path.isdir(folder):
        return folder
    if os.path.isfile(archive):
        return archive
    available = sorted(
        name[: -len(".tar")] if name.endswith(".tar") else name
        for name in os.listdir(root)
        if os.path.isdir(os.path.join(root, name)) or name.endswith(".tar")
    )
    raise FileNotFoundError(
        f"split {split!r} not found in {root}: expected the folder {folder}/CLASS/*.jpg "
        f"(or .jpeg, .png) or the tar archive {archive} with members {split}/CLASS/*.jpg. "
        f"Splits found there: {available or 'none'}."
    )


def _load_split(
    location: str,
    split: str,
    image_size: int | None,
    skip_corrupt: bool,
    cache_dir: str,
    num_workers: int | None,
) -> ArraySource:
    """Load one split from the cache, or decode it and write the cache."""
    is_archive = location.endswith(".tar")
    listing = None
    if is_archive:
        # The archive's own size and mtime key the cache, so a hit needs no listing.
        stat = os.stat(location)
        fingerprint = {"size": stat.st_size, "mtime_ns": stat.st_mtime_ns}
    else:
        listing = _list_folder(location)
        fingerprint = {
            "files": listing.file_stats,
            "classes": listing.class_names,
        }
    cache_path = _cache_path(cache_dir, location, split, image_size, fingerprint)

    cached = _read_cache(cache_path)
    if cached is not None:
        source, skipped = cached
        logger.info("Loaded %d images of %s from the cache %s.", len(source), location, cache_path)
    else:
        if listing is None:
            listing = _list_archive(location, split)
        source, skipped = _decode_split(listing, image_size, num_workers)
        _write_cache(cache_path, source, skipped)
    _report_skipped(location, skipped, skip_corrupt)
    return source


def _cache_path(
    cache_dir: str, location: str, split: str, image_size: int | None, fingerprint: dict
) -> str:
    """Return the cache file of a split: DIR/folder/DATASET_SPLIT-HASH.npz."""
    key = json.dumps(
        {
            "version": _CACHE_FORMAT_VERSION,
            "path": location,
            "split": split,
            "image_size": image_size,
            "fingerprint": fingerprint,
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(key.encode()).hexdigest()[:20]
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", f"{os.path.basename(os.path.dirname(location))}_{split}")
    return os.path.join(cache_dir, "folder", f"{name}-{digest}.npz")


def _is_image_name(name: str) -> bool:
    return not name.startswith(".") and name.lower().endswith(IMAGE_EXTENSIONS)


def _list_folder(folder: str) -> _SplitListing:
    """List the images of a split folder: FOLDER/CLASS/*.jpg, or FOLDER/*.jpg if unlabelled."""
    class_names = []
    entries = []
    file_stats = []
    with os.scandir(folder) as children:
        children = sorted(children, key=lambda child: child.name)
    for child in children:
        if child.name.startswith("."):
            continue
        if child.is_dir():
            class_names.append(child.name)
            with os.scandir(child.path) as files:
                for file in sorted(files, key=lambda file: file.name):
                    if file.is_file() and _is_image_name(file.name):
                        entries.append(_ImageEntry(file.path, file.path, -1, -1, child.name))
                        stat = file.stat()
                        file_stats.append([file.path, stat.st_size, stat.st_mtime_ns])
        elif child.is_file() and _is_image_name(child.name):
            entries.append(_ImageEntry(child.path, child.path, -1, -1, None))
            stat = child.stat()
            file_stats.append([child.path, stat.st_size, stat.st_mtime_ns])
    _check_listing(folder, class_names, entries)
    return _SplitListing(folder, tuple(class_names), entries, file_stats)


def _list_archive(archive: str, split: str) -> _SplitListing:
    """List the members SPLIT/CLASS/*.jpg (or SPLIT/*.jpg if unlabelled) of an uncompressed tar."""
    class_names = set()
    entries = []
    try:
        with tarfile.open(archive, mode="r:") as tar:
            for member in tar:
                parts = member.name.removeprefix("./").strip("/").split("/")
                if parts[0] != split:
                    continue
                if member.isdir() and len(parts) == 2 and not parts[1].startswith("."):
                    class_names.add(parts[1])
                # Images nested deeper than SPLIT/CLASS/ are not part of the layout.
                if not member.isfile() or not _is_image_name(parts[-1]) or len(parts) > 3:
                    continue
                class_name = parts[1] if len(parts) == 3 else None
                if class_name is not None:
                    class_names.add(class_name)
                entries.append(
                    _ImageEntry(
                        f"{archive}:{member.name}",
                        archive,
                        member.offset_data,
                        member.size,
                        class_name,
                    )
                )
    except tarfile.ReadError as error:
        raise ValueError(
            f"cannot read {archive} as an uncompressed tar archive ({error}); "
            "compressed archives are not supported, unpack them with `gunzip` first."
        ) from error
    entries.sort(key=lambda entry: (entry.class_name or "", entry.display_path))
    class_names = sorted(class_names)
    _check_listing(f"{archive} (members {split}/...)", class_names, entries)
    return _SplitListing(archive, tuple(class_names), entries)


def _check_listing(location: str, class_names: list[str], entries: list[_ImageEntry]) -> None:
    if not entries:
        raise FileNotFoundError(
            f"no images ({', '.join(IMAGE_EXTENSIONS)}) found in {location}; expected "
            "CLASS/*.jpg inside the split."
        )
    unlabelled = sum(entry.class_name is None for entry in entries)
    if unlabelled and unlabelled != len(entries):
        raise ValueError(
            f"{location} mixes {unlabelled} images outside class folders with "
            f"{len(entries) - unlabelled} inside them; put every image in a class folder, "
            "or all directly in the split for an unlabelled split."
        )


def _decode_split(
    listing: _SplitListing, image_size: int | None, num_workers: int | None
) -> tuple[ArraySource, list[str]]:
    """Decode every image of a listing; return the source and the paths that failed."""
    images = _decode_entries(listing.entries, image_size, num_workers)

    decoded = []
    labels = []
    skipped = []
    label_of_class = {name: i for i, name in enumerate(listing.class_names)}
    for entry, result in zip(listing.entries, images):
        if isinstance(result, str):
            skipped.append(f"{entry.display_path}: {result}")
            continue
        decoded.append((entry, result))
        labels.append(UNLABELLED if entry.class_name is None else label_of_class[entry.class_name])
    if not decoded:
        raise ImageDecodeError(
            f"none of the {len(listing.entries)} images in {listing.location} could be decoded; "
            f"first failure: {skipped[0]}"
        )

    first_entry, first_image = decoded[0]
    for entry, image in decoded:
        if image.shape[:2] != first_image.shape[:2]:
            raise ValueError(
                f"image {entry.display_path} is {image.shape[0]}x{image.shape[1]} pixels but "
                f"{first_entry.display_path} is {first_image.shape[0]}x{first_image.shape[1]}; "
                "pass image_size to resize every image to one square size."
            )
    all_grey = all(image.shape[-1] == 1 for _, image in decoded)
    stacked = np.stack(
        [image if all_grey or image.shape[-1] == 3 else np.repeat(image, 3, axis=-1)
         for _, image in decoded]
    )
    source = ArraySource(stacked, np.asarray(labels, np.int32), listing.class_names)
    return source, skipped


def _decode_entries(
    entries: list[_ImageEntry], image_size: int | None, num_workers: int | None
) -> list[np.ndarray | str]:
    """Decode entries in order, in worker processes when there are many.

    Returns, per entry, the image [H, W, 1 or 3] or the error message if decoding failed.
    """
    if num_workers is None:
        num_workers = (os.cpu_count() or 1) if len(entries) >= _MIN_IMAGES_FOR_WORKERS else 0
    if num_workers < 0:
        raise ValueError(f"num_workers must be >= 0; got {num_workers}.")
    if num_workers <= 1:
        return _decode_chunk(entries, image_size)

    chunk_size = int(np.clip(len(entries) // (4 * num_workers), 64, 2048))
    chunks = [entries[i : i + chunk_size] for i in range(0, len(entries), chunk_size)]
    # Spawned workers do not inherit the threads of JAX or TensorFlow, which fork would copy.
    context = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(num_workers, mp_context=context) as executor:
        results = executor.map(_decode_chunk, chunks, [image_size] * len(chunks))
        return [image for chunk in results for image in chunk]


def _decode_chunk(entries: list[_ImageEntry], image_size: int | None) -> list[np.ndarray | str]:
    """Decode a list of entries; runs in a worker process."""
    results = []
    # Members of one archive share its file, which is opened once rather than once per image.
    archive_path, archive = None, None
    try:
        for entry in entries:
            try:
                if entry.offset >= 0:
                    if entry.file_path != archive_path:
                        if archive is not None:
                            archive.close()
                        archive_path, archive = None, None
                        archive = open(entry.file_path, "rb")  # noqa: SIM115 - closed below.
                        archive_path = entry.file_path
                    archive.seek(entry.offset)
                    data = archive.read(entry.size)
                else:
                    with open(entry.file_path, "rb") as file:
                        data = file.read()
                results.append(decode_image(data, image_size))
            except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as error:
                results.append(f"{type(error).__name__}: {error}")
    finally:
        if archive is not None:
            archive.close()
    return results


def decode_image(data: bytes, image_size: int | None = None) -> np.ndarray:
    """Decode JPEG or PNG bytes to uint8 [H, W, 1] (greyscale modes) or [H, W, 3] (all others).

    With image_size, the image is resized and center-cropped by resize_and_center_crop.
    """
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        grey = image.mode in _GREY_MODES
        mode = "L" if grey else "RGB"
        # convert() to the image's own mode only returns a copy, which np.asarray does not need.
        array = np.asarray(image if image.mode == mode else image.convert(mode))
    array = array[..., None] if grey else array
    if image_size is not None:
        array = resize_and_center_crop(array, image_size)
    return array


def _read_cache(path: str) -> tuple[ArraySource, list[str]] | None:
    """Return the cached source and its skipped-image list, or None if there is no valid entry."""
    if not os.path.isfile(path):
        return None
    try:
        with np.load(path, allow_pickle=False) as archive:
            source = ArraySource(
                archive["images"],
                archive["labels"],
                tuple(str(name) for name in archive["class_names"]),
            )
            skipped = [str(item) for item in archive["skipped"]]
    except (OSError, ValueError, KeyError) as error:
        logger.warning("Ignoring the unreadable cache file %s: %s", path, error)
        return None
    return source, skipped


def _write_cache(path: str, source: ArraySource, skipped: list[str]) -> None:
    """Write the cache entry atomically; a failure is logged, not raised."""
    directory = os.path.dirname(path)
    try:
        os.makedirs(directory, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=directory, suffix=".tmp", delete=False) as file:
            temporary_path = file.name
            np.savez(
                file,
                images=source.images,
                labels=source.labels,
                class_names=np.array(source.class_names, dtype=str),
                skipped=np.array(skipped, dtype=str),
            )
        os.replace(temporary_path, path)
    except OSError as error:
        logger.warning("Could not write the cache file %s: %s", path, error)
        return
    logger.info("Cached %d decoded images in %s.", len(source), path)


def _report_skipped(location: str, skipped: list[str], skip_corrupt: bool) -> None:
    """Raise ImageDecodeError for undecodable images, or log their count if skipping."""
    if not skipped:
        return
    if not skip_corrupt:
        more = f" ({len(skipped) - 1} more failed)" if len(skipped) > 1 else ""
        raise ImageDecodeError(
            f"cannot decode image {skipped[0]}{more}. Replace or delete the file, or pass "
            "skip_corrupt=True to skip undecodable images."
        )
    logger.warning(
        "Skipped %d undecodable images in %s; first: %s", len(skipped), location, skipped[0]
    )
