"""ASCL on STL-10 with the reference recipe: ResNet-18 with a max-pool in the stem, at 64x64 pixels.

Pretraining reads train+unlabelled (105,000 images); the kNN monitor uses train (5,000) as its
memory bank and test (8,000) as queries. Images are resized to 64x64 on the host.

Command:
    python -m experiments.pretrain --config=experiments/configs/stl10.py --workdir=DIR \
        --config.data_dir=DATA_DIR

Hardware: one accelerator chip. The compiled step counts 1,008 GFLOP per 256 images, so 200
epochs of 410 steps are 8.3e16 FLOP, about 14 minutes of compute at a sustained 100 TFLOP/s
(an arithmetic estimate).

Expected result: to be filled in when measured on an accelerator.
"""

import ml_collections

from experiments.configs import cifar10


def get_config() -> ml_collections.ConfigDict:
    """Return the STL-10 reference recipe."""
    config = cifar10.get_config()
    config.dataset = "tfds:stl10"
    config.train_split = "train+unlabelled"
    config.memory_split = "train"
    config.test_split = "test"
    config.image_size = 64
    # At 64x64 the recipe keeps the max-pool after the 3x3 stride-1 stem convolution.
    config.stem = "cifar_maxpool"
    config.mean = (0.4408, 0.4279, 0.3867)
    config.std = (0.2682, 0.2610, 0.2686)
    return config
