"""The platform defaults (same results with and without them) and a tiny run of bench_train."""

import importlib.util
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from ascl_jax import platform

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Two train steps of a tiny model in a fresh process, so that XLA reads the flags of that run.
# Prints the final XLA_FLAGS and writes the losses, parameters, BatchNorm statistics and queue
# to the file in argv[1].
TWO_STEPS = r"""
import json, sys
import numpy as np
from ascl_jax import platform
platform.apply_platform_defaults()
import os, jax
from ascl_jax import models, train_state as state_lib, train_step as step_lib
from experiments.configs import default

config = default.get_config()
config.update(dict(model="resnet10", width=8, hidden_dim=32, projection_dim=16, bn_groups=2,
                   queue_size=64, batch_size=16, image_size=8))
model = models.create_encoder("resnet10", width=8, bn_groups=2, hidden_dim=32, projection_dim=16)
schedule = state_lib.learning_rate_schedule(0.1, warmup_steps=0, total_steps=100)
tx = state_lib.make_optimizer(schedule, momentum=0.9, weight_decay=5e-4)
state = state_lib.create_train_state(jax.random.PRNGKey(0), model, image_shape=(8, 8, 3), tx=tx,
                                     queue_size=64, projection_dim=16)
step = jax.jit(step_lib.make_train_step(config, model, schedule, mean=(0.5,) * 3, std=(0.25,) * 3))
rng = np.random.default_rng(0)
images = rng.integers(0, 256, (16, 8, 8, 3), dtype=np.uint8)
labels = rng.integers(0, 4, 16).astype(np.int32)
losses = []
for _ in range(2):
    state, metrics = step(state, images, labels)
    losses.append(float(metrics["loss"]))
leaves = jax.tree.leaves((state.params, state.batch_stats, state.queue.keys))
np.savez(sys.argv[1], losses=np.array(losses),
         **{f"leaf{i}": np.asarray(leaf) for i, leaf in enumerate(leaves)})
print(json.dumps({"xla_flags": os.environ.get("XLA_FLAGS", "")}))
"""


def _run_two_steps(tmp_path, name: str, *, defaults: bool) -> tuple[dict, dict]:
    env = {key: value for key, value in os.environ.items() if key != "XLA_FLAGS"}
    env["PYTHONPATH"] = ROOT
    env["JAX_PLATFORMS"] = "cpu"
    env[platform.DISABLE_VARIABLE] = "0" if defaults else "1"
    output = tmp_path / f"{name}.npz"
    result = subprocess.run(
        [sys.executable, "-c", TWO_STEPS, str(output)], env=env, cwd=ROOT,
        capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    with np.load(output) as arrays:
        return report, dict(arrays)


def test_platform_defaults_keep_results(tmp_path):
    with_report, with_defaults = _run_two_steps(tmp_path, "with", defaults=True)
    without_report, without_defaults = _run_two_steps(tmp_path, "without", defaults=False)
    for flag in platform.CPU_XLA_FLAGS:
        assert flag in with_report["xla_flags"].split()
        assert flag not in without_report["xla_flags"].split()

    assert sorted(with_defaults) == sorted(without_defaults)
    np.testing.assert_allclose(with_defaults["losses"], without_defaults["losses"], rtol=1e-5)
    for name in with_defaults:
        np.testing.assert_allclose(with_defaults[name], without_defaults[name],
                                   rtol=1e-4, atol=1e-5, err_msg=name)


def test_platform_defaults_appended_once(monkeypatch):
    # Earlier tests in this process may have started JAX's backend; these cases do not.
    monkeypatch.setattr(platform, "backend_started", lambda: False)
    environ = {"XLA_FLAGS": "--xla_force_host_platform_device_count=2"}
    added = platform.apply_platform_defaults(environ)
    assert added == list(platform.CPU_XLA_FLAGS)
    assert environ["XLA_FLAGS"].split() == [
        "--xla_force_host_platform_device_count=2", *platform.CPU_XLA_FLAGS
    ]
    assert platform.apply_platform_defaults(environ) == []


def test_platform_defaults_keep_user_value(monkeypatch):
    # Earlier tests in this process may have started JAX's backend; these cases do not.
    monkeypatch.setattr(platform, "backend_started", lambda: False)
    user_flags = " ".join(flag.split("=")[0] + "=false" for flag in platform.CPU_XLA_FLAGS)
    environ = {"XLA_FLAGS": user_flags}
    assert platform.apply_platform_defaults(environ) == []
    assert environ["XLA_FLAGS"] == user_flags


@pytest.mark.parametrize("platforms", ["cuda", "tpu", "gpu,cpu"])
def test_platform_defaults_skip_other_platforms(platforms):
    environ = {"JAX_PLATFORMS": platforms}
    assert platform.apply_platform_defaults(environ) == []
    assert "XLA_FLAGS" not in environ


def test_platform_defaults_disabled_by_variable():
    environ = {platform.DISABLE_VARIABLE: "1"}
    assert platform.apply_platform_defaults(environ) == []
    assert "XLA_FLAGS" not in environ


def test_platform_defaults_after_backend_start(caplog):
    import jax

    jax.devices()
    environ = {"JAX_PLATFORMS": "cpu"}
    assert platform.apply_platform_defaults(environ) == []
    assert "already started" in caplog.text


# bench_train and bench_input define absl flags of the same names (--repeats), and the tests of
# bench_input import it, so bench_train is imported only in a subprocess.
PEAK_FLOPS_LOOKUP = r"""
import json
from experiments import bench_train
cases = [("TPU v5 lite", "bfloat16"), ("NVIDIA H100 80GB HBM3", "bfloat16"),
         ("NVIDIA H200", "float32"), ("TPU v4", "float32"), ("cpu", "float32")]
print(json.dumps([bench_train.peak_flops(kind, dtype) for kind, dtype in cases]))
"""


def test_peak_flops_lookup():
    result = subprocess.run(
        [sys.executable, "-c", PEAK_FLOPS_LOOKUP], env=dict(os.environ, PYTHONPATH=ROOT),
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    tpu_v5_lite, h100, h200_float32, tpu_v4_float32, cpu = json.loads(result.stdout)
    assert tpu_v5_lite == 197e12
    assert h100 == 989e12
    assert h200_float32 == 67e12
    assert tpu_v4_float32 is None
    assert cpu is None


def test_bench_train_tiny_run():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, "-m", "experiments.bench_train", "--batch_sizes=8",
         "--dtypes=float32,bfloat16", "--steps=1", "--repeats=2", "--warmup=0",
         "--model=resnet10", "--width=4", "--hidden_dim=16", "--projection_dim=8",
         "--bn_groups=2", "--queue_size=32", "--image_size=8"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=300,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    rows = [line.split() for line in result.stdout.splitlines()
            if line.split()[:1] == ["8"]]
    assert [row[1] for row in rows] == ["float32", "bfloat16"]
    # PyTorch is an optional dependency: without it the PyTorch columns read n/a.
    has_torch = importlib.util.find_spec("torch") is not None
    for row in rows:
        jax_rate = float(row[3])
        assert jax_rate > 0
        assert row[-1] == "n/a"  # MFU on a CPU.
        if not has_torch:
            assert row[4:7] == ["n/a", "n/a", "n/a"]
            continue
        torch_rate, ratio = float(row[5]), float(row[6])
        assert torch_rate > 0
        assert ratio == pytest.approx(jax_rate / torch_rate, rel=0.05, abs=0.01)


def test_bench_train_rejects_bad_batch():
    env = dict(os.environ, PYTHONPATH=ROOT, JAX_PLATFORMS="cpu")
    result = subprocess.run(
        [sys.executable, "-m", "experiments.bench_train", "--batch_sizes=12", "--bn_groups=8"],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip() == (
        "error: invalid batch size 12 in --batch_sizes: it must be a positive multiple of "
        "--bn_groups=8."
    )
