"""ASCL on CIFAR-10 with the reference recipe: ResNet-18 (CIFAR stem), 200 epochs, batch 256.

Command (tensorflow-datasets, prepared under DATA_DIR):
    python -m experiments.pretrain --config=experiments/configs/cifar10.py --workdir=DIR \
        --config.data_dir=DATA_DIR

Command (the same images as JPEG folders or SPLIT.tar archives, SPLIT/CLASS/*.jpg):
    python -m experiments.pretrain --config=experiments/configs/cifar10.py --workdir=DIR \
        --config.dataset=folder --config.data_dir=PATH_TO_CIFAR10_JPG

Hardware: one accelerator chip (a GPU or a TPU core). XLA's cost analysis of the compiled step
counts 995 GFLOP per step of 256 images, so 200 epochs (39,000 steps) are 3.9e16 FLOP. That is
about 7 minutes of pure compute at a sustained 100 TFLOP/s, and about 7 days at the 63 GFLOP/s
that experiments/bench_train.py measured for ResNet-18 on a 2-core CPU. Both times are
arithmetic estimates, not measured runs.

Expected result: to be filled in when measured on an accelerator. The CPU-sized runs of
experiments/RESULTS.md use experiments/configs/cifar10_cpu.py instead.
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
