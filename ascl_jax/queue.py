"""The MoCo queue: a ring buffer of L2-normalised target embeddings.

The queue contains `n` rows of dimension `D`. Each train step writes the whole global batch of target
embeddings at the write pointer and advances the pointer by the batch size, modulo `n`. Because `n`
is a multiple of the batch size (checked by `check_queue_size`), a write never wraps around the
end, so an enqueue is one `dynamic_update_slice` and the oldest keys are always the ones replaced.

Next to the embeddings the queue stores the dataset label of each key. The loss never reads these
labels; they only feed the pseudo-label same-class diagnostic. Rows that hold the random start-up
vectors carry the label `EMPTY_LABEL`.

Data-parallel training shards the queue along n: with P devices, device i stores the rows
`[i * n / P, (i + 1) * n / P)` of the same logical array, and the pointer is replicated. Inside
`jax.shard_map`, `enqueue(..., axis_name=...)` writes the global batch into that layout, so the
global queue after every step is the queue of a one-device run, row for row, whatever P is.
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


def enqueue(
    queue: Queue, keys: jax.Array, labels: jax.Array, *, axis_name: str | None = None
) -> Queue:
    """Write `keys` [B, D] and their `labels` [B] at the pointer and advance it by B (mod n).

    The caller guarantees that n is a multiple of B (see `check_queue_size`), so the block
    [pointer, pointer + B) never crosses the end of the buffer.

    With `axis_name` (inside `jax.shard_map` or `jax.pmap` over that axis), `queue.keys` and
    `queue.labels` are this device's shard of n / P rows, `queue.pointer` is the global
    pointer, and `keys` and `labels` are the whole global batch, equal on every device. Each
    device writes the rows of the block [pointer, pointer + B) that fall into its shard. This
    is a select over the n / P local rows, the same order of work as reading the shard for
    the similarities.
    """
    batch_size = keys.shape[0]
    local_size = queue.keys.shape[0]
    num_shards = 1 if axis_name is None else jax.lax.axis_size(axis_name)
    queue_size = local_size * num_shards
    if queue_size % batch_size:
        raise ValueError(
            f"Cannot enqueue a batch of {batch_size} keys into a queue of {queue_size} rows: "
            "the queue size must be a multiple of the batch size."
        )
    keys = jax.lax.stop_gradient(keys).astype(queue.keys.dtype)
    labels = labels.astype(jnp.int32)
    pointer = ((queue.pointer + batch_size) % queue_size).astype(jnp.int32)

    if axis_name is None:
        new_keys = jax.lax.dynamic_update_slice(queue.keys, keys, (queue.pointer, 0))
        new_labels = jax.lax.dynamic_update_slice(queue.labels, labels, (queue.pointer,))
        return Queue(keys=new_keys, labels=new_labels, pointer=pointer)

    first_row = jax.lax.axis_index(axis_name) * local_size
    batch_row = first_row + jnp.arange(local_size) - queue.pointer
    is_written = (batch_row >= 0) & (batch_row < batch_size)
    source = jnp.clip(batch_row, 0, batch_size - 1)
    new_keys = jnp.where(is_written[:, None], keys[source], queue.keys)
    new_labels = jnp.where(is_written, labels[source], queue.labels)
    return Queue(keys=new_keys, labels=new_labels, pointer=pointer)
