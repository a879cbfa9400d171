"""Test ascl_jax.losses against a float64 NumPy reference written from the method's formulas."""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from absl.testing import parameterized

from ascl_jax import losses

TAU = 0.1
TAU_PRIME = 0.05


# ---------------------------------------------------------------------------
# Float64 NumPy reference, written from the formulas (not from the JAX code).
# ---------------------------------------------------------------------------


def _normalize_rows(x):
    return x / np.linalg.norm(x, axis=-1, keepdims=True)


def _random_embeddings(seed, batch, bank_size, dim):
    """Return L2-normalised float64 (query, target, bank) drawn from a seeded Gaussian."""
    rng = np.random.default_rng(seed)
    query = _normalize_rows(rng.standard_normal((batch, dim)))
    target = _normalize_rows(rng.standard_normal((batch, dim)))
    bank = _normalize_rows(rng.standard_normal((bank_size, dim)))
    return query, target, bank


def reference_soft_labels(target, bank, kind, num_neighbors, tau_prime):
    """Return (labels [B, 1+n], confidence [B]) in float64 from the relabeling table."""
    bank_size = bank.shape[0]
    d = target @ bank.T

    scaled = d / tau_prime
    scaled = scaled - scaled.max(axis=-1, keepdims=True)
    q = np.exp(scaled)
    q = q / q.sum(axis=-1, keepdims=True)

    with np.errstate(divide="ignore", invalid="ignore"):
        q_log_q = np.where(q > 0, q * np.log(q), 0.0)
    entropy = -q_log_q.sum(axis=-1)
    if bank_size > 1:
        confidence = 1.0 - entropy / np.log(bank_size)
    else:
        confidence = np.ones(d.shape[0])

    neighbours = np.argsort(-d, axis=-1, kind="stable")[:, :num_neighbors]
    in_top_k = np.zeros_like(d)
    np.put_along_axis(in_top_k, neighbours, 1.0, axis=-1)

    if kind == "normal":
        bank_weights = np.zeros_like(d)
    elif kind == "hard":
        bank_weights = in_top_k
    elif kind == "ahcl":
        bank_weights = confidence[:, None] * in_top_k
    elif kind == "ascl":
        bank_weights = np.minimum(1.0, confidence[:, None] * num_neighbors * q)
    else:
        raise AssertionError(kind)

    unnormalised = np.concatenate([np.ones((d.shape[0], 1)), bank_weights], axis=-1)
    labels = unnormalised / unnormalised.sum(axis=-1, keepdims=True)
    return labels, confidence


def reference_logits(query, target, bank, tau):
    positive = np.sum(query * target, axis=-1, keepdims=True)
    return np.concatenate([positive, query @ bank.T], axis=-1) / tau


def reference_loss(query, target, bank, labels, tau):
    logits = reference_logits(query, target, bank, tau)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    log_p = shifted - np.log(np.exp(shifted).sum(axis=-1, keepdims=True))
    return -(labels * log_p).sum(axis=-1).mean()


def reference_query_gradient(query, target, bank, labels, tau):
    """Return dL/dquery: (1 / (B tau)) sum_j (p_bj - y_bj) z'_bj with z'_b0 = target_b."""
    logits = reference_logits(query, target, bank, tau)
    shifted = logits - logits.max(axis=-1, keepdims=True)
    p = np.exp(shifted) / np.exp(shifted).sum(axis=-1, keepdims=True)
    residual = p - labels
    batch = query.shape[0]
    gradient = residual[:, :1] * target + residual[:, 1:] @ bank
    return gradient / (batch * tau)


# Jitted entry points keep the suite fast: one compilation per configuration instead of one
# per operation and shape. LossVariantsTest covers the functions without jit.
soft_labels_jit = jax.jit(
    losses.soft_labels, static_argnames=("kind", "num_neighbors", "tau_prime")
)
ascl_loss_jit = jax.jit(
    losses.ascl_loss, static_argnames=("kind", "num_neighbors", "tau", "tau_prime")
)


@functools.partial(jax.jit, static_argnames=("neighbor_counts",))
def outputs_for_all_kinds(query, target, bank, neighbor_counts):
    """Return {"kind/K": (labels, confidence, loss, gradients)} for every kind and K.

    gradients is the tuple of d loss / d (query, target, bank).
    """
    outputs = {}
    for kind in losses.KINDS:
        for num_neighbors in neighbor_counts:
            labels, confidence = losses.soft_labels(
                target, bank, kind=kind, num_neighbors=num_neighbors, tau_prime=TAU_PRIME
            )
            loss_fn = functools.partial(
                losses.ascl_loss,
                kind=kind, num_neighbors=num_neighbors, tau=TAU, tau_prime=TAU_PRIME,
            )
            loss, gradients = jax.value_and_grad(loss_fn, argnums=(0, 1, 2))(query, target, bank)
            outputs[f"{kind}/{num_neighbors}"] = (labels, confidence, loss, gradients)
    return outputs


def _f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


# ---------------------------------------------------------------------------
# Agreement with the reference.
# ---------------------------------------------------------------------------

SHAPES = [(1, 5, 3), (4, 37, 16), (8, 100, 32)]
NEIGHBOR_COUNTS = (1, 2, 5)


def _shape_seed(shape):
    batch, bank_size, dim = shape
    return batch * 1000 + bank_size * 10 + dim


@functools.lru_cache(maxsize=None)
def _outputs_for_shape(shape):
    """Return the seeded float64 inputs and the JAX outputs of every kind and K for one shape."""
    inputs = _random_embeddings(_shape_seed(shape), *shape)
    outputs = outputs_for_all_kinds(*_f32(*inputs), neighbor_counts=NEIGHBOR_COUNTS)
    return inputs, jax.device_get(outputs)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-n{}-D{}".format(*s))
@pytest.mark.parametrize("num_neighbors", NEIGHBOR_COUNTS)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_soft_labels_match_reference(kind, num_neighbors, shape):
    batch, bank_size, _ = shape
    (query, target, bank), outputs = _outputs_for_shape(shape)
    labels, confidence, loss, _ = outputs[f"{kind}/{num_neighbors}"]
    expected_labels, expected_confidence = reference_soft_labels(
        target, bank, kind, num_neighbors, TAU_PRIME
    )
    expected_loss = reference_loss(query, target, bank, expected_labels, TAU)

    chex.assert_shape(labels, (batch, 1 + bank_size))
    chex.assert_shape(confidence, (batch,))
    assert labels.dtype == np.float32
    np.testing.assert_allclose(labels, expected_labels, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(confidence, expected_confidence, atol=1e-5)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "B{}-n{}-D{}".format(*s))
@pytest.mark.parametrize("kind", losses.KINDS)
def test_query_gradient_matches_reference(kind, shape):
    (query, target, bank), outputs = _outputs_for_shape(shape)
    for num_neighbors in NEIGHBOR_COUNTS:
        query_grad = outputs[f"{kind}/{num_neighbors}"][3][0]
        expected_labels, _ = reference_soft_labels(target, bank, kind, num_neighbors, TAU_PRIME)
        expected = reference_query_gradient(query, target, bank, expected_labels, TAU)
        np.testing.assert_allclose(
            query_grad, expected, rtol=1e-4, atol=1e-6, err_msg=f"K={num_neighbors}"
        )


@pytest.mark.parametrize("kind", losses.KINDS)
def test_labels_are_distributions(kind):
    _, outputs = _outputs_for_shape(SHAPES[-1])
    for num_neighbors in NEIGHBOR_COUNTS:
        labels, confidence, _, _ = outputs[f"{kind}/{num_neighbors}"]
        np.testing.assert_allclose(labels.sum(axis=-1), 1.0, rtol=1e-6)
        assert np.all(labels >= 0)
        assert np.all(confidence >= 0)
        assert np.all(confidence <= 1)


@jax.jit
def _similarities_and_log_q(target, bank):
    similarities = losses.bank_similarities(target, bank)
    return similarities, losses.similarity_distribution(similarities, tau_prime=TAU_PRIME)


def test_pieces_match_reference():
    _, target, bank = _random_embeddings(3, 4, 11, 8)
    d = target @ bank.T
    scaled = d / TAU_PRIME
    expected_log_q = scaled - np.log(np.exp(scaled).sum(axis=-1, keepdims=True))

    target32, bank32 = _f32(target, bank)
    similarities, log_q = _similarities_and_log_q(target32, bank32)

    np.testing.assert_allclose(similarities, d, atol=1e-6)
    np.testing.assert_allclose(log_q, expected_log_q, atol=1e-4)


def test_normalize_labels_prepends_positive():
    weights = jnp.array([[0.0, 0.0, 0.0], [1.0, 0.5, 0.5], [0.2, 0.0, 0.8]])
    expected = np.array([
        [1.0, 0.0, 0.0, 0.0],
        [1 / 3, 1 / 3, 1 / 6, 1 / 6],
        [0.5, 0.1, 0.0, 0.4],
    ])
    np.testing.assert_allclose(losses.normalize_labels(weights), expected, rtol=1e-6)


# ---------------------------------------------------------------------------
# chex variants: jit and no-jit give the reference result.
# ---------------------------------------------------------------------------


class LossVariantsTest(chex.TestCase):

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*losses.KINDS)
    def test_soft_labels(self, kind):
        _, target, bank = _random_embeddings(7, 4, 13, 8)
        expected_labels, expected_confidence = reference_soft_labels(
            target, bank, kind, 2, TAU_PRIME
        )
        soft_labels = self.variant(
            functools.partial(losses.soft_labels, kind=kind, num_neighbors=2, tau_prime=TAU_PRIME)
        )
        labels, confidence = soft_labels(*_f32(target, bank))
        chex.assert_trees_all_close(
            labels, expected_labels.astype(np.float32), rtol=1e-4, atol=1e-6
        )
        chex.assert_trees_all_close(confidence, expected_confidence.astype(np.float32), atol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*losses.KINDS)
    def test_ascl_loss(self, kind):
        query, target, bank = _random_embeddings(8, 4, 13, 8)
        labels, _ = reference_soft_labels(target, bank, kind, 2, TAU_PRIME)
        expected = reference_loss(query, target, bank, labels, TAU)
        loss_fn = self.variant(functools.partial(
            losses.ascl_loss, kind=kind, num_neighbors=2, tau=TAU, tau_prime=TAU_PRIME
        ))
        loss = loss_fn(*_f32(query, target, bank))
        chex.assert_shape(loss, ())
        chex.assert_trees_all_close(loss, np.float32(expected), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_entropy_confidence(self):
        log_q = jax.nn.log_softmax(jnp.array([[0.0, 1.0, 2.0, 3.0], [5.0, -5.0, 0.0, 0.0]]))
        q = np.exp(np.asarray(log_q, np.float64))
        expected = 1.0 + (q * np.log(q)).sum(axis=-1) / np.log(4)
        confidence = self.variant(losses.entropy_confidence)(log_q)
        chex.assert_trees_all_close(confidence, expected.astype(np.float32), atol=1e-6)

    @chex.variants(with_jit=True, without_jit=True)
    def test_contrastive_logits_and_cross_entropy(self):
        query, target, bank = _random_embeddings(9, 3, 6, 5)
        labels, _ = reference_soft_labels(target, bank, "ascl", 1, TAU_PRIME)
        expected_logits = reference_logits(query, target, bank, TAU)
        expected_loss = reference_loss(query, target, bank, labels, TAU)

        logits = self.variant(functools.partial(losses.contrastive_logits, tau=TAU))(
            *_f32(query, target, bank)
        )
        labels32 = jnp.asarray(labels, jnp.float32)
        per_sample = self.variant(losses.soft_cross_entropy)(logits, labels32)

        chex.assert_trees_all_close(logits, expected_logits.astype(np.float32), atol=1e-5)
        chex.assert_shape(per_sample, (3,))
        chex.assert_trees_all_close(jnp.mean(per_sample), np.float32(expected_loss), rtol=1e-5)

    @chex.variants(with_jit=True, without_jit=True)
    def test_label_diagnostics(self):
        labels = jnp.array([[0.5, 0.25, 0.25, 0.0], [0.6, 0.1, 0.1, 0.2]])
        diagnostics = self.variant(losses.label_diagnostics)(
            labels, jnp.array([1, 2]), jnp.array([1, 2, -1])
        )
        # Row 0 (class 1): bank entry 0 matches, mass 0.25. Row 1 (class 2): entry 1, mass 0.1.
        chex.assert_trees_all_close(diagnostics["positive_weight"], np.float32(0.55), atol=1e-6)
        chex.assert_trees_all_close(diagnostics["same_class_rate"], np.float32(0.175), atol=1e-6)


# ---------------------------------------------------------------------------
# Properties.
# ---------------------------------------------------------------------------


def test_confidence_zero_for_identical_bank_rows():
    _, target, bank = _random_embeddings(12, 3, 1, 8)
    identical_bank = np.repeat(bank, 9, axis=0)
    _, confidence = soft_labels_jit(
        *_f32(target, identical_bank), kind="ascl", num_neighbors=1, tau_prime=TAU_PRIME
    )
    np.testing.assert_array_equal(confidence, np.zeros(3, np.float32))


def test_confidence_zero_for_uniform_log_q():
    log_q = jax.nn.log_softmax(jnp.zeros((2, 7)))
    np.testing.assert_allclose(jax.jit(losses.entropy_confidence)(log_q), 0.0, atol=1e-6)


def test_confidence_one_for_one_hot():
    one_hot_log_q = jnp.log(jax.nn.one_hot(jnp.array([0, 3]), 6))  # -inf off the hot entry
    confidence = jax.jit(losses.entropy_confidence)(one_hot_log_q)
    np.testing.assert_array_equal(confidence, np.ones(2, np.float32))

    # d = [1, -1, -1, ...]: at tau' = 0.05 every q_j but the first underflows in float32.
    target = np.eye(4)[:1]
    bank = np.concatenate([np.eye(4)[:1], -np.repeat(np.eye(4)[:1], 5, axis=0)])
    _, confidence = soft_labels_jit(
        *_f32(target, bank), kind="ascl", num_neighbors=1, tau_prime=TAU_PRIME
    )
    np.testing.assert_allclose(confidence, 1.0, atol=1e-6)


def test_single_entry_bank():
    _, target, bank = _random_embeddings(13, 2, 1, 4)
    labels_hard, confidence = soft_labels_jit(
        *_f32(target, bank), kind="hard", num_neighbors=1, tau_prime=TAU_PRIME
    )
    labels_normal, _ = soft_labels_jit(
        *_f32(target, bank), kind="normal", num_neighbors=1, tau_prime=TAU_PRIME
    )
    np.testing.assert_array_equal(confidence, np.ones(2, np.float32))
    np.testing.assert_allclose(labels_hard, np.full((2, 2), 0.5))
    np.testing.assert_allclose(labels_normal, np.array([[1.0, 0.0], [1.0, 0.0]]))


@jax.jit
def _moco_infonce(query, target, bank):
    """Return MoCo's InfoNCE: cross-entropy of [q.t, q.bank] / tau with class 0 as the target."""
    positive = jnp.einsum("bd,bd->b", query, target)[:, None]
    negatives = jnp.einsum("bd,nd->bn", query, bank, precision="highest")
    logits = jnp.concatenate([positive, negatives], axis=-1) / TAU
    class_zero = jnp.zeros(query.shape[0], jnp.int32)
    return optax.softmax_cross_entropy_with_integer_labels(logits, class_zero).mean()


def test_normal_loss_equals_moco_infonce():
    query, target, bank = _random_embeddings(14, 5, 20, 8)
    query32, target32, bank32 = _f32(query, target, bank)
    loss = ascl_loss_jit(
        query32, target32, bank32, kind="normal", num_neighbors=1, tau=TAU, tau_prime=TAU_PRIME
    )

    moco = _moco_infonce(query32, target32, bank32)

    labels, _ = soft_labels_jit(
        target32, bank32, kind="normal", num_neighbors=1, tau_prime=TAU_PRIME
    )
    np.testing.assert_array_equal(labels, np.eye(21, dtype=np.float32)[[0] * 5])
    np.testing.assert_allclose(loss, moco, rtol=1e-6)


def test_ascl_with_zero_confidence_is_normal():
    _, target, bank = _random_embeddings(15, 4, 9, 6)
    target32, bank32 = _f32(target, bank)
    similarities, log_q = _similarities_and_log_q(target32, bank32)
    ascl_bank_weights = jax.jit(losses.ascl_bank_weights, static_argnums=3)
    weights = ascl_bank_weights(similarities, log_q, jnp.zeros(4), 3)
    np.testing.assert_array_equal(weights, np.zeros((4, 9), np.float32))

    # Identical bank rows give a uniform q, so c = 0 and ascl must reproduce normal.
    identical_bank = jnp.repeat(bank32[:1], 9, axis=0)
    ascl_labels, _ = soft_labels_jit(
        target32, identical_bank, kind="ascl", num_neighbors=3, tau_prime=TAU_PRIME
    )
    normal_labels, _ = soft_labels_jit(
        target32, identical_bank, kind="normal", num_neighbors=3, tau_prime=TAU_PRIME
    )
    np.testing.assert_array_equal(ascl_labels, normal_labels)


@functools.lru_cache(maxsize=None)
def _permuted_bank_outputs():
    inputs = _random_embeddings(16, 4, 15, 8)
    permutation = np.random.default_rng(0).permutation(15)
    query, target, bank = _f32(*inputs)
    outputs = outputs_for_all_kinds(query, target, bank, neighbor_counts=(2,))
    permuted_outputs = outputs_for_all_kinds(query, target, bank[permutation], neighbor_counts=(2,))
    return permutation, jax.device_get(outputs), jax.device_get(permuted_outputs)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_labels_equivariant_under_bank_permutation(kind):
    permutation, outputs, permuted_outputs = _permuted_bank_outputs()
    labels, confidence, loss, _ = outputs[f"{kind}/2"]
    permuted_labels, permuted_confidence, permuted_loss, _ = permuted_outputs[f"{kind}/2"]

    np.testing.assert_allclose(permuted_labels[:, 0], labels[:, 0], rtol=1e-6)
    np.testing.assert_allclose(
        permuted_labels[:, 1:], labels[:, 1:][:, permutation], rtol=1e-6, atol=1e-9
    )
    np.testing.assert_allclose(permuted_confidence, confidence, atol=1e-6)
    np.testing.assert_allclose(permuted_loss, loss, rtol=1e-6)


def test_top_k_ties_pick_lowest_index():
    similarities = jnp.array([[0.5, 0.9, 0.9, 0.1, 0.9], [0.2, 0.2, 0.2, 0.2, 0.2]])
    # hard_bank_weights reads only the similarities, so log_q and confidence are placeholders.
    placeholder_log_q = jnp.zeros_like(similarities)
    placeholder_confidence = jnp.zeros(2)
    weights = jax.jit(losses.hard_bank_weights, static_argnums=3)(
        similarities, placeholder_log_q, placeholder_confidence, 2
    )
    expected = np.array([[0, 1, 1, 0, 0], [1, 1, 0, 0, 0]], np.float32)
    np.testing.assert_array_equal(weights, expected)


def test_top_k_ties_in_soft_labels():
    basis = np.eye(4)
    # Bank entries 1, 2 and 4 equal the target, so d ties at 1 among them.
    bank = basis[[1, 0, 0, 2, 0, 3]]
    target = basis[:1]
    labels, _ = soft_labels_jit(
        *_f32(target, bank), kind="hard", num_neighbors=2, tau_prime=TAU_PRIME
    )
    expected = np.array([[1, 0, 1, 1, 0, 0, 0]]) / 3
    np.testing.assert_allclose(labels, expected, rtol=1e-6)
    assert int(np.count_nonzero(np.asarray(labels)[:, 1:])) == 2


@pytest.mark.parametrize("kind", losses.KINDS)
def test_gradient_only_through_query(kind):
    _, outputs = _outputs_for_shape(SHAPES[1])
    for num_neighbors in NEIGHBOR_COUNTS:
        query_grad, target_grad, bank_grad = outputs[f"{kind}/{num_neighbors}"][3]
        np.testing.assert_array_equal(target_grad, np.zeros_like(target_grad))
        np.testing.assert_array_equal(bank_grad, np.zeros_like(bank_grad))
        assert np.max(np.abs(query_grad)) > 0


def test_soft_infonce_blocks_label_gradient():
    query, target, bank = _random_embeddings(18, 3, 7, 5)
    labels, _ = reference_soft_labels(target, bank, "ascl", 1, TAU_PRIME)
    loss_fn = functools.partial(losses.soft_infonce, tau=TAU)
    gradients = jax.jit(jax.grad(loss_fn, argnums=(1, 2, 3)))(*_f32(query, target, bank, labels))
    for gradient in gradients:
        np.testing.assert_array_equal(gradient, np.zeros_like(gradient))


def test_query_gradient_matches_finite_difference():
    (query, target, bank), outputs = _outputs_for_shape(SHAPES[1])
    query_grad = outputs["ascl/2"][3][0]
    labels, _ = reference_soft_labels(target, bank, "ascl", 2, TAU_PRIME)

    step = 1e-6
    numeric = np.zeros_like(query)
    for index in np.ndindex(*query.shape):
        plus, minus = query.copy(), query.copy()
        plus[index] += step
        minus[index] -= step
        numeric[index] = (
            reference_loss(plus, target, bank, labels, TAU)
            - reference_loss(minus, target, bank, labels, TAU)
        ) / (2 * step)
    np.testing.assert_allclose(query_grad, numeric, rtol=1e-4, atol=1e-6)


EXTREME_CASES = ("large_dim", "identical_rows", "unnormalised")


@functools.lru_cache(maxsize=None)
def _extreme_outputs(dtype_name):
    """Return the stacked float64 inputs of EXTREME_CASES and the JAX outputs for them."""
    rng = np.random.default_rng(20)
    dim = 2048
    query, target, bank = _random_embeddings(20, 4, 64, dim)
    cases = [
        (query, target, bank),
        (query, np.repeat(target[:1], 4, axis=0), np.repeat(target[:1], 64, axis=0)),
        (1e4 * rng.standard_normal((4, dim)), 1e4 * rng.standard_normal((4, dim)),
         -1e4 * rng.standard_normal((64, dim))),
    ]
    stacked = [jnp.asarray(np.stack(arrays), dtype_name) for arrays in zip(*cases)]
    all_kinds = functools.partial(outputs_for_all_kinds, neighbor_counts=(5,))
    outputs = jax.jit(jax.vmap(all_kinds))(*stacked)
    # The reference gets the same inputs, rounded to dtype.
    rounded = [np.asarray(x, np.float64) for x in stacked]
    return rounded, jax.device_get(outputs)


@pytest.mark.parametrize("dtype_name", ["float32", "bfloat16"])
@pytest.mark.parametrize("kind", losses.KINDS)
def test_extreme_inputs_stay_finite(kind, dtype_name):
    (_, targets, banks), outputs = _extreme_outputs(dtype_name)
    all_labels, all_confidence, all_loss, all_gradients = outputs[f"{kind}/5"]
    for index, name in enumerate(EXTREME_CASES):
        labels, confidence = all_labels[index], all_confidence[index]
        assert np.all(np.isfinite(labels)), name
        assert np.all(np.isfinite(confidence)), name
        assert np.isfinite(all_loss[index]), name
        assert np.all(np.isfinite(all_gradients[0][index])), name
        np.testing.assert_allclose(labels.sum(axis=-1), 1.0, rtol=1e-6, err_msg=name)
        assert np.all((confidence >= 0) & (confidence <= 1)), name

        expected_labels, expected_confidence = reference_soft_labels(
            targets[index], banks[index], kind, 5, TAU_PRIME
        )
        np.testing.assert_allclose(labels, expected_labels, atol=1e-4, err_msg=name)
        np.testing.assert_allclose(confidence, expected_confidence, atol=1e-4, err_msg=name)


def test_bfloat16_close_to_float32():
    query, target, bank = _random_embeddings(21, 4, 30, 16)
    loss_fn = functools.partial(
        ascl_loss_jit, kind="ascl", num_neighbors=1, tau=TAU, tau_prime=TAU_PRIME
    )
    loss32 = loss_fn(*_f32(query, target, bank))
    loss16 = loss_fn(*(jnp.asarray(a, jnp.bfloat16) for a in (query, target, bank)))
    assert loss16.dtype == jnp.float32
    np.testing.assert_allclose(loss16, loss32, rtol=2e-2)


def test_vmap_over_leading_axis():
    groups = 3
    query, target, bank = (np.stack(arrays) for arrays in zip(
        *(_random_embeddings(30 + g, 4, 12, 8) for g in range(groups))
    ))
    query32, target32, bank32 = _f32(query, target, bank)
    soft_labels = functools.partial(
        losses.soft_labels, kind="ascl", num_neighbors=2, tau_prime=TAU_PRIME
    )
    loss_fn = functools.partial(
        losses.ascl_loss, kind="ascl", num_neighbors=2, tau=TAU, tau_prime=TAU_PRIME
    )

    labels, confidence = jax.jit(jax.vmap(soft_labels))(target32, bank32)
    loss = jax.jit(jax.vmap(loss_fn))(query32, target32, bank32)

    chex.assert_shape(labels, (groups, 4, 13))
    chex.assert_shape(loss, (groups,))
    for g in range(groups):
        expected_labels, expected_confidence = reference_soft_labels(
            target[g], bank[g], "ascl", 2, TAU_PRIME
        )
        np.testing.assert_allclose(labels[g], expected_labels, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(confidence[g], expected_confidence, atol=1e-5)
        expected_loss = reference_loss(query[g], target[g], bank[g], expected_labels, TAU)
        np.testing.assert_allclose(loss[g], expected_loss, rtol=1e-5)


def test_traced_temperatures_are_accepted():
    query, target, bank = _random_embeddings(22, 2, 5, 4)
    labels, _ = reference_soft_labels(target, bank, "ascl", 1, TAU_PRIME)
    expected = reference_loss(query, target, bank, labels, TAU)

    @jax.jit
    def loss_fn(query, target, bank, tau, tau_prime):
        return losses.ascl_loss(
            query, target, bank, kind="ascl", num_neighbors=1, tau=tau, tau_prime=tau_prime
        )

    loss = loss_fn(*_f32(query, target, bank), TAU, TAU_PRIME)
    np.testing.assert_allclose(loss, expected, rtol=1e-5)


# ---------------------------------------------------------------------------
# Diagnostics.
# ---------------------------------------------------------------------------


def test_label_diagnostics_unknown_class_never_matches():
    labels = jnp.array([[0.5, 0.1, 0.1, 0.3], [0.6, 0.1, 0.1, 0.2]])
    diagnostics = losses.label_diagnostics(labels, jnp.array([-1, 2]), jnp.array([1, 2, -1]))
    # Row 0 has class -1, which matches nothing, not even the -1 bank entry. Row 1: mass 0.1.
    np.testing.assert_allclose(diagnostics["same_class_rate"], 0.05, atol=1e-6)
    np.testing.assert_allclose(diagnostics["positive_weight"], 0.55, atol=1e-6)


def test_label_diagnostics_rejects_shape_mismatch():
    with pytest.raises(ValueError, match=r"labels shape \(2, 4\)"):
        losses.label_diagnostics(
            jnp.zeros((2, 4)), jnp.zeros(2, jnp.int32), jnp.zeros(5, jnp.int32)
        )


# ---------------------------------------------------------------------------
# Validation.
# ---------------------------------------------------------------------------

_TARGET = jnp.zeros((4, 8))
_BANK = jnp.zeros((10, 8))
_QUERY = jnp.zeros((4, 8))


def _soft_labels(target=_TARGET, bank=_BANK, kind="ascl", num_neighbors=1, tau_prime=0.05):
    return losses.soft_labels(
        target, bank, kind=kind, num_neighbors=num_neighbors, tau_prime=tau_prime
    )


def _ascl_loss(query=_QUERY, target=_TARGET, bank=_BANK, tau=0.1):
    return losses.ascl_loss(
        query, target, bank, kind="ascl", num_neighbors=1, tau=tau, tau_prime=0.05
    )


VALIDATION_CASES = [
    ("kind", lambda: _soft_labels(kind="bogus"), r"kind 'bogus'.*'normal', 'hard', 'ahcl', 'ascl'"),
    ("neighbors_zero", lambda: _soft_labels(num_neighbors=0), r"num_neighbors 0.*\[1, 10\]"),
    ("neighbors_too_many", lambda: _soft_labels(num_neighbors=11), r"num_neighbors 11.*\[1, 10\]"),
    ("neighbors_float", lambda: _soft_labels(num_neighbors=2.0), r"num_neighbors 2\.0"),
    ("neighbors_bool", lambda: _soft_labels(num_neighbors=True), r"num_neighbors True"),
    ("tau_prime_zero", lambda: _soft_labels(tau_prime=0.0), r"tau_prime 0\.0"),
    ("tau_prime_nan", lambda: _soft_labels(tau_prime=float("nan")), r"tau_prime nan"),
    ("tau_negative", lambda: _ascl_loss(tau=-0.1), r"tau -0\.1"),
    ("tau_string", lambda: _ascl_loss(tau="0.1x"), r"tau '0\.1x'"),
    ("dim_mismatch", lambda: _soft_labels(bank=jnp.zeros((10, 7))), r"dim 8.*dim 7"),
    ("target_rank", lambda: _soft_labels(target=jnp.zeros(8)), r"target shape \(8,\)"),
    ("bank_rank", lambda: _soft_labels(bank=jnp.zeros((2, 5, 8))), r"bank shape \(2, 5, 8\)"),
    ("empty_bank", lambda: _soft_labels(bank=jnp.zeros((0, 8))), r"bank shape \(0, 8\)"),
    ("query_shape", lambda: _ascl_loss(query=jnp.zeros((3, 8))), r"query \(3, 8\)"),
    ("labels_shape",
     lambda: losses.soft_infonce(_QUERY, _TARGET, _BANK, jnp.zeros((4, 10)), tau=0.1),
     r"labels shape \(4, 10\).*\(4, 11\)"),
    ("logits_labels", lambda: losses.soft_cross_entropy(jnp.zeros((2, 3)), jnp.zeros((2, 4))),
     r"logits \(2, 3\).*labels \(2, 4\)"),
]


@pytest.mark.parametrize(
    "call, message",
    [case[1:] for case in VALIDATION_CASES],
    ids=[case[0] for case in VALIDATION_CASES],
)
def test_validation_names_value(call, message):
    with pytest.raises(ValueError, match=message):
        call()


def test_validation_raises_under_jit():
    loss_fn = jax.jit(functools.partial(
        losses.ascl_loss, kind="ascl", num_neighbors=11, tau=TAU, tau_prime=TAU_PRIME
    ))
    with pytest.raises(ValueError, match="num_neighbors 11"):
        loss_fn(_QUERY, _TARGET, _BANK)
