"""Print Markdown tables of pretraining results, one setting per label.

Usage:
    python -m experiments.results.summarize --workdir=DIR [--workdir=DIR2 ...] [--label=NAME ...]
        [--baseline=LABEL] [--linear_setting=KEY=VALUE ...]

Runs that share a label are seeds of one setting (labels as in experiments.plot). The tables:

1. kNN top-1 at each evaluated step: mean ± sample standard deviation over the seeds, n and
   the values of the individual seeds.
2. Final kNN top-1, linear-probe top-1 and top-5 (from the linear_eval.json entry that the
   --linear_setting values select, where present) and the
   pretraining wall time (from the DONE file of run_pretrain.sh, where present), per setting and
   per run.
3. Means of confidence, positive weight, same-class rate and nearest-neighbour same-class rate
   over each run's last epoch.
4. With --baseline: each setting's final kNN top-1 minus the baseline's.

Exit status 1 with a one-line `error: ...` message for invalid input.
"""

import argparse
import math
import sys
from collections.abc import Sequence

import numpy as np

from experiments.results import runs as runs_lib

Run = runs_lib.Run

# Training statistics of table 3: (metrics key, column header).
STATISTICS = (
    ("confidence", "confidence c"),
    ("positive_weight", "positive weight"),
    ("same_class_rate", "same-class rate"),
    ("neighbor_same_class", "neighbour same class"),
)


def format_mean_std(values: Sequence[float], digits: int = 2) -> str:
    """Format "mean ± sample std", only the mean for one value, "" for none."""
    if len(values) == 0:
        return ""
    mean, std = runs_lib.mean_and_std(values)
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {std:.{digits}f}"


def format_epoch(epoch: float) -> str:
    return f"{round(epoch, 3):g}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def final_knn(run: Run) -> tuple[int, float] | None:
    """Return (step, kNN top-1 as a fraction) of the run's last kNN line, or None."""
    steps, _, values = run.series("knn_top1")
    if len(steps) == 0:
        return None
    return int(steps[-1]), float(values[-1])


def knn_table(groups: dict[str, list[Run]]) -> str:
    """Build table 1: kNN top-1 (%) at every step that some run of a setting evaluated."""
    rows = []
    for label, runs in groups.items():
        by_step: dict[int, list[tuple[Run, float, float]]] = {}
        for run in runs:
            for step, epoch, value in zip(*run.series("knn_top1")):
                by_step.setdefault(int(step), []).append((run, float(epoch), 100 * float(value)))
        for step in sorted(by_step):
            entries = by_step[step]
            values = [value for _, _, value in entries]
            individual = ", ".join(f"{run.name}: {value:.2f}" for run, _, value in entries)
            rows.append([label, str(step), format_epoch(entries[0][1]), str(len(values)),
                         format_mean_std(values), individual])
    return markdown_table(
        ["setting", "step", "epoch", "n", "kNN top-1 (%)", "per run (%)"], rows
    )


def _linear_values(runs: Sequence[Run], key: str) -> list[float]:
    return [100 * run.linear_eval[key] for run in runs if run.linear_eval is not None]


def _with_count(text: str, count: int, total: int) -> str:
    """Append "(n=count)" when only some of the runs contribute."""
    if text and count != total:
        return f"{text} (n={count})"
    return text


def final_tables(groups: dict[str, list[Run]]) -> tuple[str, list[str]]:
    """Build table 2 (final results per setting and per run) and notes on unequal run lengths."""
    setting_rows, run_rows, notes = [], [], []
    for label, runs in groups.items():
        finals = [final for final in map(final_knn, runs) if final is not None]
        final_steps = sorted({step for step, _ in finals})
        if len(final_steps) > 1:
            notes.append(f"The runs of {label} end at different steps "
                         f"({', '.join(map(str, final_steps))}); the mean mixes them.")
        top1 = _linear_values(runs, "test_top1")
        top5 = _linear_values(runs, "test_top5")
        seconds = [run.wall_seconds for run in runs if run.wall_seconds is not None]
        setting_rows.append([
            label, str(len(runs)),
            "/".join(map(str, final_steps)),
            _with_count(format_mean_std([100 * value for _, value in finals]), len(finals),
                        len(runs)),
            _with_count(format_mean_std(top1), len(top1), len(runs)),
            _with_count(format_mean_std(top5), len(top5), len(runs)),
            _with_count(format_mean_std(seconds, digits=0), len(seconds), len(runs)),
        ])

        for run in runs:
            final = final_knn(run)
            linear = run.linear_eval or {}
            run_rows.append([
                label, run.name, run.workdir,
                str(final[0]) if final else "",
                f"{100 * final[1]:.2f}" if final else "",
                f"{100 * linear['test_top1']:.2f}" if linear else "",
                f"{100 * linear['test_top5']:.2f}" if linear else "",
                f"{run.wall_seconds:.0f}" if run.wall_seconds is not None else "",
            ])
    setting_table = markdown_table(
        ["setting", "n", "final step", "kNN top-1 (%)", "linear top-1 (%)", "linear top-5 (%)",
         "pretraining time (s)"],
        setting_rows,
    )
    run_table = markdown_table(
        ["setting", "run", "workdir", "final step", "kNN top-1 (%)", "linear top-1 (%)",
         "linear top-5 (%)", "pretraining time (s)"],
        run_rows,
    )
    return setting_table + "\n\n" + run_table, notes


def last_epoch_mean(run: Run, key: str) -> float | None:
    """Mean of `key` over the run's lines with epoch in (E - 1, E], E the last epoch logging it."""
    _, epochs, values = run.series(key)
    if len(values) == 0:
        return None
    last = epochs.max()
    return float(values[epochs > last - 1].mean())


def moved_mass_precision(run: Run) -> float | None:
    """Same-class share of the label mass moved off the positive, over the last epoch.

    It is the last-epoch same_class_rate over (1 - positive_weight), and None for a run that
    moves no mass (normal) or logs neither key.
    """
    same_class = last_epoch_mean(run, "same_class_rate")
    positive = last_epoch_mean(run, "positive_weight")
    if same_class is None or positive is None or 1.0 - positive < 1e-6:
        return None
    return same_class / (1.0 - positive)


def statistics_table(groups: dict[str, list[Run]]) -> str:
    """Build table 3: last-epoch means of the training statistics, mean ± std over the runs."""
    rows = []
    for label, runs in groups.items():
        row = [label, str(len(runs))]
        for key, _ in STATISTICS:
            means = [mean for mean in (last_epoch_mean(run, key) for run in runs)
                     if mean is not None]
            row.append(_with_count(format_mean_std(means, digits=3), len(means), len(runs)))
        shares = [share for share in map(moved_mass_precision, runs) if share is not None]
        row.append(_with_count(format_mean_std(shares, digits=3), len(shares), len(runs))
                   if shares else "")
        rows.append(row)
    headers = [header for _, header in STATISTICS] + ["same-class share of moved mass"]
    return markdown_table(["setting", "n", *headers], rows)


def baseline_table(groups: dict[str, list[Run]], baseline: str) -> str:
    """Build table 4: each setting's mean final kNN top-1 minus the baseline's (in points of %).

    The standard error of the difference is sqrt(s_a^2 / n_a + s_b^2 / n_b) with the sample
    standard deviations, left blank when either side has fewer than two runs. Runs with the same
    seed in both settings also give per-seed differences.
    """
    def finals_by_run(runs: Sequence[Run]) -> list[tuple[Run, float]]:
        return [(run, 100 * final[1]) for run in runs
                if (final := final_knn(run)) is not None]

    reference = finals_by_run(groups[baseline])
    reference_values = [value for _, value in reference]
    reference_by_seed = {run.seed: value for run, value in reference if run.seed is not None}
    rows = []
    for label, runs in groups.items():
        if label == baseline:
            continue
        finals = finals_by_run(runs)
        values = [value for _, value in finals]
        if not values or not reference_values:
            rows.append([label, str(len(values)), str(len(reference_values)), "", "", ""])
            continue
        difference = float(np.mean(values) - np.mean(reference_values))
        error = ""
        if len(values) > 1 and len(reference_values) > 1:
            variance = (np.var(values, ddof=1) / len(values)
                        + np.var(reference_values, ddof=1) / len(reference_values))
            error = f"{math.sqrt(variance):.2f}"
        paired = [f"seed {run.seed}: {value - reference_by_seed[run.seed]:+.2f}"
                  for run, value in finals if run.seed in reference_by_seed]
        rows.append([label, str(len(values)), str(len(reference_values)), f"{difference:+.2f}",
                     error, ", ".join(paired)])
    return markdown_table(
        ["setting", "n", f"n ({baseline})", f"kNN top-1 minus {baseline} (pp)",
         "standard error (pp)", "per seed (pp)"],
        rows,
    )


def summarize(runs: Sequence[Run], baseline: str | None = None) -> str:
    """Return the Markdown text of all tables for `runs`."""
    groups = runs_lib.group_runs(runs)
    if baseline is not None and baseline not in groups:
        raise runs_lib.RunsError(
            f"--baseline={baseline!r} matches no label; the labels are "
            + ", ".join(repr(label) for label in groups)
        )
    final_text, notes = final_tables(groups)
    parts = [
        "## kNN top-1 by step\n\nMean ± sample standard deviation over the n runs of a "
        "setting.\n\n" + knn_table(groups),
        "## Final results\n\nkNN top-1 at each run's last evaluation; linear probe from "
        "linear_eval.json; pretraining wall time from DONE. Blank where a run has no such "
        "file.\n\n" + final_text + "".join(f"\n\n{note}" for note in notes),
        "## Training statistics in the last epoch\n\nEach run's train lines with epoch in "
        "(E - 1, E], E its last logged epoch, are averaged; then mean ± sample standard "
        "deviation over the runs. The last column is the same-class rate over (1 - positive "
        "weight): the fraction of the label mass moved off the positive that lands on queue "
        "entries of the sample's class.\n\n" + statistics_table(groups),
    ]
    if baseline is not None:
        parts.append(
            f"## Final kNN top-1 relative to {baseline}\n\nDifference of the means over the "
            "runs, with the standard error sqrt(s_a²/n_a + s_b²/n_b); per-seed differences "
            "pair runs with the same seed.\n\n" + baseline_table(groups, baseline)
        )
    return "\n\n".join(parts) + "\n"


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.results.summarize",
        description="Print Markdown tables of pretraining results, one setting per label.",
    )
    parser.add_argument("--workdir", action="append", default=[],
                        help="Workdir of a pretraining run; repeat for several runs.")
    parser.add_argument("--label", action="append", default=[],
                        help="Setting of the matching --workdir, given once per workdir; runs "
                             "with the same label are seeds of one setting. Default: the "
                             "config's kind, plus the target view when it is not weak.")
    parser.add_argument("--linear_setting", action="append", default=[],
                        help="KEY=VALUE that selects the entry of each linear_eval.json, e.g. "
                             "mode=features; repeat for several keys. Needed when a file has "
                             "several entries.")
    parser.add_argument("--baseline", default=None,
                        help="Label whose final kNN top-1 the other settings are compared to, "
                             "e.g. normal.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        linear_settings = dict(runs_lib.parse_setting(text) for text in args.linear_setting)
        runs = runs_lib.load_runs(args.workdir, args.label, linear_settings)
        if linear_settings and all(run.linear_eval is None for run in runs):
            raise runs_lib.RunsError(
                f"no linear_eval.json entry matches --linear_setting {linear_settings}; "
                "check the keys and values against the files' entries"
            )
        text = summarize(runs, args.baseline)
    except runs_lib.RunsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
