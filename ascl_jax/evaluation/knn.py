"""Weighted k-nearest-neighbour classifier used as the training monitor.

Protocol: bank and query features are L2-normalised backbone features, similarity is the
cosine ``s = <q, b>``, and each of the ``k`` most similar bank entries votes for its class
with weight ``exp(s / T)``:

    votes[c] = sum_{j in topk(q)} exp(s_j / T) * [y_j == c],    prediction = argmax_c votes[c]

Vote ties go to the lowest class index, and similarity ties at the k-th place go to the lower
bank index (``jax.lax.top_k`` documents that equal values keep the lower index first).

Memory: queries are processed ``query_chunk`` rows at a time by one jitted function, so it
compiles once per bank shape and setting of ``k``, ``num_classes`` and the chunk sizes.
Without ``bank_chunk`` each step materialises the full ``[query_chunk, bank_size]``
similarity matrix (256 x 50,000 float32 is 51 MB). With
``bank_chunk`` the bank is streamed in slices and a running top-k (values and labels) is
merged after each slice, so the working memory beyond the bank itself is
``O(query_chunk * (k + bank_chunk))`` whatever the bank size.
"""

from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

__all__ = ["knn_accuracy", "knn_predict", "l2_normalize"]


def l2_normalize(x: Any, axis: int = -1, eps: float = 1e-12) -> jax.Array:
    """Scale ``x`` to unit L2 norm along ``axis``: ``x / max(||x||_2, eps)``.

    The computation and the result are float32 whatever the input dtype, so bfloat16
    features lose no precision in the norm. Zero vectors stay zero.
    """
    x = jnp.asarray(x, dtype=jnp.float32)
    return x * jax.lax.rsqrt(jnp.maximum(jnp.sum(x * x, axis=axis, keepdims=True), eps * eps))


def _cosine_similarity(queries: jax.Array, bank: jax.Array) -> jax.Array:
    """Compute ``queries @ bank.T`` accumulated in float32, shape ``[num_queries, num_bank]``."""
    dtype = jnp.promote_types(queries.dtype, bank.dtype)
    return lax.dot_general(
        queries.astype(dtype),
        bank.astype(dtype),
        dimension_numbers=(((1,), (1,)), ((), ())),
        preferred_element_type=jnp.float32,
    )


def _merge_top_k(
    running_values: jax.Array,
    running_labels: jax.Array,
    chunk_similarity: jax.Array,
    chunk_labels: jax.Array,
    k: int,
) -> tuple[jax.Array, jax.Array]:
    """Merge one bank slice into the running top-k of every query.

    The running entries come first in the concatenation, so on equal similarity they (the
    lower bank indices) win, which matches ``top_k`` over the whole bank at once.
    """
    candidate_values = jnp.concatenate([running_values, chunk_similarity], axis=1)
    top_values, top_index = lax.top_k(candidate_values, k)

    # Candidate i < k is running entry i and candidate i >= k is chunk row i - k. Both
    # gathers get clamped indices and the select keeps the valid one, which avoids building
    # a [num_queries, k + bank_chunk] label matrix.
    from_running = top_index < k
    running_pick = jnp.take_along_axis(running_labels, jnp.minimum(top_index, k - 1), axis=1)
    chunk_pick = chunk_labels[jnp.maximum(top_index - k, 0)]
    top_labels = jnp.where(from_running, running_pick, chunk_pick)
    return top_values, top_labels


def _top_k_streamed(
    queries: jax.Array, bank: jax.Array, bank_labels: jax.Array, k: int, bank_chunk: int
) -> tuple[jax.Array, jax.Array]:
    """Find the top-k similarities and their labels, reading the bank ``bank_chunk`` rows at a time.

    Full slices run in a ``fori_loop`` with ``dynamic_slice``, and the remainder (if any) is
    one more statically shaped step, so the bank is never padded or copied as a whole.
    """
    num_queries = queries.shape[0]
    bank_size = bank.shape[0]
    num_full_chunks = bank_size // bank_chunk
    remainder = bank_size - num_full_chunks * bank_chunk

    # -inf never wins against a real similarity, and bank_size >= k guarantees that every
    # placeholder is replaced by the end.
    running = (
        jnp.full((num_queries, k), -jnp.inf, dtype=jnp.float32),
        jnp.zeros((num_queries, k), dtype=jnp.int32),
    )

    def merge_full_chunk(chunk_index: jax.Array, carry: tuple[jax.Array, jax.Array]):
        start = chunk_index * bank_chunk
        chunk = lax.dynamic_slice_in_dim(bank, start, bank_chunk, axis=0)
        chunk_labels = lax.dynamic_slice_in_dim(bank_labels, start, bank_chunk, axis=0)
        similarity = _cosine_similarity(queries, chunk)
        return _merge_top_k(*carry, similarity, chunk_labels, k)

    running = lax.fori_loop(0, num_full_chunks, merge_full_chunk, running)

    if remainder:
        start = num_full_chunks * bank_chunk
        similarity = _cosine_similarity(queries, bank[start:])
        running = _merge_top_k(*running, similarity, bank_labels[start:], k)
    return running


@functools.partial(jax.jit, static_argnames=("num_classes", "k", "bank_chunk"))
def _predict_query_chunk(
    bank: jax.Array,
    bank_labels: jax.Array,
    queries: jax.Array,
    temperature: jax.Array,
    *,
    num_classes: int,
    k: int,
    bank_chunk: int | None,
) -> jax.Array:
    """Predict the class of each row of ``queries`` by weighted top-k voting."""
    if bank_chunk is None:
        similarity = _cosine_similarity(queries, bank)
        top_values, top_index = lax.top_k(similarity, k)
        top_labels = bank_labels[top_index]
    else:
        top_values, top_labels = _top_k_streamed(queries, bank, bank_labels, k, bank_chunk)

    # exp((s - s_max) / T) is exp(s / T) times a per-query positive constant, so the argmax
    # is the same, but the largest weight is 1 and small temperatures cannot overflow.
    # s_max comes from jnp.max and not from top_values[:, :1]. On the XLA CPU backend of
    # jax 0.10.2 that slice stops top_k from lowering to the TopK custom call, so XLA sorts
    # every similarity row in full. That made a 50,000-entry bank about 40x slower (2 cores).
    max_similarity = jnp.max(top_values, axis=1, keepdims=True)
    weights = jnp.exp((top_values - max_similarity) / temperature)
    rows = jnp.arange(queries.shape[0])[:, None]
    votes = jnp.zeros((queries.shape[0], num_classes), jnp.float32)
    votes = votes.at[rows, top_labels].add(weights)
    # jnp.argmax returns the first maximum, which is the lowest class index on a tie.
    return jnp.argmax(votes, axis=1).astype(jnp.int32)


def _check_positive_int(name: str, value: Any) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"{name} must be a positive integer, got {value!r}.")


def _check_features(name: str, features: Any) -> tuple[int, ...]:
    shape = np.shape(features)
    if len(shape) != 2:
        raise ValueError(
            f"{name} must have shape [num_samples, feature_dim], got shape {shape}."
        )
    # np.dtype objects are falsy (their len() is the number of record fields), so test for None.
    dtype = getattr(features, "dtype", None)
    if dtype is None:
        dtype = np.asarray(features).dtype
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"{name} must have a floating-point dtype, got {dtype}.")
    return shape


def _check_labels(name: str, labels: Any, num_samples: int, num_classes: int) -> np.ndarray:
    """Return ``labels`` as a host int32 array after checking shape, dtype and range."""
    labels = np.asarray(labels)
    if labels.shape != (num_samples,):
        raise ValueError(
            f"{name} must have shape ({num_samples},) to match the features, "
            f"got shape {labels.shape}."
        )
    if not np.issubdtype(labels.dtype, np.integer):
        raise ValueError(f"{name} must have an integer dtype, got {labels.dtype}.")
    if labels.size:
        lowest, highest = int(labels.min()), int(labels.max())
        if lowest < 0:
            raise ValueError(
                f"{name} contains {lowest}, but every label must be a class index in "
                f"[0, {num_classes}). Remove unlabelled samples (label < 0) first."
            )
        if highest >= num_classes:
            raise ValueError(
                f"{name} contains {highest}, which is not a class index in "
                f"[0, {num_classes}). Pass a larger num_classes or fix the labels."
            )
    return labels.astype(np.int32)


def knn_predict(
    bank_features: Any,
    bank_labels: Any,
    query_features: Any,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    query_chunk: int = 256,
    bank_chunk: int | None = None,
) -> jax.Array:
    """Classify each query by a similarity-weighted vote of its k nearest bank features.

    The caller must L2-normalise both feature sets (for example with ``l2_normalize``),
    because the dot product is used as the cosine similarity and is not normalised here.
    For each query ``q``, with ``s_j = <q, b_j>`` over the ``k`` most similar bank rows:

        prediction = argmax_c sum_j exp(s_j / temperature) * [bank_labels[j] == c]

    Vote ties go to the lowest class index. Similarity is accumulated in float32, and
    bfloat16 features are accepted. Mixed dtypes are promoted inside each step, so a
    bfloat16 bank with float32 queries gets a float32 copy of each bank slice (of the whole
    bank when ``bank_chunk`` is None).

    This is a host-side driver that checks its inputs and then loops over query chunks, so
    call it from ordinary Python and not inside ``jax.jit``.

    Args:
        bank_features: ``[bank_size, dim]`` L2-normalised features of the labelled bank.
        bank_labels: ``[bank_size]`` integer classes in ``[0, num_classes)``. Negative
            (unlabelled) entries raise ``ValueError``.
        query_features: ``[num_queries, dim]`` L2-normalised features to classify.
        num_classes: number of classes, the length of each vote vector.
        k: number of neighbours. It must not exceed ``bank_size``: a larger ``k`` raises
            ``ValueError`` instead of being clamped, so a reported accuracy always means the
            requested k.
        temperature: softmax-style temperature ``T > 0`` of the vote weights.
        query_chunk: number of queries per jitted step. The last chunk is zero-padded so the
            step compiles once, and fewer queries than this shrink the chunk to the query count.
        bank_chunk: if set, the number of bank rows per streaming step, which bounds the
            working memory at ``O(query_chunk * (k + bank_chunk))``. ``None``, or a value of at
            least ``bank_size``, compares each query chunk with the whole bank at once. Both
            modes select the same neighbours in the same order.

    Returns:
        ``int32`` array of shape ``[num_queries]`` with the predicted classes.

    Raises:
        ValueError: on bad shapes, dtypes, labels, ``k``, ``temperature`` or chunk sizes.
    """
    bank_shape = _check_features("bank_features", bank_features)
    query_shape = _check_features("query_features", query_features)
    if bank_shape[1] != query_shape[1]:
        raise ValueError(
            f"bank_features has feature dimension {bank_shape[1]} but query_features has "
            f"{query_shape[1]}. Both must come from the same encoder."
        )
    _check_positive_int("num_classes", num_classes)
    _check_positive_int("k", k)
    _check_positive_int("query_chunk", query_chunk)
    if bank_chunk is not None:
        _check_positive_int("bank_chunk", bank_chunk)
    bank_size, num_queries = bank_shape[0], query_shape[0]
    if k > bank_size:
        raise ValueError(
            f"k={k} is larger than the bank ({bank_size} samples). "
            f"Pass k <= {bank_size} or use a larger bank."
        )
    if not (isinstance(temperature, (int, float, np.floating)) and math.isfinite(temperature)
            and temperature > 0):
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}.")
    labels = _check_labels("bank_labels", bank_labels, bank_size, num_classes)

    if num_queries == 0:
        return jnp.zeros((0,), jnp.int32)
    if bank_chunk is not None and bank_chunk >= bank_size:
        bank_chunk = None

    bank = jnp.asarray(bank_features)
    bank_labels_device = jnp.asarray(labels)
    queries = jnp.asarray(query_features)
    chunk = min(query_chunk, num_queries)
    num_chunks = -(-num_queries // chunk)
    padding = num_chunks * chunk - num_queries
    if padding:
        queries = jnp.pad(queries, ((0, padding), (0, 0)))
    temperature_array = jnp.asarray(temperature, jnp.float32)

    predictions = [
        _predict_query_chunk(
            bank,
            bank_labels_device,
            queries[start : start + chunk],
            temperature_array,
            num_classes=int(num_classes),
            k=int(k),
            bank_chunk=None if bank_chunk is None else int(bank_chunk),
        )
        for start in range(0, num_chunks * chunk, chunk)
    ]
    return jnp.concatenate(predictions)[:num_queries]


def knn_accuracy(
    bank_features: Any,
    bank_labels: Any,
    query_features: Any,
    query_labels: Any,
    *,
    num_classes: int,
    k: int = 200,
    temperature: float = 0.1,
    **chunking: int | None,
) -> float:
    """Compute the top-1 accuracy in [0, 1] of ``knn_predict`` on labelled queries.

    ``chunking`` takes ``query_chunk`` and ``bank_chunk`` and passes them on to
    ``knn_predict``, whose docstring describes the features and the vote. ``query_labels``
    must be integer classes in ``[0, num_classes)``, one per query, and at least one query
    is required.
    """
    unknown = set(chunking) - {"query_chunk", "bank_chunk"}
    if unknown:
        raise ValueError(
            f"Unknown keyword arguments {sorted(unknown)}. knn_accuracy accepts only "
            "query_chunk and bank_chunk besides its named arguments."
        )
    query_shape = _check_features("query_features", query_features)
    if query_shape[0] == 0:
        raise ValueError("query_features has no rows, so the accuracy is undefined.")
    _check_positive_int("num_classes", num_classes)
    labels = _check_labels("query_labels", query_labels, query_shape[0], num_classes)

    predictions = knn_predict(
        bank_features,
        bank_labels,
        query_features,
        num_classes=num_classes,
        k=k,
        temperature=temperature,
        **chunking,
    )
    return float(np.mean(np.asarray(predictions) == labels))
