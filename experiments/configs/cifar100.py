"""ASCL on CIFAR-100 with the reference recipe: as CIFAR-10, with K = 5 neighbours.

Command:
    python -m experiments.pretrain --config=experiments/configs/cifar100.py --workdir=DIR \
        --config.data_dir=DATA_DIR

Expected result: not yet measured (200 epochs of ResNet-18 need an accelerator).
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
