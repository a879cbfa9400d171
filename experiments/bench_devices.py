"""Time the sharded train step on 1 and more (fake CPU) devices, side by side in one process.

Usage:
    XLA_FLAGS=--xla_force_host_platform_device_count=4 \
        python -m experiments.bench_devices [--devices=1,4] [--repeats=7] [--width=16]

Prints, per device count, the median time of one train step of the embedded default's model
(ResNet-10, batch 256, queue 4096, 28x28 greyscale images) after compilation, and its ratio
to the first device count. Fake CPU devices share the machine's cores, so on a CPU this
measures the overhead of the sharded program, not a speed-up.
"""

import time

import numpy as np
from absl import app, flags

_DEVICES = flags.DEFINE_list("devices", ["1", "4"], "Device counts to compare.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed steps per device count, after one warm-up.")
_WIDTH = flags.DEFINE_integer("width", 16, "Base width of the ResNet-10.")


def time_step(num_devices: int, repeats: int, width: int) -> float:
    """Return the median seconds of one sharded train step on the first `num_devices`."""
    import jax

    from ascl_jax import data as data_lib
    from ascl_jax import models, sharding
    from ascl_jax import train_state as state_lib
    from ascl_jax import train_step as step_lib
    from experiments.configs import default

    config = default.get_config()
    config.width = width
    source = data_lib.load_source("embedded", "train")
    images, labels = source.get(np.arange(config.batch_size))
    mean, std = data_lib.DATASET_STATS["embedded"]

    mesh = sharding.create_mesh(jax.devices()[:num_devices])
    model = models.create_encoder(
        config.model, width=config.width, stem=config.stem, bn_groups=config.bn_groups,
        hidden_dim=config.hidden_dim, projection_dim=config.projection_dim,
    )
    schedule = state_lib.learning_rate_schedule(0.1, warmup_steps=0, total_steps=1000)
    tx = state_lib.make_optimizer(schedule, momentum=0.9, weight_decay=5e-4)
    state = state_lib.create_train_state(
        jax.random.PRNGKey(0), model, image_shape=(28, 28, 1), tx=tx,
        queue_size=config.queue_size, projection_dim=config.projection_dim,
    )
    state = sharding.put_state(state, mesh)
    step = sharding.shard_train_step(
        step_lib.make_train_step(config, model, schedule, mean=mean, std=std,
                                 axis_name=sharding.DATA_AXIS),
        mesh, state,
    )
    batch = sharding.global_batch(mesh, images, labels, batch_size=config.batch_size)

    state, metrics = step(state, *batch)
    jax.block_until_ready(metrics)
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        state, metrics = step(state, *batch)
        jax.block_until_ready(metrics)
        times.append(time.perf_counter() - started)
    return float(np.median(times))


def main(argv: list[str]) -> None:
    del argv
    counts = [int(count) for count in _DEVICES.value]
    medians = [time_step(count, _REPEATS.value, _WIDTH.value) for count in counts]
    print(f"{'devices':>8} {'median step (ms)':>17} {'images/s':>9} {'ratio':>6}")
    for count, median in zip(counts, medians):
        print(f"{count:>8} {1000 * median:>17.1f} {256 / median:>9.0f} "
              f"{median / medians[0]:>6.2f}")


if __name__ == "__main__":
    app.run(main)
