"""Tests of resuming: SIGKILL and SIGTERM mid-run, reruns, config conflicts, the NaN guard.

The end-to-end tests run the pretraining command in subprocesses that share one persistent
compilation cache, so only the first run and the first resumed run compile the train step.
The metrics of a run that was interrupted and rerun are compared with those of an uninterrupted
run, line by line and bit for bit, leaving out the wall-clock fields.
"""

import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import time

import jax.numpy as jnp
import optax
import pytest

from ascl_jax import checkpoint as checkpoint_lib
from ascl_jax import train
from ascl_jax import train_step as step_lib
from experiments.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHECKPOINT_EVERY = 4
OVERRIDES = {
    "width": 4,
    "hidden_dim": 32,
    "projection_dim": 16,
    "bn_groups": 4,
    "batch_size": 32,
    "queue_size": 128,
    "warmup_epochs": 0,
    "eval_batch_size": 500,
    # One device keeps compilation short; the sharded path has its own tests.
    "num_devices": 1,
    # The 2,000 test images keep data loading and the kNN monitor short.
    "train_split": "test",
    "memory_split": "test",
    "num_train_steps": 16,
    "log_every_steps": 1,
    # 62 steps per epoch, so the kNN monitor runs at steps 6 and 12, and at the end.
    "knn_every_epochs": 0.1,
    "checkpoint_every_steps": CHECKPOINT_EVERY,
    "keep_checkpoints": 3,
}
# Fields that measure wall-clock time and differ between any two runs.
TIMING_KEYS = {"images_per_second", "knn_seconds", "compile_seconds"}


def cli_args(workdir, **changes):
    overrides = dict(OVERRIDES, **changes)
    flags = [f"--config.{key}={value}" for key, value in overrides.items()]
    return [f"--workdir={workdir}", *flags]


def start_cli(args, cache_dir):
    environment = dict(
        os.environ,
        PYTHONPATH=ROOT,
        JAX_COMPILATION_CACHE_DIR=str(cache_dir),
        JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
        JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
    )
    return subprocess.Popen(
        [sys.executable, "-m", "experiments.pretrain", *args], cwd=ROOT, env=environment,
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def run_cli(args, cache_dir, timeout=300):
    process = start_cli(args, cache_dir)
    stdout, stderr = process.communicate(timeout=timeout)
    return process.returncode, stdout + stderr


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def without_timing(records):
    return [{key: value for key, value in record.items() if key not in TIMING_KEYS}
            for record in records]


def saved_steps(workdir):
    """Return the steps of the complete checkpoints (orbax's temporary directories excluded)."""
    directory = checkpoint_lib.checkpoint_dir(workdir)
    return sorted(int(name) for name in os.listdir(directory) if name.isdigit())


def interrupt_cli(workdir, cache_dir, signal_number, *, after_step):
    """Start a run and send it a signal once it has logged a step >= `after_step` that is past
    its newest complete checkpoint; return (returncode, output)."""
    process = start_cli(cli_args(workdir), cache_dir)
    metrics_path = os.path.join(workdir, "metrics.jsonl")
    deadline = time.time() + 300
    while process.poll() is None and time.time() < deadline:
        steps = []
        if os.path.exists(metrics_path):
            with open(metrics_path, encoding="utf-8") as file:
                steps = [json.loads(line)["step"] for line in file if line.endswith("\n")]
        checkpoints = saved_steps(workdir) if os.path.isdir(
            checkpoint_lib.checkpoint_dir(workdir)) else []
        past_checkpoint = bool(checkpoints) and max(steps, default=0) > checkpoints[-1]
        if max(steps, default=0) >= after_step and past_checkpoint:
            process.send_signal(signal_number)
            break
        time.sleep(0.02)
    stdout, stderr = process.communicate(timeout=300)
    return process.returncode, stdout + stderr


@pytest.fixture(scope="module", name="cache_dir")
def fixture_cache_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("jax_cache")


@pytest.fixture(scope="module", name="reference")
def fixture_reference(tmp_path_factory, cache_dir):
    """Workdir and metrics of an uninterrupted run."""
    workdir = str(tmp_path_factory.mktemp("reference") / "run")
    returncode, output = run_cli(cli_args(workdir), cache_dir)
    assert returncode == 0, output[-3000:]
    records = read_metrics(workdir)
    assert [r["step"] for r in records if "knn_top1" in r] == [0, 6, 12, 16]
    assert saved_steps(workdir) == [8, 12, 16]
    return workdir, records


def test_sigkill_resume_matches_uninterrupted(tmp_path, cache_dir, reference):
    workdir = str(tmp_path / "run")
    returncode, output = interrupt_cli(workdir, cache_dir, signal.SIGKILL, after_step=5)
    assert returncode == -signal.SIGKILL, f"the run ended before the kill: {output[-2000:]}"
    restored_step = saved_steps(workdir)[-1]
    killed_at = read_metrics(workdir)[-1]["step"]
    assert killed_at > restored_step

    returncode, output = run_cli(cli_args(workdir), cache_dir)
    assert returncode == 0, output[-3000:]
    assert f"at step {restored_step}." in output
    assert f"after step {restored_step} from" in output
    assert without_timing(read_metrics(workdir)) == without_timing(reference[1])


def test_sigterm_saves_current_step_then_resumes(tmp_path, cache_dir, reference):
    workdir = str(tmp_path / "run")
    returncode, output = interrupt_cli(workdir, cache_dir, signal.SIGTERM, after_step=5)
    assert returncode == 128 + signal.SIGTERM, output[-3000:]
    last_step = read_metrics(workdir)[-1]["step"]
    assert f"Received SIGTERM: saved the checkpoint of step {last_step} in" in output
    assert saved_steps(workdir)[-1] == last_step
    assert "Traceback" not in output

    returncode, output = run_cli(cli_args(workdir), cache_dir)
    assert returncode == 0, output[-3000:]
    assert f"at step {last_step}." in output
    assert without_timing(read_metrics(workdir)) == without_timing(reference[1])


def test_truncated_newest_checkpoint_falls_back(tmp_path, cache_dir, reference):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    newest = os.path.join(checkpoint_lib.checkpoint_dir(workdir), "16")
    data_files = [os.path.join(folder, name)
                  for folder, _, names in os.walk(os.path.join(newest, "state"))
                  for name in names if os.path.basename(folder) == "d"]
    largest = max(data_files, key=os.path.getsize)
    with open(largest, "r+b") as file:
        file.truncate(os.path.getsize(largest) // 2)

    returncode, output = run_cli(cli_args(workdir), cache_dir)
    assert returncode == 0, output[-3000:]
    assert f"Cannot restore the checkpoint {newest} " in output
    assert "at step 12." in output
    assert saved_steps(workdir) == [8, 12, 16]
    assert without_timing(read_metrics(workdir)) == without_timing(reference[1])


def test_rerun_of_complete_run_trains_nothing(tmp_path, cache_dir, reference):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    # Keys that only change logging and evaluation may differ on a rerun.
    returncode, output = run_cli(
        cli_args(workdir, log_every_steps=3, knn_every_epochs=0), cache_dir
    )
    assert returncode == 0, output[-3000:]
    assert "already complete at step 16" in output
    assert read_metrics(workdir) == reference[1]


def test_incompatible_config_names_keys(tmp_path, cache_dir, reference):
    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    returncode, output = run_cli(cli_args(workdir, width=8, queue_size=256), cache_dir)
    assert returncode == 1
    assert "width (checkpoint 4, now 8)" in output
    assert "queue_size (checkpoint 128, now 256)" in output
    assert "Compiling" not in output
    assert read_metrics(workdir) == reference[1]


def fake_make_train_step(config, model, schedule, *, mean, std, axis_name=None):
    """Build a step that leaves the parameters alone and reports a NaN loss from step 19 on."""
    del config, model, mean, std, axis_name

    def train_step(state, images, labels):
        del images, labels
        step = state.step + 1
        metrics = {
            "loss": jnp.where(step >= 19, jnp.nan, 1.0 / step),
            "learning_rate": schedule(state.step),
            "param_norm": optax.tree.norm(state.params),
        }
        return state.replace(step=step), metrics

    return train_step


def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch, reference):
    # Continuing the finished reference run avoids building and evaluating a fresh state.
    workdir = str(tmp_path / "run")
    shutil.copytree(reference[0], workdir)
    monkeypatch.setattr(step_lib, "make_train_step", fake_make_train_step)
    config = default.get_config()
    config.update(OVERRIDES)
    config.update({"num_train_steps": 24, "checkpoint_every_steps": 2, "log_every_steps": 5,
                   "knn_every_epochs": 0})

    with pytest.raises(train.NonFiniteError) as error:
        train.train_and_evaluate(config, workdir)
    message = str(error.value)
    assert "Training stopped at step 19: loss=nan" in message
    assert "Last finite metrics (step 18): learning_rate=" in message
    assert f"loss={1 / 18:.6g}," in message
    assert os.path.join(checkpoint_lib.checkpoint_dir(workdir), "18") + ", is kept" in message
    assert saved_steps(workdir) == [12, 16, 18]
    # The first log step, 20, comes after the NaN, so no line is added.
    assert read_metrics(workdir) == reference[1]


def test_truncate_metrics_keeps_lines_up_to_step(tmp_path, caplog):
    path = tmp_path / "metrics.jsonl"
    lines = [{"step": 0, "knn_top1": 0.5}, {"step": 1, "compile_seconds": 2.0},
             {"step": 1, "loss": 4.0}, {"step": 2, "loss": 3.0}, {"step": 3, "loss": 2.0}]
    text = "".join(json.dumps(line) + "\n" for line in lines) + '{"step": 4, "lo'
    path.write_text(text)
    with caplog.at_level(logging.WARNING, logger="ascl_jax"):
        kept = train.truncate_metrics(str(path), 2)
    assert kept == lines[:4]
    assert [json.loads(line) for line in path.read_text().splitlines()] == lines[:4]
    assert "Removed 2 lines after step 2" in caplog.text

    assert train.truncate_metrics(str(path), -1) == []
    assert path.read_text() == ""


def test_stop_signals_defer_and_restore_handlers():
    before = signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)
    with train.StopSignals() as stop:
        os.kill(os.getpid(), signal.SIGTERM)
        time.sleep(0.01)
        assert stop.received == signal.SIGTERM
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before

    with pytest.raises(KeyboardInterrupt):
        with train.StopSignals() as stop:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
            assert stop.received == signal.SIGINT
            # A second Ctrl-C aborts at once.
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.01)
    assert (signal.getsignal(signal.SIGTERM), signal.getsignal(signal.SIGINT)) == before
