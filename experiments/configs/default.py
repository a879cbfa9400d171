"""ASCL pretraining on the embedded Fashion-MNIST subset: the offline default.

Runs on any machine without downloads: 10,000 training and 2,000 test images of Fashion-MNIST
(28x28 greyscale) ship inside the package. A ResNet-10 of width 16 trains for 15 epochs on the CPU.

Command:
    python -m experiments.pretrain --workdir=workdirs/default

Expected result (measured on a 2-core x86-64 CPU, seed 0): kNN top-1 67.9% at step 0 and
74.6% after 15 epochs (585 steps), in 7 to 9 minutes.
"""

import ml_collections


def get_config() -> ml_collections.ConfigDict:
    """Return the configuration of the embedded default run."""
    config = ml_collections.ConfigDict()

    # Data: "embedded", "folder" (data_dir contains SPLIT/CLASS/*.jpg or SPLIT.tar) or "tfds:NAME".
    config.dataset = "embedded"
    # Folder of the images or tfds data directory; unused by the embedded dataset.
    config.data_dir = ""
    # "folder" only: skip images that fail to decode (their count is logged) instead of failing.
    config.skip_corrupt = False
    # Split used for pretraining; "+" joins several splits.
    config.train_split = "train"
    # Split whose features form the kNN memory bank.
    config.memory_split = "train"
    # Split whose images the kNN monitor classifies.
    config.test_split = "test"
    # Side of the square crops fed to the network, in pixels.
    config.image_size = 28
    # Per-channel normalisation; empty means the dataset's known values or values computed from it.
    config.mean = ()
    config.std = ()

    # Model: "resnet10", "resnet18", "resnet34" or "resnet50".
    config.model = "resnet10"
    # Base number of filters; 64 is the standard ResNet width.
    config.width = 16
    # "cifar" (3x3 convolution, stride 1, no max-pool) or "imagenet" (7x7 stride 2 and max-pool).
    config.stem = "cifar"
    # Hidden and output sizes of the projector MLP.
    config.hidden_dim = 512
    config.projection_dim = 128
    # Computation dtype of convolutions and dense layers: "float32" or "bfloat16" (mixed
    # precision). Parameters, optimiser state, BatchNorm statistics and the loss math stay float32.
    config.compute_dtype = "float32"
    # Number of "ghost" BatchNorm groups the batch is split into; 1 is plain BatchNorm.
    config.bn_groups = 8
    # Shuffle the target batch around the target encoder, so that a key and its own query rarely
    # fall into the same BN group and BN statistics cannot serve as a shortcut to the positive.
    config.shuffle_bn = True

    # Method.
    # Label rule: "normal" (MoCo), "hard", "ahcl" or "ascl".
    config.kind = "ascl"
    # K, the number of nearest queue entries that receive weight.
    config.num_neighbors = 1
    # Temperature of the prediction softmax.
    config.tau = 0.1
    # Sharpening temperature of the target's similarity distribution over the queue.
    config.tau_prime = 0.05
    # Number of target embeddings in the queue; a multiple of batch_size.
    config.queue_size = 4096
    # EMA momentum m of the target network: theta_t <- m * theta_t + (1 - m) * theta_q.
    config.ema_momentum = 0.99
    # Augmentation of the target view: "weak" (the method's choice) or "strong".
    config.target_view = "weak"

    # Optimisation.
    # Global batch size over all devices.
    config.batch_size = 256
    # Peak learning rate of SGD after warm-up.
    config.learning_rate = 0.1
    # SGD momentum.
    config.momentum = 0.9
    # Weight decay added to the gradient (coupled), on all parameters.
    config.weight_decay = 5e-4
    # Linear warm-up from 0, in epochs, then cosine decay to 0.
    config.warmup_epochs = 1
    config.num_epochs = 15
    # When > 0, the number of steps to train, overriding num_epochs.
    config.num_train_steps = 0
    config.seed = 0

    # Devices.
    # Number of devices to train on; 0 uses every device of every process.
    config.num_devices = 0
    # Start jax.distributed with cluster auto-detection (TPU pod slices, SLURM, Open MPI). It also
    # starts when JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES and JAX_PROCESS_ID are set.
    config.distributed = False

    # Monitoring.
    config.log_every_steps = 10
    # Run the kNN monitor every this many epochs, which may be a fraction (0: only before and
    # after training).
    config.knn_every_epochs = 3.0
    config.knn_k = 200
    config.knn_temperature = 0.1
    # Batch size of feature extraction for the kNN monitor.
    config.eval_batch_size = 512
    # Number of batches the host prepares ahead of the device.
    config.prefetch = 2

    # Checkpoints in WORKDIR/checkpoints.
    # Save every this many steps (0: only at the end and on SIGTERM/SIGINT).
    config.checkpoint_every_steps = 200
    # Number of newest checkpoints kept; older ones are deleted.
    config.keep_checkpoints = 2
    return config
