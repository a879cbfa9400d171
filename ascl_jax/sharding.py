"""Data-parallel training over every device of every process: mesh, shardings, multi-host set-up.

One mesh axis, "data", runs over all devices. The global batch is split along it into equal
contiguous shards, and so is the queue: device i of P stores the queue rows
[i * n / P, (i + 1) * n / P). The parameters, the optimiser state, the BatchNorm statistics,
the queue pointer, the step and the PRNG key are replicated. The train step runs as the body of
a `jax.shard_map` (see `ascl_jax.train_step`), inside `jax.jit` with these shardings on its
inputs and outputs, so the state never leaves the devices and the step compiles once.

The result of a step does not depend on P: the sharded step computes what one device computes
on the global batch, up to float32 rounding of reductions that run in a different order.

Multi-host: each process loads only the rows of each global batch that its own devices hold
(`process_batch_rows`), and `global_batch` assembles the global arrays from them with
`jax.make_array_from_process_local_data`. `initialize_distributed` starts the JAX distributed
runtime before anything touches the devices.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from ascl_jax import queue as queue_lib

logger = logging.getLogger(__name__)

DATA_AXIS = "data"

# Environment variables that describe a multi-process run without a cluster manager that JAX
# detects by itself (TPU pod slices, SLURM and Open MPI are detected).
COORDINATOR_ADDRESS_ENV = "JAX_COORDINATOR_ADDRESS"
NUM_PROCESSES_ENV = "JAX_NUM_PROCESSES"
PROCESS_ID_ENV = "JAX_PROCESS_ID"

State = TypeVar("State")


# ---------------------------------------------------------------------------
# Mesh and validation.
# ---------------------------------------------------------------------------


def create_mesh(devices: Sequence[jax.Device] | None = None) -> Mesh:
    """Build the one-axis ("data") mesh over `devices`, by default every device of every process.

    `jax.make_mesh` orders the devices for fast collectives on the physical topology. The axis
    type is Auto, so the mesh only places arrays and leaves `jax.numpy` semantics unchanged.
    """
    devices = jax.devices() if devices is None else list(devices)
    if not devices:
        raise ValueError("Cannot build a mesh over an empty list of devices.")
    return jax.make_mesh(
        (len(devices),), (DATA_AXIS,), axis_types=(AxisType.Auto,), devices=devices
    )


def _multiples_near(value: int, divisor: int) -> str:
    """Return the multiples of `divisor` on either side of `value`, e.g. "96 or 104"."""
    lower = max(divisor, value // divisor * divisor)
    return f"{lower} or {lower + divisor}"


def check_batch_and_queue(
    *, batch_size: int, queue_size: int, num_devices: int, bn_groups: int = 1
) -> None:
    """Raise ValueError unless the global batch, the queue and the BN groups fit the devices.

    The global batch must split into equal shards, so batch_size must be a multiple of
    num_devices. Each enqueue writes one contiguous block, so queue_size must be a multiple of
    batch_size, and it then also splits evenly over the devices. The BatchNorm groups are
    groups of the global batch, so bn_groups must divide batch_size. The message names the
    numbers and values that would fit.
    """
    if num_devices < 1:
        raise ValueError(f"Invalid number of devices {num_devices}: expected at least 1.")
    if batch_size < 1 or batch_size % num_devices:
        raise ValueError(
            f"Invalid global batch_size={batch_size} for {num_devices} devices: the global "
            f"batch must split into {num_devices} equal shards, so it must be a positive "
            f"multiple of {num_devices}. "
            f"{_multiples_near(max(batch_size, 1), num_devices)} would work."
        )
    try:
        queue_lib.check_queue_size(queue_size, batch_size)
    except ValueError as error:
        raise ValueError(f"Invalid queue_size for {num_devices} devices: {error}") from None
    if bn_groups < 1 or batch_size % bn_groups:
        divisors = [g for g in (1, 2, 4, 8, 16, 32) if batch_size % g == 0]
        raise ValueError(
            f"Invalid bn_groups={bn_groups} for the global batch_size={batch_size}: the "
            f"BatchNorm groups split the global batch into equal parts, so bn_groups must "
            f"divide {batch_size}; for example {divisors} would work."
        )


# ---------------------------------------------------------------------------
# Shardings of the state and the batch.
# ---------------------------------------------------------------------------


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Return the sharding of a global batch: axis 0 split over "data"."""
    return NamedSharding(mesh, P(DATA_AXIS))


def replicated_sharding(mesh: Mesh) -> NamedSharding:
    """Return the sharding of an array with a full copy on every device."""
    return NamedSharding(mesh, P())


def state_partition_specs(state: State) -> State:
    """Return a pytree like `state` with a PartitionSpec per leaf.

    Everything is replicated except the queue's keys [n, D] and labels [n], which are split
    along n. `state` may hold arrays or `jax.ShapeDtypeStruct`s.
    """
    specs = jax.tree.map(lambda _: P(), state)
    queue_specs = queue_lib.Queue(keys=P(DATA_AXIS, None), labels=P(DATA_AXIS), pointer=P())
    return specs.replace(queue=queue_specs)


def state_shardings(state: State, mesh: Mesh) -> State:
    """Return the NamedSharding of every leaf of `state` (see `state_partition_specs`)."""
    return jax.tree.map(
        lambda spec: NamedSharding(mesh, spec),
        state_partition_specs(state),
        is_leaf=lambda node: isinstance(node, P),
    )


def put_state(state: State, mesh: Mesh) -> State:
    """Place `state` on the mesh: replicated, with the queue split along n.

    Every process must pass the same values, as it does when it builds the state from the
    same seed.
    """
    return jax.device_put(state, state_shardings(state, mesh))


def create_sharded_state(create_state: Callable[[], State], mesh: Mesh) -> State:
    """Build the train state directly on the mesh by running `create_state` under `jax.jit`.

    `create_state` takes no arguments and returns the state (for example a `functools.partial`
    of `train_state.create_train_state`). The outputs come out with the shardings of
    `state_shardings`, so no device ever stores the whole queue, and the initialisation runs
    as one compiled program rather than op by op. Every process must call this with the same
    function, as it does when it builds the state from the same seed.
    """
    shapes = jax.eval_shape(create_state)
    return jax.jit(create_state, out_shardings=state_shardings(shapes, mesh))()


def shard_train_step(
    step_fn: Callable[..., tuple[State, Mapping[str, jax.Array]]],
    mesh: Mesh,
    state: State,
    *,
    donate_state: bool = True,
) -> Callable[[State, jax.Array, jax.Array], tuple[State, dict[str, jax.Array]]]:
    """Wrap a per-device train step in `jax.shard_map` over "data" and `jax.jit`.

    Args:
        step_fn: the step built by `train_step.make_train_step(..., axis_name=DATA_AXIS)`.
        mesh: the mesh from `create_mesh`.
        state: the train state or its shapes; only its tree structure is used.
        donate_state: let the step reuse the input state's buffers for the output state.

    Returns:
        `step(state, images, labels) -> (state, metrics)` for a state placed with `put_state`
        and a batch sharded with `batch_sharding` (see `global_batch`). The new state has the
        shardings of the input state, so the next call reuses the compiled program, and the
        metrics are replicated scalars.
    """
    specs = state_partition_specs(state)
    mapped = jax.shard_map(
        step_fn,
        mesh=mesh,
        in_specs=(specs, P(DATA_AXIS), P(DATA_AXIS)),
        out_specs=(specs, P()),
    )
    shardings = state_shardings(state, mesh)
    return jax.jit(
        mapped,
        in_shardings=(shardings, batch_sharding(mesh), batch_sharding(mesh)),
        out_shardings=(shardings, replicated_sharding(mesh)),
        donate_argnums=(0,) if donate_state else (),
    )


def shard_feature_fn(
    feature_fn: Callable[[State, jax.Array], jax.Array], mesh: Mesh, state: State
) -> Callable[[State, np.ndarray], jax.Array]:
    """Wrap `feature_fn(state, images)` (e.g. `train_step.make_feature_fn`) to split batches.

    The returned function takes the whole batch as a host array, the same on every process,
    computes the features of each device's share of it and returns them replicated, as a
    global array that `np.asarray` reads on every process. The batch size must be a multiple
    of the number of devices.
    """
    jitted = jax.jit(
        feature_fn,
        in_shardings=(state_shardings(state, mesh), batch_sharding(mesh)),
        out_shardings=replicated_sharding(mesh),
    )

    def apply(state: State, images: np.ndarray) -> jax.Array:
        batch_size = images.shape[0]
        if batch_size % mesh.size:
            raise ValueError(
                f"Invalid evaluation batch of {batch_size} images for {mesh.size} devices: "
                f"it must split evenly, so use a multiple of {mesh.size}, e.g. "
                f"{_multiples_near(batch_size, mesh.size)}."
            )
        rows = process_batch_rows(mesh, batch_size)
        global_images = jax.make_array_from_process_local_data(
            batch_sharding(mesh), np.asarray(images)[rows], images.shape
        )
        return jitted(state, global_images)

    return apply


# ---------------------------------------------------------------------------
# Multi-host input.
# ---------------------------------------------------------------------------


def process_batch_rows(mesh: Mesh, batch_size: int) -> np.ndarray:
    """Return the rows of each global batch that this process's devices hold, in increasing order.

    This process's input pipeline loads exactly these rows, in this order; `global_batch` then
    assembles the global batch. With one process this is `arange(batch_size)`. With several,
    the rows are usually one contiguous block per process, but the order of the mesh devices
    decides, so they are read from the sharding rather than computed from
    `jax.process_index()`.
    """
    index_map = batch_sharding(mesh).addressable_devices_indices_map((batch_size,))
    rows = set()
    for (index,) in index_map.values():
        rows.update(range(*index.indices(batch_size)))
    return np.asarray(sorted(rows), np.int64)


def global_batch(
    mesh: Mesh, images: np.ndarray, labels: np.ndarray, *, batch_size: int
) -> tuple[jax.Array, jax.Array]:
    """Assemble global, batch-sharded arrays from this process's rows of a batch.

    `images` [R, H, W, C] and `labels` [R] are the rows `process_batch_rows(mesh, batch_size)`
    of the global batch, in that order (R = batch_size with one process).
    """
    num_rows = len(process_batch_rows(mesh, batch_size))
    if images.shape[0] != num_rows or labels.shape[0] != num_rows:
        raise ValueError(
            f"Invalid process-local batch: this process's devices take {num_rows} rows of the "
            f"global batch of {batch_size}, but got {images.shape[0]} images and "
            f"{labels.shape[0]} labels. Load the rows that process_batch_rows returns."
        )
    sharding = batch_sharding(mesh)
    return (
        jax.make_array_from_process_local_data(sharding, images, (batch_size, *images.shape[1:])),
        jax.make_array_from_process_local_data(sharding, labels, (batch_size,)),
    )


# ---------------------------------------------------------------------------
# Multi-process runtime.
# ---------------------------------------------------------------------------


def initialize_distributed(
    enabled: bool = False, environ: Mapping[str, str] | None = None
) -> bool:
    """Start the JAX distributed runtime when asked to or when the environment describes a run.

    Call it before anything else touches JAX's devices. With `enabled`,
    `jax.distributed.initialize()` detects the cluster by itself on TPU pod slices, SLURM and
    Open MPI (JAX 0.10.2). Without `enabled`, it runs only when JAX_COORDINATOR_ADDRESS,
    JAX_NUM_PROCESSES and JAX_PROCESS_ID are set, and passes them on. That starts several
    processes on hosts without a cluster manager, or on one machine over 127.0.0.1. Returns
    whether the runtime is up after the call, whether or not this call started it.
    """
    environ = os.environ if environ is None else environ
    if jax.distributed.is_initialized():
        return True
    address = environ.get(COORDINATOR_ADDRESS_ENV)
    num_processes = environ.get(NUM_PROCESSES_ENV)
    process_id = environ.get(PROCESS_ID_ENV)
    explicit = [address, num_processes, process_id]
    if any(value is not None for value in explicit) and None in explicit:
        raise ValueError(
            f"Set all of {COORDINATOR_ADDRESS_ENV}, {NUM_PROCESSES_ENV} and {PROCESS_ID_ENV} "
            f"for a multi-process run, or none of them; got {COORDINATOR_ADDRESS_ENV}="
            f"{address!r}, {NUM_PROCESSES_ENV}={num_processes!r}, "
            f"{PROCESS_ID_ENV}={process_id!r}."
        )
    if address is not None:
        try:
            count, index = int(num_processes), int(process_id)
        except ValueError as error:
            raise ValueError(
                f"Invalid {NUM_PROCESSES_ENV}={num_processes!r} or {PROCESS_ID_ENV}="
                f"{process_id!r}: both must be integers, with 0 <= process id < processes."
            ) from error
        logger.info("Starting JAX distributed: process %d of %d, coordinator %s.",
                    index, count, address)
        jax.distributed.initialize(address, num_processes=count, process_id=index)
        return True
    if enabled:
        logger.info("Starting JAX distributed with cluster auto-detection.")
        jax.distributed.initialize()
        return True
    return False


def is_main_process() -> bool:
    """Return whether this is process 0, the only one that should log and write files.

    Checkpoints are the exception: orbax saves and restores from every process.
    """
    return jax.process_index() == 0


def describe(mesh: Mesh) -> dict[str, Any]:
    """Return the process and device counts of a run, for the log."""
    return {
        "process_index": jax.process_index(),
        "process_count": jax.process_count(),
        "local_devices": jax.local_device_count(),
        "devices": mesh.size,
        "platform": mesh.devices.flat[0].platform,
    }
