"""The CPU budget of experiments/RESULTS.md: CIFAR-10 (JPEG copy), small ResNet, 2 epochs.

Every kind and seed in RESULTS.md uses this config unchanged except for `kind`, `seed` and, in the
target-view ablation, `target_view`. It differs from the reference recipe (cifar10.py) in size.
The backbone is a ResNet-10 of width 16 (128-d features) instead of a ResNet-18 of width 64, and
the projector's hidden layer has 512 units instead of 2048. The learning rate is 0.1 with 1
warm-up epoch, and training lasts 2 epochs instead of 200, which fits a 2-core CPU.

Command:
    python -m experiments.pretrain --config=experiments/configs/cifar10_cpu.py --workdir=DIR \
        --config.data_dir=PATH_TO_CIFAR10_JPG --config.kind=ascl --config.seed=0
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Return the 2-epoch CPU config of the results page."""
    config = default.get_config()
    config.dataset = "folder"
    config.image_size = 32
    config.mean = (0.4914, 0.4822, 0.4465)
    config.std = (0.2023, 0.1994, 0.2010)
    config.num_epochs = 2
    config.warmup_epochs = 1
    # kNN at step 0 and after each epoch.
    config.knn_every_epochs = 1.0
    return config
