"""ASCL on CIFAR-100 with the reference recipe: as CIFAR-10, with K = 5 neighbours.

Command:
    python -m experiments.pretrain --config=experiments/configs/cifar100.py --workdir=DIR \
        --config.data_dir=DATA_DIR

Hardware: as CIFAR-10, one accelerator chip (3.9e16 FLOP for 200 epochs, estimated from the
cost analysis of the compiled step).

Expected result: to be filled in when measured on an accelerator.
"""

import ml_collections

from experiments.configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    """Return the CIFAR-100 reference recipe."""
    config = cifar10.get_config()
    config.dataset = "tfds:cifar100"
    config.mean = (0.5071, 0.4867, 0.4408)
    config.std = (0.2675, 0.2565, 0.2761)
    config.num_neighbors = 5
    return config
