"""Test a two-process run on 127.0.0.1: 2 CPU processes with 2 devices each, 4 devices in all.

JAX 0.10.2 runs CPU collectives across processes (gloo, its default CPU implementation), so
the test starts two worker processes that join through `sharding.initialize_distributed` and
the JAX_COORDINATOR_ADDRESS / JAX_NUM_PROCESSES / JAX_PROCESS_ID variables. Each worker
loads only its own rows of every global batch, assembles the global batch, and trains the
tiny encoder of `sharded_setup` for 3 steps. The result must equal one process on one device.
"""

import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from tests import sharded_setup
from tests.test_sharding import assert_same_run

NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
WORKER_TIMEOUT_SECONDS = 240


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def worker_main(output_dir: str) -> None:
    """Run in each worker process: join the run, train, and save what the test compares."""
    from ascl_jax import sharding

    assert sharding.initialize_distributed()
    assert jax.process_count() == NUM_PROCESSES
    assert jax.device_count() == NUM_PROCESSES * DEVICES_PER_PROCESS

    mesh = sharding.create_mesh()
    config = sharded_setup.tiny_config(kind="hard", bn_groups=1)
    rows = sharding.process_batch_rows(mesh, config.batch_size)
    summaries = sharded_setup.run_sharded(config, mesh, create_on_mesh=True)

    # The kNN features of the initial state, each device computing its share of the batch.
    state = sharding.put_state(sharded_setup.initial_state(), mesh)
    images, _ = sharded_setup.batches()[0]
    features = sharding.shard_feature_fn(sharded_setup.feature_fn(), mesh, state)(state, images)

    arrays = {"rows": rows, "features": np.asarray(features)}
    for step, summary in enumerate(summaries):
        arrays.update({f"step{step}_{name}": value for name, value in summary.items()})
    np.savez(os.path.join(output_dir, f"process{jax.process_index()}.npz"), **arrays)
    with open(os.path.join(output_dir, f"main{jax.process_index()}.txt"), "w") as file:
        file.write(str(sharding.is_main_process()))


def _load_results(path: str) -> tuple[np.ndarray, np.ndarray, list[dict[str, np.ndarray]]]:
    with np.load(path) as arrays:
        rows = arrays["rows"]
        features = arrays["features"]
        summaries = []
        for step in range(sharded_setup.NUM_STEPS):
            prefix = f"step{step}_"
            summaries.append({name[len(prefix):]: arrays[name] for name in arrays.files
                              if name.startswith(prefix)})
    return rows, features, summaries


def test_two_processes_match_one_device(tmp_path):
    port = _free_port()
    environment = dict(
        os.environ,
        XLA_FLAGS=f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS}",
        JAX_PLATFORMS="cpu",
        JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}",
        JAX_NUM_PROCESSES=str(NUM_PROCESSES),
    )
    command = [sys.executable, "-c",
               f"from tests.test_multihost import worker_main; worker_main({str(tmp_path)!r})"]
    workers = [
        subprocess.Popen(command, env=dict(environment, JAX_PROCESS_ID=str(index)),
                         stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        for index in range(NUM_PROCESSES)
    ]
    outputs = []
    try:
        for worker in workers:
            output, _ = worker.communicate(timeout=WORKER_TIMEOUT_SECONDS)
            outputs.append(output)
    except subprocess.TimeoutExpired:
        for worker in workers:
            worker.kill()
        pytest.fail(f"The worker processes did not finish within {WORKER_TIMEOUT_SECONDS} s.")
    for index, (worker, output) in enumerate(zip(workers, outputs)):
        assert worker.returncode == 0, f"worker {index} failed:\n{output[-4000:]}"

    expected = sharded_setup.run_one_device(sharded_setup.tiny_config(kind="hard", bn_groups=1))
    images, _ = sharded_setup.batches()[0]
    expected_features = jax.jit(sharded_setup.feature_fn())(sharded_setup.initial_state(), images)
    all_rows = []
    for index in range(NUM_PROCESSES):
        rows, features, summaries = _load_results(str(tmp_path / f"process{index}.npz"))
        all_rows.append(rows)
        assert_same_run(summaries, expected, f"process {index} of {NUM_PROCESSES}")
        np.testing.assert_allclose(features, expected_features, rtol=1e-5, atol=1e-6)
    # The processes load disjoint halves of each batch that together cover it.
    assert all(len(rows) == sharded_setup.BATCH_SIZE // NUM_PROCESSES for rows in all_rows)
    np.testing.assert_array_equal(np.sort(np.concatenate(all_rows)),
                                  np.arange(sharded_setup.BATCH_SIZE))
    assert (tmp_path / "main0.txt").read_text() == "True"
    assert (tmp_path / "main1.txt").read_text() == "False"
