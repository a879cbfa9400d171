"""Self-supervised ASCL pretraining.

Usage:
    python -m experiments.pretrain --workdir=DIR [--config=experiments/configs/NAME.py]
        [--config.key=value ...]

Without --config the embedded Fashion-MNIST default runs. The workdir receives config.json,
metrics.jsonl (one JSON object per line) and checkpoints/. Rerunning the same command with the
same workdir resumes from the newest checkpoint.

Exit status:
    0    training is complete.
    1    a one-line message explains the failure: invalid input, a config that conflicts with the
         workdir's checkpoints, unreadable checkpoints, or a NaN or infinite loss.
    143  SIGTERM stopped training after the checkpoint of the current step was saved
         (130 for SIGINT: 128 + the signal number).
"""

import logging
import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

_WORKDIR = flags.DEFINE_string(
    "workdir", None, "Directory for config.json, metrics.jsonl and checkpoints/."
)
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Configuration file; its fields can be overridden as --config.key=value."
)
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # XLA reads its flags when JAX starts a backend, so the platform defaults come first.
    from ascl_jax import platform

    platform.apply_platform_defaults()
    # Imported here so that --help does not pay for importing JAX.
    from ascl_jax import train
    from ascl_jax.checkpoint import CheckpointError
    from ascl_jax.config import ConfigError
    from ascl_jax.data import ImageDecodeError

    # orbax logs every save and restore step at INFO through absl; keep its warnings only.
    logging.getLogger("absl").setLevel(logging.WARNING)
    # JAX logs at INFO each accelerator backend it fails to find (TPU on every CPU machine).
    logging.getLogger("jax._src.xla_bridge").setLevel(logging.WARNING)
    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except train.TrainingInterrupted as interrupted:
        print(f"stopped: {interrupted}", file=sys.stderr)
        sys.exit(128 + interrupted.signal_number)
    except (ConfigError, FileNotFoundError, ImageDecodeError, CheckpointError,
            train.NonFiniteError) as error:
        # Input problems end with their message alone; a traceback would only hide it.
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
