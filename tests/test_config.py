"""Tests of config validation: each rule rejects a bad value with a message naming it."""

import logging

import numpy as np
import pytest

from ascl_jax import config as config_lib
from experiments.configs import cifar10, cifar100, default, imagenet, stl10


def make_config(**overrides):
    config = default.get_config()
    for key, value in overrides.items():
        config[key] = value
    return config


@pytest.mark.parametrize("module", [default, cifar10, cifar100, stl10, imagenet])
def test_shipped_configs_are_valid(module):
    config_lib.validate_config(module.get_config())


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"kind": "soft"}, r"config.kind='soft'.*'normal', 'hard', 'ahcl', 'ascl'"),
        ({"num_neighbors": 0}, r"config.num_neighbors=0.*> 0"),
        ({"num_neighbors": 5000}, r"config.num_neighbors=5000.*\[1, 4096\]"),
        ({"tau": 0.0}, r"config.tau=0.0"),
        ({"tau_prime": -0.05}, r"config.tau_prime=-0.05"),
        ({"queue_size": 1000}, r"queue_size=1000.*batch_size=256.*768 or 1024"),
        ({"ema_momentum": 1.0}, r"config.ema_momentum=1.0.*\[0, 1\)"),
        ({"model": "vit"}, r"config.model='vit'.*resnet18"),
        ({"stem": "big"}, r"config.stem='big'"),
        ({"image_size": 0}, r"config.image_size=0"),
        ({"batch_size": 0}, r"config.batch_size=0"),
        ({"bn_groups": 3}, r"config.bn_groups=3.*batch of 256"),
        ({"dataset": "cifar10"}, r"config.dataset='cifar10'.*tfds:NAME"),
        ({"dataset": "folder"}, r"config.data_dir=''.*SPLIT/CLASS"),
        ({"num_epochs": 0}, r"config.num_epochs=0"),
        ({"num_train_steps": -1}, r"config.num_train_steps=-1"),
        ({"target_view": "medium"}, r"config.target_view='medium'"),
        ({"weight_decay": -1.0}, r"config.weight_decay=-1.0"),
        ({"learning_rate": 0}, r"config.learning_rate=0"),
        ({"test_split": ""}, r"config.test_split=''"),
        ({"seed": -1}, r"config.seed=-1.*>= 0"),
        ({"prefetch": -2}, r"config.prefetch=-2.*>= 0"),
        ({"mean": (0.5,)}, r"config.std=\(\).*Give both"),
        ({"mean": (0.5,), "std": (0.0,)}, r"config.std=\(0.0,\).*> 0"),
        ({"mean": ("abc",), "std": (0.5,)}, r"config.mean=\('abc',\).*not a number"),
        ({"mean": (0.5, 0.5), "std": (0.5,)}, r"config.std=\(0.5,\).*has 2"),
    ],
)
def test_validation_names_bad_value(overrides, message):
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate_config(make_config(**overrides))


def test_batch_must_split_over_devices():
    config = make_config(batch_size=252, queue_size=252 * 4, bn_groups=1)
    with pytest.raises(config_lib.ConfigError, match=r"batch_size=252.*8 devices.*248 or 256"):
        config_lib.validate_config(config, num_devices=8)


def test_missing_keys_are_listed():
    config = default.get_config().to_dict()
    del config["tau"]
    with pytest.raises(config_lib.ConfigError, match=r"\['tau'\]"):
        config_lib.validate_config(config)


def test_dataset_smaller_than_batch_fails():
    with pytest.raises(config_lib.ConfigError, match=r"only 100 examples"):
        config_lib.check_dataset_size(make_config(), 100)


def test_queue_larger_than_dataset_warns():
    warnings = config_lib.check_dataset_size(make_config(), 3000)
    assert len(warnings) == 1
    assert "queue_size=4096" in warnings[0]


@pytest.mark.parametrize(
    "overrides,message",
    [
        ({"image_size": None}, r"config.image_size=None.*positive integer"),
        ({"train_split": ""}, r"config.train_split=''"),
        ({"memory_split": ""}, r"config.memory_split=''"),
        ({"knn_every_epochs": -1.0}, r"config.knn_every_epochs=-1.0.*>= 0"),
        ({"checkpoint_every_steps": -5}, r"config.checkpoint_every_steps=-5.*integer >= 0"),
        ({"checkpoint_every_steps": 2.5}, r"config.checkpoint_every_steps=2.5"),
        ({"keep_checkpoints": 0}, r"config.keep_checkpoints=0.*>= 1"),
        ({"skip_corrupt": "yes"}, r"config.skip_corrupt='yes'.*True or False"),
    ],
)
def test_validation_names_bad_input_and_checkpoint_keys(overrides, message):
    # A plain dict, because ConfigDict itself rejects some of these types.
    config = default.get_config().to_dict()
    config.update(overrides)
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.validate_config(config)


def test_fractional_knn_interval_is_valid():
    config_lib.validate_config(make_config(knn_every_epochs=0.5))


def test_resume_allows_run_length_and_monitoring_changes():
    saved = default.get_config().to_dict()
    changed = make_config(num_epochs=30, knn_every_epochs=1.0, log_every_steps=50,
                          checkpoint_every_steps=10, keep_checkpoints=5, eval_batch_size=64)
    config_lib.check_resume_compatible(saved, changed, checkpoint="ckpt/100")


def test_resume_names_every_conflicting_key():
    saved = default.get_config().to_dict()
    changed = make_config(model="resnet18", width=32, queue_size=8192, num_epochs=30)
    with pytest.raises(config_lib.ConfigError) as error:
        config_lib.check_resume_compatible(saved, changed, checkpoint="ckpt/100")
    message = str(error.value)
    assert "ckpt/100" in message
    assert "model (checkpoint 'resnet10', now 'resnet18')" in message
    assert "width (checkpoint 16, now 32)" in message
    assert "queue_size (checkpoint 4096, now 8192)" in message
    assert "num_epochs" not in message.split("Only")[0]


def test_resume_compares_tuples_with_saved_lists():
    saved = make_config(mean=(0.5,), std=(0.25,)).to_dict()
    saved["mean"], saved["std"] = [0.5], [0.25]
    config_lib.check_resume_compatible(saved, make_config(mean=(0.5,), std=(0.25,)),
                                       checkpoint="ckpt/1")


def test_resume_treats_missing_key_as_changed():
    saved = default.get_config().to_dict()
    del saved["projection_dim"]
    message = r"projection_dim \(checkpoint unset, now 128\)"
    with pytest.raises(config_lib.ConfigError, match=message):
        config_lib.check_resume_compatible(saved, make_config(), checkpoint="ckpt/1")


def write_png_folder(root, split):
    """Write SPLIT/{a,b}/*.png with two 8x8 grey images per class and return the split folder."""
    from PIL import Image

    for label, name in enumerate(("a", "b")):
        folder = root / split / name
        folder.mkdir(parents=True)
        for index in range(2):
            pixels = np.full((8, 8), 40 * label + 10 * index, np.uint8)
            Image.fromarray(pixels).save(folder / f"{index}.png")
    return root / split


@pytest.fixture(name="corrupt_folder")
def fixture_corrupt_folder(tmp_path, monkeypatch):
    monkeypatch.setenv("ASCL_JAX_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "images"
    train_dir = write_png_folder(root, "train")
    write_png_folder(root, "test")
    broken = train_dir / "a" / "broken.png"
    broken.write_bytes(b"\x89PNG but not really")
    config = make_config(dataset="folder", data_dir=str(root), image_size=8, mean=(0.5,),
                         std=(0.25,))
    return config, broken


def test_corrupt_image_fails_with_its_path(corrupt_folder):
    from ascl_jax import train
    from ascl_jax.data import ImageDecodeError

    config, broken = corrupt_folder
    with pytest.raises(ImageDecodeError, match=str(broken)):
        train.load_run_data(config)


def test_skip_corrupt_skips_and_counts(corrupt_folder, caplog):
    from ascl_jax import train

    config, broken = corrupt_folder
    config.skip_corrupt = True
    with caplog.at_level(logging.WARNING):
        run_data = train.load_run_data(config)
    assert len(run_data.train) == 4
    assert "Skipped 1 undecodable images" in caplog.text
    assert str(broken) in caplog.text


def test_unwritable_checkpoint_dir_fails_before_loading(tmp_path):
    from ascl_jax import train

    (tmp_path / "checkpoints").write_text("a file where the checkpoint directory goes")
    with pytest.raises(config_lib.ConfigError, match=r"Invalid --workdir=.*cannot write"):
        train.train_and_evaluate(make_config(), str(tmp_path))
