"""Validation of a run configuration before anything is loaded or compiled.

Every check raises `ConfigError` with the name of the key, its value, the reason, and values that
would work, so that a mistyped command fails in a second instead of after a compilation.
"""

import json
from collections.abc import Mapping
from typing import Any

from ascl_jax import losses
from ascl_jax import queue as queue_lib
from ascl_jax.models import COMPUTE_DTYPES, MODELS, STEMS

TARGET_VIEWS = ("weak", "strong")

REQUIRED_KEYS = (
    "dataset", "data_dir", "model", "image_size", "kind", "num_neighbors", "tau", "tau_prime",
    "queue_size", "ema_momentum", "batch_size", "learning_rate", "weight_decay", "num_epochs",
    "num_train_steps", "seed", "log_every_steps", "knn_every_epochs", "checkpoint_every_steps",
    "keep_checkpoints",
)


# Keys that a resumed run may change: they set the length of the run, what is logged and
# evaluated, and how checkpoints are kept, but not the state or the batches of the steps done so
# far. A changed num_epochs or num_train_steps moves the end of the cosine schedule, so the steps
# after the resume follow the new schedule. Every other key must equal its value in the checkpoint.
RESUMABLE_KEYS = frozenset({
    "num_epochs", "num_train_steps", "log_every_steps", "knn_every_epochs", "knn_k",
    "knn_temperature", "eval_batch_size", "memory_split", "test_split", "data_dir", "prefetch",
    "checkpoint_every_steps", "keep_checkpoints", "skip_corrupt", "num_devices", "distributed",
})


# Values that keys added after the first release had before they existed, so that a checkpoint
# saved without such a key still resumes under a config that sets it to this value.
IMPLICIT_KEY_VALUES: dict[str, Any] = {"compute_dtype": "float32"}


class ConfigError(ValueError):
    """A configuration value that cannot work, with the reason and a fix."""


def _fail(key: str, value: Any, reason: str, fix: str) -> None:
    raise ConfigError(f"Invalid config.{key}={value!r}: {reason}. {fix}")


def _check_positive(config: Mapping[str, Any], key: str, *, integer: bool) -> None:
    value = config[key]
    kind = int if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind) or value <= 0:
        noun = "integer" if integer else "number"
        _fail(key, value, f"it must be a positive {noun}", f"Set --config.{key} to a value > 0.")


def validate_config(config: Mapping[str, Any], *, num_devices: int = 1) -> None:
    """Check every key that can be checked without data; raise ConfigError on the first problem."""
    missing = [key for key in REQUIRED_KEYS if key not in config]
    if missing:
        raise ConfigError(
            f"The config is missing the keys {missing}. Start from experiments/configs/default.py, "
            "which defines every key."
        )

    dataset = config["dataset"]
    if not isinstance(dataset, str) or not (
        dataset in ("embedded", "folder") or (dataset.startswith("tfds:") and len(dataset) > 5)
    ):
        _fail("dataset", dataset, "unknown dataset",
              'Use "embedded", "folder" (with data_dir) or "tfds:NAME", e.g. "tfds:cifar10".')
    if dataset == "folder" and not config["data_dir"]:
        _fail("data_dir", config["data_dir"], 'dataset="folder" reads its images from data_dir',
              "Set --config.data_dir to a folder with SPLIT/CLASS/*.jpg or SPLIT.tar archives.")
    for key in ("train_split", "memory_split", "test_split"):
        if key in config and not config[key]:
            _fail(key, config[key], "a split name is needed", 'Use e.g. "train" or "test".')

    if config["model"] not in MODELS:
        _fail("model", config["model"], "unknown model", f"Choose one of {MODELS}.")
    if config.get("stem", "cifar") not in STEMS:
        _fail("stem", config["stem"], "unknown stem", f"Choose one of {STEMS}.")
    for key in ("image_size", "batch_size", "queue_size", "num_neighbors", "log_every_steps"):
        _check_positive(config, key, integer=True)
    for key in ("width", "hidden_dim", "projection_dim", "bn_groups", "eval_batch_size", "knn_k"):
        if key in config:
            _check_positive(config, key, integer=True)
    for key in ("tau", "tau_prime", "learning_rate"):
        _check_positive(config, key, integer=False)
    if "knn_temperature" in config:
        _check_positive(config, "knn_temperature", integer=False)

    if config["kind"] not in losses.KINDS:
        _fail("kind", config["kind"], "unknown label rule", f"Choose one of {losses.KINDS}.")
    if config["num_neighbors"] > config["queue_size"]:
        _fail("num_neighbors", config["num_neighbors"],
              f"K cannot exceed the queue size {config['queue_size']}",
              f"Use a value in [1, {config['queue_size']}].")
    compute_dtype = config.get("compute_dtype", "float32")
    if not isinstance(compute_dtype, str) or compute_dtype not in COMPUTE_DTYPES:
        _fail("compute_dtype", compute_dtype, "unknown computation dtype",
              f"Choose one of {tuple(COMPUTE_DTYPES)}; parameters stay float32 in both.")
    if config.get("target_view", "weak") not in TARGET_VIEWS:
        _fail("target_view", config["target_view"], "unknown view", f"Choose one of {TARGET_VIEWS}.")

    momentum = config["ema_momentum"]
    if not 0.0 <= momentum < 1.0:
        _fail("ema_momentum", momentum, "the EMA momentum must lie in [0, 1)",
              "Use 0.99 for small datasets or 0.999 for ImageNet.")
    if config["weight_decay"] < 0:
        _fail("weight_decay", config["weight_decay"], "it must be >= 0", "Use e.g. 5e-4.")
    if "momentum" in config and not 0.0 <= config["momentum"] < 1.0:
        _fail("momentum", config["momentum"], "SGD momentum must lie in [0, 1)", "Use e.g. 0.9.")
    if config.get("warmup_epochs", 0) < 0:
        _fail("warmup_epochs", config["warmup_epochs"], "it must be >= 0", "Use e.g. 5.")

    if config["num_train_steps"] < 0:
        _fail("num_train_steps", config["num_train_steps"], "it must be >= 0",
              "Use 0 to train for num_epochs, or a positive number of steps.")
    if config["num_train_steps"] == 0 and config["num_epochs"] <= 0:
        _fail("num_epochs", config["num_epochs"], "nothing to train",
              "Set --config.num_epochs > 0 or --config.num_train_steps > 0.")
    knn_every_epochs = config["knn_every_epochs"]
    if isinstance(knn_every_epochs, bool) or not isinstance(knn_every_epochs, (int, float)) or (
        knn_every_epochs < 0
    ):
        _fail("knn_every_epochs", knn_every_epochs, "it must be a number >= 0",
              "Use 0 to run the kNN monitor only before and after training.")
    _check_checkpoint_keys(config)
    _check_seed_and_prefetch(config)
    _check_normalization(config)

    batch_size = config["batch_size"]
    try:
        queue_lib.check_queue_size(config["queue_size"], batch_size)
    except ValueError as error:
        raise ConfigError(f"Invalid config.queue_size: {error}") from None
    if batch_size % num_devices:
        lower = max(num_devices, batch_size // num_devices * num_devices)
        _fail("batch_size", batch_size,
              f"the global batch must split evenly over {num_devices} devices",
              f"Use a multiple of {num_devices}, e.g. {lower} or {lower + num_devices}.")
    groups = config.get("bn_groups", 1)
    if batch_size % groups:
        _fail("bn_groups", groups,
              f"the global batch of {batch_size} cannot be split into {groups} equal BN groups",
              "Use a divisor of batch_size (1 gives plain BatchNorm); a group may span devices.")
    eval_batch_size = config.get("eval_batch_size", num_devices)
    if eval_batch_size % num_devices:
        lower = max(num_devices, eval_batch_size // num_devices * num_devices)
        _fail("eval_batch_size", eval_batch_size,
              f"evaluation batches must split evenly over {num_devices} devices",
              f"Use a multiple of {num_devices}, e.g. {lower} or {lower + num_devices}.")


def _check_seed_and_prefetch(config: Mapping[str, Any]) -> None:
    seed = config["seed"]
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        _fail("seed", seed, "it must be an integer >= 0", "Use e.g. 0.")
    prefetch = config.get("prefetch", 0)
    if isinstance(prefetch, bool) or not isinstance(prefetch, int) or prefetch < 0:
        _fail("prefetch", prefetch, "it must be an integer >= 0",
              "Use 0 to load batches in the training thread, or e.g. 2.")


def _check_normalization(config: Mapping[str, Any]) -> None:
    mean, std = tuple(config.get("mean", ())), tuple(config.get("std", ()))
    if bool(mean) != bool(std):
        key, value = ("std", std) if mean else ("mean", mean)
        _fail(key, value, "mean and std are used together",
              "Give both (one value per channel) or leave both empty to use the dataset's values.")
    for key, values in (("mean", mean), ("std", std)):
        for value in values:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                _fail(key, values, f"{value!r} is not a number",
                      "Give one number per channel, e.g. (0.4914, 0.4822, 0.4465).")
    if len(mean) != len(std):
        _fail("std", std, f"it has {len(std)} values but config.mean has {len(mean)}",
              "Give one value per channel in each.")
    if any(value <= 0 for value in std):
        _fail("std", std, "every standard deviation must be > 0",
              "Use the per-channel std of the pixel values in [0, 1], e.g. 0.25.")


def _check_checkpoint_keys(config: Mapping[str, Any]) -> None:
    every = config["checkpoint_every_steps"]
    if isinstance(every, bool) or not isinstance(every, int) or every < 0:
        _fail("checkpoint_every_steps", every, "it must be an integer >= 0",
              "Use 0 to save only at the end of training and on SIGTERM/SIGINT, or e.g. 1000.")
    keep = config["keep_checkpoints"]
    if isinstance(keep, bool) or not isinstance(keep, int) or keep < 1:
        _fail("keep_checkpoints", keep, "at least the newest checkpoint must be kept",
              "Use an integer >= 1; keep 2 or more so that a damaged newest checkpoint has a "
              "fallback.")
    skip_corrupt = config.get("skip_corrupt", False)
    if not isinstance(skip_corrupt, bool):
        _fail("skip_corrupt", skip_corrupt, "it must be a boolean", "Use True or False.")


def check_resume_compatible(
    saved: Mapping[str, Any], config: Mapping[str, Any], *, checkpoint: str
) -> None:
    """Raise ConfigError naming each key outside RESUMABLE_KEYS that differs from `saved`.

    `saved` is the config stored with the checkpoint named by `checkpoint`. Both configs are
    compared as JSON values, so a tuple and a list with equal items are equal. A key present in
    only one of them counts as changed, except that a key of IMPLICIT_KEY_VALUES that is
    missing counts as its value there.
    """
    saved = {**IMPLICIT_KEY_VALUES, **json.loads(json.dumps(dict(saved)))}
    current = {**IMPLICIT_KEY_VALUES, **json.loads(json.dumps(_plain_dict(config)))}
    changes = []
    for key in sorted(set(saved) | set(current)):
        if key in RESUMABLE_KEYS:
            continue
        old = repr(saved[key]) if key in saved else "unset"
        new = repr(current[key]) if key in current else "unset"
        if key not in saved or key not in current or saved[key] != current[key]:
            changes.append(f"{key} (checkpoint {old}, now {new})")
    if changes:
        raise ConfigError(
            f"Cannot resume from the checkpoint {checkpoint}: the config differs in keys that "
            f"the saved state depends on: {'; '.join(changes)}. Rerun with the checkpoint's "
            "values, or give a new --workdir to start a separate run. Only "
            f"{sorted(RESUMABLE_KEYS)} may change on resume."
        )


def _plain_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        return config.to_dict()
    return dict(config)


def check_dataset_size(config: Mapping[str, Any], num_train_examples: int) -> list[str]:
    """Check the config against the training split's size; return warnings, raise on errors."""
    if num_train_examples < config["batch_size"]:
        _fail("batch_size", config["batch_size"],
              f"the training split has only {num_train_examples} examples, fewer than one batch",
              f"Use a batch size <= {num_train_examples}.")
    warnings = []
    if config["queue_size"] > num_train_examples:
        warnings.append(
            f"config.queue_size={config['queue_size']} exceeds the {num_train_examples} training "
            "examples, so the queue holds several keys of the same image."
        )
    return warnings
