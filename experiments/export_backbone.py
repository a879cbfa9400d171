"""Export the pretrained backbone of a workdir's checkpoint for feature extraction or fine-tuning.

Usage:
    python -m experiments.export_backbone --workdir=DIR --output=FILE [--step=N]

FILE ending in `.npz` gets a numpy archive: one array per parameter, named `params/PATH` and
`batch_stats/PATH` with "/"-joined module names, and `model_config`, a JSON string. Any other
name gets a msgpack file (flax.serialization) of the dict {"model_config", "params",
"batch_stats"}. Read them back with

    np.load(FILE)                                          # .npz
    flax.serialization.msgpack_restore(open(FILE, "rb").read())   # msgpack

`model_config` names the network (model, width, stem, ...), the input size and channels, the
normalisation the network was trained with, the feature size and the checkpoint's step.
"""

import json
import logging
import os
import sys
from collections.abc import Mapping
from typing import Any

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "Workdir of a pretraining run.")
_OUTPUT = flags.DEFINE_string(
    "output", None, "File to write: .npz for a numpy archive, any other name for msgpack."
)
_STEP = flags.DEFINE_integer(
    "step", None, "Step of the checkpoint to export; default: the newest readable one."
)
flags.mark_flags_as_required(["workdir", "output"])


def flatten(tree: Mapping[str, Any], prefix: str) -> dict[str, Any]:
    """Flatten nested dicts into {"prefix/a/b": leaf}."""
    flat = {}
    for key, value in tree.items():
        name = f"{prefix}/{key}"
        if isinstance(value, Mapping):
            flat.update(flatten(value, name))
        else:
            flat[name] = value
    return flat


def export_backbone(workdir: str, output: str, step: int | None = None) -> dict[str, Any]:
    """Write the backbone of the checkpoint of `step` (default: newest) to `output`.

    The file is written under a temporary name and renamed, so an interrupted export never
    leaves a partial file. Returns the model_config written.
    """
    import numpy as np
    from flax import serialization

    from ascl_jax import checkpoint

    model_config, params, batch_stats = checkpoint.load_backbone(workdir, step)
    output = os.path.abspath(output)
    os.makedirs(os.path.dirname(output), exist_ok=True)
    temporary = output + ".tmp"
    if output.endswith(".npz"):
        arrays = {**flatten(params, "params"), **flatten(batch_stats, "batch_stats")}
        with open(temporary, "wb") as file:
            np.savez(file, model_config=np.array(json.dumps(model_config)), **arrays)
    else:
        payload = {"model_config": model_config, "params": params, "batch_stats": batch_stats}
        with open(temporary, "wb") as file:
            file.write(serialization.msgpack_serialize(payload))
    os.replace(temporary, output)
    return model_config


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    from ascl_jax.checkpoint import CheckpointError

    # orbax logs every restore step at INFO through absl; keep its warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    try:
        model_config = export_backbone(_WORKDIR.value, _OUTPUT.value, _STEP.value)
    except (FileNotFoundError, CheckpointError, OSError) as error:
        sys.exit(f"error: {error}")
    print(
        f"Wrote the {model_config['model']} backbone (width {model_config['width']}, "
        f"{model_config['feature_dim']} features) of step {model_config['step']} to "
        f"{os.path.abspath(_OUTPUT.value)}."
    )


if __name__ == "__main__":
    app.run(main)
