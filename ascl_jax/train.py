"""The pretraining loop: data, state, jitted step, kNN monitor, metrics, checkpoints.

`train_and_evaluate(config, workdir)` is the library entry point that `experiments/pretrain.py`
calls. The loop reads as the list of its steps. It validates the config and checks it against
the workdir's checkpoints, loads the data, and restores or builds the state. Then it evaluates at
step 0, trains with periodic logging, kNN evaluation and checkpoints, evaluates at the end and
saves the last checkpoint.

Resuming. Rerunning the same command with the same workdir restores the newest checkpoint that
reads and continues from its step. The data order, the augmentation keys and the schedule are
all functions of the seed and the step. So the steps after a resume compute what an
uninterrupted run computes. Every line of
`metrics.jsonl` for step s is written before the checkpoint of step s is saved, and a resumed run
first removes the lines after its checkpoint's step, so the file reads as one uninterrupted run.
"""

import dataclasses
import json
import logging
import math
import os
import signal
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import tqdm

from ascl_jax import checkpoint as checkpoint_lib
from ascl_jax import config as config_lib
from ascl_jax import data as data_lib
from ascl_jax import models
from ascl_jax import sharding
from ascl_jax import summary
from ascl_jax import train_state as state_lib
from ascl_jax import train_step as step_lib
from ascl_jax.data import pipeline
from ascl_jax.evaluation import knn

logger = logging.getLogger("ascl_jax")

METRICS_FILE = "metrics.jsonl"


# Metrics file.


class MetricWriter:
    """Appends one JSON object per line to `WORKDIR/metrics.jsonl`, flushed after every line.

    The same numbers go to TensorBoard event files in `WORKDIR/tensorboard`; `previous_records`,
    the lines kept from an earlier process, are written there again first (see `summary`).

    With `enabled=False`, as on every process but the first of a multi-process run, it writes
    nothing.
    """

    def __init__(
        self, workdir: str, *, enabled: bool = True,
        previous_records: Sequence[Mapping[str, Any]] = (),
    ):
        self.path = os.path.join(workdir, METRICS_FILE)
        self._file = open(self.path, "a", encoding="utf-8") if enabled else None
        self._events = None
        if enabled:
            self._events = summary.EventWriter(
                os.path.join(workdir, summary.TENSORBOARD_DIR), previous_records
            )

    def write(self, record: Mapping[str, Any]) -> None:
        """Write `record`, converting numpy and JAX scalars to Python numbers."""
        if self._file is None:
            return
        clean = {key: _to_python(value) for key, value in record.items()}
        self._file.write(json.dumps(clean, sort_keys=True) + "\n")
        self._file.flush()
        self._events.write(clean)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._events.close()


def _to_python(value: Any) -> Any:
    if isinstance(value, (jax.Array, np.ndarray, np.generic)):
        value = np.asarray(value).item()
    return value


def truncate_metrics(path: str, last_step: int) -> list[dict[str, Any]]:
    """Remove the lines of a metrics file after `last_step`; return the records kept.

    A run killed after its last checkpoint has written lines that the resumed run writes again.
    Those lines are removed, and so is a line that the kill cut off, which does not parse.
    `last_step=-1` empties the file. The file is replaced atomically, so a kill during this call
    leaves the old file.
    """
    if not os.path.exists(path):
        return []
    kept_lines, kept_records, removed = [], [], 0
    with open(path, encoding="utf-8") as file:
        for line in file:
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                removed += 1
                continue
            step = record.get("step") if isinstance(record, dict) else None
            if not isinstance(step, int) or step > last_step:
                removed += 1
                continue
            kept_lines.append(line.rstrip("\n") + "\n")
            kept_records.append(record)
    if removed:
        temporary = path + ".tmp"
        with open(temporary, "w", encoding="utf-8") as file:
            file.writelines(kept_lines)
        os.replace(temporary, path)
        logger.warning("Removed %d lines after step %d from %s; this run writes them again.",
                       removed, last_step, path)
    return kept_records


# Ways a run stops early.


class NonFiniteError(FloatingPointError):
    """The loss or the parameters became NaN or infinite; the message gives the step."""


class TrainingInterrupted(Exception):
    """SIGTERM or SIGINT stopped training after a checkpoint of the current step was saved.

    Attributes:
        step: the step of the saved checkpoint.
        signal_number: the signal received.
    """

    def __init__(self, message: str, *, step: int, signal_number: int):
        super().__init__(message)
        self.step = step
        self.signal_number = signal_number


class StopSignals:
    """Context manager that turns SIGTERM and SIGINT into a stop request checked between steps.

    The handler only records the signal, so the current step finishes and the loop saves a
    checkpoint before it stops. A second SIGINT raises KeyboardInterrupt at once, for a user who
    does not want to wait; the atomic saves keep the existing checkpoints intact. Outside the
    main thread, where Python cannot install handlers, nothing is installed.
    """

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self) -> None:
        self.received: int | None = None
        self._previous: dict[int, Any] = {}

    @property
    def requested(self) -> bool:
        """Whether a stop signal arrived."""
        return self.received is not None

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for number in self.SIGNALS:
                self._previous[number] = signal.signal(number, self._handle)
        return self

    def __exit__(self, *exc_info: object) -> None:
        for number, handler in self._previous.items():
            signal.signal(number, handler)
        self._previous.clear()

    def _handle(self, number: int, frame: Any) -> None:
        # Logging here could deadlock on the logging lock held by the interrupted code, so the
        # loop reports the signal.
        if self.received == signal.SIGINT and number == signal.SIGINT:
            raise KeyboardInterrupt
        if self.received is None:
            self.received = number


class FiniteGuard:
    """Detector of the first step whose loss or parameter norm is NaN or infinite.

    The metrics of every step are kept on the device and fetched together at `check`, so the
    loop does not wait for the device after each step, yet the error names the exact step.
    """

    def __init__(self) -> None:
        self._pending: list[tuple[int, Mapping[str, jax.Array]]] = []
        # (step, metrics) of the newest step known to be finite.
        self.last_finite: tuple[int, dict[str, float]] | None = None

    def add(self, step: int, metrics: Mapping[str, jax.Array]) -> None:
        """Remember the metrics of `step` for the next check."""
        self._pending.append((step, metrics))

    def check(self) -> tuple[int, dict[str, float]] | None:
        """Return (step, values) of the first non-finite step since the last check, or None."""
        if not self._pending:
            return None
        # Every train step reports its loss. The parameter norm is checked where it is reported.
        watched = []
        for _, metrics in self._pending:
            values = {"loss": metrics["loss"]}
            if "param_norm" in metrics:
                values["param_norm"] = metrics["param_norm"]
            watched.append(values)
        for index, values in enumerate(jax.device_get(watched)):
            if all(math.isfinite(float(value)) for value in values.values()):
                continue
            if index:
                step, metrics = self._pending[index - 1]
                self.last_finite = (step, _fetch(metrics))
            bad_step = self._pending[index][0]
            self._pending.clear()
            return bad_step, {key: float(value) for key, value in values.items()}
        step, metrics = self._pending[-1]
        self.last_finite = (step, _fetch(metrics))
        self._pending.clear()
        return None


def _fetch(metrics: Mapping[str, jax.Array]) -> dict[str, float]:
    return {key: _to_python(value) for key, value in jax.device_get(dict(metrics)).items()}


# Data and evaluation.


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
        config["dataset"], split, data_dir=config["data_dir"], image_size=config["image_size"],
        skip_corrupt=config.get("skip_corrupt", False),
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
            only_here = sorted(set(source.class_names) - set(train.class_names))
            only_train = sorted(set(train.class_names) - set(source.class_names))
            raise config_lib.ConfigError(
                f"Invalid config.{name}={config[name]!r}: its {len(source.class_names)} classes "
                f"differ from the {len(train.class_names)} of config.train_split="
                f"{config['train_split']!r} (only in {name}: {only_here}; only in train_split: "
                f"{only_train}; the same names in another order count as different). Every "
                "class folder counts, empty ones included, so give both splits the same folders."
            )
    return RunData(train=train, memory=memory, test=test, mean=mean, std=std)


def _knn_k(knn_k: int, bank_size: int) -> int:
    """Return knn_k, clamped to the memory bank's size with a warning."""
    if knn_k <= bank_size:
        return knn_k
    logger.warning("config.knn_k=%d exceeds the %d labelled memory-bank examples; using k=%d.",
                   knn_k, bank_size, bank_size)
    return bank_size


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
        k=_knn_k(config["knn_k"], int(labelled.sum())),
        temperature=config["knn_temperature"],
    )


# The run.


def train_and_evaluate(config: Mapping[str, Any], workdir: str) -> dict[str, float]:
    """Run ASCL pretraining as `config` describes, writing metrics and checkpoints into `workdir`.

    Resumes from the newest readable checkpoint in `workdir` when there is one.

    Returns:
        A summary with the kNN top-1 before and after training, the number of steps, the step
        the run resumed from (0 for a fresh run) and the wall time of this call.

    Raises:
        config_lib.ConfigError: an invalid config, an unwritable workdir, or a config that
            conflicts with the workdir's checkpoints.
        checkpoint_lib.CheckpointError: checkpoints exist but none can be restored.
        NonFiniteError: the loss or the parameters became NaN or infinite; no checkpoint of
            that state is saved.
        TrainingInterrupted: SIGTERM or SIGINT arrived; the checkpoint of the step reached is
            saved first.
    """
    start_time = time.time()
    sharding.initialize_distributed(enabled=config.get("distributed", False))
    mesh = create_mesh(config)
    config_lib.validate_config(config, num_devices=mesh.size)
    logger.info("Devices: %s", sharding.describe(mesh))
    manager = _open_checkpoints(config, workdir)
    try:
        summary = _run(config, workdir, manager, mesh)
    finally:
        # Pending asynchronous saves must finish before the process may exit.
        manager.wait_until_finished()
        manager.close()
    summary["wall_time_s"] = time.time() - start_time
    logger.info(
        "kNN top-1: %.2f%% at step 0, %.2f%% after %d steps (%.0f s in all).",
        100 * summary["knn_top1_initial"], 100 * summary["knn_top1_final"], summary["steps"],
        summary["wall_time_s"],
    )
    return summary


def create_mesh(config: Mapping[str, Any]) -> jax.sharding.Mesh:
    """Build the data-parallel mesh over config.num_devices devices (0: every device)."""
    available = jax.devices()
    requested = config.get("num_devices", 0)
    if isinstance(requested, bool) or not isinstance(requested, int) or not (
        0 <= requested <= len(available)
    ):
        raise config_lib.ConfigError(
            f"Invalid config.num_devices={requested!r}: {len(available)} devices are available. "
            f"Use 0 for all of them, or a number from 1 to {len(available)}."
        )
    if requested and jax.process_count() > 1:
        raise config_lib.ConfigError(
            f"Invalid config.num_devices={requested!r}: a multi-process run uses every device "
            "of every process. Use 0."
        )
    return sharding.create_mesh(available[:requested] if requested else available)


def _open_checkpoints(config: Mapping[str, Any], workdir: str) -> ocp.CheckpointManager:
    """Open the workdir's checkpoints, check the config against the newest, write config.json."""
    try:
        os.makedirs(workdir, exist_ok=True)
        manager = checkpoint_lib.open_manager(workdir, max_to_keep=config["keep_checkpoints"])
    except OSError as error:
        raise _unwritable_workdir(workdir, error) from error
    try:
        newest = checkpoint_lib.newest_meta(manager)
        if newest is not None:
            step, meta = newest
            config_lib.check_resume_compatible(
                meta.get("config", {}), config, checkpoint=checkpoint_lib.step_path(manager, step)
            )
        if sharding.is_main_process():
            with open(os.path.join(workdir, "config.json"), "w", encoding="utf-8") as file:
                json.dump(_config_dict(config), file, indent=2, sort_keys=True)
    except OSError as error:
        manager.close()
        raise _unwritable_workdir(workdir, error) from error
    except BaseException:
        manager.close()
        raise
    return manager


def _unwritable_workdir(workdir: str, error: OSError) -> config_lib.ConfigError:
    return config_lib.ConfigError(
        f"Invalid --workdir={workdir!r}: cannot write there ({error.strerror or error}). "
        "Choose a directory you can write to."
    )


@dataclasses.dataclass
class _Run:
    """Inputs and outputs of the training loop, besides the state."""

    config: Mapping[str, Any]
    mesh: jax.sharding.Mesh
    run_data: RunData
    train_step: Any
    feature_fn: Any
    writer: MetricWriter
    manager: ocp.CheckpointManager
    stop: StopSignals
    steps_per_epoch: int
    total_steps: int
    # The meta item saved with every checkpoint, less the step.
    meta: dict[str, Any]
    # Records kept in metrics.jsonl from before this process started.
    previous_records: list[dict[str, Any]]

    def evaluate(self, step: int, state: state_lib.TrainState) -> float:
        """Run the kNN monitor and write its line."""
        started = time.time()
        top1 = knn_top1(self.feature_fn, state, self.run_data, self.config)
        self.writer.write({"step": step, "epoch": step / self.steps_per_epoch, "knn_top1": top1,
                           "knn_seconds": time.time() - started})
        logger.info("step %d: kNN top-1 %.2f%% (%.1f s)", step, 100 * top1, time.time() - started)
        return top1

    def logged_top1(self, step: int) -> float | None:
        """Return the kNN top-1 that an earlier process wrote for `step`, if any."""
        for record in reversed(self.previous_records):
            if record.get("step") == step and "knn_top1" in record:
                return float(record["knn_top1"])
        return None

    def save(self, step: int, state: state_lib.TrainState) -> str:
        """Save the checkpoint of `step` unless it exists; return its directory."""
        if not bool(_all_finite(state)):
            raise NonFiniteError(
                f"The train state has NaN or infinite values at step {step}; it is not saved. "
                f"{self.newest_checkpoint_note()}"
            )
        meta = dict(self.meta, next_batch_step=step)
        if checkpoint_lib.save_checkpoint(self.manager, step, state, meta):
            logger.info("Saving the checkpoint of step %d.", step)
        return checkpoint_lib.step_path(self.manager, step)

    def newest_checkpoint_note(self) -> str:
        """Describe the newest checkpoint, which a non-finite state leaves untouched."""
        newest = self.manager.latest_step()
        if newest is None:
            return "No checkpoint has been saved."
        return f"The newest checkpoint, {checkpoint_lib.step_path(self.manager, newest)}, is kept."


@jax.jit
def _all_finite(tree: Any) -> jax.Array:
    leaves = [leaf for leaf in jax.tree.leaves(tree) if jnp.issubdtype(leaf.dtype, jnp.inexact)]
    return jnp.all(jnp.stack([jnp.all(jnp.isfinite(leaf)) for leaf in leaves]))


def _run(
    config: Mapping[str, Any], workdir: str, manager: ocp.CheckpointManager,
    mesh: jax.sharding.Mesh,
) -> dict:
    """Load the data, restore or build the state, and train; return the summary."""
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
        dtype=models.compute_dtype(config.get("compute_dtype", "float32")),
    )
    schedule = state_lib.learning_rate_schedule(
        config["learning_rate"],
        warmup_steps=int(round(config["warmup_epochs"] * steps_per_epoch)),
        total_steps=total_steps,
    )
    tx = state_lib.make_optimizer(
        schedule, momentum=config["momentum"], weight_decay=config["weight_decay"]
    )
    image_shape = (config["image_size"], config["image_size"], run_data.train.image_shape[-1])
    meta = {
        "seed": config["seed"],
        "num_train_examples": len(run_data.train),
        "steps_per_epoch": steps_per_epoch,
        "image_shape": list(image_shape),
        "mean": list(run_data.mean),
        "std": list(run_data.std),
        "config": _config_dict(config),
    }

    def create_state(rng: jax.Array) -> state_lib.TrainState:
        return state_lib.create_train_state(
            rng, model, image_shape=image_shape, tx=tx, queue_size=config["queue_size"],
            projection_dim=config["projection_dim"],
        )

    state, start_step = _restore_or_create(create_state, config, manager, meta, mesh)

    train_step = sharding.shard_train_step(
        step_lib.make_train_step(config, model, schedule, mean=run_data.mean, std=run_data.std,
                                 axis_name=sharding.DATA_AXIS),
        mesh, state,
    )
    feature_fn = sharding.shard_feature_fn(
        step_lib.make_feature_fn(
            model, image_size=config["image_size"], mean=run_data.mean, std=run_data.std
        ),
        mesh, state,
    )

    metrics_path = os.path.join(workdir, METRICS_FILE)
    main_process = sharding.is_main_process()
    previous_records = []
    if main_process:
        previous_records = truncate_metrics(metrics_path, start_step if start_step else -1)
    writer = MetricWriter(workdir, enabled=main_process, previous_records=previous_records)
    try:
        with StopSignals() as stop:
            run = _Run(
                config=config, mesh=mesh, run_data=run_data, train_step=train_step, feature_fn=feature_fn,
                writer=writer, manager=manager, stop=stop, steps_per_epoch=steps_per_epoch,
                total_steps=total_steps, meta=meta, previous_records=previous_records,
            )
            summary = _train_loop(run, state, start_step)
    finally:
        writer.close()
    summary["resumed_from_step"] = start_step
    return summary


def _restore_or_create(
    create_state, config, manager, meta, mesh
) -> tuple[state_lib.TrainState, int]:
    """Restore the newest readable checkpoint onto `mesh`, or build a fresh state there."""
    rng = jax.random.PRNGKey(config["seed"])
    shapes = jax.eval_shape(create_state, rng)
    target = checkpoint_lib.abstract_target(shapes, sharding.state_shardings(shapes, mesh))

    def check_meta(path: str, saved: dict[str, Any]) -> None:
        config_lib.check_resume_compatible(saved.get("config", {}), config, checkpoint=path)
        if saved.get("num_train_examples") != meta["num_train_examples"]:
            raise config_lib.ConfigError(
                f"Cannot resume from the checkpoint {path}: it was trained on "
                f"{saved.get('num_train_examples')} examples of config.train_split="
                f"{config['train_split']!r}, which now has {meta['num_train_examples']}, so "
                "the data order after the resume would differ. Restore the original data, or "
                "give a new --workdir to start a separate run."
            )

    restored = checkpoint_lib.restore_latest(manager, target, check_meta=check_meta)
    if restored is None:
        logger.info("No checkpoint in %s; starting at step 0.", manager.directory)
        state = create_state(rng)
        # A restored state has an int32 step and committed arrays. Giving the fresh state the
        # same types lets fresh and resumed runs share one compiled train step.
        state = state.replace(step=jnp.asarray(state.step, jnp.int32))
        return sharding.put_state(state, mesh), 0
    logger.info("Resuming from the checkpoint %s at step %d.",
                checkpoint_lib.step_path(manager, restored.step), restored.step)
    return restored.state, restored.step


def _train_loop(run: _Run, state: state_lib.TrainState, start_step: int) -> dict[str, Any]:
    """Train from `start_step` to the end, logging, evaluating and saving per schedule."""
    config = run.config
    total_steps = run.total_steps
    if start_step == 0:
        initial_top1 = run.evaluate(0, state)
    else:
        initial_top1 = run.logged_top1(0)
        if initial_top1 is None:
            initial_top1 = float("nan")
    if start_step >= total_steps:
        return _finish_complete_run(run, state, start_step, initial_top1)
    if run.stop.requested:
        _stop_for_signal(run, state, start_step)

    batch_size = config["batch_size"]
    knn_every_steps = 0
    if config["knn_every_epochs"] > 0:
        knn_every_steps = max(1, round(config["knn_every_epochs"] * run.steps_per_epoch))
    checkpoint_every = config["checkpoint_every_steps"]
    guard = FiniteGuard()
    # Each process loads only the rows of every global batch that its devices take.
    batches = pipeline.train_batches(
        run.run_data.train, batch_size=batch_size, seed=config["seed"], start_step=start_step,
        num_steps=total_steps - start_step, prefetch=config["prefetch"],
        rows=sharding.process_batch_rows(run.mesh, batch_size),
    )
    # Device prefetch: the next batches are put on the mesh while the current step runs.
    batches = pipeline.prefetch_to_device(
        batches,
        lambda images, labels: sharding.global_batch(
            run.mesh, images, labels, batch_size=batch_size
        ),
    )
    progress = tqdm.tqdm(
        total=total_steps * batch_size, initial=start_step * batch_size, unit="img",
        unit_scale=True, dynamic_ncols=True, desc="pretrain",
        disable=None if sharding.is_main_process() else True,
    )
    window_start, window_images = time.time(), 0
    try:
        for batch in batches:
            images, labels = batch.images, batch.labels
            step = batch.step + 1
            first_step = step == start_step + 1
            if first_step:
                logger.info("Compiling the train step; the first step takes longer.")
                compile_start = time.time()
            state, metrics = run.train_step(state, images, labels)
            guard.add(step, metrics)
            if first_step:
                jax.block_until_ready(metrics)
                _log_compile_time(run, step, time.time() - compile_start)
                window_start, window_images = time.time(), 0
            else:
                window_images += batch_size
            progress.update(batch_size)

            if step % config["log_every_steps"] == 0 or step == total_steps:
                _check_finite(run, guard)
                elapsed = time.time() - window_start
                metrics = guard.last_finite[1]
                record = {"step": step, "epoch": step / run.steps_per_epoch, **metrics}
                if window_images and elapsed > 0:
                    record["images_per_second"] = window_images / elapsed
                run.writer.write(record)
                progress.set_postfix(loss=f"{metrics['loss']:.3f}",
                                     c=f"{metrics.get('confidence', float('nan')):.3f}")
                window_start, window_images = time.time(), 0

            if knn_every_steps and step % knn_every_steps == 0 and step != total_steps:
                _check_finite(run, guard)
                run.evaluate(step, state)
                window_start, window_images = time.time(), 0

            if checkpoint_every and step % checkpoint_every == 0 and step != total_steps:
                _check_finite(run, guard)
                run.save(step, state)
            if run.stop.requested:
                _check_finite(run, guard)
                _stop_for_signal(run, state, step)
    finally:
        progress.close()
        batches.close()

    _check_finite(run, guard)
    final_top1 = run.evaluate(total_steps, state)
    run.save(total_steps, state)
    return {"knn_top1_initial": initial_top1, "knn_top1_final": final_top1, "steps": total_steps}


def _log_compile_time(run: _Run, step: int, seconds: float) -> None:
    # A resumed run leaves the metrics file as an uninterrupted run would have written it, so
    # its compile time goes to the log alone.
    if step == 1:
        run.writer.write({"step": 1, "compile_seconds": seconds})
    else:
        logger.info("Compiled the train step in %.1f s.", seconds)


def _check_finite(run: _Run, guard: FiniteGuard) -> None:
    """Raise NonFiniteError at the first step since the last check whose metrics are not finite."""
    failure = guard.check()
    if failure is None:
        return
    step, values = failure
    bad_values = ", ".join(f"{key}={value}" for key, value in values.items())
    if guard.last_finite is None:
        last = "No step before it was finite."
    else:
        last_step, metrics = guard.last_finite
        last = (f"Last finite metrics (step {last_step}): "
                + ", ".join(f"{key}={value:.6g}" for key, value in sorted(metrics.items())) + ".")
    raise NonFiniteError(
        f"Training stopped at step {step}: {bad_values}. {last} {run.newest_checkpoint_note()} "
        "Lower --config.learning_rate or lengthen --config.warmup_epochs, and start again in a "
        "new --workdir."
    )


def _stop_for_signal(run: _Run, state: state_lib.TrainState, step: int) -> None:
    """Save the checkpoint of `step`, wait for it, and raise TrainingInterrupted."""
    path = run.save(step, state)
    run.manager.wait_until_finished()
    name = signal.Signals(run.stop.received).name
    raise TrainingInterrupted(
        f"Received {name}: saved the checkpoint of step {step} in {path}. Rerun the same "
        "command to resume.",
        step=step, signal_number=run.stop.received,
    )


def _finish_complete_run(
    run: _Run, state: state_lib.TrainState, step: int, initial_top1: float
) -> dict[str, Any]:
    """Return the summary of a run whose checkpoint is at or past its last step."""
    if step > run.total_steps:
        logger.warning(
            "The checkpoint is at step %d, past the %d steps that the config asks for; "
            "nothing to train.", step, run.total_steps,
        )
    else:
        logger.info("The run is already complete at step %d; nothing to train.", step)
    final_top1 = run.logged_top1(step)
    if final_top1 is None:
        final_top1 = run.evaluate(step, state)
    return {"knn_top1_initial": initial_top1, "knn_top1_final": final_top1, "steps": step}


def _config_dict(config: Mapping[str, Any]) -> dict[str, Any]:
    if hasattr(config, "to_dict"):
        config = config.to_dict()
    return {key: list(value) if isinstance(value, Sequence) and not isinstance(value, str)
            else value for key, value in dict(config).items()}
