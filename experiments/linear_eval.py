"""Linear evaluation of a pretraining run's checkpoint.

Usage:
    python -m experiments.linear_eval --workdir=DIR [--mode=augmented|features] [--epochs=N]
        [--batch_size=N] [--learning_rate=X] [--holdout=N] [--seed=N] [--step=N]
        [--train_split=SPLIT] [--test_split=SPLIT] [--max_train_examples=N]
        [--max_test_examples=N] [--normalize_features]

The frozen online backbone of the newest checkpoint in DIR/checkpoints (or of --step) gets a
linear head trained on the run's train_split and tested on its test_split, with the dataset
settings of DIR/config.json and the normalisation saved with the checkpoint. The defaults are
the protocol: mode "augmented", 100 epochs, batch 256, learning rate 10 (see
ascl_jax.evaluation.linear). "features" mode trains on precomputed features without
augmentation and takes seconds instead of a backbone pass per epoch.

The result is printed and added to DIR/linear_eval.json, {"entries": [...]}. A new entry
replaces an earlier one of the same step, mode and settings. The file is replaced atomically.

Exit status:
    0    the evaluation is complete.
    1    a one-line message explains the failure: an invalid flag, a workdir without
         config.json or checkpoints, too few images for --holdout, unreadable data or
         checkpoints, or a NaN or infinite training loss.
"""

import logging
import math
import os
import sys

from absl import app, flags

from experiments import eval_workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a pretraining run.")
_MODE = flags.DEFINE_string(
    "mode", "augmented",
    "'augmented' (the protocol: crop and flip every training image, backbone forward each "
    "step) or 'features' (precomputed test-time features, no augmentation).",
)
_EPOCHS = flags.DEFINE_integer("epochs", 100, "Epochs of head training.")
_BATCH_SIZE = flags.DEFINE_integer("batch_size", 256, "Global batch size of head training.")
_LEARNING_RATE = flags.DEFINE_float(
    "learning_rate", 10.0, "Base learning rate of SGD; multiplied by 0.1 at 60% and 80% of the "
    "epochs."
)
_HOLDOUT = flags.DEFINE_integer(
    "holdout", 0, "Labelled training images held out to choose the reported epoch (the best "
    "held-out top-1); 0 reports the final epoch."
)
_SEED = flags.DEFINE_integer(
    "seed", 0, "Seed of the head's initialisation, the batch order and the augmentation."
)
_STEP = flags.DEFINE_integer(
    "step", None, "Step of the checkpoint to evaluate; default: the newest readable one."
)
_TRAIN_SPLIT = flags.DEFINE_string(
    "train_split", None, "Split that trains the head; default: the run's train_split. Its "
    "unlabelled images are skipped."
)
_TEST_SPLIT = flags.DEFINE_string(
    "test_split", None, "Split that tests the head; default: the run's test_split."
)
_MAX_TRAIN = flags.DEFINE_integer(
    "max_train_examples", 0, "When > 0, train on a fixed random subset of this many labelled "
    "images (for quick checks)."
)
_MAX_TEST = flags.DEFINE_integer(
    "max_test_examples", 0, "When > 0, test on a fixed random subset of this many images."
)
_NORMALIZE = flags.DEFINE_boolean(
    "normalize_features", False, "L2-normalise the backbone features before the head, as the "
    "kNN monitor does. The protocol uses the raw features."
)
flags.mark_flags_as_required(["workdir"])

MODES = ("augmented", "features")


def flag_error() -> str | None:
    """Return the message of the first invalid flag or None, without importing JAX."""
    if _MODE.value not in MODES:
        return (f"Invalid --mode={_MODE.value!r}: use 'augmented' (the protocol) or 'features' "
                "(precomputed features without augmentation, much faster on a CPU).")
    for flag in (_EPOCHS, _BATCH_SIZE):
        if flag.value < 1:
            return f"Invalid --{flag.name}={flag.value}: use a positive integer."
    if not (math.isfinite(_LEARNING_RATE.value) and _LEARNING_RATE.value > 0):
        return (f"Invalid --learning_rate={_LEARNING_RATE.value}: use a finite number > 0 "
                "(the protocol uses 10).")
    for flag in (_HOLDOUT, _SEED, _MAX_TRAIN, _MAX_TEST):
        if flag.value < 0:
            return f"Invalid --{flag.name}={flag.value}: use an integer >= 0."
    # The name of ascl_jax.evaluation.linear.RESULTS_FILE, written out so that flag errors do
    # not import JAX.
    return eval_workdir.workdir_error(_WORKDIR.value, _STEP.value, "linear_eval.json")




def describe(entry: dict) -> str:
    """Return the one-line summary of a result entry."""
    if entry["reported"] == "selected_on_holdout":
        rule = (f"epoch {entry['epoch']} of {entry['epochs']}, selected on "
                f"{entry['num_holdout_examples']} held-out images")
    else:
        rule = f"final epoch of {entry['epochs']}"
    return (
        f"Linear evaluation of step {entry['step']} ({entry['mode']} mode, "
        f"{entry['num_train_examples']} training images): test top-1 "
        f"{100 * entry['test_top1']:.2f}%, top-5 {100 * entry['test_top5']:.2f}% ({rule})."
    )


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    message = flag_error()
    if message:
        sys.exit(f"error: {message}")

    # Imported here so that --help and invalid flags do not pay for importing JAX.
    from ascl_jax import sharding
    from ascl_jax.checkpoint import CheckpointError
    from ascl_jax.data import ImageDecodeError
    from ascl_jax.evaluation import linear

    # orbax logs every restore step at INFO through absl; keep its warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    settings = linear.LinearEvalSettings(
        mode=_MODE.value, epochs=_EPOCHS.value, batch_size=_BATCH_SIZE.value,
        learning_rate=_LEARNING_RATE.value, holdout=_HOLDOUT.value, seed=_SEED.value,
        max_train_examples=_MAX_TRAIN.value, max_test_examples=_MAX_TEST.value,
        normalize_features=_NORMALIZE.value,
    )
    try:
        sharding.initialize_distributed()
        entry = linear.run_linear_eval(
            _WORKDIR.value, settings, step=_STEP.value, train_split=_TRAIN_SPLIT.value,
            test_split=_TEST_SPLIT.value,
        )
    except (ValueError, FileNotFoundError, CheckpointError, ImageDecodeError,
            FloatingPointError) as error:
        # Input problems end with their message alone; a traceback would only hide it.
        sys.exit(f"error: {error}")
    if sharding.is_main_process():
        path = os.path.join(os.path.abspath(_WORKDIR.value), linear.RESULTS_FILE)
        print(f"{describe(entry)} Wrote {path}.")


if __name__ == "__main__":
    app.run(main)
