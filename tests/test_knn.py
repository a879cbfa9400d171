"""Tests for the weighted kNN monitor against a float64 NumPy reference of the protocol."""

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascl_jax.evaluation import knn_accuracy, knn_predict, l2_normalize
from ascl_jax.evaluation.knn import _predict_query_chunk


def reference_predict(bank, bank_labels, queries, num_classes, k, temperature):
    """Predict by the protocol in float64: sort by cosine similarity, keep k, vote exp(s / T)."""
    bank = np.asarray(bank, np.float64)
    queries = np.asarray(queries, np.float64)
    similarity = queries @ bank.T
    predictions = []
    for row in similarity:
        # A stable sort on -s keeps the lower bank index first among equal similarities.
        neighbours = np.argsort(-row, kind="stable")[:k]
        weights = np.exp(row[neighbours] / temperature)
        votes = np.bincount(bank_labels[neighbours], weights=weights, minlength=num_classes)
        predictions.append(np.argmax(votes))
    return np.asarray(predictions)


def random_unit_features(rng, num_samples, dim):
    """Draw Gaussian vectors and normalise them in float64, then store them as float32."""
    features = rng.normal(size=(num_samples, dim))
    features /= np.linalg.norm(features, axis=1, keepdims=True)
    return features.astype(np.float32)


def random_problem(seed, bank_size=120, num_queries=37, dim=8, num_classes=5):
    rng = np.random.default_rng(seed)
    bank = random_unit_features(rng, bank_size, dim)
    labels = rng.integers(0, num_classes, size=bank_size)
    queries = random_unit_features(rng, num_queries, dim)
    return bank, labels, queries


def clustered_problem(seed, num_classes=4, per_class=30, dim=16, noise=0.05):
    """Build well-separated clusters: class c sits around the c-th basis vector."""
    rng = np.random.default_rng(seed)
    centres = np.eye(dim)[:num_classes]
    labels = np.repeat(np.arange(num_classes), per_class)
    points = centres[labels] + noise * rng.normal(size=(labels.size, dim))
    points /= np.linalg.norm(points, axis=1, keepdims=True)
    return points.astype(np.float32), labels


@pytest.mark.parametrize(
    "k, temperature, num_queries, query_chunk",
    [
        (1, 0.1, 37, 16),
        (10, 0.07, 37, 16),
        (25, 0.1, 50, 7),
        (64, 0.5, 23, 256),
        (120, 1.0, 9, 4),
    ],
)
def test_predict_matches_reference(k, temperature, num_queries, query_chunk):
    bank, labels, queries = random_problem(seed=k, num_queries=num_queries)
    expected = reference_predict(bank, labels, queries, 5, k, temperature)

    predictions = knn_predict(
        bank, labels, queries, num_classes=5, k=k, temperature=temperature,
        query_chunk=query_chunk,
    )

    assert predictions.dtype == jnp.int32
    chex.assert_shape(predictions, (num_queries,))
    np.testing.assert_array_equal(np.asarray(predictions), expected)


@pytest.mark.parametrize("k", [1, 20, 64])
@pytest.mark.parametrize("bank_chunk", [1, 7, 64, 119, 500])
def test_bank_chunking_matches_unchunked(k, bank_chunk):
    bank, labels, queries = random_problem(seed=100 + k, num_queries=41)
    kwargs = dict(num_classes=5, k=k, temperature=0.1, query_chunk=16)

    unchunked = knn_predict(bank, labels, queries, **kwargs)
    chunked = knn_predict(bank, labels, queries, bank_chunk=bank_chunk, **kwargs)

    np.testing.assert_array_equal(np.asarray(chunked), np.asarray(unchunked))
    expected = reference_predict(bank, labels, queries, 5, k, 0.1)
    np.testing.assert_array_equal(np.asarray(chunked), expected)


def test_query_chunk_does_not_change_predictions():
    bank, labels, queries = random_problem(seed=7, num_queries=45)
    results = [
        np.asarray(knn_predict(bank, labels, queries, num_classes=5, k=15, query_chunk=chunk))
        for chunk in (1, 8, 44, 45, 1000)
    ]
    for result in results[1:]:
        np.testing.assert_array_equal(result, results[0])


@pytest.mark.parametrize("bank_chunk", [None, 13])
def test_separated_clusters_accuracy_one(bank_chunk):
    bank, bank_labels = clustered_problem(seed=0)
    queries, query_labels = clustered_problem(seed=1, per_class=9)

    accuracy = knn_accuracy(
        bank, bank_labels, queries, query_labels, num_classes=4, k=20, query_chunk=8,
        bank_chunk=bank_chunk,
    )

    assert isinstance(accuracy, float)
    assert accuracy == 1.0


def test_accuracy_counts_wrong_labels():
    bank, bank_labels = clustered_problem(seed=0)
    queries, query_labels = clustered_problem(seed=1, per_class=2)
    wrong_labels = query_labels.copy()
    wrong_labels[[0, 3, 6]] = (wrong_labels[[0, 3, 6]] + 1) % 4

    accuracy = knn_accuracy(bank, bank_labels, queries, wrong_labels, num_classes=4, k=10)

    assert accuracy == pytest.approx(5 / 8)


def test_query_equal_to_bank_point_k1():
    bank, labels, _ = random_problem(seed=3)
    picked = np.array([0, 17, 64, 119])

    predictions = knn_predict(bank, labels, bank[picked], num_classes=5, k=1)

    np.testing.assert_array_equal(np.asarray(predictions), labels[picked])


@pytest.mark.parametrize("bank_chunk", [None, 1])
def test_vote_tie_picks_lowest_class(bank_chunk):
    # Two identical bank rows give the query two identical votes, for classes 2 and 1.
    point = np.array([[0.6, 0.8]], np.float32)
    bank = np.concatenate([point, point, [[0.0, -1.0]]]).astype(np.float32)
    labels = np.array([2, 1, 0])

    predictions = knn_predict(bank, labels, point, num_classes=3, k=2, bank_chunk=bank_chunk)

    assert int(predictions[0]) == 1


@pytest.mark.parametrize("bank_chunk", [None, 1])
def test_similarity_tie_picks_lower_bank_index(bank_chunk):
    point = np.array([[0.6, 0.8]], np.float32)
    bank = np.concatenate([[[0.0, -1.0]], point, point]).astype(np.float32)
    labels = np.array([0, 3, 1])

    predictions = knn_predict(bank, labels, point, num_classes=4, k=1, bank_chunk=bank_chunk)

    assert int(predictions[0]) == 3


def test_small_temperature_does_not_overflow():
    # One neighbour of class 1 at similarity 0.9 and 49 of class 0 at 0.8. With T = 1e-3,
    # exp(s / T) is inf in float32 for both classes, which would tie and wrongly pick class 0.
    query = np.array([[1.0, 0.0]], np.float32)
    near = [0.9, np.sqrt(1 - 0.81)]
    far = [0.8, 0.6]
    bank = np.array([near] + [far] * 49, np.float32)
    labels = np.array([1] + [0] * 49)

    predictions = knn_predict(bank, labels, query, num_classes=2, k=50, temperature=1e-3)

    assert int(predictions[0]) == 1


def test_bfloat16_features():
    bank, bank_labels = clustered_problem(seed=0)
    queries, query_labels = clustered_problem(seed=1, per_class=9)
    bank_bf16 = jnp.asarray(bank, jnp.bfloat16)
    queries_bf16 = jnp.asarray(queries, jnp.bfloat16)

    predictions = knn_predict(bank_bf16, bank_labels, queries_bf16, num_classes=4, k=20)
    accuracy = knn_accuracy(
        bank_bf16, bank_labels, queries_bf16, query_labels, num_classes=4, k=20, bank_chunk=16
    )

    assert predictions.dtype == jnp.int32
    assert np.all((np.asarray(predictions) >= 0) & (np.asarray(predictions) < 4))
    assert np.isfinite(accuracy)
    assert accuracy == 1.0


def test_mixed_dtypes_match_float32():
    bank, labels, queries = random_problem(seed=11)
    float32_predictions = knn_predict(bank, labels, queries, num_classes=5, k=10)

    mixed = knn_predict(
        jnp.asarray(bank, jnp.bfloat16), labels, queries, num_classes=5, k=10
    )

    chex.assert_shape(mixed, float32_predictions.shape)
    # bfloat16 keeps 8 bits of mantissa, so only most predictions need to agree.
    assert np.mean(np.asarray(mixed) == np.asarray(float32_predictions)) > 0.8


def test_empty_queries_return_empty():
    bank, labels, _ = random_problem(seed=0)

    predictions = knn_predict(bank, labels, np.zeros((0, 8), np.float32), num_classes=5, k=3)

    chex.assert_shape(predictions, (0,))


@pytest.mark.skipif(jax.default_backend() != "cpu", reason="checks XLA CPU lowering")
@pytest.mark.parametrize("bank_chunk", [None, 300])
def test_top_k_lowers_without_full_sort(bank_chunk):
    # A full sort of each similarity row made the monitor about 40x slower on CPU.
    bank = jnp.zeros((1000, 8), jnp.float32)
    labels = jnp.zeros((1000,), jnp.int32)
    queries = jnp.zeros((16, 8), jnp.float32)

    compiled = _predict_query_chunk.lower(
        bank, labels, queries, jnp.float32(0.1), num_classes=5, k=10, bank_chunk=bank_chunk
    ).compile()

    assert " sort(" not in compiled.as_text()


@pytest.mark.parametrize(
    "overrides, message",
    [
        (dict(k=121), "k=121"),
        (dict(k=0), "got 0"),
        (dict(k=2.0), "got 2.0"),
        (dict(num_classes=0), "num_classes must be a positive integer, got 0"),
        (dict(temperature=0.0), "got 0.0"),
        (dict(temperature=float("nan")), "got nan"),
        (dict(query_chunk=0), "query_chunk must be a positive integer, got 0"),
        (dict(bank_chunk=-4), "bank_chunk must be a positive integer, got -4"),
        (dict(num_classes=3), "contains 4"),
    ],
)
def test_predict_rejects_bad_arguments(overrides, message):
    bank, labels, queries = random_problem(seed=0)
    labels[5] = 4
    kwargs = dict(num_classes=5, k=10, temperature=0.1) | overrides

    with pytest.raises(ValueError, match=message):
        knn_predict(bank, labels, queries, **kwargs)


def test_predict_rejects_unlabelled_bank():
    bank, labels, queries = random_problem(seed=0)
    labels[7] = -1

    with pytest.raises(ValueError, match="contains -1"):
        knn_predict(bank, labels, queries, num_classes=5, k=10)


def test_predict_rejects_bad_shapes():
    bank, labels, queries = random_problem(seed=0)

    with pytest.raises(ValueError, match=r"feature dimension 8 .* has 4"):
        knn_predict(bank, labels, queries[:, :4], num_classes=5, k=10)
    with pytest.raises(ValueError, match=r"shape \(120,\).*got shape \(119,\)"):
        knn_predict(bank, labels[:-1], queries, num_classes=5, k=10)
    with pytest.raises(ValueError, match=r"got shape \(120, 2, 4\)"):
        knn_predict(bank.reshape(120, 2, 4), labels, queries, num_classes=5, k=10)
    with pytest.raises(ValueError, match="floating-point dtype, got int32"):
        knn_predict(bank.astype(np.int32), labels, queries, num_classes=5, k=10)
    with pytest.raises(ValueError, match="integer dtype, got float32"):
        knn_predict(bank, labels.astype(np.float32), queries, num_classes=5, k=10)


def test_accuracy_rejects_bad_arguments():
    bank, labels, queries = random_problem(seed=0)
    query_labels = np.zeros(37, np.int64)

    with pytest.raises(ValueError, match=r"query_labels must have shape \(37,\)"):
        knn_accuracy(bank, labels, queries, query_labels[:30], num_classes=5, k=10)
    with pytest.raises(ValueError, match="query_labels contains 9"):
        knn_accuracy(bank, labels, queries, query_labels + 9, num_classes=5, k=10)
    with pytest.raises(ValueError, match="bank_chunks"):
        knn_accuracy(bank, labels, queries, query_labels, num_classes=5, k=10, bank_chunks=8)
    with pytest.raises(ValueError, match="no rows"):
        knn_accuracy(bank, labels, queries[:0], query_labels[:0], num_classes=5, k=10)


class L2NormalizeTest(chex.TestCase):

    @chex.all_variants(with_jit=True, without_jit=True)
    def test_unit_norm_and_direction(self):
        x = np.random.default_rng(0).normal(size=(6, 5)).astype(np.float32)

        normalized = self.variant(l2_normalize)(x)

        expected = x / np.linalg.norm(x.astype(np.float64), axis=-1, keepdims=True)
        chex.assert_trees_all_close(normalized, expected.astype(np.float32), rtol=1e-6)

    @chex.all_variants(with_jit=True, without_jit=True)
    def test_axis_zero_and_zero_vector(self):
        x = np.array([[3.0, 0.0], [4.0, 0.0]], np.float32)

        normalized = self.variant(lambda v: l2_normalize(v, axis=0))(x)

        chex.assert_trees_all_close(normalized, np.array([[0.6, 0.0], [0.8, 0.0]]), rtol=1e-6)

    def test_bfloat16_input_gives_float32(self):
        x = jnp.asarray([[3.0, 4.0]], jnp.bfloat16)

        normalized = l2_normalize(x)

        assert normalized.dtype == jnp.float32
        chex.assert_trees_all_close(normalized, np.array([[0.6, 0.8]]), rtol=1e-6)
