"""Measure the input pipeline against what the train step consumes, side by side in one process.

Usage:
    python -m experiments.bench_input [--cifar10_dir=DIR] [--datasets=embedded,cifar10]
        [--cifar10_config=cifar10] [--repeats=5] [--cold_repeats=3] [--num_batches=40]
        [--step_repeats=5] [--loop_steps=20] [--loop_repeats=3] [--loop_budget_s=600]
        [--num_devices=0] [--tiny]

For each dataset (the embedded Fashion-MNIST subset with the config `default.py`, and the
CIFAR-10 JPEG tar archives with `cifar10.py`) it prints the images per second of:

- host: loading the training split. For CIFAR-10 that is the first decode of `train.tar` into
  an empty temporary cache directory ("cold"), and the load of the arrays cached by it
  ("cached"). Then batching through `pipeline.train_batches` with its background thread, and
  batching plus the transfer onto the mesh through `pipeline.prefetch_to_device`.
- device: the jitted strong and weak views (`augment.augment_batch`) of one batch, each alone
  and both together, as the train step computes them.
- consumption: the default train step of the dataset's config, built as `ascl_jax.train` builds
  it, on one placed batch. Then the training loop itself (pipeline, transfer and step, with the
  metrics fetched every log_every_steps as the loop does), without and with device prefetch.

Every figure is the median of several timed runs after one warm-up run: `--repeats` runs,
`--step_repeats` for the train step and `--loop_repeats` for the loop, whose two settings
alternate. The cold decode has no warm-up, because each run decodes into a fresh cache. The
last column divides each rate by the train step's, so an input part with a ratio below 3 risks
slowing training down.
"""

import dataclasses
import functools
import math
import os
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from absl import app, flags, logging

from experiments import cli

_CIFAR10_DIR = flags.DEFINE_string(
    "cifar10_dir", os.environ.get("ASCL_JAX_CIFAR10_DIR", ""),
    "Folder with the CIFAR-10 JPEG archives train.tar and test.tar, or the folders train/ and "
    "test/ (default: the environment variable ASCL_JAX_CIFAR10_DIR). When it is empty, the "
    "default --datasets skips CIFAR-10.",
)
_DATASETS = flags.DEFINE_list(
    "datasets", ["embedded", "cifar10"], "Datasets to measure, from embedded and cifar10."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Timed runs per figure, after one warm-up run.")
_COLD_REPEATS = flags.DEFINE_integer(
    "cold_repeats", 3, "Cold decodes of the CIFAR-10 training archive (0 skips them)."
)
_NUM_BATCHES = flags.DEFINE_integer("num_batches", 40, "Batches per timed batching run.")
_STEP_REPEATS = flags.DEFINE_integer(
    "step_repeats", 5, "Timed train steps, after the compile (0 skips the train step and the "
    "loop, and leaves the ratios empty)."
)
_LOOP_STEPS = flags.DEFINE_integer(
    "loop_steps", 20, "Steps per run of the training loop, with and without device prefetch "
    "(0 skips the loop)."
)
_LOOP_REPEATS = flags.DEFINE_integer(
    "loop_repeats", 3, "Timed runs of the training loop per setting, after one warm-up run."
)
_LOOP_BUDGET = flags.DEFINE_float(
    "loop_budget_s", 600.0, "Skip the training loop when its runs would take longer than this "
    "many seconds in all, estimated from the train step's time."
)
_CIFAR10_CONFIG = flags.DEFINE_string(
    "cifar10_config", "cifar10", "Config module in experiments/configs whose train step the "
    "CIFAR-10 rows compare with, for example cifar10_cpu."
)
_NUM_DEVICES = flags.DEFINE_integer("num_devices", 0, "Devices of the mesh; 0 uses all.")
_TINY = flags.DEFINE_bool(
    "tiny", False, "Smoke test: a tiny model, batches of 16 and few runs, in seconds. Run "
    "counts given on the command line keep their values."
)

# The config each dataset trains with by default; --cifar10_config replaces that of CIFAR-10.
CONFIG_OF_DATASET = {"embedded": "default", "cifar10": "cifar10"}
# Sizes of the --tiny smoke test.
TINY_OVERRIDES = {"width": 4, "hidden_dim": 32, "projection_dim": 16, "batch_size": 16,
                  "queue_size": 64}
# Run counts of the --tiny smoke test, by Options field (each one also a flag name).
TINY_RUNS = {"repeats": 2, "cold_repeats": 1, "num_batches": 3, "step_repeats": 2,
             "loop_steps": 3, "loop_repeats": 1}
# Smallest valid value of each numeric option.
MINIMUM_OF_OPTION = {"repeats": 1, "cold_repeats": 0, "num_batches": 1, "step_repeats": 0,
                     "loop_steps": 0, "loop_repeats": 1, "loop_budget_s": 0, "num_devices": 0}


@dataclasses.dataclass(frozen=True)
class Options:
    """Settings of a benchmark run: datasets, run counts and config overrides (see the flags)."""

    datasets: tuple[str, ...] = ("embedded", "cifar10")
    cifar10_dir: str = ""
    repeats: int = 5
    cold_repeats: int = 3
    num_batches: int = 40
    step_repeats: int = 5
    loop_steps: int = 20
    loop_repeats: int = 3
    loop_budget_s: float = 600.0
    cifar10_config: str = "cifar10"
    num_devices: int = 0
    # Config values that replace those of each dataset's config.
    overrides: Mapping[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass(frozen=True)
class Row:
    """One line of the table."""

    dataset: str
    side: str
    part: str
    images_per_second: float
    # Images per second of the train step of the same dataset; the ratio's denominator.
    step_images_per_second: float = float("nan")

    @property
    def ratio(self) -> float:
        """Images per second of this part divided by the train step's; NaN without a step."""
        return self.images_per_second / self.step_images_per_second


def _median_seconds(run: Callable[[], Any], repeats: int, warmup: bool = True) -> float:
    """Return the median wall time of `repeats` calls of `run`, after one untimed call."""
    if warmup:
        run()
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        run()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def config_name(dataset: str, options: Options) -> str:
    """Return the name of the config module whose train step `dataset` is compared with."""
    return options.cifar10_config if dataset == "cifar10" else CONFIG_OF_DATASET[dataset]


def load_config(dataset: str, options: Options) -> Any:
    """Return the default config of `dataset` with the options' overrides applied."""
    import importlib

    module = importlib.import_module(f"experiments.configs.{config_name(dataset, options)}")
    config = module.get_config()
    if dataset == "cifar10":
        config.dataset = "folder"
        config.data_dir = options.cifar10_dir
    for key, value in options.overrides.items():
        config[key] = value
    return config


# Host side.


def measure_loading(dataset: str, config: Any, options: Options) -> tuple[Any, list[Row]]:
    """Load the training split, timing it; return the source and its rows."""
    from ascl_jax import data as data_lib

    if dataset == "embedded":
        load = functools.partial(data_lib.load_source, "embedded", config.train_split)
        seconds = _median_seconds(load, options.repeats)
        source = load()
        return source, [Row(dataset, "host", "load the embedded .npz", len(source) / seconds)]

    rows = []
    load_with_cache = functools.partial(
        data_lib.load_source, "folder", config.train_split, data_dir=config.data_dir,
        image_size=config.image_size,
    )
    with tempfile.TemporaryDirectory(prefix="bench_input_cache_") as cache_dir:
        cold_dirs = iter(range(options.cold_repeats))

        def load_cold() -> None:
            load_with_cache(cache_dir=os.path.join(cache_dir, f"cold{next(cold_dirs)}"))

        if options.cold_repeats:
            seconds = _median_seconds(load_cold, options.cold_repeats, warmup=False)
            num_images = len(load_with_cache(cache_dir=os.path.join(cache_dir, "cold0")))
            rows.append(Row(dataset, "host", "decode train.tar (cold, empty cache)",
                            num_images / seconds))
        # The first cold run wrote a cache; without cold runs the warm-up run writes one.
        cached = functools.partial(load_with_cache, cache_dir=os.path.join(cache_dir, "cold0"))
        seconds = _median_seconds(cached, options.repeats)
        source = cached()
    rows.append(Row(dataset, "host", "load the cached arrays", len(source) / seconds))
    return source, rows


def _put_batch(mesh: Any, batch_size: int) -> Callable[[np.ndarray, np.ndarray], Any]:
    from ascl_jax import sharding

    return lambda images, labels: sharding.global_batch(
        mesh, images, labels, batch_size=batch_size
    )


def _host_batches(source: Any, config: Any, mesh: Any, num_steps: int | None) -> Any:
    """Return the host batch iterator exactly as the training loop opens it."""
    from ascl_jax import sharding
    from ascl_jax.data import pipeline

    return pipeline.train_batches(
        source, batch_size=config.batch_size, seed=config.seed, num_steps=num_steps,
        prefetch=config.prefetch, rows=sharding.process_batch_rows(mesh, config.batch_size),
    )


def measure_batching(dataset: str, source: Any, config: Any, mesh: Any,
                     options: Options) -> list[Row]:
    """Time train_batches alone, and with the transfer through prefetch_to_device."""
    import jax

    from ascl_jax.data import pipeline

    num_images = options.num_batches * config.batch_size

    def host_only() -> None:
        with _host_batches(source, config, mesh, options.num_batches) as batches:
            for _ in batches:
                pass

    def to_device() -> None:
        batches = _host_batches(source, config, mesh, options.num_batches)
        put = _put_batch(mesh, config.batch_size)
        with pipeline.prefetch_to_device(batches, put) as placed:
            for batch in placed:
                jax.block_until_ready((batch.images, batch.labels))

    return [
        Row(dataset, "host", f"train_batches (prefetch={config.prefetch})",
            num_images / _median_seconds(host_only, options.repeats)),
        Row(dataset, "host", "train_batches + prefetch_to_device",
            num_images / _median_seconds(to_device, options.repeats)),
    ]


# Device side.


def measure_augmentation(dataset: str, source: Any, config: Any, mean: Any, std: Any,
                         options: Options) -> list[Row]:
    """Time the jitted strong view, weak view and both on one batch of the source's images."""
    import jax

    from ascl_jax import augment

    batch_size = config.batch_size
    images = jax.device_put(source.get(np.arange(batch_size))[0])
    kwargs = dict(size=config.image_size, mean=tuple(mean), std=tuple(std))

    def views(names: tuple[str, ...]) -> Callable[[Any, Any], Any]:
        def apply(key: Any, batch: Any) -> Any:
            keys = jax.random.split(key, len(names))
            return [augment.augment_batch(k, batch, augment.VIEWS[name], **kwargs)
                    for k, name in zip(keys, names)]
        return jax.jit(apply)

    rows = []
    shape = "x".join(str(side) for side in images.shape[1:])
    for names in (("strong",), ("weak",), ("strong", "weak")):
        jitted = views(names)
        key = jax.random.PRNGKey(0)
        seconds = _median_seconds(lambda: jax.block_until_ready(jitted(key, images)),
                                  options.repeats)
        label = " + ".join(f"{name}_view" for name in names)
        rows.append(Row(dataset, "device", f"{label} (jit, batch {batch_size}, {shape})",
                        batch_size / seconds))
    return rows


# Consumption.


def build_train_step(config: Any, mesh: Any, image_shape: tuple[int, ...], mean: Any,
                     std: Any, steps_per_epoch: int) -> tuple[Any, Any]:
    """Build the sharded train step and a fresh state on `mesh`, as `ascl_jax.train` does."""
    import jax
    import jax.numpy as jnp

    from ascl_jax import models, sharding
    from ascl_jax import train_state as state_lib
    from ascl_jax import train_step as step_lib

    model = models.create_encoder(
        config.model, width=config.width, stem=config.stem, bn_groups=config.bn_groups,
        hidden_dim=config.hidden_dim, projection_dim=config.projection_dim,
    )
    total_steps = int(config.num_epochs * steps_per_epoch)
    schedule = state_lib.learning_rate_schedule(
        config.learning_rate, warmup_steps=int(round(config.warmup_epochs * steps_per_epoch)),
        total_steps=total_steps,
    )
    tx = state_lib.make_optimizer(
        schedule, momentum=config.momentum, weight_decay=config.weight_decay
    )
    state = state_lib.create_train_state(
        jax.random.PRNGKey(config.seed), model, image_shape=image_shape, tx=tx,
        queue_size=config.queue_size, projection_dim=config.projection_dim,
    )
    state = sharding.put_state(state.replace(step=jnp.asarray(state.step, jnp.int32)), mesh)
    train_step = sharding.shard_train_step(
        step_lib.make_train_step(config, model, schedule, mean=mean, std=std,
                                 axis_name=sharding.DATA_AXIS),
        mesh, state,
    )
    return train_step, state


def measure_consumption(dataset: str, source: Any, config: Any, mesh: Any, mean: Any,
                        std: Any, options: Options) -> list[Row]:
    """Time the train step on one placed batch, then the loop without and with prefetch."""
    import jax

    from ascl_jax.data import pipeline

    batch_size = config.batch_size
    image_shape = (config.image_size, config.image_size, source.image_shape[-1])
    train_step, state = build_train_step(
        config, mesh, image_shape, mean, std, pipeline.steps_per_epoch(len(source), batch_size)
    )
    put = _put_batch(mesh, batch_size)
    with _host_batches(source, config, mesh, 1) as batches:
        first = next(batches)
    images, labels = put(first.images, first.labels)
    holder = {"state": state}

    def one_step() -> None:
        holder["state"], metrics = train_step(holder["state"], images, labels)
        jax.block_until_ready(metrics)

    step_seconds = _median_seconds(one_step, options.step_repeats)
    rows = [Row(dataset, "consumption", f"train step ({config_name(dataset, options)}.py, "
                f"{config.model} width {config.width}, batch {batch_size})",
                batch_size / step_seconds)]
    # Two settings, each with a warm-up run and loop_repeats timed runs.
    loop_seconds = step_seconds * options.loop_steps * 2 * (options.loop_repeats + 1)
    if loop_seconds > options.loop_budget_s:
        logging.warning("Skipping the training loop of %s: it would take about %.0f s, more "
                        "than --loop_budget_s=%.0f.", dataset, loop_seconds,
                        options.loop_budget_s)
        return rows
    if options.loop_steps <= 0:
        return rows

    def loop(size: int) -> None:
        batches = _host_batches(source, config, mesh, options.loop_steps)
        with pipeline.prefetch_to_device(batches, put, size) as placed:
            for batch in placed:
                holder["state"], metrics = train_step(holder["state"], batch.images,
                                                      batch.labels)
                # The training loop fetches the metrics every log_every_steps steps.
                if (batch.step + 1) % config.log_every_steps == 0:
                    jax.device_get(metrics["loss"])
        jax.block_until_ready(holder["state"])

    num_images = options.loop_steps * batch_size
    # Interleaved runs, so a change in the machine's load affects both settings alike.
    times: dict[int, list[float]] = {0: [], 2: []}
    loop(0)
    loop(2)
    for _ in range(options.loop_repeats):
        for size in times:
            started = time.perf_counter()
            loop(size)
            times[size].append(time.perf_counter() - started)
    for size, seconds in times.items():
        rows.append(Row(dataset, "consumption",
                        f"training loop, device prefetch {size}",
                        num_images / statistics.median(seconds)))
    return rows


# The table.


def measure_dataset(dataset: str, mesh: Any, options: Options) -> list[Row]:
    """Return every row of one dataset, each with the train step's rate for the ratio."""
    from ascl_jax import data as data_lib

    config = load_config(dataset, options)
    source, rows = measure_loading(dataset, config, options)
    if config.mean and config.std:
        mean, std = tuple(config.mean), tuple(config.std)
    else:
        mean, std = data_lib.normalization_stats(config.dataset, source)
    rows += measure_batching(dataset, source, config, mesh, options)
    rows += measure_augmentation(dataset, source, config, mean, std, options)
    if options.step_repeats <= 0:
        return rows
    consumption = measure_consumption(dataset, source, config, mesh, mean, std, options)
    step_rate = consumption[0].images_per_second
    return [dataclasses.replace(row, step_images_per_second=step_rate)
            for row in rows + consumption]


def format_table(rows: list[Row]) -> str:
    """Return the rows as a fixed-width table."""
    width = max(len(row.part) for row in rows)
    lines = [f"{'dataset':<9} {'side':<12} {'part':<{width}} {'images/s':>10} {'x step':>7}"]
    for row in rows:
        ratio = "n/a" if math.isnan(row.ratio) else f"{row.ratio:.2f}"
        lines.append(f"{row.dataset:<9} {row.side:<12} {row.part:<{width}} "
                     f"{row.images_per_second:>10.0f} {ratio:>7}")
    return "\n".join(lines)


def check_options(options: Options) -> None:
    """Raise ValueError, naming the flag and a valid value, for an option the run would reject.

    It reads the config modules and lists the CIFAR-10 folder but starts no JAX backend, so a
    bad option fails before any measurement or compilation.
    """
    if not options.datasets:
        raise ValueError(f"invalid --datasets=: it is empty; pass one or more of "
                         f"{','.join(CONFIG_OF_DATASET)}.")
    unknown = sorted(set(options.datasets) - set(CONFIG_OF_DATASET))
    if unknown:
        raise ValueError(f"invalid --datasets={','.join(options.datasets)}: unknown "
                         f"{', '.join(unknown)}; use some of {','.join(CONFIG_OF_DATASET)}.")
    for name, minimum in MINIMUM_OF_OPTION.items():
        value = getattr(options, name)
        if not value >= minimum:  # Also rejects NaN.
            raise ValueError(f"invalid --{name}={value}: it must be at least {minimum}.")
    if "cifar10" in options.datasets:
        check_cifar10(options)


def check_cifar10(options: Options) -> None:
    """Raise ValueError unless the CIFAR-10 config exists and the folder has its training split."""
    import importlib.util

    if not options.cifar10_dir:
        raise ValueError(
            "missing CIFAR-10 folder: --datasets includes cifar10, so pass --cifar10_dir or set "
            "ASCL_JAX_CIFAR10_DIR to the folder with train.tar, or pass --datasets=embedded."
        )
    module = f"experiments.configs.{options.cifar10_config}"
    if "." in options.cifar10_config or importlib.util.find_spec(module) is None:
        raise ValueError(f"invalid --cifar10_config={options.cifar10_config}: no such module in "
                         "experiments/configs; use a module name such as cifar10 or cifar10_cpu.")
    root = os.path.abspath(os.path.expanduser(options.cifar10_dir))
    if not os.path.isdir(root):
        raise ValueError(f"invalid --cifar10_dir={options.cifar10_dir}: {root} is not a folder; "
                         "pass the folder that contains train.tar (or train/CLASS/*.jpg).")
    # The benchmark loads only the training split, one folder or archive per "+"-joined part.
    for split in load_config("cifar10", options).train_split.split("+"):
        folder = os.path.join(root, split)
        if not (os.path.isdir(folder) or os.path.isfile(folder + ".tar")):
            raise ValueError(
                f"invalid --cifar10_dir={options.cifar10_dir}: it contains neither {split}.tar "
                f"nor the folder {split}/; pass the folder with the CIFAR-10 archives "
                f"{split}.tar and test.tar."
            )


def mesh_devices(options: Options) -> list[Any]:
    """Return the first --num_devices devices, or all; raise ValueError if there are fewer."""
    import jax

    devices = jax.devices()
    if options.num_devices > len(devices):
        raise ValueError(f"invalid --num_devices={options.num_devices}: JAX has only "
                         f"{len(devices)} device(s); pass at most {len(devices)}, or 0 for all.")
    return devices[: options.num_devices] if options.num_devices else devices


def run(options: Options) -> list[Row]:
    """Measure every dataset of `options`; return the rows.

    Raises:
        ValueError: an option is invalid (see check_options), or --num_devices exceeds the
            devices JAX has.
    """
    check_options(options)
    from ascl_jax import sharding

    mesh = sharding.create_mesh(mesh_devices(options))
    rows = []
    for dataset in options.datasets:
        rows += measure_dataset(dataset, mesh, options)
    return rows


def options_from_flags() -> Options:
    """Return the Options of the command line, shrunk by --tiny, and check them.

    Without a CIFAR-10 folder, the default --datasets drops cifar10 with a note.

    Raises:
        ValueError: an option is invalid; the message names the flag and a valid value.
    """
    datasets = tuple(_DATASETS.value)
    skip_cifar10 = ("cifar10" in datasets and not _CIFAR10_DIR.value
                    and not flags.FLAGS["datasets"].present)
    if skip_cifar10:
        datasets = tuple(name for name in datasets if name != "cifar10")
    options = Options(
        datasets=datasets, cifar10_dir=_CIFAR10_DIR.value,
        repeats=_REPEATS.value, cold_repeats=_COLD_REPEATS.value,
        num_batches=_NUM_BATCHES.value, step_repeats=_STEP_REPEATS.value,
        loop_steps=_LOOP_STEPS.value, loop_repeats=_LOOP_REPEATS.value,
        loop_budget_s=_LOOP_BUDGET.value,
        cifar10_config=_CIFAR10_CONFIG.value, num_devices=_NUM_DEVICES.value,
    )
    if _TINY.value:
        # --tiny sets only the run counts that the command line leaves at their defaults.
        runs = {name: value for name, value in TINY_RUNS.items()
                if not flags.FLAGS[name].present}
        options = dataclasses.replace(options, overrides=TINY_OVERRIDES, **runs)
    check_options(options)
    if skip_cifar10:
        print("note: skipping CIFAR-10 because --cifar10_dir is empty and ASCL_JAX_CIFAR10_DIR "
              "is unset.")
    return options


def main(argv: list[str]) -> None:
    cli.reject_arguments(argv)
    try:
        options = options_from_flags()
        # The device count needs the JAX backend, which starts here, before any compilation.
        mesh_devices(options)
    except ValueError as error:
        sys.exit(f"error: {error}")
    import jax

    rows = run(options)
    print(f"devices: {jax.device_count()} x {jax.devices()[0].device_kind}, CPU cores: "
          f"{os.cpu_count()}, load average at the end: {os.getloadavg()[0]:.1f}")
    print(f"medians of {options.repeats} runs after a warm-up ({options.step_repeats} for the "
          f"train step, {options.loop_repeats} of {options.loop_steps} steps for the loop); "
          "x step = images/s divided by the train step's images/s")
    print(format_table(rows))


if __name__ == "__main__":
    app.run(main, flags_parser=cli.parse_flags)
