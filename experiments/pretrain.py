"""Self-supervised ASCL pretraining.

Usage:
    python -m experiments.pretrain --workdir=DIR [--config=experiments/configs/NAME.py]
        [--config.key=value ...]

Without --config the embedded Fashion-MNIST default runs. The workdir receives config.json and
metrics.jsonl (one JSON object per line).
"""

import os
import sys

from absl import app, flags
from ml_collections import config_flags

_DEFAULT_CONFIG = os.path.join(os.path.dirname(__file__), "configs", "default.py")

_WORKDIR = flags.DEFINE_string("workdir", None, "Directory for config.json and metrics.jsonl.")
_CONFIG = config_flags.DEFINE_config_file(
    "config", _DEFAULT_CONFIG, "Configuration file; its fields can be overridden as --config.key=value."
)
flags.mark_flags_as_required(["workdir"])


def main(argv: list[str]) -> None:
    if len(argv) > 1:
        raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
    # Imported here so that --help does not pay for importing JAX.
    from ascl_jax import train
    from ascl_jax.config import ConfigError
    from ascl_jax.data import ImageDecodeError

    try:
        train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
    except (ConfigError, FileNotFoundError, ImageDecodeError) as error:
        # Input problems end with their message alone; a traceback would only hide it.
        sys.exit(f"error: {error}")


if __name__ == "__main__":
    app.run(main)
