"""ASCL on ImageNet-1k: ResNet-50, MoCo v2 schedule with ASCL labels.

Queue of 65,536 keys, EMA momentum 0.999, K = 1, global batch 256 with learning rate 0.03
(scale both linearly for larger batches), 200 epochs, 224x224 crops.

Command (imagenet2012 prepared with tensorflow-datasets under DATA_DIR):
    python -m experiments.pretrain --config=experiments/configs/imagenet.py --workdir=DIR \
        --config.data_dir=DATA_DIR

Hardware: a TPU pod slice or a multi-GPU host. The compiled step counts 8,247 GFLOP per 256
images, so 200 epochs (1,000,800 steps of 256) are 8.3e18 FLOP: about 23 hours at a sustained
100 TFLOP/s, or under 3 hours on 8 such devices (an arithmetic estimate, not a measured run).

Expected result: to be filled in when measured on an accelerator.
"""

import ml_collections

from experiments.configs import default


def get_config() -> ml_collections.ConfigDict:
    """Return the ImageNet-1k recipe."""
    config = default.get_config()
    config.dataset = "tfds:imagenet2012"
    config.test_split = "validation"
    config.image_size = 224
    config.mean = (0.485, 0.456, 0.406)
    config.std = (0.229, 0.224, 0.225)

    config.model = "resnet50"
    config.width = 64
    config.stem = "imagenet"
    config.hidden_dim = 2048
    config.projection_dim = 128
    config.bn_groups = 8

    config.queue_size = 65536
    config.ema_momentum = 0.999
    config.batch_size = 256
    config.learning_rate = 0.03
    config.warmup_epochs = 5
    config.num_epochs = 200
    config.log_every_steps = 100
    config.knn_every_epochs = 10
    config.eval_batch_size = 256
    config.checkpoint_every_steps = 2000
    return config
