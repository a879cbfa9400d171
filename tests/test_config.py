"""Tests of config validation: each rule rejects a bad value with a message naming it."""

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
