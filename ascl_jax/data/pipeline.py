"""Batches for training and evaluation, with the training order a function of (seed, step).

Training visits the examples in a fresh permutation every epoch and drops the last partial
batch. Step s belongs to epoch s // steps_per_epoch and takes the examples at positions
[(s % steps_per_epoch) * batch_size, ... + batch_size) of that epoch's permutation, so a run
resumed at step s yields exactly the batches an uninterrupted run yields from step s.

In a multi-process run every process walks through the same global batches and loads only its
own rows of each (the `rows` argument of `train_batches`), so the processes together read each
global batch once.

A background thread gathers the next batches from the source while the caller computes, and
`prefetch_to_device` places the next batches on the devices before the step that needs them.
"""

import collections
import logging
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any, NamedTuple

import numpy as np

from ascl_jax.data.base import UNLABELLED, ImageSource

logger = logging.getLogger(__name__)


class Batch(NamedTuple):
    """One training batch."""

    # Global step, counted from 0 at the start of training.
    step: int
    # Epoch the batch belongs to: step // steps_per_epoch.
    epoch: int
    # uint8 [batch_size, H, W, C], or [len(rows), H, W, C] when train_batches got rows. After
    # prefetch_to_device, whatever its `put` returns, such as a global jax.Array.
    images: Any
    # int32 [batch_size] (or [len(rows)]); -1 for unlabelled examples.
    labels: Any


class EvalBatch(NamedTuple):
    """One evaluation batch, padded to the full batch size."""

    # uint8 [batch_size, H, W, C]; zeros where mask is False.
    images: np.ndarray
    # int32 [batch_size]; -1 where mask is False.
    labels: np.ndarray
    # bool [batch_size]; False on padding rows.
    mask: np.ndarray


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
    """Return the number of full batches per epoch, num_examples // batch_size.

    Raises:
        ValueError: batch_size is not positive, or the dataset has fewer examples than one batch.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}.")
    if num_examples < batch_size:
        raise ValueError(
            f"the dataset has {num_examples} examples, fewer than one batch of {batch_size}; "
            "lower batch_size or use a larger split."
        )
    return num_examples // batch_size


def epoch_permutation(seed: int, epoch: int, num_examples: int) -> np.ndarray:
    """Return the order of examples in an epoch: a permutation of range(num_examples).

    The permutation comes from numpy's PCG64 generator seeded with SeedSequence([seed, epoch]),
    so it depends on (seed, epoch) alone.
    """
    if seed < 0 or epoch < 0:
        raise ValueError(f"seed and epoch must be non-negative; got seed={seed}, epoch={epoch}.")
    if num_examples < 0:
        raise ValueError(f"num_examples must be non-negative; got {num_examples}.")
    return np.random.default_rng([seed, epoch]).permutation(num_examples)


def train_batches(
    source: ImageSource,
    *,
    batch_size: int,
    seed: int,
    start_step: int = 0,
    num_steps: int | None = None,
    prefetch: int = 2,
    rows: np.ndarray | None = None,
) -> Iterator[Batch]:
    """Iterate over training batches from step `start_step`, across epochs in order.

    Args:
        source: Examples to draw from.
        batch_size: Examples per batch; the last partial batch of each epoch is dropped.
        seed: Seed of the epoch permutations.
        start_step: First step to yield, for example the step a checkpoint stores.
        num_steps: Number of batches to yield (steps start_step .. start_step + num_steps - 1);
            None yields forever.
        prefetch: Batches a background thread prepares ahead; 0 gathers them in the caller's
            thread.
        rows: Positions within each global batch to load, distinct and in [0, batch_size),
            for example `ascl_jax.sharding.process_batch_rows` of this process. None loads
            the whole batch.

    Returns:
        An iterator of Batch with a close() method that stops the background thread.
    """
    if start_step < 0:
        raise ValueError(f"start_step must be non-negative; got {start_step}.")
    if num_steps is not None and num_steps < 0:
        raise ValueError(f"num_steps must be non-negative or None; got {num_steps}.")
    if seed < 0:
        raise ValueError(f"seed must be non-negative; got {seed}.")
    if prefetch < 0:
        raise ValueError(f"prefetch must be non-negative; got {prefetch}.")
    num_batches = steps_per_epoch(len(source), batch_size)
    if rows is not None:
        rows = _check_rows(rows, batch_size)

    def generate() -> Iterator[Batch]:
        step = start_step
        epoch = -1
        order = None
        while num_steps is None or step < start_step + num_steps:
            if step // num_batches != epoch:
                epoch = step // num_batches
                order = epoch_permutation(seed, epoch, len(source))
            position = (step % num_batches) * batch_size
            indices = order[position : position + batch_size]
            if rows is not None:
                indices = indices[rows]
            images, labels = source.get(indices)
            yield Batch(step, epoch, images, labels)
            step += 1

    return _maybe_in_background(generate, prefetch)


def _check_rows(rows: np.ndarray, batch_size: int) -> np.ndarray:
    """Return `rows` as an int64 array; raise ValueError unless distinct and in [0, batch_size)."""
    rows = np.asarray(rows)
    if rows.ndim != 1 or rows.size == 0 or not np.issubdtype(rows.dtype, np.integer):
        raise ValueError(
            f"rows must be a non-empty 1-D array of integer positions within a batch; got "
            f"shape {rows.shape} and dtype {rows.dtype}."
        )
    if rows.min() < 0 or rows.max() >= batch_size or len(np.unique(rows)) != rows.size:
        raise ValueError(
            f"rows must be distinct positions in [0, {batch_size}) (batch_size); got "
            f"{rows.tolist()[:16]}."
        )
    return rows.astype(np.int64)


def eval_batches(
    source: ImageSource, *, batch_size: int, prefetch: int = 2
) -> Iterator[EvalBatch]:
    """Iterate over every example once, in index order, in batches of exactly batch_size.

    The last batch is padded with zero images and label -1, and its mask is False on the
    padding, so a jitted function compiles once.
    """
    if batch_size <= 0:
        raise ValueError(f"batch_size must be positive; got {batch_size}.")
    if len(source) == 0:
        raise ValueError("cannot evaluate on an empty source.")
    if prefetch < 0:
        raise ValueError(f"prefetch must be non-negative; got {prefetch}.")

    def generate() -> Iterator[EvalBatch]:
        for start in range(0, len(source), batch_size):
            indices = np.arange(start, min(start + batch_size, len(source)))
            images, labels = source.get(indices)
            num_padding = batch_size - indices.size
            mask = np.arange(batch_size) < indices.size
            if num_padding:
                images = np.concatenate(
                    [images, np.zeros((num_padding, *images.shape[1:]), images.dtype)]
                )
                labels = np.concatenate([labels, np.full((num_padding,), UNLABELLED, np.int32)])
            yield EvalBatch(images, labels, mask)

    return _maybe_in_background(generate, prefetch)


def _maybe_in_background(generate: Callable[[], Iterator[Any]], prefetch: int) -> Iterator[Any]:
    if prefetch == 0:
        return generate()
    return BackgroundIterator(generate, prefetch)


class _End:
    """Queue item that marks the end of the stream."""


class _Failure:
    """Queue item that carries an exception raised by the producer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


# Seconds a blocked put waits before it checks again whether the iterator was closed.
_POLL_SECONDS = 0.1


def _put_unless_stopped(items: queue.Queue, item: Any, stop: threading.Event) -> bool:
    """Put an item, waiting for room; return False if `stop` was set meanwhile."""
    while not stop.is_set():
        try:
            items.put(item, timeout=_POLL_SECONDS)
            return True
        except queue.Full:
            continue
    return False


def _produce(
    generate: Callable[[], Iterator[Any]], items: queue.Queue, stop: threading.Event
) -> None:
    """Fill `items` from generate() until it ends, fails or `stop` is set."""
    # The thread holds no reference to its BackgroundIterator, so an abandoned iterator is
    # garbage collected, and its __del__ stops this thread.
    try:
        for item in generate():
            if not _put_unless_stopped(items, item, stop):
                return
    except BaseException as error:  # noqa: BLE001 - re-raised in the consumer's thread.
        _put_unless_stopped(items, _Failure(error), stop)
        return
    _put_unless_stopped(items, _End(), stop)


class BackgroundIterator(Iterator[Any]):
    """Iterator that runs a generator in a daemon thread, `size` items ahead of the consumer.

    An exception raised by the generator is raised again by the consumer's next(). close()
    (also called by `with`) stops the thread after its current item; an iterator that is
    garbage collected stops its thread the same way.
    """

    def __init__(self, generate: Callable[[], Iterator[Any]], size: int) -> None:
        """Start a thread that fills a queue of `size` items from generate()."""
        self._finished = True
        if size <= 0:
            raise ValueError(f"size must be positive; got {size}.")
        self._queue: queue.Queue = queue.Queue(maxsize=size)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=_produce,
            args=(generate, self._queue, self._stop),
            name="ascl_jax-prefetch",
            daemon=True,
        )
        self._finished = False
        self._thread.start()

    def __iter__(self) -> "BackgroundIterator":
        return self

    def __next__(self) -> Any:
        if self._finished:
            raise StopIteration
        item = self._queue.get()
        if isinstance(item, _End):
            self._finished = True
            raise StopIteration
        if isinstance(item, _Failure):
            self._finished = True
            raise item.error
        return item

    def close(self) -> None:
        """Stop the background thread and drop the batches it prepared."""
        self._finished = True
        self._stop.set()
        while True:
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        self._thread.join(timeout=10.0)
        if self._thread.is_alive():
            logger.warning("The prefetch thread did not stop within 10 s of close().")

    @property
    def thread_alive(self) -> bool:
        """Whether the background thread is still running."""
        return self._thread.is_alive()

    def __enter__(self) -> "BackgroundIterator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    def __del__(self) -> None:
        stop = getattr(self, "_stop", None)
        if stop is not None:
            stop.set()


def prefetch_to_device(
    batches: Iterator[Batch],
    put: Callable[[np.ndarray, np.ndarray], tuple[Any, Any]],
    size: int = 2,
) -> "DevicePrefetchIterator":
    """Place the next `size` batches on the devices while the caller runs the current step.

    Args:
        batches: Host batches, for example from `train_batches`.
        put: Maps a batch's (images, labels) to device arrays, for example
            `ascl_jax.sharding.global_batch` with its mesh and batch size. JAX dispatches the
            transfer asynchronously, so on an accelerator it runs while the device computes
            the steps already dispatched.
        size: Batches placed ahead of the one the caller holds; 0 places each batch when it is
            requested.

    Returns:
        An iterator of the same batches, in the same order, with images and labels replaced by
        what `put` returns. Its close() also closes `batches` when that has a close().

    NOTE: the speed-up is measured on CPU only (experiments/bench_input.py), where the
    training loop ran equally fast with and without it, since host and device memory are
    the same there. The overlap it is for happens on GPU and TPU.
    """
    if size < 0:
        raise ValueError(f"size must be non-negative; got {size}.")
    return DevicePrefetchIterator(batches, put, size)


class DevicePrefetchIterator(Iterator[Batch]):
    """Iterator that keeps `size` batches already placed on the devices (see prefetch_to_device).

    An exception raised by the host iterator or by `put` reaches the caller only after the
    batches placed before it, so the caller sees the same sequence as without the prefetch.
    """

    def __init__(
        self,
        batches: Iterator[Batch],
        put: Callable[[np.ndarray, np.ndarray], tuple[Any, Any]],
        size: int,
    ) -> None:
        self._batches = batches
        self._put = put
        self._size = size
        self._placed: collections.deque[Batch] = collections.deque()
        self._error: BaseException | None = None
        self._exhausted = False

    def _place_next(self) -> None:
        """Put one more host batch on the devices; remember the end or an error for later."""
        try:
            batch = next(self._batches)
            images, labels = self._put(batch.images, batch.labels)
        except StopIteration:
            self._exhausted = True
            return
        except Exception as error:  # noqa: BLE001 - raised again once the placed batches are out.
            self._exhausted = True
            self._error = error
            return
        self._placed.append(batch._replace(images=images, labels=labels))

    def __iter__(self) -> "DevicePrefetchIterator":
        return self

    def __next__(self) -> Batch:
        while not self._exhausted and len(self._placed) <= self._size:
            self._place_next()
        if self._placed:
            return self._placed.popleft()
        if self._error is not None:
            error, self._error = self._error, None
            raise error
        raise StopIteration

    def close(self) -> None:
        """Drop the placed batches and close the host iterator."""
        self._exhausted = True
        self._placed.clear()
        close = getattr(self._batches, "close", None)
        if close is not None:
            close()

    def __enter__(self) -> "DevicePrefetchIterator":
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
