"""The workdir checks that the evaluation commands run before importing JAX."""

import os

import pytest

from experiments import eval_workdir


@pytest.fixture
def workdir(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    (tmp_path / "checkpoints" / "20").mkdir(parents=True)
    (tmp_path / "checkpoints" / "30.orbax-checkpoint-tmp").mkdir()
    return str(tmp_path)


def test_complete_workdir_passes(workdir):
    assert eval_workdir.workdir_error(workdir, None, "knn_eval.json") is None
    assert eval_workdir.workdir_error(workdir, 20, "knn_eval.json") is None


def test_missing_step_lists_finished_steps(workdir):
    message = eval_workdir.workdir_error(workdir, 30, "knn_eval.json")
    assert message.startswith("Invalid --step=30")
    assert "[20]" in message


def test_results_path_that_is_a_directory(workdir):
    os.mkdir(os.path.join(workdir, "linear_eval.json"))
    message = eval_workdir.workdir_error(workdir, None, "linear_eval.json")
    assert "is a directory" in message


def test_read_only_workdir_fails_before_work(workdir, monkeypatch):
    monkeypatch.setattr(eval_workdir.os, "access", lambda path, mode: False)
    message = eval_workdir.workdir_error(workdir, None, "knn_eval.json")
    assert message.startswith("Cannot write ")
    assert "read-only" in message


def test_not_a_run_directory(tmp_path):
    message = eval_workdir.workdir_error(str(tmp_path), None, "knn_eval.json")
    assert "no config.json" in message
    missing = eval_workdir.workdir_error(str(tmp_path / "nope"), None, "knn_eval.json")
    assert "no such directory" in missing
