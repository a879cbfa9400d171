"""Tests of experiments.results.summarize: table values against NumPy, labels, input errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest

from experiments.results import runs as runs_lib
from experiments.results import summarize

STEPS_PER_EPOCH = 10
TOTAL_STEPS = 30
STATISTICS = ("confidence", "positive_weight", "same_class_rate", "neighbor_same_class")


def write_workdir(path, kind, seed, *, target_view="weak", config=True, total_steps=TOTAL_STEPS):
    """Write a workdir with random metrics; return {"knn": {step: value}, key: (epochs, values)}.

    Train lines every 4 steps and at the last step, so that step 20 lies on the boundary of the
    last epoch (2, 3]. kNN lines every 10 steps, a compile line at step 1.
    """
    os.makedirs(path, exist_ok=True)
    if config:
        with open(os.path.join(path, "config.json"), "w") as file:
            json.dump({"kind": kind, "seed": seed, "target_view": target_view}, file)
    rng = np.random.default_rng(100 * seed + len(kind) + len(target_view))
    logged = {"knn": {}, **{key: ([], []) for key in STATISTICS}}
    with open(os.path.join(path, "metrics.jsonl"), "w") as file:
        for step in range(total_steps + 1):
            epoch = step / STEPS_PER_EPOCH
            if step % 10 == 0:
                top1 = float(rng.uniform(0.2, 0.8))
                logged["knn"][step] = top1
                file.write(json.dumps({"step": step, "epoch": epoch, "knn_top1": top1,
                                       "knn_seconds": 0.5}) + "\n")
            if step == 1:
                file.write(json.dumps({"step": 1, "compile_seconds": 3.0}) + "\n")
            if step and (step % 4 == 0 or step == total_steps):
                record = {"step": step, "epoch": epoch, "loss": 5.0, "learning_rate": 0.1}
                for key in STATISTICS:
                    record[key] = float(rng.uniform(0, 1))
                    logged[key][0].append(epoch)
                    logged[key][1].append(record[key])
                file.write(json.dumps(record) + "\n")
    return logged


@pytest.fixture
def experiment(tmp_path):
    """Three seeds of ascl, two of normal, one of ascl with the strong target view.

    The baseline normal has another seed count than ascl, so that a standard error formula
    that mixes up n_a and n_b gives another value.
    """
    paths, logged = [], {}
    for kind, view, seeds in (("ascl", "weak", 3), ("normal", "weak", 2), ("ascl", "strong", 1)):
        for seed in range(seeds):
            path = str(tmp_path / f"{kind}_{view}_s{seed}")
            logged[path] = write_workdir(path, kind, seed, target_view=view)
            paths.append(path)
    return paths, logged


def table_rows(text, heading):
    """Return the cells of the first Markdown table after `## heading`, header excluded."""
    section = text.split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    rows = [line for line in section.splitlines() if line.startswith("| ")]
    return [[cell.strip() for cell in row.strip("|").split("|")] for row in rows[1:]]


def mean_std(values, digits=2):
    values = np.asarray(values, dtype=np.float64)
    if values.size == 1:
        return f"{values[0]:.{digits}f}"
    return f"{values.mean():.{digits}f} ± {values.std(ddof=1):.{digits}f}"


def test_default_labels(tmp_path, experiment):
    paths, _ = experiment
    no_config = str(tmp_path / "plain_run")
    write_workdir(no_config, "ascl", 0, config=False)
    runs = runs_lib.load_runs(paths + [no_config])
    assert [run.label for run in runs] == (
        ["ascl"] * 3 + ["normal"] * 2 + ["ascl, strong target", "plain_run"]
    )
    relabelled = runs_lib.load_runs(paths[:2], ["x", "y"])
    assert [run.label for run in relabelled] == ["x", "y"]


def test_knn_table_mean_std(experiment):
    paths, logged = experiment
    text = summarize.summarize(runs_lib.load_runs(paths))
    rows = table_rows(text, "kNN top-1 by step")
    settings = {"ascl": paths[:3], "normal": paths[3:5], "ascl, strong target": paths[5:]}
    expected = []
    for label, group in settings.items():
        for step in (0, 10, 20, 30):
            values = [100 * logged[path]["knn"][step] for path in group]
            individual = ", ".join(f"seed {seed}: {value:.2f}" for seed, value in enumerate(values))
            expected.append([label, str(step), f"{step / STEPS_PER_EPOCH:g}", str(len(group)),
                             mean_std(values), individual])
    assert rows == expected


def test_final_table_mean_std(experiment):
    paths, logged = experiment
    with open(os.path.join(paths[0], "DONE"), "w") as file:
        file.write("== ascl_s0: 412 s\n")
    with open(os.path.join(paths[1], "linear_eval.json"), "w") as file:
        json.dump({"entries": [
            {"mode": "features", "test_top1": 0.8125, "test_top5": 0.9875},
            {"mode": "augmented", "test_top1": 0.5, "test_top5": 0.75},
        ]}, file)

    text = summarize.summarize(runs_lib.load_runs(paths, linear_settings={"mode": "features"}))
    rows = table_rows(text, "Final results")
    ascl = [100 * logged[path]["knn"][TOTAL_STEPS] for path in paths[:3]]
    normal = [100 * logged[path]["knn"][TOTAL_STEPS] for path in paths[3:5]]
    assert rows[0] == ["ascl", "3", "30", mean_std(ascl), "81.25 (n=1)", "98.75 (n=1)",
                       "412 (n=1)"]
    assert rows[1] == ["normal", "2", "30", mean_std(normal), "", "", ""]

    per_run = [line for line in text.splitlines() if line.startswith("| ascl | seed ")]
    assert per_run[0] == f"| ascl | seed 0 | {paths[0]} | 30 | {ascl[0]:.2f} |  |  | 412 |"
    assert per_run[1] == f"| ascl | seed 1 | {paths[1]} | 30 | {ascl[1]:.2f} | 81.25 | 98.75 |  |"


def test_final_table_unfinished_run(tmp_path):
    paths = [str(tmp_path / "s0"), str(tmp_path / "s1")]
    finished = write_workdir(paths[0], "ascl", 0)
    unfinished = write_workdir(paths[1], "ascl", 1, total_steps=20)
    text = summarize.summarize(runs_lib.load_runs(paths))
    rows = table_rows(text, "Final results")
    values = [100 * finished["knn"][30], 100 * unfinished["knn"][20]]
    assert rows[0] == ["ascl", "2", "20/30", mean_std(values), "", "", ""]
    assert "The runs of ascl end at different steps (20, 30); the mean mixes them." in text


def test_statistics_table_last_epoch(experiment):
    paths, logged = experiment
    text = summarize.summarize(runs_lib.load_runs(paths))
    rows = table_rows(text, "Training statistics in the last epoch")
    assert rows[0][:2] == ["ascl", "3"]
    for column, key in enumerate(STATISTICS, start=2):
        per_run = []
        for path in paths[:3]:
            epochs, values = (np.array(series) for series in logged[path][key])
            # The last epoch is (2, 3]: steps 24, 28 and 30, not 20.
            per_run.append(values[epochs > 2.0].mean())
            assert (epochs > 2.0).sum() == 3
        assert rows[0][column] == mean_std(per_run, digits=3)


def test_statistics_moved_mass_share(experiment):
    paths, logged = experiment
    text = summarize.summarize(runs_lib.load_runs(paths))
    rows = {row[0]: row for row in table_rows(text, "Training statistics in the last epoch")}
    shares = []
    for path in paths[:3]:
        means = {}
        for key in ("same_class_rate", "positive_weight"):
            epochs, values = (np.array(series) for series in logged[path][key])
            means[key] = values[epochs > 2.0].mean()
        shares.append(means["same_class_rate"] / (1.0 - means["positive_weight"]))
    assert rows["ascl"][-1] == mean_std(shares, digits=3)


def test_baseline_difference(experiment):
    paths, logged = experiment
    text = summarize.summarize(runs_lib.load_runs(paths), baseline="normal")
    rows = table_rows(text, "Final kNN top-1 relative to normal")
    ascl = np.array([100 * logged[path]["knn"][TOTAL_STEPS] for path in paths[:3]])
    normal = np.array([100 * logged[path]["knn"][TOTAL_STEPS] for path in paths[3:5]])
    strong = 100 * logged[paths[5]]["knn"][TOTAL_STEPS]
    error = np.sqrt(ascl.var(ddof=1) / 3 + normal.var(ddof=1) / 2)
    # Seed 2 of ascl has no normal run to pair with.
    paired = ", ".join(f"seed {seed}: {ascl[seed] - normal[seed]:+.2f}" for seed in range(2))
    assert rows[0] == ["ascl", "3", "2", f"{ascl.mean() - normal.mean():+.2f}", f"{error:.2f}",
                       paired]
    assert rows[1] == ["ascl, strong target", "1", "2", f"{strong - normal.mean():+.2f}", "",
                       f"seed 0: {strong - normal[0]:+.2f}"]
    assert "relative to" not in summarize.summarize(runs_lib.load_runs(paths))


def test_wall_seconds_from_done(tmp_path):
    done = tmp_path / "DONE"
    assert runs_lib.read_wall_seconds(str(done)) is None
    done.write_text("== ascl_s0: 12:00:01\n== ascl_s0: 398 s\n")
    assert runs_lib.read_wall_seconds(str(done)) == 398
    done.write_text("finished\n")
    assert runs_lib.read_wall_seconds(str(done)) is None


def test_linear_eval_entry_selection(tmp_path):
    path = os.path.join(tmp_path, "linear_eval.json")
    entries = [
        {"mode": "features", "learning_rate": 1.0, "test_top1": 0.5, "test_top5": 0.9},
        {"mode": "features", "learning_rate": 10.0, "test_top1": 0.4, "test_top5": 0.8},
    ]
    with open(path, "w") as file:
        json.dump({"entries": entries}, file)
    selected = runs_lib.read_linear_eval(path, {"learning_rate": 1})
    assert selected == {"test_top1": 0.5, "test_top5": 0.9}
    assert runs_lib.read_linear_eval(path, {"mode": "augmented"}) is None
    with pytest.raises(runs_lib.RunsError, match="2 linear evaluations match .* learning_rate"):
        runs_lib.read_linear_eval(path, {"mode": "features"})


def test_unmatched_linear_setting_is_an_error(experiment, capsys):
    paths, _ = experiment
    with open(os.path.join(paths[1], "linear_eval.json"), "w") as file:
        json.dump({"entries": [{"mode": "features", "test_top1": 0.5, "test_top5": 0.9}]}, file)
    args = [f"--workdir={path}" for path in paths[:2]] + ["--linear_setting=mode=nosuch"]
    assert summarize.main(args) == 1
    assert "no linear_eval.json entry matches" in capsys.readouterr().err


def test_parse_setting_reads_json_values():
    assert runs_lib.parse_setting("normalize_features=true") == ("normalize_features", True)
    assert runs_lib.parse_setting("learning_rate=1") == ("learning_rate", 1)
    assert runs_lib.parse_setting("mode=features") == ("mode", "features")
    with pytest.raises(runs_lib.RunsError, match="expected KEY=VALUE"):
        runs_lib.parse_setting("mode")


@pytest.mark.parametrize("case", ["baseline", "linear_eval", "linear_eval_json", "bad_json",
                                  "no_step", "label_count", "no_workdir"])
def test_summarize_invalid_input(case, experiment, capsys):
    paths, _ = experiment
    args = [f"--workdir={path}" for path in paths[:4]]
    metrics = os.path.join(paths[1], "metrics.jsonl")
    linear_eval = os.path.join(paths[2], "linear_eval.json")
    if case == "baseline":
        args.append("--baseline=moco")
        expected = "--baseline='moco' matches no label; the labels are 'ascl', 'normal'"
    elif case == "linear_eval":
        with open(linear_eval, "w") as file:
            json.dump({"entries": [{"test_top1": 81.2, "test_top5": 98.0}]}, file)
        expected = f"{linear_eval}: 'test_top1' is 81.2, expected a fraction in [0, 1]"
    elif case == "linear_eval_json":
        with open(linear_eval, "w") as file:
            file.write("{")
        expected = f"{linear_eval} is not valid JSON"
    elif case == "bad_json":
        with open(metrics, "a") as file:
            file.write('{"step": 31, "loss"')
        lines = sum(1 for _ in open(metrics))
        expected = f"line {lines} of {metrics} is not valid JSON"
    elif case == "no_step":
        with open(metrics, "a") as file:
            file.write('{"epoch": 3.1, "loss": 1.0}\n')
        lines = sum(1 for _ in open(metrics))
        expected = f"line {lines} of {metrics} has no integer 'step'"
    elif case == "label_count":
        args += ["--label=a", "--label=b"]
        expected = "2 --label values for 4 --workdir values"
    else:
        args = []
        expected = "no --workdir given"

    status = summarize.main(args)
    captured = capsys.readouterr()
    assert status == 1
    assert captured.out == ""
    assert captured.err.startswith("error: ")
    assert captured.err.count("\n") == 1
    assert expected in captured.err


def test_summarize_command_line(experiment):
    paths, _ = experiment
    result = subprocess.run(
        [sys.executable, "-m", "experiments.results.summarize", f"--workdir={paths[0]}",
         f"--workdir={paths[3]}", "--baseline=normal"],
        capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("## kNN top-1 by step\n")
    assert "## Final kNN top-1 relative to normal" in result.stdout
