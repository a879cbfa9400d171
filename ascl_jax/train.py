"""The pretraining loop: data, state, jitted step, kNN monitor, metrics.

`train_and_evaluate(config, workdir)` is the library entry point that `experiments/pretrain.py`
calls. The loop reads as the list of its steps: validate, load data, build the state, evaluate at
step 0, train with periodic logging and kNN evaluation, evaluate at the end.
"""

import dataclasses
import json
import logging
import math
import os
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import tqdm

from ascl_jax import config as config_lib
from ascl_jax import data as data_lib
from ascl_jax import models
from ascl_jax import train_state as state_lib
from ascl_jax import train_step as step_lib
from ascl_jax.data import pipeline
from ascl_jax.evaluation import knn

logger = logging.getLogger("ascl_jax")


class MetricWriter:
    """Appends one JSON object per line to `WORKDIR/metrics.jsonl`, flushed after every line."""

    def __init__(self, workdir: str):
        self.path = os.path.join(workdir, "metrics.jsonl")
        self._file = open(self.path, "a", encoding="utf-8")

    def write(self, record: Mapping[str, Any]) -> None:
        """Write `record`, converting numpy and JAX scalars to Python numbers."""
        clean = {key: _to_python(value) for key, value in record.items()}
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()

    def close(self) -> None:
        self._file.close()


def _to_python(value: Any) -> Any:
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        value = np.asarray(value).item()
    return value


@dataclasses.dataclass(frozen=True)
class RunData:
    """The three splits a run reads and the normalisation of its images."""

    train: data_lib.ImageSource
    memory: data_lib.ImageSource
    test: data_lib.ImageSource
    mean: tuple[float, ...]
    std: tuple[float, ...]


def load_run_data(config: Mapping[str, Any]) -> RunData:
    """Load the pretraining, kNN memory and kNN test splits and resolve the normalisation."""
    load = lambda split: data_lib.load_source(  # noqa: E731
        config["dataset"], split, data_dir=config["data_dir"], image_size=config["image_size"]
    )
    train = load(config["train_split"])
    memory = train if config["memory_split"] == config["train_split"] else load(config["memory_split"])
    test = load(config["test_split"])
    if config["mean"] and config["std"]:
        mean, std = tuple(config["mean"]), tuple(config["std"])
    else:
        mean, std = data_lib.normalization_stats(config["dataset"], train)
    channels = train.image_shape[-1]
    if len(mean) != channels or len(std) != channels:
        raise config_lib.ConfigError(
            f"Invalid config.mean={mean!r} / config.std={std!r}: the images have {channels} "
            f"channels. Give {channels} values each, or leave both empty to use the dataset's."
        )
    for name, source in (("memory_split", memory), ("test_split", test)):
        if source.class_names != train.class_names:
            raise config_lib.ConfigError(
                f"Invalid config.{name}={config[name]!r}: its classes {source.class_names[:5]}... "
                f"differ from those of the training split {train.class_names[:5]}..."
            )
    return RunData(train=train, memory=memory, test=test, mean=mean, std=std)


def num_train_steps(config: Mapping[str, Any], steps_per_epoch: int) -> int:
    """Return num_train_steps when set, else num_epochs whole epochs."""
    if config["num_train_steps"] > 0:
        return int(config["num_train_steps"])
    return int(config["num_epochs"] * steps_per_epoch)


def knn_top1(
    feature_fn, state: state_lib.TrainState, run_data: RunData, config: Mapping[str, Any]
) -> float:
    """Return the kNN top-1 accuracy of the online backbone on the test split."""

    def features_of(source: data_lib.ImageSource) -> tuple[np.ndarray, np.ndarray]:
        chunks, labels = [], []
        for images, batch_labels, mask in pipeline.eval_batches(
            source, batch_size=config["eval_batch_size"]
        ):
            features = np.asarray(feature_fn(state, images))
            chunks.append(features[mask])
            labels.append(batch_labels[mask])
        return np.concatenate(chunks), np.concatenate(labels)

    bank, bank_labels = features_of(run_data.memory)
    labelled = bank_labels >= 0
    queries, query_labels = features_of(run_data.test)
    return knn.knn_accuracy(
        jnp.asarray(bank[labelled]),
        jnp.asarray(bank_labels[labelled]),
        jnp.asarray(queries),
        jnp.asarray(query_labels),
        num_classes=run_data.train.num_classes,
        k=min(config["knn_k"], int(labelled.sum())),
        temperature=config["knn_temperature"],
    )


def _batches_to_device(batches: Iterator[pipeline.Batch]) -> Iterator[tuple[pipeline.Batch, Any]]:
    for batch in batches:
        yield batch, (jax.device_put(batch.images), jax.device_put(batch.labels))


def train_and_evaluate(config: Mapping[str, Any], workdir: str) -> dict[str, float]:
    """Run ASCL pretraining as `config` describes, writing logs and metrics into `workdir`.

    Returns a summary with the kNN top-1 before and after training and the wall time.
    """
    start_time = time.time()
    config_lib.validate_config(config)
    try:
        os.makedirs(workdir, exist_ok=True)
        with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as file:
            json.dump(_config_dict(config), file, indent=2, sort_keys=True)
    except OSError as error:
        raise config_lib.ConfigError(
            f"Invalid --workdir={workdir!r}: cannot write there ({error.strerror}). "
            "Choose a directory you can write to."
        ) from error

    # Data.
    run_data = load_run_data(config)
    for warning in config_lib.check_dataset_size(config, len(run_data.train)):
        logger.warning(warning)
    steps_per_epoch = pipeline.steps_per_epoch(len(run_data.train), config["batch_size"])
    total_steps = num_train_steps(config, steps_per_epoch)
    logger.info(
        "Training on %d images of %s (%s), %d steps of %d images, %d steps per epoch.",
        len(run_data.train), config["dataset"], config["train_split"], total_steps,
        config["batch_size"], steps_per_epoch,
    )

    # Model, optimiser and state.
    model = models.create_encoder(
        config["model"],
        width=config["width"],
        stem=config["stem"],
        bn_groups=config["bn_groups"],
        hidden_dim=config["hidden_dim"],
        projection_dim=config["projection_dim"],
    )
    schedule = state_lib.learning_rate_schedule(
        config["learning_rate"],
        warmup_steps=int(round(config["warmup_epochs"] * steps_per_epoch)),
        total_steps=total_steps,
    )
    tx = state_lib.make_optimizer(
        schedule, momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    channels = run_data.train.image_shape[-1]
    state = state_lib.create_train_state(
        jax.random.PRNGKey(config["seed"]),
        model,
        image_shape=(config["image_size"], config["image_size"], channels),
        tx=tx,
        queue_size=config["queue_size"],
        projection_dim=config["projection_dim"],
    )
    train_step = jax.jit(
        step_lib.make_train_step(config, model, schedule, mean=run_data.mean, std=run_data.std),
        donate_argnums=0,
    )
    feature_fn = jax.jit(
        step_lib.make_feature_fn(
            model, image_size=config["image_size"], mean=run_data.mean, std=run_data.std
        )
    )

    writer = MetricWriter(workdir)
    try:
        summary = _train_loop(
            config, state, train_step, feature_fn, run_data, writer,
            steps_per_epoch=steps_per_epoch, total_steps=total_steps,
        )
    finally:
        writer.close()
    summary["wall_time_s"] = time.time() - start_time
    logger.info(
        "kNN top-1: %.2f%% at step 0, %.2f%% after %d steps (%.0f s in all).",
        100 * summary["knn_top1_initial"], 100 * summary["knn_top1_final"], total_steps,
        summary["wall_time_s"],
    )
    return summary


def _train_loop(
    config, state, train_step, feature_fn, run_data, writer, *, steps_per_epoch, total_steps
) -> dict[str, float]:
    """Train for `total_steps`, logging every `log_every_steps` and evaluating kNN per schedule."""
    batch_size = config["batch_size"]
    knn_every_steps = config["knn_every_epochs"] * steps_per_epoch

    def evaluate(step: int, state: state_lib.TrainState) -> float:
        started = time.time()
        top1 = knn_top1(feature_fn, state, run_data, config)
        writer.write({"step": step, "epoch": step / steps_per_epoch, "knn_top1": top1,
                      "knn_seconds": time.time() - started})
        logger.info("step %d: kNN top-1 %.2f%% (%.1f s)", step, 100 * top1, time.time() - started)
        return top1

    initial_top1 = evaluate(0, state)
    final_top1 = initial_top1
    batches = pipeline.train_batches(
        run_data.train, batch_size=batch_size, seed=config["seed"], start_step=0,
        num_steps=total_steps, prefetch=config["prefetch"],
    )
    progress = tqdm.tqdm(
        total=total_steps * batch_size, unit="img", unit_scale=True, dynamic_ncols=True,
        desc="pretrain", disable=None,
    )
    window_start, window_images = time.time(), 0
    try:
        for batch, (images, labels) in _batches_to_device(batches):
            step = batch.step + 1
            if step == 1:
                logger.info("Compiling the train step; the first step takes longer.")
                compile_start = time.time()
            state, metrics = train_step(state, images, labels)
            if step == 1:
                jax.block_until_ready(metrics)
                writer.write({"step": 1, "compile_seconds": time.time() - compile_start})
                window_start, window_images = time.time(), 0
            else:
                window_images += batch_size
            progress.update(batch_size)

            if step % config["log_every_steps"] == 0 or step == total_steps:
                metrics = jax.device_get(metrics)
                if not math.isfinite(float(metrics["loss"])):
                    raise FloatingPointError(
                        f"The loss became {metrics['loss']} at step {step}; stopping."
                    )
                elapsed = time.time() - window_start
                record = {"step": step, "epoch": step / steps_per_epoch, **metrics}
                if window_images and elapsed > 0:
                    record["images_per_second"] = window_images / elapsed
                writer.write(record)
                progress.set_postfix(loss=f"{float(metrics['loss']):.3f}",
                                     c=f"{float(metrics['confidence']):.3f}")
                window_start, window_images = time.time(), 0

            if knn_every_steps and step % knn_every_steps == 0 and step != total_steps:
                final_top1 = evaluate(step, state)
                window_start, window_images = time.time(), 0
    finally:
        progress.close()
        batches.close()

    final_top1 = evaluate(total_steps, state)
    return {"knn_top1_initial": initial_top1, "knn_top1_final": final_top1, "steps": total_steps}


def _config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {key: list(value) if isinstance(value, Sequence) and not isinstance(value, str)
            else value for key, value in dict(config).items()}
