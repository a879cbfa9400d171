"""End-to-end tests: the pretraining entry point on real images for a few steps."""

import json
import os
import subprocess
import sys

import pytest

from ascl_jax import train
from experiments.configs import default

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY_OVERRIDES = {
    "model": "resnet10",
    "width": 4,
    "hidden_dim": 32,
    "projection_dim": 16,
    "bn_groups": 4,
    "batch_size": 32,
    "queue_size": 128,
    "num_train_steps": 4,
    "log_every_steps": 2,
    "warmup_epochs": 0,
    "eval_batch_size": 512,
}


def read_metrics(workdir):
    with open(os.path.join(workdir, "metrics.jsonl"), encoding="utf-8") as file:
        return [json.loads(line) for line in file]


def run_cli(*args, timeout=600):
    environment = dict(os.environ, PYTHONPATH=ROOT)
    return subprocess.run(
        [sys.executable, "-m", "experiments.pretrain", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=environment,
    )


def test_cli_pretrains_on_embedded_images(tmp_path):
    workdir = str(tmp_path / "run")
    overrides = [f"--config.{key}={value}" for key, value in TINY_OVERRIDES.items()]
    result = run_cli(f"--workdir={workdir}", "--config.memory_split=test", *overrides)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kNN top-1" in result.stderr

    with open(os.path.join(workdir, "config.json"), encoding="utf-8") as file:
        saved = json.load(file)
    assert saved["batch_size"] == 32
    assert saved["kind"] == "ascl"

    records = read_metrics(workdir)
    train_lines = [r for r in records if "loss" in r]
    eval_lines = [r for r in records if "knn_top1" in r]
    assert [r["step"] for r in train_lines] == [2, 4]
    for record in train_lines:
        for key in ("step", "epoch", "loss", "learning_rate", "confidence", "positive_weight",
                    "same_class_rate"):
            assert key in record
    assert [r["step"] for r in eval_lines] == [0, 4]
    for record in eval_lines:
        assert 0.1 < record["knn_top1"] <= 1.0  # 10 classes: a working monitor beats chance


def test_cli_rejects_bad_kind_before_compiling(tmp_path):
    result = run_cli(f"--workdir={tmp_path}", "--config.kind=soft", timeout=120)
    assert result.returncode != 0
    assert "config.kind='soft'" in result.stderr
    assert "Compiling" not in result.stderr


def test_cli_reports_missing_folder(tmp_path):
    missing = tmp_path / "nowhere"
    result = run_cli(f"--workdir={tmp_path / 'run'}", "--config.dataset=folder",
                     f"--config.data_dir={missing}", timeout=120)
    assert result.returncode != 0
    assert str(missing) in result.stderr


@pytest.mark.skipif(
    not os.environ.get("ASCL_JAX_CIFAR10_DIR"),
    reason="set ASCL_JAX_CIFAR10_DIR to a CIFAR-10 JPEG folder or tar directory",
)
def test_pretrain_on_cifar10_jpeg(tmp_path):
    config = default.get_config()
    config.update(TINY_OVERRIDES)
    config.dataset = "folder"
    config.data_dir = os.environ["ASCL_JAX_CIFAR10_DIR"]
    # The 10,000 test images keep this test short; the full run uses the 50,000 train images.
    config.train_split = config.memory_split = config.test_split = "test"
    config.image_size = 32
    config.mean, config.std = (), ()
    summary = train.train_and_evaluate(config, str(tmp_path))
    assert summary["steps"] == 4
    assert 0.1 < summary["knn_top1_final"] <= 1.0
    records = read_metrics(str(tmp_path))
    assert all(r["loss"] > 0 for r in records if "loss" in r)


def test_unwritable_workdir_fails_with_its_path(tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    config = default.get_config()
    with pytest.raises(ValueError, match=r"Invalid --workdir=.*file/run.*cannot write"):
        train.train_and_evaluate(config, str(blocker / "run"))


def test_split_class_mismatch_names_the_classes(tmp_path):
    from PIL import Image

    for split, classes in (("train", ("cat", "dog", "empty")), ("test", ("cat", "dog"))):
        for name in classes:
            folder = tmp_path / split / name
            folder.mkdir(parents=True)
            if name != "empty":
                Image.new("RGB", (8, 8), (10, 20, 30)).save(folder / "0.png")
    config = default.get_config()
    config.dataset = "folder"
    config.data_dir = str(tmp_path)
    config.image_size = 8
    with pytest.raises(ValueError, match=r"config.test_split='test'") as error:
        train.load_run_data(config)
    assert "only in train_split: ['empty']" in str(error.value)
    assert "empty ones included" in str(error.value)


def test_knn_k_clamped_to_bank(caplog):
    with caplog.at_level("WARNING", logger="ascl_jax"):
        assert train._knn_k(5000, 2000) == 2000
    assert "config.knn_k=5000 exceeds the 2000" in caplog.text
    assert train._knn_k(200, 2000) == 200
