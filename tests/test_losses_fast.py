"""Test the fused ascl_loss against the straightforward composition soft_labels + soft_infonce.

The fused path (``ascl_loss`` without ``axis_name``) processes the batch in row blocks and the
bank in column chunks and computes the query gradient in closed form. Its loss and gradients
must equal those of the composition, which materialises the labels and is differentiated by
autodiff, to float32 tolerance, and the float64 NumPy reference of test_losses.py.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized

from ascl_jax import losses
from tests.test_losses import (
    _random_embeddings,
    reference_loss,
    reference_query_gradient,
    reference_soft_labels,
)

TAU = 0.1
TAU_PRIME = 0.05


def composed_loss(query, target, bank, *, kind, num_neighbors, tau=TAU, tau_prime=TAU_PRIME):
    """Return the loss as soft_labels followed by soft_infonce, the unfused reference."""
    labels, _ = losses.soft_labels(
        target, bank, kind=kind, num_neighbors=num_neighbors, tau_prime=tau_prime
    )
    return losses.soft_infonce(query, target, bank, labels, tau=tau)


def fused_loss(query, target, bank, *, kind, num_neighbors, block_rows=None, chunk_size=None,
               tau=TAU, tau_prime=TAU_PRIME):
    return losses.ascl_loss(
        query, target, bank, kind=kind, num_neighbors=num_neighbors, tau=tau,
        tau_prime=tau_prime, block_rows=block_rows, chunk_size=chunk_size,
    )


def _f32(*arrays):
    return tuple(jnp.asarray(a, jnp.float32) for a in arrays)


def _assert_loss_and_gradient_match(fused, expected, message=""):
    (loss, gradient), (expected_loss, expected_gradient) = fused, expected
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5, err_msg=message)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-6,
                               err_msg=message)


# Batch 10 and bank 53 are not multiples of the block and chunk sizes below, so the last row
# block is padded and the last chunk is partial. Chunk 53 is one chunk; chunk 100 is clamped to
# the bank size and block 16 to the batch size.
BLOCK_CASES = [(None, None), (3, 8), (4, 53), (16, 100)]
NEIGHBOR_COUNTS = (1, 7)


@functools.lru_cache(maxsize=None)
def _block_case_inputs():
    return _f32(*_random_embeddings(40, 10, 53, 8))


@functools.lru_cache(maxsize=None)
def _composed_outputs():
    """Return {kind/K: value and query gradient} of the composition on _block_case_inputs()."""

    @jax.jit
    def all_outputs(query, target, bank):
        return {
            f"{kind}/{num_neighbors}": jax.value_and_grad(functools.partial(
                composed_loss, kind=kind, num_neighbors=num_neighbors
            ))(query, target, bank)
            for kind in losses.KINDS for num_neighbors in NEIGHBOR_COUNTS
        }

    return jax.device_get(all_outputs(*_block_case_inputs()))


@functools.lru_cache(maxsize=None)
def _block_case_outputs(block_rows, chunk_size):
    """Return inputs and {kind/K: (fused, composed)} value-and-gradients, jitted at once."""

    @jax.jit
    def all_outputs(query, target, bank):
        return {
            f"{kind}/{num_neighbors}": jax.value_and_grad(functools.partial(
                fused_loss, kind=kind, num_neighbors=num_neighbors, block_rows=block_rows,
                chunk_size=chunk_size,
            ))(query, target, bank)
            for kind in losses.KINDS for num_neighbors in NEIGHBOR_COUNTS
        }

    inputs = _block_case_inputs()
    fused = jax.device_get(all_outputs(*inputs))
    composed = _composed_outputs()
    return inputs, {key: (fused[key], composed[key]) for key in fused}


@pytest.mark.parametrize("block_rows, chunk_size", BLOCK_CASES)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_fused_matches_composition(kind, block_rows, chunk_size):
    _, outputs = _block_case_outputs(block_rows, chunk_size)
    for num_neighbors in NEIGHBOR_COUNTS:
        fused, composed = outputs[f"{kind}/{num_neighbors}"]
        _assert_loss_and_gradient_match(fused, composed, f"K={num_neighbors}")


@pytest.mark.parametrize("kind", losses.KINDS)
def test_fused_matches_float64_reference(kind):
    (query, target, bank), outputs = _block_case_outputs(3, 8)
    query, target, bank = (np.asarray(x, np.float64) for x in (query, target, bank))
    for num_neighbors in NEIGHBOR_COUNTS:
        (loss, gradient), _ = outputs[f"{kind}/{num_neighbors}"]
        labels, _ = reference_soft_labels(target, bank, kind, num_neighbors, TAU_PRIME)
        np.testing.assert_allclose(loss, reference_loss(query, target, bank, labels, TAU),
                                   rtol=1e-5, err_msg=f"K={num_neighbors}")
        np.testing.assert_allclose(
            gradient, reference_query_gradient(query, target, bank, labels, TAU),
            rtol=1e-4, atol=1e-6, err_msg=f"K={num_neighbors}",
        )


class FusedVariantsTest(chex.TestCase):
    """Jitted and unjitted fused loss and gradient on a partial block and a partial chunk."""

    @chex.variants(with_jit=True, without_jit=True)
    @parameterized.parameters(*losses.KINDS)
    def test_value_and_grad(self, kind):
        query, target, bank = _f32(*_random_embeddings(41, 5, 23, 6))
        fused = self.variant(jax.value_and_grad(functools.partial(
            fused_loss, kind=kind, num_neighbors=2, block_rows=2, chunk_size=7
        )))
        composed = jax.jit(jax.value_and_grad(functools.partial(
            composed_loss, kind=kind, num_neighbors=2
        )))
        _assert_loss_and_gradient_match(fused(query, target, bank), composed(query, target, bank))


def test_target_and_bank_gradients_are_zero():
    query, target, bank = _f32(*_random_embeddings(42, 4, 19, 8))
    for kind in losses.KINDS:
        loss_fn = functools.partial(fused_loss, kind=kind, num_neighbors=3, chunk_size=5)
        gradients = jax.jit(jax.grad(loss_fn, argnums=(0, 1, 2)))(query, target, bank)
        _, target_grad, bank_grad = gradients
        np.testing.assert_array_equal(target_grad, np.zeros_like(target_grad), err_msg=kind)
        np.testing.assert_array_equal(bank_grad, np.zeros_like(bank_grad), err_msg=kind)


def test_tau_gradient_matches_composition():
    query, target, bank = _f32(*_random_embeddings(43, 4, 17, 8))
    for kind in losses.KINDS:
        def fused(tau, kind=kind):
            return fused_loss(query, target, bank, kind=kind, num_neighbors=2, chunk_size=6,
                              tau=tau)

        def composed(tau, kind=kind):
            return composed_loss(query, target, bank, kind=kind, num_neighbors=2, tau=tau)

        np.testing.assert_allclose(jax.jit(jax.grad(fused))(TAU),
                                   jax.jit(jax.grad(composed))(TAU), rtol=1e-4, err_msg=kind)


def test_forward_mode_matches_composition():
    query, target, bank = _f32(*_random_embeddings(44, 4, 17, 8))
    direction = jnp.asarray(np.random.default_rng(44).standard_normal(query.shape), jnp.float32)
    for kind in losses.KINDS:
        fused = functools.partial(fused_loss, target=target, bank=bank, kind=kind,
                                  num_neighbors=2, chunk_size=6)
        composed = functools.partial(composed_loss, target=target, bank=bank, kind=kind,
                                     num_neighbors=2)
        fused_out = jax.jit(lambda q, d, f=fused: jax.jvp(f, (q,), (d,)))(query, direction)
        composed_out = jax.jit(lambda q, d, f=composed: jax.jvp(f, (q,), (d,)))(query, direction)
        np.testing.assert_allclose(fused_out[0], composed_out[0], rtol=1e-5, err_msg=kind)
        np.testing.assert_allclose(fused_out[1], composed_out[1], rtol=1e-4, atol=1e-6,
                                   err_msg=kind)


def test_vmap_matches_per_group():
    groups = [_f32(*_random_embeddings(45 + g, 4, 12, 8)) for g in range(3)]
    stacked = [jnp.stack(arrays) for arrays in zip(*groups)]
    loss_fn = functools.partial(fused_loss, kind="ascl", num_neighbors=2, chunk_size=5)
    losses_vmapped, gradients = jax.jit(jax.vmap(jax.value_and_grad(loss_fn)))(*stacked)
    for g, (query, target, bank) in enumerate(groups):
        expected = jax.jit(jax.value_and_grad(functools.partial(
            composed_loss, kind="ascl", num_neighbors=2
        )))(query, target, bank)
        _assert_loss_and_gradient_match((losses_vmapped[g], gradients[g]), expected, f"g={g}")


def test_bfloat16_inputs_keep_dtypes():
    query, target, bank = (jnp.asarray(a, jnp.bfloat16) for a in _random_embeddings(48, 4, 20, 8))
    loss_fn = functools.partial(fused_loss, kind="ascl", num_neighbors=2, chunk_size=6)
    loss, gradient = jax.jit(jax.value_and_grad(loss_fn))(query, target, bank)
    expected_loss, expected_gradient = jax.jit(jax.value_and_grad(functools.partial(
        composed_loss, kind="ascl", num_neighbors=2
    )))(query, target, bank)
    assert loss.dtype == jnp.float32
    assert gradient.dtype == jnp.bfloat16
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(gradient, np.float32),
                               np.asarray(expected_gradient, np.float32), rtol=1e-2, atol=1e-3)


def _tied_bank():
    """Return (query, target, bank) where entries 2, 9 and 15 tie for the largest d.

    The tied entries have equal similarity to the target but different similarities to the
    query, so the loss depends on which of them the top-K picks.
    """
    basis = np.eye(4)
    target = basis[:1]
    rng = np.random.default_rng(49)
    bank = rng.standard_normal((18, 4)) * 0.1
    bank[:, 0] = np.abs(bank[:, 0]) * 0.1
    for index, other_axis in ((2, 1), (9, 2), (15, 3)):
        bank[index] = 0.6 * basis[0] + 0.8 * basis[other_axis]
    query = np.array([[0.5, 0.1, 0.5, 0.7]])
    return _f32(query, target, bank)


@pytest.mark.parametrize("kind", ["hard", "ahcl"])
def test_top_k_ties_across_chunks_pick_lowest_index(kind):
    # Chunks of 4 put the tied entries 2, 9 and 15 in chunks 0, 2 and 3. K = 2 must pick 2
    # and 9, as the unfused top-K does.
    query, target, bank = _tied_bank()
    fused = jax.jit(jax.value_and_grad(functools.partial(
        fused_loss, kind=kind, num_neighbors=2, chunk_size=4
    )))(query, target, bank)
    composed = jax.jit(jax.value_and_grad(functools.partial(
        composed_loss, kind=kind, num_neighbors=2
    )))(query, target, bank)
    _assert_loss_and_gradient_match(fused, composed)
    labels, _ = losses.soft_labels(target, bank, kind=kind, num_neighbors=2, tau_prime=TAU_PRIME)
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(labels)[0, 1:]), [2, 9])


@pytest.mark.parametrize("kind", losses.KINDS)
def test_extreme_inputs_match_composition(kind):
    rng = np.random.default_rng(50)
    dim = 256
    query, target, bank = _random_embeddings(50, 4, 30, dim)
    cases = {
        "identical_bank": (query, np.repeat(target[:1], 4, 0), np.repeat(target[:1], 30, 0)),
        "unnormalised": (1e4 * rng.standard_normal((4, dim)), 1e4 * rng.standard_normal((4, dim)),
                         -1e4 * rng.standard_normal((30, dim))),
    }
    for name, arrays in cases.items():
        arrays = _f32(*arrays)
        fused = jax.jit(jax.value_and_grad(functools.partial(
            fused_loss, kind=kind, num_neighbors=3, chunk_size=7
        )))(*arrays)
        composed = jax.jit(jax.value_and_grad(functools.partial(
            composed_loss, kind=kind, num_neighbors=3
        )))(*arrays)
        assert np.isfinite(fused[0]), name
        assert np.all(np.isfinite(fused[1])), name
        _assert_loss_and_gradient_match(fused, composed, name)


def test_single_entry_bank():
    query, target, bank = _f32(*_random_embeddings(51, 3, 1, 4))
    for kind in losses.KINDS:
        fused = jax.jit(jax.value_and_grad(functools.partial(
            fused_loss, kind=kind, num_neighbors=1
        )))(query, target, bank)
        composed = jax.jit(jax.value_and_grad(functools.partial(
            composed_loss, kind=kind, num_neighbors=1
        )))(query, target, bank)
        _assert_loss_and_gradient_match(fused, composed, kind)


def test_default_block_sizes_bound_the_buffers():
    for batch, bank_size in [(256, 65536), (256, 4096), (7, 3), (1024, 1_000_003)]:
        block_rows, chunk_size = losses.default_block_sizes(batch, bank_size)
        assert 1 <= block_rows <= batch
        assert 1 <= chunk_size <= bank_size
        assert 2 * block_rows * bank_size <= max(2**23, 16 * bank_size)


@pytest.mark.parametrize("name, value", [
    ("block_rows", 0), ("block_rows", 2.5), ("block_rows", True), ("chunk_size", -1),
    ("chunk_size", "8"),
])
def test_invalid_block_size_raises(name, value):
    query, target, bank = _f32(*_random_embeddings(52, 2, 5, 4))
    with pytest.raises(ValueError, match=rf"Invalid {name} {value!r}"):
        losses.ascl_loss(query, target, bank, kind="ascl", num_neighbors=1, tau=TAU,
                         tau_prime=TAU_PRIME, **{name: value})
