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
) -> Array:
    """Compute the ASCL loss: soft_labels(target, bank) followed by soft_infonce, a scalar.

    With kind="normal" this is MoCo's InfoNCE. Use soft_labels and soft_infonce directly when
    the labels or the confidence are also needed for logging. With ``axis_name``, ``bank`` is
    this device's shard of the global bank (see the module docstring).
    """
    # Check the query and tau here too, so that a bad value raises before any label math runs.
    _check_target_and_bank(target, bank)
    _check_query_and_target(query, target)
    _check_temperature("tau", tau)
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
