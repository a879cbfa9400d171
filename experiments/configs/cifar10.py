"""ASCL on CIFAR-10 with the reference recipe: ResNet-18 (CIFAR stem), 200 epochs, batch 256.

Command (tensorflow-datasets, prepared under DATA_DIR):
    python -m experiments.pretrain --config=experiments/configs/cifar10.py --workdir=DIR \
        --config.data_dir=DATA_DIR

Command (the same images as JPEG folders or SPLIT.tar archives, SPLIT/CLASS/*.jpg):
    python -m experiments.pretrain --config=experiments/configs/cifar10.py --workdir=DIR \
        --config.dataset=folder --config.data_dir=PATH_TO_CIFAR10_JPG

Expected result: not yet measured. The full recipe (200 epochs of ResNet-18) needs an
accelerator, so the final kNN top-1 is to be filled in once such a run has finished.
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Return the CIFAR-10 reference recipe."""
    config = default.get_config()
    config.dataset = "tfds:cifar10"
    config.image_size = 32
    config.mean = (0.4914, 0.4822, 0.4465)
    config.std = (0.2023, 0.1994, 0.2010)

    config.model = "resnet18"
    config.width = 64
    config.hidden_dim = 2048
    config.projection_dim = 128
    config.bn_groups = 8

    config.queue_size = 4096
    config.ema_momentum = 0.99
    config.batch_size = 256
    config.learning_rate = 0.03
    config.warmup_epochs = 5
    config.num_epochs = 200
    config.log_every_steps = 50
    config.knn_every_epochs = 1
    config.checkpoint_every_steps = 1000
    return config
