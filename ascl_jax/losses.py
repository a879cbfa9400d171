"""Compute the ASCL soft-target contrastive loss (MoCo with adaptive soft labels).

Notation, for a batch of B samples, embedding size D and a memory bank (queue) of n entries:

- ``query``  [B, D]: online-network embedding of the strong view, z_q.
- ``target`` [B, D]: target-network embedding of the weak view, z_t (the positive).
- ``bank``   [n, D]: the queue entries z'_2 .. z'_{n+1}, from earlier steps.

All embeddings are expected to be L2-normalised already; nothing here renormalises them.

Relabeling (everything on the target side is under stop-gradient):

    d_j = z_t . z'_j                                   j = 2 .. n+1
    q_j = exp(d_j / tau') / sum_l exp(d_l / tau')
    c   = 1 - H(q) / log(n),   H(q) = -sum_j q_j log q_j
    N_K = the K bank entries with the largest d_j

Unnormalised targets, y_1 = 1 (the positive) in every kind:

    normal: y_j = 0
    hard:   y_j = 1 if z'_j in N_K else 0
    ahcl:   y_j = c if z'_j in N_K else 0
    ascl:   y_j = min(1, c * K * q_j)

Each row is then divided by its sum. The loss is the soft cross-entropy

    p_j = softmax_j(z_q . z'_j / tau),  j = 1 .. n+1,   L = -mean_batch sum_j y_j log p_j

which for the "normal" kind is exactly MoCo's InfoNCE.

Label math runs in float32 (bfloat16 and float16 inputs are upcast), and similarities use
``jax.lax.Precision.HIGHEST``. At tau' = 0.05 an error of 1e-3 in d, the order of error of a
bfloat16 or TF32 matmul pass, changes q_j by exp(1e-3 / 0.05) - 1, about 2 %.

Speed. Without ``axis_name``, ``ascl_loss`` is fused: it runs over the bank in cache-sized
chunks and computes the query gradient in closed form, (p - y) / tau times the keys, instead
of materialising the labels and log-probabilities and differentiating through them (see
``ascl_loss``). ``soft_labels`` and ``soft_infonce`` stay the plain, unfused reference.

Sharded bank. ``soft_labels``, ``similarity_distribution``, ``entropy_confidence``, the label
rules, ``normalize_labels``, ``soft_infonce``, ``ascl_loss`` and ``label_diagnostics`` take an
optional ``axis_name``. With ``axis_name=None`` (the default) the bank is the whole bank. With an
axis name they must run inside ``jax.shard_map`` or ``jax.pmap`` over that axis, and then:

- ``bank`` (and ``bank_classes``) is this device's shard of the global bank. The global bank is
  the concatenation of the shards in axis-index order, so the shard of device i contains the global
  entries ``[i * n_local, (i + 1) * n_local)``.
- ``query``, ``target`` and ``sample_classes`` are the whole batch and must be equal on every
  device (for example the result of ``jax.lax.all_gather(..., tiled=True)``).
- The softmax, the entropy and the top-K are global: per-shard maxima and sums are combined with
  ``pmax`` and ``psum``, and the per-shard top-K candidates (K values per row) are merged with an
  ``all_gather``. The bank itself is never gathered.
- Labels have the layout [B, 1 + n_local]: column 0 is the positive's weight (the same value on
  every device) and columns 1..n_local are the weights of the local bank entries. Each row is
  normalised over the GLOBAL bank, so column 0 plus the sum of the bank columns of all shards is
  1. Concatenating column 0 of any shard with the bank columns of every shard gives the
  unsharded labels.
- Scalars (the loss, the diagnostics) and the confidence come out equal on every device.

Validation of static arguments (kind, num_neighbors, tau, tau_prime) and of array ranks and
shapes happens in plain Python before tracing, so a bad value raises ValueError before anything
is compiled.
"""

from __future__ import annotations

import functools
import math
import numbers
from typing import Callable

import jax
import jax.numpy as jnp

Array = jax.Array

KINDS = ("normal", "hard", "ahcl", "ascl")

_HIGHEST = jax.lax.Precision.HIGHEST

AxisName = str | None


# ---------------------------------------------------------------------------
# Validation (plain Python, runs before tracing).
# ---------------------------------------------------------------------------


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"Invalid kind {kind!r}: expected one of {KINDS}.")


def _check_num_neighbors(num_neighbors: int, bank_size: int) -> None:
    is_integer = isinstance(num_neighbors, numbers.Integral) and not isinstance(num_neighbors, bool)
    if not is_integer:
        raise ValueError(
            f"Invalid num_neighbors {num_neighbors!r} (type {type(num_neighbors).__name__}): "
            f"expected a Python int in [1, {bank_size}] (the bank size), because top-K needs "
            "a static K."
        )
    if not 1 <= num_neighbors <= bank_size:
        raise ValueError(
            f"Invalid num_neighbors {num_neighbors}: expected an int in [1, {bank_size}], "
            f"where {bank_size} is the number of bank entries."
        )


def _check_temperature(name: str, value: float) -> None:
    """Raise ValueError unless ``value`` is a finite number > 0; traced values pass unchecked."""
    try:
        number = float(value)
    except jax.errors.ConcretizationTypeError:
        # A temperature traced under jit (e.g. a schedule) cannot be checked in Python.
        return
    except (TypeError, ValueError) as error:
        raise ValueError(
            f"Invalid {name} {value!r}: expected a positive finite number such as 0.1."
        ) from error
    if not (math.isfinite(number) and number > 0.0):
        raise ValueError(
            f"Invalid {name} {value!r}: expected a positive finite number such as 0.1."
        )


def _check_rank(name: str, array: Array, rank: int, layout: str) -> None:
    if jnp.ndim(array) != rank:
        raise ValueError(
            f"Invalid {name} shape {jnp.shape(array)}: expected rank {rank} {layout}. "
            "Use jax.vmap for extra leading axes."
        )


def _check_target_and_bank(target: Array, bank: Array, target_name: str = "target") -> None:
    _check_rank(target_name, target, 2, "[batch, dim]")
    _check_rank("bank", bank, 2, "[bank_size, dim]")
    target_dim = jnp.shape(target)[1]
    bank_dim = jnp.shape(bank)[1]
    if target_dim != bank_dim:
        raise ValueError(
            f"Mismatched embedding size: {target_name} has dim {target_dim} "
            f"(shape {jnp.shape(target)}) but bank has dim {bank_dim} (shape {jnp.shape(bank)}). "
            "Both must have the same last axis."
        )
    if jnp.shape(bank)[0] < 1:
        raise ValueError(
            f"Invalid bank shape {jnp.shape(bank)}: the bank needs at least one entry."
        )


def _axis_size(axis_name: AxisName) -> int:
    """Return the number of shards along ``axis_name``: 1 for None, else the bound axis size."""
    if axis_name is None:
        return 1
    try:
        return int(jax.lax.axis_size(axis_name))
    except NameError as error:
        raise ValueError(
            f"Invalid axis_name {axis_name!r}: no mapped axis of that name is bound here. "
            "Call the function inside jax.shard_map or jax.pmap over that axis, or pass "
            "axis_name=None for an unsharded bank."
        ) from error


def _check_query_and_target(query: Array, target: Array) -> None:
    if jnp.shape(query) != jnp.shape(target):
        raise ValueError(
            f"Mismatched shapes: query {jnp.shape(query)} and target {jnp.shape(target)} "
            "must both be [batch, dim]."
        )


# ---------------------------------------------------------------------------
# Numerics helpers.
# ---------------------------------------------------------------------------


def _upcast(x: Array) -> Array:
    """Cast a floating array to float32 at least (bfloat16/float16 -> float32; float64 stays)."""
    x = jnp.asarray(x)
    return x.astype(jnp.promote_types(x.dtype, jnp.float32))


def _psum(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else jax.lax.psum(x, axis_name)


def _pmax(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else jax.lax.pmax(x, axis_name)


def _pmin(x: Array, axis_name: AxisName) -> Array:
    return x if axis_name is None else jax.lax.pmin(x, axis_name)


def _row_max(x: Array, axis_name: AxisName = None) -> Array:
    """Return max_j x[..., j] with keepdims under stop-gradient, over all shards when sharded.

    The stop-gradient comes before the ``pmax``, which has no differentiation rule.
    """
    return _pmax(jax.lax.stop_gradient(jnp.max(x, axis=-1, keepdims=True)), axis_name)


def _scaled_shift(x: Array, row_max: Array, temperature: float) -> Array:
    """Return min((x - row_max) / temperature, 0) with the gradient of (x - row_max) / temperature.

    The maximum is subtracted before the division by the temperature, so the largest entry
    gives exactly 0. With the division first, XLA on CPU (jax 0.10.2) contracted x / t - m
    into one fused multiply-add. For logits near 1e11 the largest entry then gave +-2048
    instead of 0, and exp of it overflowed or underflowed. The clamp at 0 is an exact
    identity that guards against such logits passed in from outside.
    """
    shifted = (x - row_max) / temperature
    return shifted - jax.lax.stop_gradient(jnp.maximum(shifted, 0.0))


def _clamp_at_least_one(x: Array) -> Array:
    """Return max(x, 1) with the gradient of x, also at x == 1."""
    return x + jax.lax.stop_gradient(jnp.maximum(x, 1.0) - x)


def _row_sum_exp(
    x: Array, row_max: Array, temperature: float, axis_name: AxisName = None
) -> Array:
    """Return sum_j exp((x_j - row_max) / temperature) with keepdims, over all shards.

    The sum is clamped to >= 1, an exact identity when row_max is the true maximum because
    that entry contributes exp(0) = 1, so its log stays finite.
    """
    terms = jnp.exp(_scaled_shift(x, row_max, temperature))
    total = _psum(jnp.sum(terms, axis=-1, keepdims=True), axis_name)
    return _clamp_at_least_one(total)


def _log_softmax(x: Array, temperature: float = 1.0, axis_name: AxisName = None) -> Array:
    """Compute log_softmax(x / t) over the last axis as (x - m) / t - log sum_j exp((x_j - m) / t).

    Here m = max_j x_j and t = temperature > 0. With ``axis_name`` the last axis is one shard
    of a longer axis, and m and the sum run over all shards.
    """
    row_max = jax.lax.stop_gradient(_row_max(x, axis_name))
    log_normalizer = jnp.log(_row_sum_exp(x, row_max, temperature, axis_name))
    return _scaled_shift(x, row_max, temperature) - log_normalizer


def _top_k_mask(similarities: Array, num_neighbors: int, axis_name: AxisName = None) -> Array:
    """Return a float32 0/1 mask of the K largest entries of each row (ties: lowest index wins).

    ``jax.lax.top_k`` returns equal values in order of increasing index, so exactly K entries
    per row are set, also when more than K entries tie.

    With ``axis_name`` the rows are shards of the global rows and the mask marks this shard's
    entries among the GLOBAL top K. Each shard contributes its own top min(K, n_local)
    candidates, which contain every global winner of that shard. The candidates of all shards
    are gathered in shard order. Among equal values ``top_k`` then prefers the earlier
    candidate, which has the lower global index, so the tie rule matches the unsharded one.
    """
    if axis_name is None:
        bank_size = similarities.shape[-1]
        rows = similarities.reshape(-1, bank_size)
        _, indices = jax.lax.top_k(rows, num_neighbors)
        row_ids = jnp.arange(rows.shape[0])[:, None]
        mask = jnp.zeros(rows.shape, jnp.float32).at[row_ids, indices].set(1.0)
        return mask.reshape(similarities.shape)

    local_size = similarities.shape[-1]
    rows = similarities.reshape(-1, local_size)
    values, indices = jax.lax.top_k(rows, min(num_neighbors, local_size))
    offset = jax.lax.axis_index(axis_name) * local_size
    candidate_values = jax.lax.all_gather(values, axis_name, axis=1, tiled=True)
    candidate_indices = jax.lax.all_gather(indices + offset, axis_name, axis=1, tiled=True)
    _, winners = jax.lax.top_k(candidate_values, num_neighbors)
    local_winners = jnp.take_along_axis(candidate_indices, winners, axis=1) - offset
    # Winners on other shards point past the end of this shard and are dropped by the scatter.
    is_local = (local_winners >= 0) & (local_winners < local_size)
    local_winners = jnp.where(is_local, local_winners, local_size)
    row_ids = jnp.arange(rows.shape[0])[:, None]
    mask = jnp.zeros(rows.shape, jnp.float32).at[row_ids, local_winners].set(1.0, mode="drop")
    return mask.reshape(similarities.shape)


# ---------------------------------------------------------------------------
# Relabeling pieces.
# ---------------------------------------------------------------------------


def bank_similarities(target: Array, bank: Array) -> Array:
    """Compute the cosine similarities d = target @ bank.T, shape [B, n], in float32 or wider.

    Inputs are taken as already L2-normalised, so d_j = z_t . z'_j is the cosine similarity.
    """
    _check_target_and_bank(target, bank)
    return jnp.matmul(_upcast(target), _upcast(bank).T, precision=_HIGHEST)


def similarity_distribution(
    similarities: Array, *, tau_prime: float, axis_name: AxisName = None
) -> Array:
    """Compute log q, the log of the sharpened distribution over the bank, shape [B, n].

        log q_j = d_j / tau' - log sum_l exp(d_l / tau')

    The distribution itself is q = exp(log_q). It is returned in log form because at
    tau' = 0.05 most q_j underflow to 0 in float32 while log q_j stays finite. With
    ``axis_name``, ``similarities`` is one shard [B, n_local] and the sum over l runs over
    all shards.
    """
    _check_temperature("tau_prime", tau_prime)
    return _log_softmax(_upcast(similarities), tau_prime, axis_name)


def entropy_confidence(log_q: Array, *, axis_name: AxisName = None) -> Array:
    """Compute the confidence c = 1 - H(q) / log(n) from log q over the last axis, shape [B].

    Computed as the equivalent c = KL(q || uniform) / log(n), with
    KL = sum_j q_j (log q_j + log n), which needs only log q and never q * log(q) of an
    underflowed q. c is exactly 0 for a uniform q and exactly 1 for a one-hot q (log q = 0 at
    one entry, very negative or -inf elsewhere). Rounding elsewhere is clipped into [0, 1].
    A bank of a single entry (n = 1) always yields a one-hot q, so c is defined as 1 there,
    although H / log(n) is 0 / 0. With ``axis_name``, ``log_q`` is one shard of the bank axis,
    n is the global bank size and the sum runs over all shards.
    """
    log_q = _upcast(log_q)
    bank_size = log_q.shape[-1] * _axis_size(axis_name)
    if bank_size == 1:
        return jnp.ones(log_q.shape[:-1], log_q.dtype)

    log_bank_size = jnp.log(jnp.asarray(bank_size, log_q.dtype))
    q = jnp.exp(log_q)
    # Entries with q_j == 0 contribute 0 (the limit), even where log q_j is -inf.
    terms = jnp.where(q > 0, q * (log_q + log_bank_size), 0.0)
    kl_to_uniform = _psum(jnp.sum(terms, axis=-1), axis_name)
    confidence = jnp.clip(kl_to_uniform / log_bank_size, 0.0, 1.0)

    # Pin the end points against rounding. Under jit on CPU the division above gives
    # 1 - 2**-24 for a one-hot q (XLA multiplies by 1 / log(n) instead), and KL >= log(n)
    # happens only for a one-hot q. A row of equal log q_j is exactly a uniform q.
    row_max = _pmax(jnp.max(log_q, axis=-1), axis_name)
    row_min = _pmin(jnp.min(log_q, axis=-1), axis_name)
    is_uniform = row_max == row_min
    confidence = jnp.where(kl_to_uniform >= log_bank_size, 1.0, confidence)
    return jnp.where(is_uniform, 0.0, confidence)


# ---------------------------------------------------------------------------
# Label rules. Each returns the UNNORMALISED bank weights y_2 .. y_{n+1}, shape [B, n], float32;
# y_1 = 1 for the positive is implicit and added by normalize_labels.
# All rules share the signature (similarities, log_q, confidence, num_neighbors, *, axis_name).
# With axis_name the inputs and the result are this device's shard of the bank axis.
# ---------------------------------------------------------------------------


def normal_bank_weights(
    similarities: Array,
    log_q: Array,
    confidence: Array,
    num_neighbors: int,
    *,
    axis_name: AxisName = None,
) -> Array:
    """Return y_j = 0 for every bank entry (MoCo's one-hot target)."""
    del log_q, confidence, num_neighbors, axis_name
    return jnp.zeros(jnp.shape(similarities), jnp.float32)


def hard_bank_weights(
    similarities: Array,
    log_q: Array,
    confidence: Array,
    num_neighbors: int,
    *,
    axis_name: AxisName = None,
) -> Array:
    """Return y_j = 1 for the K entries with the largest d_j, else 0 (ties: lowest index wins)."""
    del log_q, confidence
    return _top_k_mask(_upcast(similarities), num_neighbors, axis_name)


def ahcl_bank_weights(
    similarities: Array,
    log_q: Array,
    confidence: Array,
    num_neighbors: int,
    *,
    axis_name: AxisName = None,
) -> Array:
    """Return y_j = c for the K entries with the largest d_j, else 0 (adaptive hard labels)."""
    del log_q
    mask = _top_k_mask(_upcast(similarities), num_neighbors, axis_name)
    return jnp.asarray(confidence, jnp.float32)[..., None] * mask


def ascl_bank_weights(
    similarities: Array,
    log_q: Array,
    confidence: Array,
    num_neighbors: int,
    *,
    axis_name: AxisName = None,
) -> Array:
    """Return y_j = min(1, c * K * q_j) with q_j = exp(log q_j) (adaptive soft labels).

    The cap at 1 is applied before the row normalisation, so no bank entry outweighs the
    positive. The rule is elementwise, so a shard needs no communication.
    """
    del similarities, axis_name
    q = jnp.exp(jnp.asarray(log_q, jnp.float32))
    scale = jnp.asarray(confidence, jnp.float32)[..., None] * float(num_neighbors)
    return jnp.minimum(1.0, scale * q)


_BANK_WEIGHT_RULES: dict[str, Callable[..., Array]] = {
    "normal": normal_bank_weights,
    "hard": hard_bank_weights,
    "ahcl": ahcl_bank_weights,
    "ascl": ascl_bank_weights,
}


def normalize_labels(bank_weights: Array, *, axis_name: AxisName = None) -> Array:
    """Prepend the positive's weight 1 and divide each row by its sum, shape [B, 1 + n].

        labels = [1, y_2, .., y_{n+1}] / (1 + sum_j y_j)

    Weights must be >= 0, so every row sum is >= 1 and the division is safe. With
    ``axis_name``, ``bank_weights`` is one shard [B, n_local], the sum over j runs over all
    shards, and the result is [B, 1 + n_local] with the positive's weight in column 0.
    """
    bank_weights = _upcast(bank_weights)
    ones = jnp.ones(bank_weights.shape[:-1] + (1,), bank_weights.dtype)
    unnormalised = jnp.concatenate([ones, bank_weights], axis=-1)
    if axis_name is None:
        return unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)
    row_sum = 1.0 + _psum(jnp.sum(bank_weights, axis=-1, keepdims=True), axis_name)
    return unnormalised / row_sum


def soft_labels(
    target: Array,
    bank: Array,
    *,
    kind: str,
    num_neighbors: int,
    tau_prime: float,
    axis_name: AxisName = None,
) -> tuple[Array, Array]:
    """Compute the soft targets and the confidence for one batch, both under stop-gradient.

    Returns ``(labels, confidence)``: labels [B, 1 + n] in float32, column 0 for the positive
    z_t and columns 1..n for the bank entries in bank order, each row summing to 1; confidence
    c [B] in [0, 1]. The confidence is computed for every kind, "normal" included, as a
    diagnostic. ``kind``, ``num_neighbors`` and ``tau_prime`` must be Python values (close
    over them under jit); ``num_neighbors`` must lie in [1, n] for every kind.

    With ``axis_name``, ``bank`` is this device's shard [n_local, D] of the global bank and
    ``target`` is the whole batch, equal on every device. The labels then have the layout
    [B, 1 + n_local] described in the module docstring, normalised over the global bank, and
    ``num_neighbors`` may be up to the global n.
    """
    _check_kind(kind)
    _check_target_and_bank(target, bank)
    _check_num_neighbors(num_neighbors, jnp.shape(bank)[0] * _axis_size(axis_name))
    _check_temperature("tau_prime", tau_prime)

    target = jax.lax.stop_gradient(target)
    bank = jax.lax.stop_gradient(bank)

    similarities = bank_similarities(target, bank)
    log_q = similarity_distribution(similarities, tau_prime=tau_prime, axis_name=axis_name)
    confidence = entropy_confidence(log_q, axis_name=axis_name)
    bank_weights = _BANK_WEIGHT_RULES[kind](
        similarities, log_q, confidence, num_neighbors, axis_name=axis_name
    )
    labels = normalize_labels(bank_weights, axis_name=axis_name)
    return jax.lax.stop_gradient(labels), jax.lax.stop_gradient(confidence)


# ---------------------------------------------------------------------------
# Loss.
# ---------------------------------------------------------------------------


def _cosine_logits(query: Array, target: Array, bank: Array) -> Array:
    """Return [q . z_t, q . z'_2, .., q . z'_{n+1}] in float32 or wider, not yet divided by tau."""
    query = _upcast(query)
    positive = jnp.sum(query * _upcast(target), axis=-1, keepdims=True)
    negatives = jnp.matmul(query, _upcast(bank).T, precision=_HIGHEST)
    return jnp.concatenate([positive, negatives], axis=-1)


def _check_labels_shape(labels: Array, target: Array, bank: Array) -> None:
    expected_label_shape = (jnp.shape(target)[0], 1 + jnp.shape(bank)[0])
    if jnp.shape(labels) != expected_label_shape:
        raise ValueError(
            f"Invalid labels shape {jnp.shape(labels)}: expected {expected_label_shape}, "
            "[batch, 1 + bank_size], with column 0 for the positive."
        )


def contrastive_logits(query: Array, target: Array, bank: Array, *, tau: float) -> Array:
    """Compute the logits [q . z_t, q . z'_2, .., q . z'_{n+1}] / tau, shape [B, 1 + n].

    Column 0 is the positive. Logits are float32 or wider and use HIGHEST matmul precision.
    """
    _check_target_and_bank(target, bank)
    _check_query_and_target(query, target)
    _check_temperature("tau", tau)
    return _cosine_logits(query, target, bank) / tau


def soft_cross_entropy(logits: Array, labels: Array) -> Array:
    """Compute -sum_j y_j log softmax(logits)_j per row, shape [B]."""
    if jnp.shape(logits) != jnp.shape(labels):
        raise ValueError(
            f"Mismatched shapes: logits {jnp.shape(logits)} and labels {jnp.shape(labels)} "
            "must be equal, [batch, 1 + bank_size]."
        )
    log_p = _log_softmax(_upcast(logits))
    return -jnp.sum(_upcast(labels) * log_p, axis=-1)


def soft_infonce(
    query: Array,
    target: Array,
    bank: Array,
    labels: Array,
    *,
    tau: float,
    axis_name: AxisName = None,
) -> Array:
    """Compute the batch mean of the soft cross-entropy between labels and softmax(logits / tau).

        L = -(1/B) sum_b sum_j y_bj log softmax_j(z_q . z'_j / tau)

    This equals mean(soft_cross_entropy(contrastive_logits(...), labels)), but divides by tau
    after the softmax's max-shift, which keeps logits of any finite size finite (see
    ``_scaled_shift``). Gradients flow only through ``query``; ``target``, ``bank`` and
    ``labels`` are under stop-gradient.

    With ``axis_name``, ``bank`` is this device's shard, ``labels`` has the sharded layout of
    ``soft_labels`` and the softmax runs over the positive and the global bank. The positive's
    term enters the cross-device sum from the device of axis index 0 only, so the loss and
    its gradient count it once whether ``query`` was gathered (varying over the axis) or is
    replicated. The returned scalar is equal on every device.
    """
    _check_target_and_bank(target, bank)
    _check_query_and_target(query, target)
    _check_labels_shape(labels, target, bank)
    _check_temperature("tau", tau)

    target = jax.lax.stop_gradient(target)
    bank = jax.lax.stop_gradient(bank)
    labels = jax.lax.stop_gradient(labels)

    if axis_name is None:
        log_p = _log_softmax(_cosine_logits(query, target, bank), tau)
        per_sample = -jnp.sum(_upcast(labels) * log_p, axis=-1)
        return jnp.mean(per_sample)

    logits = _cosine_logits(query, target, bank)
    positive, negatives = logits[:, :1], logits[:, 1:]
    row_max = jax.lax.stop_gradient(
        jnp.maximum(positive, _row_max(negatives, axis_name))
    )
    sum_exp = jnp.exp(_scaled_shift(positive, row_max, tau)) + _psum(
        jnp.sum(jnp.exp(_scaled_shift(negatives, row_max, tau)), axis=-1, keepdims=True),
        axis_name,
    )
    log_normalizer = jnp.log(_clamp_at_least_one(sum_exp))
    log_p = _scaled_shift(logits, row_max, tau) - log_normalizer
    weighted = _upcast(labels) * log_p
    is_first = jax.lax.axis_index(axis_name) == 0
    local_terms = jnp.sum(weighted[:, 1:], axis=-1) + jnp.where(is_first, weighted[:, 0], 0.0)
    per_sample = -_psum(local_terms, axis_name)
    return jnp.mean(per_sample)


# ---------------------------------------------------------------------------
# Fused loss and query gradient (unsharded bank).
#
# The rows of the batch are processed in blocks (lax.map), and each block runs over the bank
# in chunks of columns (lax.scan), so the exponentials, reductions and the gradient product of
# a chunk work on one cache-sized tile. A block makes up to three passes over the bank:
#
# 1. The similarities of the query and target rows to the chunk, as one matrix product. They
#    update the running maximum, sum of exponentials and entropy sum of both sides, and the
#    running top-K for hard and ahcl. The similarities are stored for the later passes.
# 2. ascl only: W = sum_j min(1, c K q_j), which needs the confidence from pass 1.
# 3. p - y for the chunk and its product with the chunk's keys, summed into the gradient,
#    and sum_j y_j log p_j for the loss.
# ---------------------------------------------------------------------------

# Default sizes. A row block stores its similarities, [2 * rows, n] float32, for passes 2 and
# 3, so 2 * rows * n is bounded (32 MiB). More than 128 rows per block make the block's matrix
# products no faster but its buffers larger. A chunk tile [2 * rows, chunk] is 2 MiB, so it
# stays in a core's L2 or L3 cache between the products and the elementwise work.
# NOTE: these sizes were tuned on one 2-core x86-64 CPU (jax 0.10.2) only. On a GPU or TPU
# larger blocks and chunks are likely faster; pass block_rows and chunk_size to ascl_loss.
_MAX_BLOCK_ELEMENTS = 2**23
_MAX_BLOCK_ROWS = 128
_TILE_ELEMENTS = 2**19


def default_block_sizes(batch_size: int, bank_size: int) -> tuple[int, int]:
    """Return the default (block_rows, chunk_size) of the fused loss for a batch and bank size.

    A block of rows keeps its query and target similarities to the whole bank, about
    2 * block_rows * bank_size float32 values, and each chunk works on a tile of
    2 * block_rows * chunk_size values.
    """
    block_rows = max(8, min(_MAX_BLOCK_ROWS, _MAX_BLOCK_ELEMENTS // (2 * bank_size)))
    block_rows = min(batch_size, block_rows)
    chunk_size = max(128, _TILE_ELEMENTS // (2 * block_rows))
    return block_rows, min(bank_size, chunk_size)


def _check_block_size(name: str, value: int | None) -> None:
    if value is None:
        return
    is_integer = isinstance(value, numbers.Integral) and not isinstance(value, bool)
    if not is_integer or value < 1:
        raise ValueError(
            f"Invalid {name} {value!r}: expected a positive Python int or None for the "
            "default. Any positive value works, because the last block or chunk may be partial."
        )


def _bank_products(rows: Array, bank: Array) -> Array:
    """Return rows @ bank.T [R, n], contracting the bank's last axis without a transposed copy."""
    return jax.lax.dot_general(rows, bank, (((1,), (1,)), ((), ())), precision=_HIGHEST)


def _shifted_exp(x: Array, row_max: Array, temperatures: Array) -> Array:
    """Return exp(min((x - row_max) / t, 0)). The min is the exact guard of _scaled_shift."""
    return jnp.exp(jnp.minimum((x - row_max[:, None]) / temperatures[:, None], 0.0))


def _softmax_stats(x: Array, temperatures: Array) -> tuple[tuple[Array, Array, Array], Array]:
    """Return per row (m, Z, A), m = max_j x_j, Z = sum_j e_j, A = sum_j e_j (x_j - m), and e.

    Here e_j = exp((x_j - m) / t). Then softmax(x / t)_j = e_j / Z, and the mean of
    (x_j - m) / t under that softmax is A / (t Z).
    """
    row_max = jnp.max(x, axis=-1)
    exps = _shifted_exp(x, row_max, temperatures)
    stats = (row_max, jnp.sum(exps, axis=-1), jnp.sum(exps * (x - row_max[:, None]), axis=-1))
    return stats, exps


def _merge_softmax_stats(first, second, temperatures):
    """Combine the (m, Z, A) of two disjoint column sets into those of their union."""
    max_1, sum_1, moment_1 = first
    max_2, sum_2, moment_2 = second
    row_max = jnp.maximum(max_1, max_2)
    gap_1, gap_2 = max_1 - row_max, max_2 - row_max
    scale_1, scale_2 = jnp.exp(gap_1 / temperatures), jnp.exp(gap_2 / temperatures)
    total = scale_1 * sum_1 + scale_2 * sum_2
    # An empty set (m = -inf, Z = 0) contributes nothing. Without the guard, -inf * 0 is nan.
    moment_1 = jnp.where(sum_1 > 0, scale_1 * (moment_1 + gap_1 * sum_1), 0.0)
    moment_2 = jnp.where(sum_2 > 0, scale_2 * (moment_2 + gap_2 * sum_2), 0.0)
    return row_max, total, moment_1 + moment_2


def _confidence_from_stats(
    sum_exp: Array, moment: Array, tau_prime: Array, bank_size: int
) -> Array:
    """Return c = 1 - H(q) / log(n) from the (Z, A) of _softmax_stats over the whole bank.

    c = KL(q || uniform) / log(n) = (sum_j q_j log q_j + log n) / log(n), where
    sum_j q_j log q_j = A / (tau' Z) - log Z. The end points are pinned as in
    ``entropy_confidence``. KL >= log(n) only for a one-hot q, and Z = n (the maximum
    contributes exp(0) = 1) only when every e_j is 1, a uniform q.
    """
    if bank_size == 1:
        return jnp.ones_like(sum_exp)
    log_bank_size = jnp.log(jnp.asarray(bank_size, sum_exp.dtype))
    mean_log_q = moment / (tau_prime * sum_exp) - jnp.log(sum_exp)
    kl_to_uniform = mean_log_q + log_bank_size
    confidence = jnp.clip(kl_to_uniform / log_bank_size, 0.0, 1.0)
    confidence = jnp.where(kl_to_uniform >= log_bank_size, 1.0, confidence)
    return jnp.where(sum_exp == bank_size, 0.0, confidence)


def _merge_top_k(first, second, num_neighbors):
    """Combine two (values, indices) candidate lists into the top K. On ties the first wins."""
    values = jnp.concatenate([first[0], second[0]], axis=-1)
    indices = jnp.concatenate([first[1], second[1]], axis=-1)
    top_values, positions = jax.lax.top_k(values, num_neighbors)
    return top_values, jnp.take_along_axis(indices, positions, axis=-1)


def _scan_chunks(body, carry, bank_size: int, chunk_size: int, stored=None):
    """Run ``body(carry, start, size, stored_chunk) -> (carry, output)`` over the bank's chunks.

    Full chunks run in a lax.scan and a last partial chunk (when chunk_size does not divide
    bank_size) runs once more, so the bank is never padded or copied. ``stored`` is the
    (full, tail) pair of outputs of an earlier call, or None. Returns (carry, (full, tail)).
    """
    num_full = bank_size // chunk_size
    tail_size = bank_size - num_full * chunk_size
    full_outputs = tail_output = None
    if num_full:
        def scan_body(carry, xs):
            index, stored_chunk = xs
            return body(carry, index * chunk_size, chunk_size, stored_chunk)

        stored_full = None if stored is None else stored[0]
        carry, full_outputs = jax.lax.scan(
            scan_body, carry, (jnp.arange(num_full), stored_full)
        )
    if tail_size:
        stored_tail = None if stored is None else stored[1]
        carry, tail_output = body(carry, num_full * chunk_size, tail_size, stored_tail)
    return carry, (full_outputs, tail_output)


def _fused_block(
    query: Array,
    target: Array,
    bank: Array,
    tau: Array,
    tau_prime: Array,
    *,
    kind: str,
    num_neighbors: int,
    chunk_size: int,
    with_gradient: bool,
) -> tuple[Array, Array | None]:
    """Return the per-row loss [R] and, if requested, its gradient w.r.t. the query rows [R, D].

    Computes for R rows what ``soft_labels`` followed by ``soft_infonce`` computes, without
    materialising labels or log-probabilities over the whole bank:

        loss_b = -(y_0 log p_0 + sum_j y_j log p_j)
        dloss_b / dz_q = ((p_0 - y_0) z_t + sum_j (p_j - y_j) z'_j) / tau
    """
    rows = query.shape[0]
    bank_size = bank.shape[0]
    dtype = query.dtype
    uses_target = kind != "normal"
    # Tie the bank to this block's rows. Otherwise XLA hoists the per-chunk slices of the bank
    # out of the loop over blocks and stacks them into a copy of the whole bank.
    query, target, bank = jax.lax.optimization_barrier((query, target, bank))
    # Rows [0, R) of a tile are the query similarities s_j = z_q . z'_j, rows [R, 2R) (unless
    # kind is normal) the target similarities d_j = z_t . z'_j.
    sides = jnp.concatenate([query, target]) if uses_target else query
    temperatures = jnp.concatenate([
        jnp.full((rows,), tau, dtype), jnp.full((rows,), tau_prime, dtype)
    ]) if uses_target else jnp.full((rows,), tau, dtype)
    positive = jnp.sum(query * target, axis=-1)

    def bank_chunk(start, size):
        return jax.lax.dynamic_slice_in_dim(bank, start, size, axis=0)

    # Pass 1: similarities, softmax statistics and top-K candidates.
    def statistics_body(carry, start, size, _):
        stats, top = carry
        sims = _bank_products(sides, bank_chunk(start, size))
        chunk_stats, exps = _softmax_stats(sims, temperatures)
        stats = _merge_softmax_stats(stats, chunk_stats, temperatures)
        if top is not None:
            chunk_top = jax.lax.top_k(sims[rows:], min(num_neighbors, size))
            chunk_top = (chunk_top[0], chunk_top[1] + start)
            top = _merge_top_k(top, chunk_top, num_neighbors)
        # Store what passes 2 and 3 read: the query similarities, and for ascl the target
        # exponentials with their chunk maximum, which spares passes 2 and 3 an exp each.
        if kind == "ascl":
            return (stats, top), (sims[:rows], exps[rows:], chunk_stats[0][rows:])
        return (stats, top), (sims[:rows],)

    # The positive s_0 starts the query rows' statistics; the target rows start empty.
    start_max = jnp.concatenate([positive, jnp.full((rows,), -jnp.inf, dtype)])[: sides.shape[0]]
    start_sum = jnp.concatenate([jnp.ones((rows,), dtype), jnp.zeros((rows,), dtype)])[
        : sides.shape[0]
    ]
    start_stats = (start_max, start_sum, jnp.zeros_like(start_sum))
    start_top = None
    if kind in ("hard", "ahcl"):
        start_top = (
            jnp.full((rows, num_neighbors), -jnp.inf, dtype),
            jnp.zeros((rows, num_neighbors), jnp.int32),
        )
    (stats, top), stored = _scan_chunks(
        statistics_body, (start_stats, start_top), bank_size, chunk_size
    )
    row_max, row_sum_exp, row_moment = stats

    query_max = row_max[:rows]
    query_log_normalizer = jnp.log(jnp.maximum(row_sum_exp[:rows], 1.0))
    positive_log_p = jnp.minimum((positive - query_max) / tau, 0.0) - query_log_normalizer

    if kind in ("ahcl", "ascl"):
        target_max = row_max[rows:]
        target_sum_exp = jnp.maximum(row_sum_exp[rows:], 1.0)
        confidence = _confidence_from_stats(
            target_sum_exp, row_moment[rows:], tau_prime, bank_size
        )

    if kind == "ascl":
        # y_j = min(1, c K q_j) / (1 + W), q_j = e_j / Z, W = sum_j min(1, c K q_j).
        weight_scale = confidence * num_neighbors / target_sum_exp

        def bank_weights(stored_chunk):
            # e_j of pass 1 is relative to the chunk maximum; rescale it to the bank maximum.
            _, chunk_exps, chunk_max = stored_chunk
            rescale = jnp.exp((chunk_max - target_max) / tau_prime)
            return jnp.minimum(1.0, (weight_scale * rescale)[:, None] * chunk_exps)

        # Pass 2: W.
        def weight_sum_body(total, start, size, stored_chunk):
            del start, size
            return total + jnp.sum(bank_weights(stored_chunk), axis=-1), None

        weight_sum, _ = _scan_chunks(
            weight_sum_body, jnp.zeros((rows,), dtype), bank_size, chunk_size, stored
        )
        row_sum = 1.0 + weight_sum
        positive_label = 1.0 / row_sum
    elif kind in ("hard", "ahcl"):
        _, neighbors = top
        weight = jnp.ones_like(positive) if kind == "hard" else confidence
        row_sum = 1.0 + num_neighbors * weight
        positive_label = 1.0 / row_sum
        neighbor_label = weight / row_sum
    else:
        positive_label = jnp.ones_like(positive)

    # Pass 3: sum_j y_j (s_j - max) / tau for the loss and sum_j (p_j - y_j) z'_j.
    def residual_body(carry, start, size, stored_chunk):
        weighted_shift, gradient = carry
        query_shift = jnp.minimum((stored_chunk[0] - query_max[:, None]) / tau, 0.0)
        if kind == "ascl":
            labels = bank_weights(stored_chunk) / row_sum[:, None]
            weighted_shift = weighted_shift + jnp.sum(labels * query_shift, axis=-1)
        if with_gradient:
            residual = jnp.exp(query_shift - query_log_normalizer[:, None])
            if kind == "ascl":
                residual = residual - labels
            gradient = gradient + jnp.matmul(
                residual, bank_chunk(start, size), precision=_HIGHEST
            )
        return (weighted_shift, gradient), None

    gradient = jnp.zeros(query.shape, dtype) if with_gradient else None
    weighted_shift = jnp.zeros((rows,), dtype)
    if with_gradient or kind == "ascl":
        (weighted_shift, gradient), _ = _scan_chunks(
            residual_body, (weighted_shift, gradient), bank_size, chunk_size, stored
        )

    if kind == "ascl":
        bank_term = weighted_shift - (1.0 - positive_label) * query_log_normalizer
    elif kind in ("hard", "ahcl"):
        neighbor_keys = jnp.take(bank, neighbors, axis=0)  # [R, K, D]
        neighbor_sims = jnp.einsum("rd,rkd->rk", query, neighbor_keys, precision=_HIGHEST)
        neighbor_log_p = (
            jnp.minimum((neighbor_sims - query_max[:, None]) / tau, 0.0)
            - query_log_normalizer[:, None]
        )
        bank_term = neighbor_label * jnp.sum(neighbor_log_p, axis=-1)
    else:
        bank_term = 0.0
    per_row_loss = -(positive_label * positive_log_p + bank_term)
    if not with_gradient:
        return per_row_loss, None

    positive_residual = jnp.exp(positive_log_p) - positive_label
    gradient = positive_residual[:, None] * target + gradient
    if kind in ("hard", "ahcl"):
        gradient = gradient - neighbor_label[:, None] * jnp.sum(neighbor_keys, axis=1)
    return per_row_loss, gradient / tau


def _fused_loss(
    query: Array,
    target: Array,
    bank: Array,
    tau: Array,
    tau_prime: Array,
    *,
    kind: str,
    num_neighbors: int,
    block_rows: int,
    chunk_size: int,
    with_gradient: bool,
) -> tuple[Array, Array | None]:
    """Return the batch-mean loss and, if requested, its gradient w.r.t. ``query`` [B, D].

    The batch is processed ``block_rows`` rows at a time with ``jax.lax.map``. A batch that
    is not a multiple of ``block_rows`` is padded with zero rows, which are dropped after.
    """
    batch, dim = query.shape
    block = functools.partial(
        _fused_block, bank=bank, tau=tau, tau_prime=tau_prime, kind=kind,
        num_neighbors=num_neighbors, chunk_size=chunk_size, with_gradient=with_gradient,
    )
    num_blocks = -(-batch // block_rows)
    if num_blocks == 1:
        per_row_loss, gradient = block(query, target)
    else:
        padding = num_blocks * block_rows - batch
        padded = [jnp.pad(x, ((0, padding), (0, 0))).reshape(num_blocks, block_rows, dim)
                  for x in (query, target)]
        per_row_loss, gradient = jax.lax.map(lambda xs: block(*xs), tuple(padded))
        per_row_loss = per_row_loss.reshape(-1)[:batch]
        if gradient is not None:
            gradient = gradient.reshape(-1, dim)[:batch]
    loss = jnp.mean(per_row_loss)
    if gradient is not None:
        gradient = gradient / batch
    return loss, gradient


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6, 7, 8))
def _fused_ascl_loss(
    query, target, bank, tau, tau_prime, kind, num_neighbors, block_rows, chunk_size
):
    loss, _ = _fused_loss(
        query, target, bank, tau, tau_prime, kind=kind, num_neighbors=num_neighbors,
        block_rows=block_rows, chunk_size=chunk_size, with_gradient=False,
    )
    return loss


@_fused_ascl_loss.defjvp
def _fused_ascl_loss_jvp(kind, num_neighbors, block_rows, chunk_size, primals, tangents):
    """Differentiate through query and tau only; target, bank and the labels are constants.

    With g = dL/dquery and logits z_q . k_j / tau, dL/dtau = -sum(query * g) / tau.
    """
    query, target, bank, tau, tau_prime = primals
    query_tangent, _, _, tau_tangent, _ = tangents
    loss, query_gradient = _fused_loss(
        query, target, bank, tau, tau_prime, kind=kind, num_neighbors=num_neighbors,
        block_rows=block_rows, chunk_size=chunk_size, with_gradient=True,
    )
    tau_gradient = -jnp.sum(query * query_gradient) / tau
    loss_tangent = jnp.sum(query_gradient * query_tangent) + tau_gradient * tau_tangent
    return loss, loss_tangent


def ascl_loss(
    query: Array,
    target: Array,
    bank: Array,
    *,
    kind: str,
    num_neighbors: int,
    tau: float,
    tau_prime: float,
    axis_name: AxisName = None,
    block_rows: int | None = None,
    chunk_size: int | None = None,
) -> Array:
    """Compute the ASCL loss: soft_labels(target, bank) followed by soft_infonce, a scalar.

    With kind="normal" this is MoCo's InfoNCE. Use soft_labels and soft_infonce directly when
    the labels or the confidence are also needed for logging. With ``axis_name``, ``bank`` is
    this device's shard of the global bank (see the module docstring), and the loss is
    computed as that composition.

    Without ``axis_name`` the loss is fused: the batch runs in blocks of ``block_rows`` rows
    and the bank in chunks of ``chunk_size`` entries (defaults from ``default_block_sizes``;
    neither needs to divide the batch or the bank size), and no [B, n] matrix of labels or
    log-probabilities is formed. Its derivative is the closed form
    ((p_0 - y_0) z_t + sum_j (p_j - y_j) z'_j) / (B tau) w.r.t. ``query``, computed together
    with the loss, and -sum(query * dL/dquery) / tau w.r.t. ``tau``; ``target``, ``bank``
    and ``tau_prime`` get zero gradients, as in the composition. Forward and reverse mode
    both work. ``block_rows`` and ``chunk_size`` change the speed and memory, not the result
    (beyond float32 rounding), and are ignored with ``axis_name``.
    """
    # Check the query and tau here too, so that a bad value raises before any label math runs.
    _check_target_and_bank(target, bank)
    _check_query_and_target(query, target)
    _check_temperature("tau", tau)
    _check_block_size("block_rows", block_rows)
    _check_block_size("chunk_size", chunk_size)
    if axis_name is None:
        _check_kind(kind)
        _check_num_neighbors(num_neighbors, jnp.shape(bank)[0])
        _check_temperature("tau_prime", tau_prime)
        query, target, bank = _upcast(query), _upcast(target), _upcast(bank)
        dtype = jnp.result_type(query, target, bank)
        default_rows, default_chunk = default_block_sizes(query.shape[0], bank.shape[0])
        block_rows = default_rows if block_rows is None else min(block_rows, query.shape[0])
        chunk_size = default_chunk if chunk_size is None else min(chunk_size, bank.shape[0])
        block_rows = max(1, block_rows)  # an empty batch still needs a valid block size
        return _fused_ascl_loss(
            query.astype(dtype),
            jax.lax.stop_gradient(target.astype(dtype)),
            jax.lax.stop_gradient(bank.astype(dtype)),
            jnp.asarray(tau, dtype),
            jax.lax.stop_gradient(jnp.asarray(tau_prime, dtype)),
            kind,
            int(num_neighbors),
            int(block_rows),
            int(chunk_size),
        )

    labels, _ = soft_labels(
        target,
        bank,
        kind=kind,
        num_neighbors=num_neighbors,
        tau_prime=tau_prime,
        axis_name=axis_name,
    )
    return soft_infonce(query, target, bank, labels, tau=tau, axis_name=axis_name)


# ---------------------------------------------------------------------------
# Diagnostics.
# ---------------------------------------------------------------------------


def label_diagnostics(
    labels: Array, sample_classes: Array, bank_classes: Array, *, axis_name: AxisName = None
) -> dict[str, Array]:
    """Summarise how the soft labels spread over the positive and same-class bank entries.

    Returns float32 scalars:

    - ``positive_weight``: mean_b labels[b, 0].
    - ``same_class_rate``: mean_b sum_j labels[b, 1 + j] * [bank_classes[j] == sample_classes[b]],
      the label mass on bank entries of the sample's own class. A class of -1 (or any
      negative value) means unknown and never matches, on either side.

    The true classes serve only this measurement. The loss never uses them. With
    ``axis_name``, ``labels`` has the sharded layout of ``soft_labels``, ``bank_classes`` is
    the local shard, and the same-class mass is summed over all shards.
    """
    _check_rank("labels", labels, 2, "[batch, 1 + bank_size]")
    _check_rank("sample_classes", sample_classes, 1, "[batch]")
    _check_rank("bank_classes", bank_classes, 1, "[bank_size]")
    expected_label_shape = (jnp.shape(sample_classes)[0], 1 + jnp.shape(bank_classes)[0])
    if jnp.shape(labels) != expected_label_shape:
        raise ValueError(
            f"Invalid labels shape {jnp.shape(labels)}: expected {expected_label_shape} from "
            f"sample_classes {jnp.shape(sample_classes)} and "
            f"bank_classes {jnp.shape(bank_classes)}."
        )

    labels = _upcast(labels).astype(jnp.float32)
    sample_classes = jnp.asarray(sample_classes)
    bank_classes = jnp.asarray(bank_classes)
    same_class = (sample_classes[:, None] == bank_classes[None, :]) & (bank_classes[None, :] >= 0)
    same_class_mass = _psum(jnp.sum(labels[:, 1:] * same_class, axis=-1), axis_name)
    positive_weight = jnp.mean(labels[:, 0])
    if axis_name is not None:
        # Column 0 is equal on every device; pmax returns that value as one replicated scalar.
        positive_weight = jax.lax.pmax(positive_weight, axis_name)
    return {
        "positive_weight": positive_weight,
        "same_class_rate": jnp.mean(same_class_mass),
    }
