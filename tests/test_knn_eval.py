"""End-to-end tests of the kNN evaluation command on a tiny checkpoint, on 8 fake CPU devices.

The vote itself is tested in test_knn.py. Here the command must reproduce the trainer's kNN
monitor on the same checkpoint. It must also reach 100% where that is known by construction:
with k = 1 and the queries in the memory bank, each query's nearest neighbour is itself.
"""

import json
import os

import pytest

from tests.test_linear_eval import error_lines, make_tiny_run, run_cli


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    return make_tiny_run(tmp_path_factory)


def read_entries(workdir):
    with open(os.path.join(workdir, "knn_eval.json"), encoding="utf-8") as file:
        return json.load(file)["entries"]


def test_cli_reproduces_monitor_and_self_match(tiny_run):
    workdir, monitor_top1 = tiny_run
    results = os.path.join(workdir, "knn_eval.json")
    if os.path.exists(results):
        os.remove(results)

    # The settings of the run's monitor: k = 20, T = 0.1, the test split as memory bank.
    result = run_cli("experiments.knn_eval", f"--workdir={workdir}", "--k=20",
                     "--temperature=0.1")
    assert result.returncode == 0, result.stderr[-3000:]
    assert "kNN top-1 of step 2 (k=20, T=0.1, 2000 test images in the bank" in result.stdout
    [entry] = read_entries(workdir)
    assert (entry["step"], entry["k"], entry["temperature"]) == (2, 20, 0.1)
    assert (entry["memory_split"], entry["test_split"]) == ("test", "test")
    assert (entry["num_memory_examples"], entry["num_test_examples"]) == (2000, 2000)
    assert entry["devices"] == 8
    # The monitor ran on 1 device and this command on 8. Float32 rounding may therefore move
    # a near-tie, so two of the 2,000 queries may differ.
    assert abs(entry["top1"] - monitor_top1) <= 2 / 2000

    result = run_cli("experiments.knn_eval", f"--workdir={workdir}", "--k=1", "--step=2",
                     "--memory_split=test", "--test_split=test")
    assert result.returncode == 0, result.stderr[-3000:]
    entries = read_entries(workdir)
    assert [(e["k"], e["temperature"]) for e in entries] == [(20, 0.1), (1, 0.1)]
    assert entries[0] == entry
    assert entries[1]["top1"] == 1.0


@pytest.mark.parametrize("flags, message", [
    (["--k=0"], "Invalid --k=0"),
    (["--temperature=0"], "Invalid --temperature=0.0"),
    (["--temperature=nan"], "Invalid --temperature=nan"),
    (["--step=9"], "Invalid --step=9: "),
])
def test_cli_rejects_invalid_flags(tiny_run, flags, message):
    result = run_cli("experiments.knn_eval", f"--workdir={tiny_run[0]}", *flags, timeout=60)
    assert result.returncode == 1
    assert len(error_lines(result.stderr)) == 1
    assert message in result.stderr


def test_cli_rejects_k_larger_than_bank(tiny_run):
    result = run_cli("experiments.knn_eval", f"--workdir={tiny_run[0]}", "--k=2001", timeout=120)
    assert result.returncode == 1
    assert error_lines(result.stderr) == [
        "error: Invalid --k=2001: the memory split 'test' has 2000 labelled images. "
        "Use k <= 2000."
    ]


def test_cli_rejects_missing_workdir(tmp_path):
    result = run_cli("experiments.knn_eval", f"--workdir={tmp_path / 'missing'}", timeout=60)
    assert result.returncode == 1
    assert "no such directory" in result.stderr
