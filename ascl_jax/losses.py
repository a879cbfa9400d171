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

The softmax over the bank is built from a per-row maximum and a per-row sum of exponentials
(``_row_max``, ``_row_sum_exp``), the entropy from a per-row sum, and the top-K selection from
``jax.lax.top_k``. For a bank sharded over devices these would become ``pmax``/``psum`` over
the shards and a merge of the per-shard top-K; sharding is not implemented here.

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


def _row_max(x: Array) -> Array:
    """Return max_j x[..., j] with keepdims; the first piece of a shardable log-softmax."""
    return jnp.max(x, axis=-1, keepdims=True)


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


def _row_sum_exp(x: Array, row_max: Array, temperature: float) -> Array:
    """Return sum_j exp((x_j - row_max) / temperature) with keepdims.

    The sum is clamped to >= 1, an exact identity when row_max is the true maximum because
    that entry contributes exp(0) = 1, so its log stays finite.
    """
    terms = jnp.exp(_scaled_shift(x, row_max, temperature))
    return _clamp_at_least_one(jnp.sum(terms, axis=-1, keepdims=True))


def _log_softmax(x: Array, temperature: float = 1.0) -> Array:
    """Compute log_softmax(x / t) over the last axis as (x - m) / t - log sum_j exp((x_j - m) / t).

    Here m = max_j x_j and t = temperature > 0.
    """
    row_max = jax.lax.stop_gradient(_row_max(x))
    log_normalizer = jnp.log(_row_sum_exp(x, row_max, temperature))
    return _scaled_shift(x, row_max, temperature) - log_normalizer


def _top_k_mask(similarities: Array, num_neighbors: int) -> Array:
    """Return a float32 0/1 mask of the K largest entries of each row (ties: lowest index wins).

    ``jax.lax.top_k`` returns equal values in order of increasing index, so exactly K entries
    per row are set, also when more than K entries tie.
    """
    bank_size = similarities.shape[-1]
    rows = similarities.reshape(-1, bank_size)
    _, indices = jax.lax.top_k(rows, num_neighbors)
    row_ids = jnp.arange(rows.shape[0])[:, None]
    mask = jnp.zeros(rows.shape, jnp.float32).at[row_ids, indices].set(1.0)
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


def similarity_distribution(similarities: Array, *, tau_prime: float) -> Array:
    """Compute log q, the log of the sharpened distribution over the bank, shape [B, n].

        log q_j = d_j / tau' - log sum_l exp(d_l / tau')

    The distribution itself is q = exp(log_q). It is returned in log form because at
    tau' = 0.05 most q_j underflow to 0 in float32 while log q_j stays finite.
    """
    _check_temperature("tau_prime", tau_prime)
    return _log_softmax(_upcast(similarities), tau_prime)


def entropy_confidence(log_q: Array) -> Array:
    """Compute the confidence c = 1 - H(q) / log(n) from log q over the last axis, shape [B].

    Computed as the equivalent c = KL(q || uniform) / log(n), with
    KL = sum_j q_j (log q_j + log n), which needs only log q and never q * log(q) of an
    underflowed q. c is exactly 0 for a uniform q and exactly 1 for a one-hot q (log q = 0 at
    one entry, very negative or -inf elsewhere). Rounding elsewhere is clipped into [0, 1].
    A bank of a single entry (n = 1) always yields a one-hot q, so c is defined as 1 there,
    although H / log(n) is 0 / 0.
    """
    log_q = _upcast(log_q)
    bank_size = log_q.shape[-1]
    if bank_size == 1:
        return jnp.ones(log_q.shape[:-1], log_q.dtype)

    log_bank_size = jnp.log(jnp.asarray(bank_size, log_q.dtype))
    q = jnp.exp(log_q)
    # Entries with q_j == 0 contribute 0 (the limit), even where log q_j is -inf.
    terms = jnp.where(q > 0, q * (log_q + log_bank_size), 0.0)
    kl_to_uniform = jnp.sum(terms, axis=-1)
    confidence = jnp.clip(kl_to_uniform / log_bank_size, 0.0, 1.0)

    # Pin the end points against rounding. Under jit on CPU the division above gives
    # 1 - 2**-24 for a one-hot q (XLA multiplies by 1 / log(n) instead), and KL >= log(n)
    # happens only for a one-hot q. A row of equal log q_j is exactly a uniform q.
    is_uniform = jnp.max(log_q, axis=-1) == jnp.min(log_q, axis=-1)
    confidence = jnp.where(kl_to_uniform >= log_bank_size, 1.0, confidence)
    return jnp.where(is_uniform, 0.0, confidence)


# ---------------------------------------------------------------------------
# Label rules. Each returns the UNNORMALISED bank weights y_2 .. y_{n+1}, shape [B, n], float32;
# y_1 = 1 for the positive is implicit and added by normalize_labels.
# All rules share the signature (similarities, log_q, confidence, num_neighbors).
# ---------------------------------------------------------------------------


def normal_bank_weights(
    similarities: Array, log_q: Array, confidence: Array, num_neighbors: int
) -> Array:
    """Return y_j = 0 for every bank entry (MoCo's one-hot target)."""
    del log_q, confidence, num_neighbors
    return jnp.zeros(jnp.shape(similarities), jnp.float32)


def hard_bank_weights(
    similarities: Array, log_q: Array, confidence: Array, num_neighbors: int
) -> Array:
    """Return y_j = 1 for the K entries with the largest d_j, else 0 (ties: lowest index wins)."""
    del log_q, confidence
    return _top_k_mask(_upcast(similarities), num_neighbors)


def ahcl_bank_weights(
    similarities: Array, log_q: Array, confidence: Array, num_neighbors: int
) -> Array:
    """Return y_j = c for the K entries with the largest d_j, else 0 (adaptive hard labels)."""
    del log_q
    mask = _top_k_mask(_upcast(similarities), num_neighbors)
    return jnp.asarray(confidence, jnp.float32)[..., None] * mask


def ascl_bank_weights(
    similarities: Array, log_q: Array, confidence: Array, num_neighbors: int
) -> Array:
    """Return y_j = min(1, c * K * q_j) with q_j = exp(log q_j) (adaptive soft labels).

    The cap at 1 is applied before the row normalisation, so no bank entry outweighs the
    positive.
    """
    del similarities
    q = jnp.exp(jnp.asarray(log_q, jnp.float32))
    scale = jnp.asarray(confidence, jnp.float32)[..., None] * float(num_neighbors)
    return jnp.minimum(1.0, scale * q)


_BANK_WEIGHT_RULES: dict[str, Callable[[Array, Array, Array, int], Array]] = {
    "normal": normal_bank_weights,
    "hard": hard_bank_weights,
    "ahcl": ahcl_bank_weights,
    "ascl": ascl_bank_weights,
}


def normalize_labels(bank_weights: Array) -> Array:
    """Prepend the positive's weight 1 and divide each row by its sum, shape [B, 1 + n].

        labels = [1, y_2, .., y_{n+1}] / (1 + sum_j y_j)

    Weights must be >= 0, so every row sum is >= 1 and the division is safe.
    """
    bank_weights = _upcast(bank_weights)
    ones = jnp.ones(bank_weights.shape[:-1] + (1,), bank_weights.dtype)
    unnormalised = jnp.concatenate([ones, bank_weights], axis=-1)
    return unnormalised / jnp.sum(unnormalised, axis=-1, keepdims=True)


def soft_labels(
    target: Array,
    bank: Array,
    *,
    kind: str,
    num_neighbors: int,
    tau_prime: float,
) -> tuple[Array, Array]:
    """Compute the soft targets and the confidence for one batch, both under stop-gradient.

    Returns ``(labels, confidence)``: labels [B, 1 + n] in float32, column 0 for the positive
    z_t and columns 1..n for the bank entries in bank order, each row summing to 1; confidence
    c [B] in [0, 1]. The confidence is computed for every kind, "normal" included, as a
    diagnostic. ``kind``, ``num_neighbors`` and ``tau_prime`` must be Python values (close
    over them under jit); ``num_neighbors`` must lie in [1, n] for every kind.
    """
    _check_kind(kind)
    _check_target_and_bank(target, bank)
    _check_num_neighbors(num_neighbors, jnp.shape(bank)[0])
    _check_temperature("tau_prime", tau_prime)

    target = jax.lax.stop_gradient(target)
    bank = jax.lax.stop_gradient(bank)

    similarities = bank_similarities(target, bank)
    log_q = similarity_distribution(similarities, tau_prime=tau_prime)
    confidence = entropy_confidence(log_q)
    bank_weights = _BANK_WEIGHT_RULES[kind](similarities, log_q, confidence, num_neighbors)
    labels = normalize_labels(bank_weights)
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
    query: Array, target: Array, bank: Array, labels: Array, *, tau: float
) -> Array:
    """Compute the batch mean of the soft cross-entropy between labels and softmax(logits / tau).

        L = -(1/B) sum_b sum_j y_bj log softmax_j(z_q . z'_j / tau)

    This equals mean(soft_cross_entropy(contrastive_logits(...), labels)), but divides by tau
    after the softmax's max-shift, which keeps logits of any finite size finite (see
    ``_scaled_shift``). Gradients flow only through ``query``; ``target``, ``bank`` and
    ``labels`` are under stop-gradient.
    """
    _check_target_and_bank(target, bank)
    _check_query_and_target(query, target)
    _check_labels_shape(labels, target, bank)
    _check_temperature("tau", tau)

    target = jax.lax.stop_gradient(target)
    bank = jax.lax.stop_gradient(bank)
    labels = jax.lax.stop_gradient(labels)

    log_p = _log_softmax(_cosine_logits(query, target, bank), tau)
    per_sample = -jnp.sum(_upcast(labels) * log_p, axis=-1)
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
) -> Array:
    """Compute the ASCL loss: soft_labels(target, bank) followed by soft_infonce, a scalar.

    With kind="normal" this is MoCo's InfoNCE. Use soft_labels and soft_infonce directly when
    the labels or the confidence are also needed for logging.
    """
    # Check the query and tau here too, so that a bad value raises before any label math runs.
    _check_target_and_bank(target, bank)
    _check_query_and_target(query, target)
    _check_temperature("tau", tau)
    labels, _ = soft_labels(
        target, bank, kind=kind, num_neighbors=num_neighbors, tau_prime=tau_prime
    )
    return soft_infonce(query, target, bank, labels, tau=tau)


# ---------------------------------------------------------------------------
# Diagnostics.
# ---------------------------------------------------------------------------


def label_diagnostics(
    labels: Array, sample_classes: Array, bank_classes: Array
) -> dict[str, Array]:
    """Summarise how the soft labels spread over the positive and same-class bank entries.

    Returns float32 scalars:

    - ``positive_weight``: mean_b labels[b, 0].
    - ``same_class_rate``: mean_b sum_j labels[b, 1 + j] * [bank_classes[j] == sample_classes[b]],
      the label mass on bank entries of the sample's own class. A class of -1 (or any
      negative value) means unknown and never matches, on either side.

    The true classes serve only this measurement. The loss never uses them.
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
    same_class_mass = jnp.sum(labels[:, 1:] * same_class, axis=-1)
    return {
        "positive_weight": jnp.mean(labels[:, 0]),
        "same_class_rate": jnp.mean(same_class_mass),
    }
