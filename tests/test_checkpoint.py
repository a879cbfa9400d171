"""Tests of checkpoints: restore onto other device counts, fallback, atomicity, backbone export."""

import glob
import logging
import os
import subprocess
import sys

import chex
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import serialization
from jax.sharding import Mesh, NamedSharding, PartitionSpec, SingleDeviceSharding

from ascl_jax import checkpoint as checkpoint_lib
from ascl_jax import models
from ascl_jax import train_state as state_lib
from ascl_jax import train_step as step_lib
from experiments import export_backbone
from experiments.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
IMAGE_SHAPE = (8, 8, 1)
MEAN, STD = (0.5,), (0.25,)


def tiny_config():
    config = default.get_config()
    config.update({
        "width": 4, "hidden_dim": 16, "projection_dim": 8, "bn_groups": 1, "batch_size": 8,
        "queue_size": 32, "image_size": IMAGE_SHAPE[0], "warmup_epochs": 0,
    })
    return config


def build(config):
    """Return (model, create_state) for the config, as the trainer builds them."""
    model = models.create_encoder(
        config.model, width=config.width, stem=config.stem, bn_groups=config.bn_groups,
        hidden_dim=config.hidden_dim, projection_dim=config.projection_dim,
    )
    schedule = state_lib.learning_rate_schedule(0.1, warmup_steps=0, total_steps=10)
    tx = state_lib.make_optimizer(schedule, momentum=0.9, weight_decay=5e-4)

    def create_state(rng):
        return state_lib.create_train_state(
            rng, model, image_shape=IMAGE_SHAPE, tx=tx, queue_size=config.queue_size,
            projection_dim=config.projection_dim,
        )

    return model, schedule, create_state


def meta_for(config):
    return {"config": config.to_dict(), "image_shape": list(IMAGE_SHAPE), "mean": list(MEAN),
            "std": list(STD), "next_batch_step": 0}


def data_sharded_queue(state, mesh):
    """Shardings that replicate the state but split the queue rows over the mesh."""
    replicated = NamedSharding(mesh, PartitionSpec())
    shardings = jax.tree.map(lambda _: replicated, state)
    rows = NamedSharding(mesh, PartitionSpec("data"))
    return shardings.replace(queue=shardings.queue._replace(
        keys=NamedSharding(mesh, PartitionSpec("data", None)), labels=rows,
    ))


def assert_trees_equal(actual, expected):
    for left, right in zip(jax.tree.leaves(actual), jax.tree.leaves(expected), strict=True):
        np.testing.assert_array_equal(np.asarray(left), np.asarray(right))


def test_restore_onto_1_and_8_devices(tmp_path):
    assert jax.device_count() >= 8, "tests/conftest.py sets 8 fake CPU devices"
    config = tiny_config()
    model, schedule, create_state = build(config)
    state = create_state(jax.random.PRNGKey(0))
    devices = jax.devices()

    mesh4 = Mesh(np.array(devices[:4]), ("data",))
    state4 = jax.device_put(state, data_sharded_queue(state, mesh4))
    assert len(state4.queue.keys.sharding.device_set) == 4
    manager = checkpoint_lib.open_manager(str(tmp_path))
    assert checkpoint_lib.save_checkpoint(manager, 0, state4, meta_for(config))
    manager.wait_until_finished()

    shapes = jax.eval_shape(create_state, jax.random.PRNGKey(0))
    one_device = SingleDeviceSharding(devices[0])
    restored1 = checkpoint_lib.restore_checkpoint(
        manager, 0, checkpoint_lib.abstract_target(shapes, one_device)
    )
    mesh8 = Mesh(np.array(devices), ("data",))
    shardings8 = data_sharded_queue(state, mesh8)
    restored8 = checkpoint_lib.restore_checkpoint(
        manager, 0, checkpoint_lib.abstract_target(shapes, shardings8)
    )
    manager.close()

    assert_trees_equal(restored1, state)
    assert_trees_equal(restored8, state)
    for leaf in jax.tree.leaves(restored1):
        assert leaf.sharding == one_device
    for leaf, sharding in zip(jax.tree.leaves(restored8), jax.tree.leaves(shardings8)):
        assert leaf.sharding == sharding
    assert restored8.queue.keys.addressable_shards[0].data.shape == (config.queue_size // 8, 8)

    # The next step's loss is the same whichever device count the state was restored onto.
    # The restored arrays equal the saved ones (checked above), so one compilation per device
    # count suffices; each takes about 15 s on 2 CPU cores.
    step = jax.jit(step_lib.make_train_step(config, model, schedule, mean=MEAN, std=STD))
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (config.batch_size, *IMAGE_SHAPE), dtype=np.uint8)
    labels = rng.integers(0, 10, (config.batch_size,), dtype=np.int32)
    _, metrics1 = step(restored1, jax.device_put(images, one_device),
                       jax.device_put(labels, one_device))
    replicated8 = NamedSharding(mesh8, PartitionSpec())
    _, metrics8 = step(restored8, jax.device_put(images, replicated8),
                       jax.device_put(labels, replicated8))
    loss1, loss8 = float(metrics1["loss"]), float(metrics8["loss"])
    assert np.isfinite(loss1)
    np.testing.assert_allclose(loss8, loss1, rtol=1e-5)


def save_two_steps(workdir):
    """Save steps 1 and 2 of a small pytree; return the two states."""
    states = {step: {"w": jnp.full((64, 64), float(step)), "b": jnp.arange(5) + step}
              for step in (1, 2)}
    manager = checkpoint_lib.open_manager(workdir)
    for step, state in states.items():
        checkpoint_lib.save_checkpoint(manager, step, state, {"next_batch_step": step})
    manager.wait_until_finished()
    manager.close()
    return states


def target_of(state):
    return checkpoint_lib.abstract_target(state, SingleDeviceSharding(jax.devices()[0]))


def largest_data_file(step_dir):
    files = glob.glob(os.path.join(step_dir, "state", "**", "d", "*"), recursive=True)
    return max(files, key=os.path.getsize)


# NOTE: after a failed read, orbax-checkpoint 0.12.8 can leave TensorStore callbacks that fire on
# its closed asyncio loop; Python reports them as unraisable "Event loop is closed" errors.
@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")
@pytest.mark.parametrize(
    "damage",
    ["truncate_data", "delete_data", "truncate_tree_metadata", "delete_meta"],
)
def test_unreadable_newest_falls_back_with_warning(tmp_path, caplog, damage):
    workdir = str(tmp_path)
    states = save_two_steps(workdir)
    newest = os.path.join(checkpoint_lib.checkpoint_dir(workdir), "2")
    if damage.endswith("data"):
        path = largest_data_file(newest)
    elif damage == "truncate_tree_metadata":
        path = os.path.join(newest, "state", "_METADATA")
    else:
        path = os.path.join(newest, "meta", "metadata")
    if damage.startswith("truncate"):
        with open(path, "r+b") as file:
            file.truncate(os.path.getsize(path) // 2)
    else:
        os.remove(path)

    manager = checkpoint_lib.open_manager(workdir)
    with caplog.at_level(logging.WARNING, logger="ascl_jax"):
        restored = checkpoint_lib.restore_latest(manager, target_of(states[1]))
    assert restored.step == 1
    assert_trees_equal(restored.state, states[1])
    assert f"Cannot restore the checkpoint {newest} " in caplog.text
    assert "falling back to the previous one" in caplog.text

    # The damaged checkpoint is moved aside, so the resumed run can save step 2 again.
    assert os.path.isdir(os.path.join(workdir, checkpoint_lib.UNREADABLE_DIR, "2"))
    assert manager.all_steps() == [1]
    assert checkpoint_lib.save_checkpoint(manager, 2, states[2], {"next_batch_step": 2})
    manager.wait_until_finished()
    again = checkpoint_lib.restore_latest(manager, target_of(states[2]))
    manager.close()
    assert again.step == 2
    assert_trees_equal(again.state, states[2])


def test_no_readable_checkpoint_names_each(tmp_path):
    workdir = str(tmp_path)
    states = save_two_steps(workdir)
    for step in (1, 2):
        os.remove(os.path.join(checkpoint_lib.checkpoint_dir(workdir), str(step), "meta",
                               "metadata"))
    manager = checkpoint_lib.open_manager(workdir)
    with pytest.raises(checkpoint_lib.CheckpointError) as error:
        checkpoint_lib.restore_latest(manager, target_of(states[1]))
    manager.close()
    for step in (1, 2):
        assert os.path.join(checkpoint_lib.checkpoint_dir(workdir), str(step)) in str(error.value)


def test_interrupted_save_is_ignored_and_removed(tmp_path):
    workdir = str(tmp_path)
    states = save_two_steps(workdir)
    # What a save killed before orbax's final rename leaves behind.
    partial = os.path.join(checkpoint_lib.checkpoint_dir(workdir), "3.orbax-checkpoint-tmp")
    os.makedirs(os.path.join(partial, "state"))
    with open(os.path.join(partial, "state", "_METADATA"), "w") as file:
        file.write("{")

    manager = checkpoint_lib.open_manager(workdir)
    assert manager.all_steps() == [1, 2]
    restored = checkpoint_lib.restore_latest(manager, target_of(states[2]))
    # Opening a manager for writing deletes the partial checkpoint in the background.
    manager.wait_until_finished()
    manager.close()
    assert restored.step == 2
    assert not os.path.exists(partial)


def test_existing_step_is_not_saved_again(tmp_path):
    workdir = str(tmp_path)
    states = save_two_steps(workdir)
    manager = checkpoint_lib.open_manager(workdir)
    assert not checkpoint_lib.save_checkpoint(manager, 2, states[1], {"next_batch_step": 2})
    manager.wait_until_finished()
    restored = checkpoint_lib.restore_latest(manager, target_of(states[2]))
    manager.close()
    assert_trees_equal(restored.state, states[2])


def test_keep_checkpoints_deletes_oldest(tmp_path):
    workdir = str(tmp_path)
    manager = checkpoint_lib.open_manager(workdir, max_to_keep=2)
    for step in (1, 2, 3):
        checkpoint_lib.save_checkpoint(
            manager, step, {"w": jnp.zeros(3)}, {"next_batch_step": step}
        )
    manager.wait_until_finished()
    manager.close()
    assert sorted(os.listdir(checkpoint_lib.checkpoint_dir(workdir))) == ["2", "3"]


@pytest.fixture(name="saved_state")
def fixture_saved_state(tmp_path):
    """A workdir with the state of a tiny config saved at step 0."""
    config = tiny_config()
    model, _, create_state = build(config)
    state = create_state(jax.random.PRNGKey(1))
    # Running statistics that differ from their initial values show that they are exported.
    state = state.replace(batch_stats=jax.tree.map(lambda x: x + 0.5, state.batch_stats))
    workdir = str(tmp_path / "run")
    manager = checkpoint_lib.open_manager(workdir)
    checkpoint_lib.save_checkpoint(manager, 0, state, meta_for(config))
    manager.wait_until_finished()
    manager.close()
    return workdir, config, model, state


def test_load_backbone_reproduces_features(saved_state):
    workdir, config, model, state = saved_state
    model_config, params, batch_stats = checkpoint_lib.load_backbone(workdir)

    assert model_config["model"] == "resnet10"
    assert model_config["width"] == 4
    assert model_config["channels"] == 1
    assert model_config["mean"] == list(MEAN)
    assert model_config["step"] == 0
    assert model_config["feature_dim"] == 8 * 4
    assert isinstance(jax.tree.leaves(params)[0], np.ndarray)
    chex.assert_trees_all_equal(params, jax.device_get(state.params["backbone"]))
    chex.assert_trees_all_equal(batch_stats, jax.device_get(state.batch_stats["backbone"]))

    images = jax.random.normal(jax.random.PRNGKey(2), (3, *IMAGE_SHAPE))
    expected, _ = model.apply({"params": state.params, "batch_stats": state.batch_stats},
                              images, train=False)
    backbone = models.resnet(model_config["model"], width=model_config["width"],
                             stem=model_config["stem"])
    features = backbone.apply({"params": params, "batch_stats": batch_stats}, images, train=False)
    assert features.shape == (3, model_config["feature_dim"])
    np.testing.assert_allclose(features, expected, rtol=1e-6, atol=1e-6)


def test_load_backbone_missing_step_lists_saved(saved_state):
    workdir = saved_state[0]
    with pytest.raises(checkpoint_lib.CheckpointError, match=r"step 7 .*saved steps are \[0\]"):
        checkpoint_lib.load_backbone(workdir, step=7)


def test_load_backbone_without_checkpoints(tmp_path):
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "empty")):
        checkpoint_lib.load_backbone(str(tmp_path / "empty"))


def test_export_npz_round_trip(saved_state, tmp_path):
    workdir, _, _, state = saved_state
    output = str(tmp_path / "out" / "backbone.npz")
    export_backbone.export_backbone(workdir, output)
    archive = np.load(output)
    kernel = state.params["backbone"]["stem"]["conv"]["kernel"]
    np.testing.assert_array_equal(archive["params/stem/conv/kernel"], kernel)
    np.testing.assert_array_equal(archive["batch_stats/stem/bn/mean"],
                                  state.batch_stats["backbone"]["stem"]["bn"]["mean"])
    assert '"model": "resnet10"' in str(archive["model_config"])


def test_export_cli_writes_msgpack(saved_state, tmp_path):
    workdir, _, _, state = saved_state
    output = tmp_path / "backbone.msgpack"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.export_backbone", f"--workdir={workdir}",
         f"--output={output}"],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
        env=dict(os.environ, PYTHONPATH=ROOT),
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "step 0" in result.stdout
    restored = serialization.msgpack_restore(output.read_bytes())
    assert restored["model_config"]["width"] == 4
    chex.assert_trees_all_equal(restored["params"], jax.device_get(state.params["backbone"]))
    chex.assert_trees_all_equal(restored["batch_stats"],
                                jax.device_get(state.batch_stats["backbone"]))
