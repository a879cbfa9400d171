"""Tests of experiments.plot on synthetic workdirs: figures written, curve math, input errors."""

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from experiments import plot
from experiments.results import runs as runs_lib

STEPS_PER_EPOCH = 10
TOTAL_STEPS = 30
FIGURES = ("loss", "knn_top1", "confidence", "positive_weight", "same_class_rate",
           "neighbor_same_class", "learning_rate", "overview")
TRAIN_KEYS = ("loss", "learning_rate", "confidence", "positive_weight", "same_class_rate",
              "neighbor_same_class")


def write_workdir(path, kind, seed, *, total_steps=TOTAL_STEPS, target_view="weak",
                  skip_keys=()):
    """Write config.json and a metrics.jsonl with random values, laid out as pretraining does.

    Train lines every 2 steps, kNN lines every 10 steps, a compile line at step 1.
    """
    os.makedirs(path, exist_ok=True)
    with open(os.path.join(path, "config.json"), "w") as file:
        json.dump({"kind": kind, "seed": seed, "target_view": target_view}, file)
    rng = np.random.default_rng(1000 * seed + len(kind))
    with open(os.path.join(path, "metrics.jsonl"), "w") as file:
        for step in range(total_steps + 1):
            epoch = step / STEPS_PER_EPOCH
            if step % 10 == 0:
                record = {"step": step, "epoch": epoch, "knn_top1": float(rng.uniform(0.2, 0.6)),
                          "knn_seconds": 1.0}
                file.write(json.dumps(record) + "\n")
            if step == 1:
                file.write(json.dumps({"step": 1, "compile_seconds": 3.0}) + "\n")
            if step and step % 2 == 0:
                record = {"step": step, "epoch": epoch, "grad_norm": 1.0}
                for key in TRAIN_KEYS:
                    if key not in skip_keys:
                        record[key] = float(rng.uniform(0, 1))
                file.write(json.dumps(record) + "\n")


@pytest.fixture
def workdirs(tmp_path):
    """Three seeds of ascl and three of normal."""
    paths = []
    for kind in ("ascl", "normal"):
        for seed in range(3):
            path = str(tmp_path / f"{kind}_s{seed}")
            write_workdir(path, kind, seed)
            paths.append(path)
    return paths


def check_png(path):
    with Image.open(path) as image:
        assert image.format == "PNG"
        pixels = np.asarray(image.convert("L"), dtype=np.float64)
    assert pixels.shape[0] > 200
    assert pixels.shape[1] > 200
    # A blank figure is all white. Axes, lines and text darken a share of the pixels.
    assert (pixels < 200).mean() > 0.01
    assert pixels.std() > 10


def run_main(args, capsys):
    status = plot.main(args)
    captured = capsys.readouterr()
    return status, captured.out, captured.err


def test_plot_writes_every_figure(workdirs, tmp_path, capsys):
    output_dir = tmp_path / "figures"
    args = [f"--workdir={path}" for path in workdirs] + [f"--output_dir={output_dir}"]
    status, out, err = run_main(args, capsys)
    assert status == 0, err
    assert err == ""
    for name in FIGURES:
        path = output_dir / f"{name}.png"
        assert str(path) in out
        check_png(path)


def test_plot_single_workdir_default_output(tmp_path, capsys):
    path = str(tmp_path / "run")
    write_workdir(path, "ascl", 0, skip_keys=("neighbor_same_class",))
    status, out, err = run_main([f"--workdir={path}", "--smooth=1"], capsys)
    assert status == 0, err
    # A metric that no run logs gets no figure and a warning.
    assert err == ("warning: no run logs neighbor_same_class; "
                   "neighbor_same_class.png is not written\n")
    assert not os.path.exists(os.path.join(path, "plots", "neighbor_same_class.png"))
    for name in FIGURES:
        if name != "neighbor_same_class":
            check_png(os.path.join(path, "plots", f"{name}.png"))


def test_plot_ignores_several_linear_results(tmp_path, capsys):
    path = str(tmp_path / "run")
    write_workdir(path, "ascl", 0)
    entries = [{"mode": "features", "test_top1": 0.5, "test_top5": 0.9},
               {"mode": "augmented", "test_top1": 0.4, "test_top5": 0.8}]
    with open(os.path.join(path, "linear_eval.json"), "w") as file:
        json.dump({"entries": entries}, file)
    status, _, err = run_main([f"--workdir={path}"], capsys)
    assert status == 0, err
    check_png(os.path.join(path, "plots", "overview.png"))


def test_setting_curve_mean_min_max(workdirs):
    runs = runs_lib.load_runs(workdirs[:3])
    for panel in plot.PANELS:
        warnings = []
        curve = plot.setting_curve("ascl", runs, panel, smooth=1, warnings=warnings)
        assert warnings == []
        assert curve.num_runs == 3
        stacked = []
        for path in workdirs[:3]:
            with open(os.path.join(path, "metrics.jsonl")) as file:
                records = [json.loads(line) for line in file]
            stacked.append([panel.scale * record[panel.key] for record in records
                            if panel.key in record])
        stacked = np.array(stacked, dtype=np.float64)
        np.testing.assert_allclose(curve.mean, stacked.mean(axis=0), rtol=1e-12)
        np.testing.assert_allclose(curve.low, stacked.min(axis=0), rtol=1e-12)
        np.testing.assert_allclose(curve.high, stacked.max(axis=0), rtol=1e-12)


def test_moving_average_matches_reference():
    values = np.random.default_rng(0).normal(size=11)
    for width in (1, 3, 5, 21):
        half = (width - 1) // 2
        expected = []
        for i in range(len(values)):
            reach = min(half, i, len(values) - 1 - i)
            expected.append(np.mean(values[i - reach:i + reach + 1]))
        np.testing.assert_allclose(plot.moving_average(values, width), expected, rtol=1e-12)
    # A linear trend stays as it is, ends included.
    line = np.linspace(0.0, 1.0, 9)
    np.testing.assert_allclose(plot.moving_average(line, 5), line, rtol=1e-12)


def test_smoothing_skips_knn_and_learning_rate(workdirs):
    runs = runs_lib.load_runs(workdirs[:1])
    raw = {panel.key: plot.setting_curve("ascl", runs, panel, 1, []) for panel in plot.PANELS}
    smoothed = {panel.key: plot.setting_curve("ascl", runs, panel, 5, [])
                for panel in plot.PANELS}
    for key in ("knn_top1", "learning_rate"):
        np.testing.assert_array_equal(smoothed[key].mean, raw[key].mean)
    assert not np.allclose(smoothed["loss"].mean, raw["loss"].mean)


def test_unfinished_seed_plots_common_steps(tmp_path):
    paths = [str(tmp_path / "s0"), str(tmp_path / "s1")]
    write_workdir(paths[0], "ascl", 0)
    write_workdir(paths[1], "ascl", 1, total_steps=20)
    runs = runs_lib.load_runs(paths)
    warnings = []
    loss = plot.PANELS[0]
    curve = plot.setting_curve("ascl", runs, loss, 1, warnings)
    assert curve.epochs.max() == pytest.approx(2.0)
    assert len(warnings) == 1
    assert "different steps" in warnings[0]


@pytest.mark.parametrize("case", ["no_metrics", "label_count", "bad_json", "not_number",
                                  "no_output_dir", "smooth", "smooth_even", "same_workdir",
                                  "nothing_to_plot"])
def test_plot_invalid_input(case, workdirs, tmp_path, capsys):
    output_dir = tmp_path / "figures"
    args = [f"--workdir={workdirs[0]}", f"--workdir={workdirs[3]}", f"--output_dir={output_dir}"]
    expected = {
        "no_metrics": "has no metrics.jsonl",
        "label_count": "1 --label values for 2 --workdir values",
        "bad_json": f"line 3 of {workdirs[3]}/metrics.jsonl is not valid JSON",
        "not_number": f"line 3 of {workdirs[3]}/metrics.jsonl: 'loss' is 'high'",
        "no_output_dir": "--output_dir is required with 2 workdirs",
        "smooth": "--smooth=0 is invalid; use an odd number",
        "smooth_even": "--smooth=4 is invalid; use an odd number",
        "same_workdir": "is given twice",
        "nothing_to_plot": "no run logs any of loss, knn_top1,",
    }[case]
    metrics = os.path.join(workdirs[3], "metrics.jsonl")
    if case == "no_metrics":
        os.remove(metrics)
    elif case == "label_count":
        args.append("--label=a")
    elif case in ("bad_json", "not_number"):
        with open(metrics) as file:
            lines = file.readlines()
        lines[2] = ('{"step": 2, "epoch": 0.2, "loss": "high"}\n' if case == "not_number"
                    else '{"step": 2, "loss": \n')
        with open(metrics, "w") as file:
            file.writelines(lines)
    elif case == "no_output_dir":
        args.pop()
    elif case == "smooth":
        args.append("--smooth=0")
    elif case == "smooth_even":
        args.append("--smooth=4")
    elif case == "same_workdir":
        args[1] = f"--workdir={workdirs[0]}/"
    elif case == "nothing_to_plot":
        for path in workdirs[0], workdirs[3]:
            with open(os.path.join(path, "metrics.jsonl"), "w") as file:
                file.write('{"step": 1, "compile_seconds": 3.0}\n')

    status, out, err = run_main(args, capsys)
    assert status == 1
    assert out == ""
    assert err.startswith("error: ")
    assert err.count("\n") == 1
    assert expected in err
    assert not output_dir.exists()


def test_plot_command_line_error(tmp_path):
    missing = tmp_path / "missing"
    result = subprocess.run(
        [sys.executable, "-m", "experiments.plot", f"--workdir={missing}"],
        capture_output=True, text=True, timeout=60,
        cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
    )
    assert result.returncode == 1
    assert result.stderr == f"error: workdir {missing} does not exist\n"
