"""Tests of linear evaluation: schedule, optimiser, head, batching, and runs on a tiny checkpoint.

The math is checked against float64 NumPy references written from the formulas. The
end-to-end tests evaluate a tiny checkpoint in the pretraining loop's layout, on the embedded
images, made once per session (`make_tiny_run`, shared with test_knn_eval.py), on 8 fake CPU
devices.
"""

import functools
import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from ascl_jax import checkpoint as checkpoint_lib
from ascl_jax import data as data_lib
from ascl_jax import models, sharding, train
from ascl_jax import train_state as state_lib
from ascl_jax import train_step as step_lib
from ascl_jax.evaluation import linear
from experiments.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_RUN_OVERRIDES = {
    "model": "resnet10",
    "width": 4,
    "hidden_dim": 16,
    "projection_dim": 16,
    "bn_groups": 4,
    "batch_size": 32,
    "queue_size": 64,
    "warmup_epochs": 0,
    # Not a multiple of 8 devices, and 2,000 is not a multiple of the rounded-up 504, so the
    # evaluations exercise the padded batches.
    "eval_batch_size": 500,
    # The monitor runs on one device, and the evaluations run on all 8.
    "num_devices": 1,
    # The 2,000 test images keep data loading and the kNN monitor short.
    "train_split": "test",
    "memory_split": "test",
    "num_train_steps": 2,
    "knn_k": 20,
}
TINY_RUN_STEP = 2


def random_leaf(path, leaf, rng):
    """Draw a numpy value for a leaf of the train state, chosen by the leaf's name.

    Kernels are He-normal, BatchNorm scales 1, running means ~ N(0, 0.1^2) and running
    variances ~ U(0.8, 1.25). Every other leaf is 0.
    """
    name = jax.tree_util.keystr(path)
    if name.endswith("['kernel']"):
        fan_in = int(np.prod(leaf.shape[:-1]))
        return (rng.normal(size=leaf.shape) * np.sqrt(2.0 / fan_in)).astype(leaf.dtype)
    if name.endswith("['scale']"):
        return np.ones(leaf.shape, leaf.dtype)
    if name.endswith("['mean']"):
        return (0.1 * rng.normal(size=leaf.shape)).astype(leaf.dtype)
    if name.endswith("['var']"):
        return rng.uniform(0.8, 1.25, size=leaf.shape).astype(leaf.dtype)
    return np.zeros(leaf.shape, leaf.dtype)


def make_tiny_run(tmp_path_factory) -> tuple[str, float]:
    """Return (workdir, kNN monitor top-1) of a tiny run's checkpoint, made once per session.

    The checkpoint is saved as the pretraining loop saves one, with the same meta item and
    config.json. Its state has the shapes of `create_train_state` and random values from
    `random_leaf`, so that the running BatchNorm statistics differ from their initial zeros and
    ones. Building the state by flax's initialisers, or training two steps with
    `train.train_and_evaluate`, spends 30 to 60 s compiling on 2 loaded CPU cores. The top-1 is
    the trainer's own kNN monitor (`train.knn_top1`) on that state.
    """
    root = tmp_path_factory.getbasetemp()
    workdir = root / "tiny_pretraining_run"
    reference = root / "tiny_pretraining_run_monitor.json"
    if reference.is_file():
        return str(workdir), json.loads(reference.read_text())["knn_top1"]

    config = default.get_config()
    config.update(TINY_RUN_OVERRIDES)
    run_data = train.load_run_data(config)
    mesh = train.create_mesh(config)
    model = models.create_encoder(
        config.model, width=config.width, stem=config.stem, bn_groups=config.bn_groups,
        hidden_dim=config.hidden_dim, projection_dim=config.projection_dim,
    )
    tx = state_lib.make_optimizer(config.learning_rate, momentum=config.momentum,
                                  weight_decay=config.weight_decay)
    image_shape = (config.image_size, config.image_size, run_data.train.image_shape[-1])
    shapes = jax.eval_shape(functools.partial(
        state_lib.create_train_state, jax.random.PRNGKey(config.seed), model,
        image_shape=image_shape, tx=tx, queue_size=config.queue_size,
        projection_dim=config.projection_dim,
    ))
    rng = np.random.default_rng(0)
    state = jax.tree_util.tree_map_with_path(lambda path, leaf: random_leaf(path, leaf, rng),
                                             shapes)
    state = sharding.put_state(state.replace(step=np.int32(TINY_RUN_STEP)), mesh)

    steps_per_epoch = len(run_data.train) // config.batch_size
    meta = {
        "seed": config.seed, "num_train_examples": len(run_data.train),
        "steps_per_epoch": steps_per_epoch, "image_shape": list(image_shape),
        "mean": list(run_data.mean), "std": list(run_data.std), "config": config.to_dict(),
        "next_batch_step": TINY_RUN_STEP,
    }
    manager = checkpoint_lib.open_manager(str(workdir))
    checkpoint_lib.save_checkpoint(manager, TINY_RUN_STEP, state, meta)
    manager.wait_until_finished()
    manager.close()
    (workdir / "config.json").write_text(json.dumps(config.to_dict(), indent=2))

    feature_fn = sharding.shard_feature_fn(
        step_lib.make_feature_fn(model, image_size=config.image_size, mean=run_data.mean,
                                 std=run_data.std),
        mesh, state,
    )
    top1 = train.knn_top1(feature_fn, state, run_data, config)
    reference.write_text(json.dumps({"knn_top1": top1}))
    return str(workdir), top1


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory)[0]


def run_cli(module, *args, timeout=300):
    environment = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", module, *args], cwd=ROOT, capture_output=True, text=True,
        timeout=timeout, env=environment,
    )


def error_lines(stderr):
    return [line for line in stderr.splitlines() if line.startswith("error:")]


# Schedule and optimiser.


@pytest.mark.parametrize("epochs, milestones", [(100, (60, 80)), (10, (6, 8)), (5, (3, 4)),
                                                (2, (1, 2)), (1, (1, 1))])
def test_lr_milestones_scale_with_epochs(epochs, milestones):
    assert linear.lr_milestones(epochs) == milestones


def test_learning_rate_drops_tenfold_at_milestones():
    rates = [linear.learning_rate_at_epoch(10.0, epoch, (60, 80)) for epoch in range(100)]
    np.testing.assert_allclose(rates[:60], 10.0)
    np.testing.assert_allclose(rates[60:80], 1.0)
    np.testing.assert_allclose(rates[80:], 0.1)


def reference_nesterov(params, gradients, rates, momentum=0.9):
    """Run PyTorch's SGD(nesterov=True) in float64: buf = m buf + g, p = p - lr (g + m buf)."""
    params = params.astype(np.float64)
    buffer = np.zeros_like(params)
    for gradient, rate in zip(gradients, rates):
        buffer = momentum * buffer + gradient
        params = params - rate * (gradient + momentum * buffer)
    return params


@pytest.mark.parametrize("jit", [False, True])
def test_optimizer_matches_nesterov_reference(jit):
    steps_per_epoch, milestones = 3, (2, 3)
    tx = linear.make_optimizer(10.0, milestones, steps_per_epoch)
    rng = np.random.default_rng(0)
    start = rng.normal(size=(3, 2)).astype(np.float32)
    gradients = rng.normal(size=(12, 3, 2)).astype(np.float32)
    rates = [linear.learning_rate_at_epoch(10.0, step // steps_per_epoch, milestones)
             for step in range(12)]
    assert rates[5] == 10.0
    assert rates[6] == pytest.approx(1.0)
    assert rates[9] == pytest.approx(0.1)

    def update(params, opt_state, gradient):
        updates, opt_state = tx.update(gradient, opt_state, params)
        return params + updates, opt_state

    update = jax.jit(update) if jit else update
    params, opt_state = jnp.asarray(start), tx.init(jnp.asarray(start))
    for gradient in gradients:
        params, opt_state = update(params, opt_state, jnp.asarray(gradient))
    expected = reference_nesterov(start, gradients.astype(np.float64), rates)
    np.testing.assert_allclose(np.asarray(params), expected, rtol=1e-5, atol=1e-5)


# The head.


def test_head_init_is_normal_001_with_zero_bias():
    head = linear.init_head(jax.random.PRNGKey(0), 512, 100)
    kernel = np.asarray(head["kernel"])
    assert kernel.shape == (512, 100)
    assert abs(kernel.std() - 0.01) < 0.0003
    assert abs(kernel.mean()) < 0.0003
    np.testing.assert_array_equal(np.asarray(head["bias"]), np.zeros(100))


def reference_cross_entropy(logits, labels):
    logits = logits.astype(np.float64)
    shifted = logits - logits.max(axis=1, keepdims=True)
    log_probs = shifted - np.log(np.exp(shifted).sum(axis=1, keepdims=True))
    valid = labels >= 0
    losses = -log_probs[np.arange(len(labels)), np.maximum(labels, 0)]
    total = losses[valid].sum()
    return total / max(valid.sum(), 1), total


@pytest.mark.parametrize("jit", [False, True])
def test_masked_cross_entropy_matches_numpy(jit):
    rng = np.random.default_rng(1)
    features = rng.normal(size=(6, 4)).astype(np.float32)
    head = {"kernel": rng.normal(size=(4, 3)).astype(np.float32),
            "bias": rng.normal(size=(3,)).astype(np.float32)}
    labels = np.array([0, 2, -1, 1, -1, 2], np.int32)
    loss = jax.jit(linear.masked_cross_entropy) if jit else linear.masked_cross_entropy
    mean, total = loss(head, jnp.asarray(features), jnp.asarray(labels))
    logits = features.astype(np.float64) @ head["kernel"] + head["bias"]
    expected_mean, expected_total = reference_cross_entropy(logits, labels)
    assert float(mean) == pytest.approx(expected_mean, rel=1e-5)
    assert float(total) == pytest.approx(expected_total, rel=1e-5)

    all_padding = np.full((6,), -1, np.int32)
    mean, total = loss(head, jnp.asarray(features), jnp.asarray(all_padding))
    assert float(mean) == 0.0
    assert float(total) == 0.0


@pytest.mark.parametrize("jit", [False, True])
def test_top_k_correct_matches_numpy(jit):
    rng = np.random.default_rng(2)
    # Rounded logits have ties, which rank the lower class first.
    logits = np.round(rng.normal(size=(50, 7)), 1).astype(np.float32)
    labels = rng.integers(0, 7, size=50).astype(np.int32)
    correct = jax.jit(linear.top_k_correct, static_argnums=2) if jit else linear.top_k_correct
    for k in (1, 3, 5):
        ranking = np.argsort(-logits.astype(np.float64), axis=1, kind="stable")[:, :k]
        expected = (ranking == labels[:, None]).any(axis=1)
        np.testing.assert_array_equal(np.asarray(correct(jnp.asarray(logits),
                                                         jnp.asarray(labels), k)), expected)


def test_accuracy_counts_top1_and_top5():
    head = {"kernel": jnp.eye(6, dtype=jnp.float32), "bias": jnp.zeros(6, jnp.float32)}
    # Logits equal the features: class i ranks (i+1)-th for the row that peaks at 0.
    features = np.array([[6, 5, 4, 3, 2, 1]] * 6, np.float32)
    labels = np.arange(6, dtype=np.int32)
    top1, top5 = linear.accuracy(head, features, labels)
    assert top1 == pytest.approx(1 / 6)
    assert top5 == pytest.approx(5 / 6)


# Batches and example selection.


def test_epoch_batches_cover_every_example_once():
    plan = linear.epoch_batches(seed=3, epoch=1, num_examples=10, batch_size=4, padded_size=8)
    assert plan.shape == (3, 8)
    assert plan.dtype == np.int32
    assert sorted(plan[plan >= 0].tolist()) == list(range(10))
    assert (plan[:, 4:] == -1).all()
    assert (plan[2, 2:] == -1).all()
    np.testing.assert_array_equal(plan[:, :4].reshape(-1)[:10],
                                  np.random.default_rng([3, 1]).permutation(10))


def test_select_examples_holds_out_fixed_labelled_images():
    labels = np.array([0, 1, -1, 2] * 25, np.int32)
    train_indices, holdout_indices = linear.select_examples(labels, holdout=10)
    assert len(train_indices) == 65
    assert len(holdout_indices) == 10
    assert not set(train_indices) & set(holdout_indices)
    assert (labels[np.concatenate([train_indices, holdout_indices])] >= 0).all()
    again = linear.select_examples(labels, holdout=10)
    np.testing.assert_array_equal(again[1], holdout_indices)

    subset, _ = linear.select_examples(labels, max_examples=20)
    assert len(subset) == 20
    assert (labels[subset] >= 0).all()


def test_select_examples_rejects_holdout_of_all_images():
    with pytest.raises(ValueError, match=r"holdout=4: .* 4 labelled images .*\[0, 3\]"):
        linear.select_examples(np.arange(4), holdout=4)
    with pytest.raises(ValueError, match="no labelled images"):
        linear.select_examples(np.full(4, -1))


@pytest.mark.parametrize("change, message", [
    ({"mode": "linear"}, "mode='linear'"),
    ({"epochs": 0}, "epochs=0"),
    ({"batch_size": -1}, "batch_size=-1"),
    ({"learning_rate": 0.0}, "learning_rate=0.0"),
    ({"learning_rate": float("nan")}, "learning_rate=nan"),
    ({"holdout": -2}, "holdout=-2"),
    ({"max_train_examples": -1}, "max_train_examples=-1"),
])
def test_settings_reject_invalid_values(change, message):
    settings = linear.LinearEvalSettings(**change)
    with pytest.raises(ValueError, match=f"Invalid {message}"):
        settings.check()


# Training on synthetic features, whose accuracy is known by construction.


def separable_features(num_per_class, num_classes=4, dim=8, seed=0):
    """Clusters of radius 0.3 around +-2 e_i: a linear classifier separates them exactly."""
    rng = np.random.default_rng(seed)
    centers = np.zeros((num_classes, dim), np.float32)
    for index in range(num_classes):
        centers[index, index // 2] = 2.0 if index % 2 == 0 else -2.0
    labels = np.repeat(np.arange(num_classes), num_per_class).astype(np.int32)
    features = centers[labels] + rng.uniform(-0.3, 0.3, size=(len(labels), dim))
    return features.astype(np.float32), labels


def test_head_learns_separable_features_to_100_percent():
    train_features, train_labels = separable_features(50)
    test_features, test_labels = separable_features(25, seed=1)
    settings = linear.LinearEvalSettings(mode="features", epochs=5, batch_size=32)
    head, history = linear.train_on_features(
        train_features, train_labels, {"test": (test_features, test_labels)}, settings, 4
    )
    assert [record["epoch"] for record in history] == [1, 2, 3, 4, 5]
    assert history[-1]["test_top1"] == 1.0
    assert linear.accuracy(head, train_features, train_labels)[0] == 1.0
    assert history[-1]["train_loss"] < history[0]["train_loss"]
    assert [record["learning_rate"] for record in history] == pytest.approx(
        [10.0, 10.0, 10.0, 1.0, 0.1])


def test_head_cannot_beat_chance_on_shuffled_labels():
    features, labels = separable_features(50)
    shuffled = np.random.default_rng(5).permutation(labels)
    settings = linear.LinearEvalSettings(mode="features", epochs=3, batch_size=32)
    _, history = linear.train_on_features(
        features, shuffled, {"test": separable_features(25, seed=1)}, settings, 4
    )
    assert history[-1]["test_top1"] < 0.5


def test_select_reported_epoch_rules():
    history = [{"epoch": 1, "holdout_top1": 0.2}, {"epoch": 2, "holdout_top1": 0.5},
               {"epoch": 3, "holdout_top1": 0.4}, {"epoch": 4, "holdout_top1": 0.5}]
    assert linear.select_reported_epoch(history) == (1, "selected_on_holdout")
    plain = [{"epoch": 1}, {"epoch": 2}]
    assert linear.select_reported_epoch(plain) == (1, "final_epoch")
    with pytest.raises(ValueError, match="empty"):
        linear.select_reported_epoch([])


def test_holdout_history_drives_reported_epoch():
    features, labels = separable_features(40)
    holdout = separable_features(10, seed=2)
    # Noisy labels make the held-out accuracy change from epoch to epoch.
    noisy = np.where(np.random.default_rng(3).random(len(labels)) < 0.4,
                     np.random.default_rng(4).integers(0, 4, len(labels)), labels)
    settings = linear.LinearEvalSettings(mode="features", epochs=6, batch_size=16, holdout=40)
    _, history = linear.train_on_features(
        features, noisy.astype(np.int32),
        {"test": separable_features(10, seed=1), "holdout": holdout}, settings, 4,
    )
    index, reported = linear.select_reported_epoch(history)
    scores = [record["holdout_top1"] for record in history]
    assert reported == "selected_on_holdout"
    assert scores[index] == max(scores)
    assert index == scores.index(max(scores))


def test_nan_loss_stops_with_epoch_and_learning_rate():
    features, labels = separable_features(10)
    features[3, 0] = np.nan
    settings = linear.LinearEvalSettings(mode="features", epochs=2, batch_size=8)
    with pytest.raises(FloatingPointError, match=r"epoch 1: .* nan at learning rate 10"):
        linear.train_on_features(features, labels, {"test": (features, labels)}, settings, 4)


# Results file.


def test_write_result_replaces_same_settings_only(tmp_path):
    path = str(tmp_path / "results.json")
    keys = ("step", "k")
    linear.write_result(path, {"step": 1, "k": 5, "top1": 0.1}, keys)
    linear.write_result(path, {"step": 1, "k": 10, "top1": 0.2}, keys)
    entries = linear.write_result(path, {"step": 1, "k": 5, "top1": 0.3}, keys)
    assert entries == [{"step": 1, "k": 10, "top1": 0.2}, {"step": 1, "k": 5, "top1": 0.3}]
    with open(path, encoding="utf-8") as file:
        assert json.load(file) == {"entries": entries}
    assert os.listdir(tmp_path) == ["results.json"]

    with open(path, "w", encoding="utf-8") as file:
        file.write("[1, 2")
    with pytest.raises(ValueError, match="Cannot parse the results file"):
        linear.write_result(path, {"step": 2, "k": 5}, keys)


# End to end on the tiny checkpoint.


def test_cli_features_mode_writes_result(tiny_run):
    results = os.path.join(tiny_run, "linear_eval.json")
    if os.path.exists(results):
        os.remove(results)

    # The protocol's learning rate of 10 overshoots on these random features for many epochs.
    result = run_cli("experiments.linear_eval", f"--workdir={tiny_run}", "--mode=features",
                     "--epochs=3", "--learning_rate=0.1", "--holdout=200")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Linear evaluation of step 2 (features mode, 1800 training images)" in result.stdout
    assert "selected on 200 held-out images" in result.stdout

    with open(results, encoding="utf-8") as file:
        entries = json.load(file)["entries"]
    assert len(entries) == 1
    entry = entries[0]
    assert entry["step"] == 2
    assert entry["mode"] == "features"
    assert entry["devices"] == 8
    assert entry["reported"] == "selected_on_holdout"
    assert (entry["num_train_examples"], entry["num_holdout_examples"],
            entry["num_test_examples"]) == (1800, 200, 2000)
    assert entry["feature_dim"] == 32
    assert entry["num_classes"] == 10
    assert entry["learning_rate"] == 0.1
    assert entry["lr_milestones"] == [2, 2]
    assert [record["epoch"] for record in entry["history"]] == [1, 2, 3]
    best = max(entry["history"], key=lambda record: record["holdout_top1"])
    assert entry["epoch"] == best["epoch"]
    assert entry["test_top1"] == best["test_top1"]
    # 10 classes: chance is 10%, with a standard deviation of 0.7% over 2,000 test images.
    assert 0.12 < entry["test_top1"] <= entry["test_top5"] <= 1.0


def test_augmented_mode_leaves_backbone_bit_identical(tiny_run):
    model_config, backbone, variables = linear.load_frozen_backbone(tiny_run)
    before = jax.tree.map(np.copy, variables)
    settings = linear.LinearEvalSettings(mode="augmented", epochs=1, batch_size=20,
                                         max_train_examples=50, max_test_examples=30)
    images = data_lib.load_source("embedded", "test", image_size=28)
    result = linear.linear_evaluation(
        backbone, variables, images, images, settings, mesh=sharding.create_mesh(),
        image_size=28, mean=model_config["mean"], std=model_config["std"], eval_batch_size=12,
    )
    assert result["reported"] == "final_epoch"
    assert result["epoch"] == 1
    assert (result["num_train_examples"], result["num_test_examples"]) == (50, 30)
    assert np.isfinite(result["history"][0]["train_loss"])
    assert 0.0 <= result["test_top1"] <= result["test_top5"] <= 1.0

    # Neither the arrays passed in nor the checkpoint changed, bit for bit.
    _, _, reloaded = linear.load_frozen_backbone(tiny_run)
    for current in (variables, reloaded):
        assert jax.tree.structure(current) == jax.tree.structure(before)
        for old, new in zip(jax.tree.leaves(before), jax.tree.leaves(current)):
            assert old.dtype == new.dtype
            np.testing.assert_array_equal(old, new)
    assert jax.tree.leaves(before["batch_stats"])


@pytest.mark.parametrize("mode", ["features", "augmented"])
def test_normalized_features_have_unit_norm(tiny_run, mode):
    model_config, backbone, variables = linear.load_frozen_backbone(tiny_run)
    images = data_lib.load_source("embedded", "test", image_size=28)
    extract = linear.BackboneFeatures(
        backbone, variables, mesh=sharding.create_mesh(), image_size=28,
        mean=model_config["mean"], std=model_config["std"], batch_size=12, normalize=True,
    )
    features, _ = extract(linear.IndexedSource(images, np.arange(30)))
    np.testing.assert_allclose(np.linalg.norm(features, axis=1), 1.0, rtol=1e-5)

    settings = linear.LinearEvalSettings(mode=mode, epochs=1, batch_size=20, learning_rate=10.0,
                                         max_train_examples=50, max_test_examples=30,
                                         normalize_features=True)
    result = linear.linear_evaluation(
        backbone, variables, images, images, settings, mesh=sharding.create_mesh(),
        image_size=28, mean=model_config["mean"], std=model_config["std"], eval_batch_size=12,
    )
    assert result["normalize_features"] is True
    assert np.isfinite(result["history"][0]["train_loss"])


def test_holdout_larger_than_train_split_fails_before_training(tiny_run):
    settings = linear.LinearEvalSettings(mode="features", holdout=2000)
    with pytest.raises(ValueError, match=r"Invalid holdout=2000: .* 2000 labelled images"):
        linear.run_linear_eval(tiny_run, settings, write=False)


@pytest.mark.parametrize("flags, message", [
    (["--mode=linear"], "Invalid --mode='linear'"),
    (["--epochs=0"], "Invalid --epochs=0"),
    (["--learning_rate=-1"], "Invalid --learning_rate=-1.0"),
    (["--holdout=-5"], "Invalid --holdout=-5"),
    (["--step=7"], "Invalid --step=7: "),
])
def test_cli_rejects_invalid_flags(tiny_run, flags, message):
    result = run_cli("experiments.linear_eval", f"--workdir={tiny_run}", *flags, timeout=60)
    assert result.returncode == 1
    assert len(error_lines(result.stderr)) == 1
    assert message in result.stderr


def test_cli_rejects_workdir_without_run(tmp_path):
    missing = tmp_path / "missing"
    result = run_cli("experiments.linear_eval", f"--workdir={missing}", timeout=60)
    assert result.returncode == 1
    assert f"Invalid --workdir='{missing}': no such directory" in result.stderr

    (tmp_path / "config.json").write_text("{}")
    result = run_cli("experiments.linear_eval", f"--workdir={tmp_path}", timeout=60)
    assert result.returncode == 1
    assert "No checkpoint in" in result.stderr
