"""The MoCo queue: a ring buffer of L2-normalised target embeddings.

The queue contains `n` rows of dimension `D`. Each train step writes the whole global batch of target
embeddings at the write pointer and advances the pointer by the batch size, modulo `n`. Because `n`
is a multiple of the batch size (checked by `check_queue_size`), a write never wraps around the
end, so an enqueue is one `dynamic_update_slice` and the oldest keys are always the ones replaced.

Next to the embeddings the queue stores the dataset label of each key. The loss never reads these
labels; they only feed the pseudo-label same-class diagnostic. Rows that hold the random start-up
vectors carry the label `EMPTY_LABEL`.
"""

from typing import NamedTuple

import jax
import jax.numpy as jnp

EMPTY_LABEL = -1


class Queue(NamedTuple):
    """Queue contents: `keys` [n, D] unit rows, `labels` [n] int32, `pointer` scalar int32."""

    keys: jax.Array
    labels: jax.Array
    pointer: jax.Array


def check_queue_size(queue_size: int, batch_size: int) -> None:
    """Raise ValueError unless the queue fits a whole number of global batches."""
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}.")
    if queue_size < batch_size or queue_size % batch_size:
        lower = max(batch_size, queue_size // batch_size * batch_size)
        raise ValueError(
            f"queue_size={queue_size} must be a positive multiple of the global batch_size="
            f"{batch_size} so that every enqueue writes one contiguous block; "
            f"{lower} or {lower + batch_size} would work."
        )


def init_queue(key: jax.Array, queue_size: int, dim: int, dtype=jnp.float32) -> Queue:
    """Create a queue of random unit vectors (uniform on the sphere) with empty labels."""
    keys = jax.random.normal(key, (queue_size, dim), jnp.float32)
    keys = keys / jnp.linalg.norm(keys, axis=-1, keepdims=True)
    return Queue(
        keys=keys.astype(dtype),
        labels=jnp.full((queue_size,), EMPTY_LABEL, jnp.int32),
        pointer=jnp.zeros((), jnp.int32),
    )


def enqueue(queue: Queue, keys: jax.Array, labels: jax.Array) -> Queue:
    """Write `keys` [B, D] and their `labels` [B] at the pointer and advance it by B (mod n).

    The caller guarantees that n is a multiple of B (see `check_queue_size`), so the block
    [pointer, pointer + B) never crosses the end of the buffer.
    """
    batch_size = keys.shape[0]
    queue_size = queue.keys.shape[0]
    if queue_size % batch_size:
        raise ValueError(
            f"Cannot enqueue a batch of {batch_size} keys into a queue of {queue_size} rows: "
            "the queue size must be a multiple of the batch size."
        )
    keys = jax.lax.stop_gradient(keys).astype(queue.keys.dtype)
    new_keys = jax.lax.dynamic_update_slice(queue.keys, keys, (queue.pointer, 0))
    new_labels = jax.lax.dynamic_update_slice(
        queue.labels, labels.astype(jnp.int32), (queue.pointer,)
    )
    pointer = (queue.pointer + batch_size) % queue_size
    return Queue(keys=new_keys, labels=new_labels, pointer=pointer.astype(jnp.int32))
