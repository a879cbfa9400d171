"""Weighted kNN evaluation of a pretraining run's checkpoint, the monitor's protocol on demand.

Usage:
    python -m experiments.knn_eval --workdir=DIR [--k=200] [--temperature=0.1] [--step=N]
        [--memory_split=SPLIT] [--test_split=SPLIT]

The L2-normalised backbone features (test-time view, eval mode) of the labelled images of the
run's memory_split form the memory bank. Each image of its test_split is classified by the vote
of its k nearest bank entries, each weighted by exp(cosine similarity / temperature), as
ascl_jax.evaluation.knn describes. The checkpoint is the newest readable one in
DIR/checkpoints unless --step names another. The dataset settings come from DIR/config.json.

The top-1 accuracy is printed and added to DIR/knn_eval.json, {"entries": [...]}, one entry
per (step, k, temperature, memory_split, test_split). A new result replaces the entry with the
same five values. The file is replaced atomically. Only top-1 is computed, because the vote
of ascl_jax.evaluation.knn returns the predicted class and not the ranking a top-5 needs.

Exit status:
    0    the evaluation is complete.
    1    a one-line message explains the failure: an invalid flag, a workdir without
         config.json or checkpoints, a k larger than the memory bank, or unreadable data or
         checkpoints.
"""

import logging
import math
import os
import sys
import time

from absl import app, flags

from experiments import eval_workdir

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a pretraining run.")
_K = flags.DEFINE_integer("k", 200, "Number of nearest memory-bank images that vote.")
_TEMPERATURE = flags.DEFINE_float(
    "temperature", 0.1, "Temperature T of the vote weights exp(similarity / T)."
)
_STEP = flags.DEFINE_integer(
    "step", None, "Step of the checkpoint to evaluate; default: the newest readable one."
)
_MEMORY_SPLIT = flags.DEFINE_string(
    "memory_split", None, "Split whose labelled images form the memory bank; default: the "
    "run's memory_split."
)
_TEST_SPLIT = flags.DEFINE_string(
    "test_split", None, "Split whose images are classified; default: the run's test_split."
)
flags.mark_flags_as_required(["workdir"])

RESULTS_FILE = "knn_eval.json"
# Settings that identify an entry of RESULTS_FILE.
RESULT_KEYS = ("step", "k", "temperature", "memory_split", "test_split")


def flag_error() -> str | None:
    """Return the message of the first invalid flag or None, without importing JAX."""
    if _K.value < 1:
        return f"Invalid --k={_K.value}: use a positive integer (the protocol uses 200)."
    if not (math.isfinite(_TEMPERATURE.value) and _TEMPERATURE.value > 0):
        return (f"Invalid --temperature={_TEMPERATURE.value}: use a finite number > 0 (the "
                "protocol uses 0.1).")
    return eval_workdir.workdir_error(_WORKDIR.value, _STEP.value, RESULTS_FILE)




def evaluate_knn(
    workdir: str,
    *,
    k: int,
    temperature: float,
    step: int | None = None,
    memory_split: str | None = None,
    test_split: str | None = None,
) -> dict:
    """Return the kNN result entry of a workdir's checkpoint and add it to its results file.

    Raises:
        ValueError: k exceeds the labelled memory bank, the splits' classes differ, or the
            results file cannot be read. All of these are raised before anything is compiled.
    """
    import numpy as np

    from ascl_jax import data as data_lib
    from ascl_jax import sharding
    from ascl_jax.evaluation import knn, linear

    config = linear.read_run_config(workdir)
    results_path = os.path.join(workdir, RESULTS_FILE)
    linear.read_results(results_path)
    memory_split = config["memory_split"] if memory_split is None else memory_split
    test_split = config["test_split"] if test_split is None else test_split

    model_config, backbone, variables = linear.load_frozen_backbone(workdir, step)
    load = lambda split: data_lib.load_source(  # noqa: E731
        config["dataset"], split, data_dir=config.get("data_dir", ""),
        image_size=config["image_size"], skip_corrupt=config.get("skip_corrupt", False),
    )
    memory, test = load(memory_split), load(test_split)
    if memory.class_names != test.class_names:
        raise ValueError(
            f"The memory split {memory_split!r} has the classes {list(memory.class_names)} but "
            f"the test split {test_split!r} has {list(test.class_names)}. Give splits with the "
            "same classes."
        )
    bank_indices = np.flatnonzero(linear.source_labels(memory) >= 0)
    query_indices = np.flatnonzero(linear.source_labels(test) >= 0)
    if k > bank_indices.size:
        raise ValueError(
            f"Invalid --k={k}: the memory split {memory_split!r} has {bank_indices.size} "
            f"labelled images. Use k <= {bank_indices.size}."
        )
    if query_indices.size == 0:
        raise ValueError(f"The test split {test_split!r} has no labelled images.")

    started = time.time()
    mesh = sharding.create_mesh()
    extract = linear.BackboneFeatures(
        backbone, variables, mesh=mesh, image_size=config["image_size"],
        mean=model_config["mean"], std=model_config["std"],
        batch_size=config.get("eval_batch_size", 512), normalize=True,
    )
    bank, bank_labels = extract(linear.IndexedSource(memory, bank_indices))
    queries, query_labels = extract(linear.IndexedSource(test, query_indices))
    top1 = knn.knn_accuracy(bank, bank_labels, queries, query_labels,
                            num_classes=memory.num_classes, k=k, temperature=temperature)
    entry = {
        "step": model_config["step"],
        "k": k,
        "temperature": temperature,
        "memory_split": memory_split,
        "test_split": test_split,
        "dataset": config["dataset"],
        "num_memory_examples": int(bank_indices.size),
        "num_test_examples": int(query_indices.size),
        "top1": top1,
        "devices": mesh.size,
        "seconds": time.time() - started,
    }
    if sharding.is_main_process():
        linear.write_result(results_path, entry, RESULT_KEYS)
    return entry


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

    # orbax logs every restore step at INFO through absl; keep its warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        sharding.initialize_distributed()
        entry = evaluate_knn(
            _WORKDIR.value, k=_K.value, temperature=_TEMPERATURE.value, step=_STEP.value,
            memory_split=_MEMORY_SPLIT.value, test_split=_TEST_SPLIT.value,
        )
    except (ValueError, FileNotFoundError, CheckpointError, ImageDecodeError) as error:
        # Input problems end with their message alone; a traceback would only hide it.
        sys.exit(f"error: {error}")
    if sharding.is_main_process():
        path = os.path.join(os.path.abspath(_WORKDIR.value), RESULTS_FILE)
        print(
            f"kNN top-1 of step {entry['step']} (k={entry['k']}, T={entry['temperature']}, "
            f"{entry['num_memory_examples']} {entry['memory_split']} images in the bank, "
            f"{entry['num_test_examples']} {entry['test_split']} queries): "
            f"{100 * entry['top1']:.2f}%. Wrote {path}."
        )


if __name__ == "__main__":
    app.run(main)
