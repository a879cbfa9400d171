"""Test the losses on a bank sharded over devices against the unsharded results.

The bank of n entries is split into 4 contiguous shards, one per fake CPU device, under
`jax.pmap` (as a chex variant) and under `jax.shard_map`. The sharded functions must give the
unsharded labels, confidence, loss and query gradient. `test_losses.py` checks those against a
float64 NumPy reference, and the pmap tests compare with that reference directly too.
"""

import functools

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from absl.testing import parameterized
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from ascl_jax import losses
from tests.test_losses import _random_embeddings, reference_loss, reference_soft_labels

AXIS = "bank"
NUM_SHARDS = 4
BATCH, BANK_SIZE, DIM = 6, 32, 8
LOCAL_SIZE = BANK_SIZE // NUM_SHARDS
TAU = 0.1
TAU_PRIME = 0.05
# K = 10 is larger than a shard (8 entries), so the global top-K spans several shards.
NEIGHBOR_COUNTS = (1, 3, 10)


def _inputs(seed: int = 0):
    query, target, bank = _random_embeddings(seed, BATCH, BANK_SIZE, DIM)
    return (np.asarray(query, np.float32), np.asarray(target, np.float32),
            np.asarray(bank, np.float32))


def _mesh() -> Mesh:
    return Mesh(np.array(jax.devices()[:NUM_SHARDS]), (AXIS,))


def _join_shards(labels_per_shard: np.ndarray) -> np.ndarray:
    """Turn per-shard labels [S, B, 1 + n_local] into unsharded labels [B, 1 + n]."""
    positive = labels_per_shard[0][:, :1]
    bank_columns = [labels_per_shard[s][:, 1:] for s in range(labels_per_shard.shape[0])]
    return np.concatenate([positive, *bank_columns], axis=1)


def _unsharded_labels(target, bank, kind, num_neighbors):
    return losses.soft_labels(
        target, bank, kind=kind, num_neighbors=num_neighbors, tau_prime=TAU_PRIME
    )


def _sharded_soft_labels(target, bank_shard, *, kind, num_neighbors):
    return losses.soft_labels(
        target, bank_shard, kind=kind, num_neighbors=num_neighbors, tau_prime=TAU_PRIME,
        axis_name=AXIS,
    )


def _sharded_loss(query, target, bank_shard, *, kind, num_neighbors):
    return losses.ascl_loss(
        query, target, bank_shard, kind=kind, num_neighbors=num_neighbors, tau=TAU,
        tau_prime=TAU_PRIME, axis_name=AXIS,
    )


def _shard_map_labels(target, bank, kind, num_neighbors):
    """Run soft_labels under shard_map; return per-shard labels [S, B, 1 + n_l], confidence."""
    fn = functools.partial(_sharded_soft_labels, kind=kind, num_neighbors=num_neighbors)
    mapped = jax.jit(jax.shard_map(
        fn, mesh=_mesh(), in_specs=(P(), P(AXIS)), out_specs=(P(None, AXIS), P()),
    ))
    labels, confidence = mapped(target, bank)
    labels = np.asarray(labels).reshape(BATCH, NUM_SHARDS, 1 + LOCAL_SIZE).transpose(1, 0, 2)
    return labels, np.asarray(confidence)


# ---------------------------------------------------------------------------
# jax.pmap, as a chex variant.
# ---------------------------------------------------------------------------


class PmapTest(chex.TestCase):
    """Sharded losses under jax.pmap with one bank shard per device."""

    def _pmapped(self, fn, in_axes):
        return self.variant(
            fn, broadcast_args_to_devices=False, in_axes=in_axes, reduce_fn="identity",
            n_devices=NUM_SHARDS, axis_name=AXIS,
        )

    @chex.variants(with_pmap=True)
    @parameterized.product(kind=losses.KINDS, num_neighbors=NEIGHBOR_COUNTS)
    def test_soft_labels(self, kind, num_neighbors):
        _, target, bank = _inputs()
        fn = functools.partial(_sharded_soft_labels, kind=kind, num_neighbors=num_neighbors)
        labels, confidence = self._pmapped(fn, (None, 0))(
            target, bank.reshape(NUM_SHARDS, LOCAL_SIZE, DIM)
        )
        labels, confidence = np.asarray(labels), np.asarray(confidence)

        expected_labels, expected_confidence = _unsharded_labels(
            target, bank, kind, num_neighbors
        )
        for shard in range(1, NUM_SHARDS):
            np.testing.assert_array_equal(labels[shard][:, 0], labels[0][:, 0])
            np.testing.assert_array_equal(confidence[shard], confidence[0])
        np.testing.assert_allclose(_join_shards(labels), expected_labels, rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(confidence[0], expected_confidence, rtol=1e-5, atol=1e-6)

        reference_labels, reference_confidence = reference_soft_labels(
            target.astype(np.float64), bank.astype(np.float64), kind, num_neighbors, TAU_PRIME
        )
        np.testing.assert_allclose(_join_shards(labels), reference_labels, rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(confidence[0], reference_confidence, rtol=1e-4, atol=1e-6)

    @chex.variants(with_pmap=True)
    @parameterized.product(kind=losses.KINDS, num_neighbors=(1, 10))
    def test_ascl_loss(self, kind, num_neighbors):
        query, target, bank = _inputs(seed=1)
        fn = functools.partial(_sharded_loss, kind=kind, num_neighbors=num_neighbors)
        loss = np.asarray(self._pmapped(fn, (None, None, 0))(
            query, target, bank.reshape(NUM_SHARDS, LOCAL_SIZE, DIM)
        ))

        expected = losses.ascl_loss(
            query, target, bank, kind=kind, num_neighbors=num_neighbors, tau=TAU,
            tau_prime=TAU_PRIME,
        )
        chex.assert_shape(loss, (NUM_SHARDS,))
        np.testing.assert_allclose(loss, np.full(NUM_SHARDS, expected), rtol=1e-5)
        labels, _ = reference_soft_labels(
            target.astype(np.float64), bank.astype(np.float64), kind, num_neighbors, TAU_PRIME
        )
        reference = reference_loss(
            query.astype(np.float64), target.astype(np.float64), bank.astype(np.float64),
            labels, TAU,
        )
        np.testing.assert_allclose(loss[0], reference, rtol=1e-4)

    @chex.variants(with_pmap=True)
    def test_label_diagnostics(self):
        _, target, bank = _inputs(seed=2)
        rng = np.random.default_rng(2)
        sample_classes = rng.integers(-1, 3, BATCH).astype(np.int32)
        bank_classes = rng.integers(-1, 3, BANK_SIZE).astype(np.int32)

        def fn(target, bank_shard, sample_classes, bank_classes_shard):
            labels, _ = _sharded_soft_labels(target, bank_shard, kind="ascl", num_neighbors=3)
            return losses.label_diagnostics(
                labels, sample_classes, bank_classes_shard, axis_name=AXIS
            )

        diagnostics = self._pmapped(fn, (None, 0, None, 0))(
            target, bank.reshape(NUM_SHARDS, LOCAL_SIZE, DIM), sample_classes,
            bank_classes.reshape(NUM_SHARDS, LOCAL_SIZE),
        )
        labels, _ = _unsharded_labels(target, bank, "ascl", 3)
        expected = losses.label_diagnostics(labels, sample_classes, bank_classes)
        for name, value in expected.items():
            np.testing.assert_allclose(
                np.asarray(diagnostics[name]), np.full(NUM_SHARDS, value), rtol=1e-5,
                err_msg=name,
            )


# ---------------------------------------------------------------------------
# jax.shard_map over a 4-device mesh.
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("num_neighbors", NEIGHBOR_COUNTS)
@pytest.mark.parametrize("kind", losses.KINDS)
def test_shard_map_soft_labels(kind, num_neighbors):
    _, target, bank = _inputs(seed=3)
    labels, confidence = _shard_map_labels(target, bank, kind, num_neighbors)
    expected_labels, expected_confidence = _unsharded_labels(target, bank, kind, num_neighbors)
    np.testing.assert_allclose(_join_shards(labels), expected_labels, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(confidence, expected_confidence, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(_join_shards(labels).sum(axis=1), 1.0, rtol=1e-5)


@pytest.mark.parametrize("kind", losses.KINDS)
def test_shard_map_loss_and_gradient(kind):
    """Loss and query gradient with the batch sharded too, as in the train step."""
    query, target, bank = _inputs(seed=4)

    def sharded(query_shard, target, bank_shard):
        def loss_fn(query_shard):
            query = jax.lax.all_gather(query_shard, AXIS, tiled=True)
            return _sharded_loss(query, target, bank_shard, kind=kind, num_neighbors=3)

        return jax.value_and_grad(loss_fn)(query_shard)

    mapped = jax.jit(jax.shard_map(
        sharded, mesh=_mesh(), in_specs=(P(AXIS), P(), P(AXIS)), out_specs=(P(), P(AXIS)),
    ))
    # The batch must split over the devices: use 8 rows of queries and targets.
    query, target = np.concatenate([query, query[:2]]), np.concatenate([target, target[:2]])
    loss, gradient = mapped(query, target, bank)

    def unsharded(query):
        return losses.ascl_loss(
            query, target, bank, kind=kind, num_neighbors=3, tau=TAU, tau_prime=TAU_PRIME
        )

    expected_loss, expected_gradient = jax.value_and_grad(unsharded)(query)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-6)


def test_shard_map_replicated_query_gradient():
    """A query replicated on every device, not gathered, also gets the unsharded gradient."""
    query, target, bank = _inputs(seed=5)

    def sharded(query, target, bank_shard):
        return jax.value_and_grad(_sharded_loss)(
            query, target, bank_shard, kind="ascl", num_neighbors=1
        )

    mapped = jax.jit(jax.shard_map(
        sharded, mesh=_mesh(), in_specs=(P(), P(), P(AXIS)), out_specs=(P(), P()),
    ))
    loss, gradient = mapped(query, target, bank)
    expected_loss, expected_gradient = jax.value_and_grad(
        lambda q: losses.ascl_loss(q, target, bank, kind="ascl", num_neighbors=1, tau=TAU,
                                   tau_prime=TAU_PRIME)
    )(query)
    np.testing.assert_allclose(loss, expected_loss, rtol=1e-5)
    np.testing.assert_allclose(gradient, expected_gradient, rtol=1e-4, atol=1e-6)


def test_top_k_ties_across_shards_pick_lowest_index():
    # Entries 5 (shard 0), 12 (shard 1) and 29 (shard 3) are equal to the target; K = 2 must
    # pick 5 and 12, as the unsharded rule does.
    _, target, bank = _inputs(seed=6)
    for index in (5, 12, 29):
        bank[index] = target[0]
    labels, _ = _shard_map_labels(target[:1].repeat(BATCH, 0), bank, "hard", 2)
    chosen = np.flatnonzero(_join_shards(labels)[0, 1:])
    np.testing.assert_array_equal(chosen, [5, 12])


def test_top_k_all_equal_picks_first_entries():
    # Every bank entry is the same vector, so the K = 10 winners are entries 0..9, which span
    # shards 0 and 1.
    _, target, _ = _inputs(seed=7)
    bank = np.repeat(target[:1], BANK_SIZE, axis=0)
    labels, confidence = _shard_map_labels(target, bank, "hard", 10)
    joined = _join_shards(labels)
    for row in range(BATCH):
        np.testing.assert_array_equal(np.flatnonzero(joined[row, 1:]), np.arange(10))
    # Identical bank entries make q uniform, so the confidence is exactly 0.
    np.testing.assert_array_equal(confidence, 0.0)


def test_unbound_axis_name_raises():
    _, target, bank = _inputs()
    with pytest.raises(ValueError, match="axis_name 'nowhere'"):
        losses.soft_labels(target, bank, kind="ascl", num_neighbors=1, tau_prime=TAU_PRIME,
                           axis_name="nowhere")


def test_num_neighbors_checked_against_global_bank():
    _, target, bank = _inputs()
    fn = functools.partial(_sharded_soft_labels, kind="hard", num_neighbors=BANK_SIZE + 1)
    mapped = jax.shard_map(fn, mesh=_mesh(), in_specs=(P(), P(AXIS)),
                           out_specs=(P(None, AXIS), P()))
    with pytest.raises(ValueError, match=rf"\[1, {BANK_SIZE}\]"):
        mapped(target, bank)


def test_sharded_labels_keep_float32_for_bfloat16_inputs():
    _, target, bank = _inputs(seed=8)
    labels, _ = _shard_map_labels(
        jnp.asarray(target, jnp.bfloat16), jnp.asarray(bank, jnp.bfloat16), "ascl", 1
    )
    assert labels.dtype == np.float32
    np.testing.assert_allclose(_join_shards(labels).sum(axis=1), 1.0, rtol=1e-5)
