"""Checkpoints of the train state with orbax: save, restore with fallback, backbone export.

A run's checkpoints live in `WORKDIR/checkpoints`, one directory per saved step:

    checkpoints/STEP/state/          the TrainState pytree (orbax StandardCheckpointHandler:
                                     OCDBT-packed zarr arrays, _METADATA with the tree structure)
    checkpoints/STEP/meta/metadata   JSON: the step, the input position, the training-set size,
                                     the resolved normalisation and the run's config
    checkpoints/STEP/_CHECKPOINT_METADATA   orbax's own record of the items and the save time

orbax writes a checkpoint into `STEP.orbax-checkpoint-tmp` and renames it to `STEP` once every
file is written (orbax-checkpoint 0.12.8, `AtomicRenameTemporaryPath` on local file systems).
A save killed midway therefore leaves only the temporary directory, which `CheckpointManager`
never lists as a step and deletes when a manager is next opened for writing.

The state is saved as the pytree of its arrays; the static fields `apply_fn` and `tx` are not
saved. A restore reads into an abstract target (`jax.ShapeDtypeStruct` leaves with shardings) of
a freshly built state, so the same checkpoint restores onto any device count or mesh.
"""

import dataclasses
import logging
import os
import shutil
import tempfile
from collections.abc import Callable, Mapping
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp

from ascl_jax import models

logger = logging.getLogger("ascl_jax")

CHECKPOINT_DIR = "checkpoints"
# Directory that receives the checkpoints that failed to restore, so the run can save those
# steps again.
UNREADABLE_DIR = "checkpoints_unreadable"
STATE_ITEM = "state"
META_ITEM = "meta"
# Version of the layout of the meta item; bumped when its keys change meaning.
META_VERSION = 1

# Config keys that describe the network, as returned by `load_backbone`.
MODEL_KEYS = ("model", "width", "stem", "bn_groups", "hidden_dim", "projection_dim", "image_size")


class CheckpointError(RuntimeError):
    """Checkpoints exist but none of them can be restored, or a requested one is missing."""


@dataclasses.dataclass(frozen=True)
class Restored:
    """A restored checkpoint: its step, the state and the meta item saved with it."""

    step: int
    state: Any
    meta: dict[str, Any]


def checkpoint_dir(workdir: str) -> str:
    """Return the checkpoint directory of a workdir, `WORKDIR/checkpoints`."""
    return os.path.join(os.path.abspath(workdir), CHECKPOINT_DIR)


def open_manager(workdir: str, *, max_to_keep: int | None = None) -> ocp.CheckpointManager:
    """Open (and create) the checkpoint manager of `workdir` for saving and restoring.

    Saves are asynchronous: `save_checkpoint` returns once the arrays are copied to host memory,
    and the files are written in a background thread. Call `manager.wait_until_finished()`
    before the process exits. Temporary directories of interrupted saves are deleted in the
    background.

    Raises:
        OSError: the checkpoint directory cannot be created or written. orbax itself would only
            fail at the first save, after the training it was to keep.
    """
    directory = checkpoint_dir(workdir)
    os.makedirs(directory, exist_ok=True)
    with tempfile.TemporaryFile(dir=directory):
        pass
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep,
        create=True,
        cleanup_tmp_directories=True,
        enable_async_checkpointing=True,
    )
    return ocp.CheckpointManager(
        directory,
        item_names=(STATE_ITEM, META_ITEM),
        item_handlers={
            STATE_ITEM: ocp.StandardCheckpointHandler(),
            META_ITEM: ocp.JsonCheckpointHandler(),
        },
        options=options,
    )


def abstract_target(shapes: Any, sharding: Any) -> Any:
    """Attach shardings to a tree of shapes, such as `jax.eval_shape(create_train_state, ...)`.

    Args:
        shapes: pytree whose leaves have `shape` and `dtype`.
        sharding: one `jax.sharding.Sharding` for every leaf, or a pytree of them with the
            structure of `shapes`.

    Returns:
        The tree of `jax.ShapeDtypeStruct` leaves that `restore_checkpoint` restores into.
    """
    if isinstance(sharding, jax.sharding.Sharding):
        return jax.tree.map(
            lambda leaf: jax.ShapeDtypeStruct(leaf.shape, leaf.dtype, sharding=sharding), shapes
        )
    return jax.tree.map(
        lambda leaf, leaf_sharding: jax.ShapeDtypeStruct(
            leaf.shape, leaf.dtype, sharding=leaf_sharding
        ),
        shapes,
        sharding,
    )


def save_checkpoint(manager: ocp.CheckpointManager, step: int, state: Any,
                    meta: Mapping[str, Any]) -> bool:
    """Start saving `state` and `meta` as the checkpoint of `step`; return False if it exists.

    The caller must not change the meaning of `meta` keys without bumping META_VERSION. Arrays
    are copied to host memory before this returns, so the caller may donate `state` afterwards.
    """
    if step in manager.all_steps():
        return False
    meta = {"version": META_VERSION, "step": step, **meta}
    manager.save(
        step,
        args=ocp.args.Composite(
            **{STATE_ITEM: ocp.args.StandardSave(state), META_ITEM: ocp.args.JsonSave(meta)}
        ),
        force=True,
    )
    return True


def read_meta(manager: ocp.CheckpointManager, step: int) -> dict[str, Any]:
    """Read the meta item of the checkpoint of `step`."""
    restored = manager.restore(
        step, args=ocp.args.Composite(**{META_ITEM: ocp.args.JsonRestore()})
    )
    meta = restored[META_ITEM]
    if not isinstance(meta, dict) or meta.get("step") != step:
        raise ValueError(f"the meta item of step {step} is not a record of that step: {meta!r}")
    # The batches are a function of (seed, step), so the input position must be the step.
    if meta.get("next_batch_step", step) != step:
        raise ValueError(
            f"the meta item of step {step} has the input position {meta['next_batch_step']}"
        )
    return meta


def newest_meta(manager: ocp.CheckpointManager) -> tuple[int, dict[str, Any]] | None:
    """Return (step, meta) of the newest checkpoint whose meta item reads, or None if none does.

    Unreadable meta items are skipped here; `restore_latest` warns about them.
    """
    for step in sorted(manager.all_steps(), reverse=True):
        try:
            return step, read_meta(manager, step)
        except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise plain Exception.
            logger.debug("Cannot read the checkpoint %s: %s", step_path(manager, step),
                         _first_line(error))
    return None


def restore_checkpoint(manager: ocp.CheckpointManager, step: int, target: Any) -> Any:
    """Restore the state of the checkpoint of `step` into `target` (see `abstract_target`).

    The arrays come back with the shardings of `target`, whatever the device count at save time.
    The step stored in the state must equal `step`.
    """
    restored = manager.restore(
        step, args=ocp.args.Composite(**{STATE_ITEM: ocp.args.StandardRestore(target)})
    )
    state = restored[STATE_ITEM]
    stored_step = getattr(state, "step", step)
    if int(stored_step) != step:
        raise ValueError(f"the state in checkpoint {step} is at step {int(stored_step)}")
    return state


def restore_latest(
    manager: ocp.CheckpointManager,
    target: Any,
    *,
    check_meta: Callable[[str, dict[str, Any]], None] | None = None,
) -> Restored | None:
    """Restore the newest checkpoint that reads, falling back to older ones.

    A checkpoint that fails to read is logged as a warning naming its directory, and once an
    older one has been restored, every newer unreadable one is moved to
    `WORKDIR/checkpoints_unreadable/STEP`, so the resumed run can save those steps again.

    Args:
        manager: from `open_manager`.
        target: abstract state from `abstract_target`.
        check_meta: called with the checkpoint's path and meta item before its state is read;
            an exception it raises (such as a config conflict) propagates.

    Returns:
        The restored checkpoint, or None when there is no checkpoint.

    Raises:
        CheckpointError: checkpoints exist but none can be restored.
    """
    failures = []
    for step in sorted(manager.all_steps(), reverse=True):
        path = step_path(manager, step)
        try:
            meta = read_meta(manager, step)
        except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise plain Exception.
            failures.append(_record_failure(step, path, error))
            continue
        if check_meta is not None:
            check_meta(path, meta)
        try:
            state = restore_checkpoint(manager, step, target)
        except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise plain Exception.
            failures.append(_record_failure(step, path, error))
            continue
        _move_unreadable(manager, [failed_step for failed_step, _, _ in failures])
        return Restored(step=step, state=state, meta=meta)

    if failures:
        details = "; ".join(f"{path}: {message}" for _, path, message in failures)
        raise CheckpointError(
            f"None of the checkpoints in {manager.directory} can be restored ({details}). Move "
            "that directory away to start the run over, or restore a copy of it."
        )
    return None


def step_path(manager: ocp.CheckpointManager, step: int) -> str:
    """Return the directory of the checkpoint of `step`."""
    return os.path.join(str(manager.directory), str(step))


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    # TensorStore appends a dump of its spec, which only hides the reason.
    text = text.split(" See full TensorStore details")[0]
    return text.splitlines()[0][:300]


def _record_failure(step: int, path: str, error: BaseException) -> tuple[int, str, str]:
    message = _first_line(error)
    logger.warning("Cannot restore the checkpoint %s (%s); falling back to the previous one.",
                   path, message)
    return step, path, message


def _move_unreadable(manager: ocp.CheckpointManager, steps: list[int]) -> None:
    if not steps:
        return
    destination_root = os.path.join(os.path.dirname(str(manager.directory)), UNREADABLE_DIR)
    os.makedirs(destination_root, exist_ok=True)
    for step in steps:
        destination = os.path.join(destination_root, str(step))
        if os.path.exists(destination):
            shutil.rmtree(destination)
        shutil.move(step_path(manager, step), destination)
        logger.warning("Moved the unreadable checkpoint of step %d to %s.", step, destination)
    manager.reload()


def load_backbone(
    workdir: str, step: int | None = None
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Load the online backbone's parameters and BatchNorm statistics from a workdir's checkpoint.

    Args:
        workdir: workdir of a pretraining run.
        step: step of the checkpoint; None takes the newest one that reads, falling back to
            older ones with a warning.

    Returns:
        `(model_config, params, batch_stats)`. `model_config` contains the config keys in
        MODEL_KEYS, `channels`, the normalisation `mean` and `std` the network was trained with,
        `feature_dim` and the checkpoint `step`. `params` and `batch_stats` are nested dicts
        of numpy arrays, the `backbone` subtrees of the encoder's variables, ready for

            backbone = models.resnet(model_config["model"], width=model_config["width"],
                                     stem=model_config["stem"])
            features = backbone.apply({"params": params, "batch_stats": batch_stats},
                                      images, train=False)

        with `images` normalised by `mean` and `std`.

    Raises:
        FileNotFoundError: the workdir has no checkpoints.
        CheckpointError: `step` has no checkpoint, or no checkpoint can be read.
    """
    directory = checkpoint_dir(workdir)
    if not os.path.isdir(directory):
        raise FileNotFoundError(
            f"No checkpoints in {directory}. Give the --workdir of a pretraining run that has "
            "saved at least one checkpoint."
        )
    manager = ocp.CheckpointManager(
        directory,
        item_names=(STATE_ITEM, META_ITEM),
        item_handlers={
            STATE_ITEM: ocp.PyTreeCheckpointHandler(),
            META_ITEM: ocp.JsonCheckpointHandler(),
        },
        options=ocp.CheckpointManagerOptions(create=False),
    )
    try:
        steps = sorted(manager.all_steps(), reverse=True)
        if step is not None:
            if step not in steps:
                raise CheckpointError(
                    f"No checkpoint of step {step} in {directory}; the saved steps are "
                    f"{sorted(steps)}."
                )
            steps = [step]
        failures = []
        for candidate in steps:
            try:
                return _read_backbone(manager, candidate)
            except Exception as error:  # noqa: BLE001 - orbax and tensorstore raise Exception.
                if step is not None:
                    raise CheckpointError(
                        f"Cannot read the checkpoint {step_path(manager, candidate)}: "
                        f"{_first_line(error)}"
                    ) from error
                failures.append(_record_failure(candidate, step_path(manager, candidate), error))
        details = "; ".join(f"{path}: {message}" for _, path, message in failures) or "none saved"
        raise CheckpointError(f"No readable checkpoint in {directory} ({details}).")
    finally:
        manager.close()


def _read_backbone(
    manager: ocp.CheckpointManager, step: int
) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    meta = read_meta(manager, step)
    metadata = manager.item_metadata(step)[STATE_ITEM]
    tree = metadata.tree if hasattr(metadata, "tree") else metadata
    wanted = {
        "params": {"backbone": tree["params"]["backbone"]},
        "batch_stats": {"backbone": tree["batch_stats"]["backbone"]},
    }
    # Restoring as numpy arrays keeps the export independent of the devices present.
    target = jax.tree.map(lambda leaf: np.zeros(leaf.shape, leaf.dtype), wanted)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), wanted)
    restored = manager.restore(
        step,
        args=ocp.args.Composite(**{
            STATE_ITEM: ocp.args.PyTreeRestore(
                item=target, restore_args=restore_args, partial_restore=True
            )
        }),
    )[STATE_ITEM]

    config = meta["config"]
    params = restored["params"]["backbone"]
    model_config = {key: config[key] for key in MODEL_KEYS}
    model_config.update(
        channels=int(meta["image_shape"][-1]),
        mean=list(meta["mean"]),
        std=list(meta["std"]),
        feature_dim=models.feature_dim(config["model"], config["width"]),
        step=step,
    )
    return model_config, params, restored["batch_stats"]["backbone"]
