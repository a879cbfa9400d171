"""Plot the training curves of one or more pretraining runs against epochs.

Usage:
    python -m experiments.plot --workdir=DIR [--workdir=DIR2 ...] [--label=NAME ...]
        [--output_dir=OUT] [--smooth=N]

Writes one PNG per metric (loss, knn_top1, confidence, positive_weight, same_class_rate,
neighbor_same_class, learning_rate) and overview.png with all of them. A metric that no run logs
is skipped. Runs that share a label are seeds of one setting: their mean is drawn as a line and
their min..max as a shaded band. Labels default to the config's kind, plus the target view when it
is not "weak"; give --label once per --workdir to override them. The output directory defaults to
DIR/plots for a single workdir and is required for several.

Exit status 1 with a one-line `error: ...` message for invalid input (a missing workdir or
metrics file, a line that does not parse, a label count that does not match the workdirs).
"""

import argparse
import dataclasses
import os
import sys
from collections.abc import Sequence

import numpy as np

from experiments.results import runs as runs_lib

DEFAULT_SMOOTH = 3


@dataclasses.dataclass(frozen=True)
class Panel:
    """One metric's figure."""

    key: str
    title: str
    ylabel: str
    # Factor applied to the logged value, e.g. 100 for a fraction shown in %.
    scale: float = 1.0
    # Whether --smooth applies; kNN points and the learning-rate schedule are drawn as logged.
    smoothed: bool = True
    markers: bool = False


PANELS = (
    Panel("loss", "Training loss", "loss"),
    Panel("knn_top1", "kNN top-1 accuracy", "top-1 (%)", scale=100, smoothed=False, markers=True),
    Panel("confidence", "Mean confidence c", "c"),
    Panel("positive_weight", "Label weight on the positive", "weight"),
    Panel("same_class_rate", "Label mass on same-class queue entries", "fraction of label mass"),
    Panel("neighbor_same_class", "Nearest queue entry has the same class", "fraction of samples"),
    Panel("learning_rate", "Learning rate", "learning rate", smoothed=False),
)


@dataclasses.dataclass
class Curve:
    """A setting's curve: mean over its runs and the min..max band, at steps common to all."""

    label: str
    num_runs: int
    epochs: np.ndarray
    mean: np.ndarray
    low: np.ndarray
    high: np.ndarray


def moving_average(values: np.ndarray, width: int) -> np.ndarray:
    """Centred moving average over `width` points, `width` odd.

    Near the ends the window shrinks symmetrically, so the first and last points stay as logged
    and a linear trend is not bent at the ends.
    """
    if width <= 1 or values.size == 0:
        return values
    half = (width - 1) // 2
    smoothed = np.empty_like(values)
    for index in range(values.size):
        reach = min(half, index, values.size - 1 - index)
        smoothed[index] = values[index - reach:index + reach + 1].mean()
    return smoothed


def setting_curve(
    label: str, runs: Sequence[runs_lib.Run], panel: Panel, smooth: int, warnings: list[str]
) -> Curve | None:
    """Combine the runs of one setting into a Curve, or None if none of them logs the metric.

    Each run is smoothed on its own logged points first. Only the steps that every run logs
    are kept, so an unfinished seed shortens the curve, and a warning is added to `warnings`.
    """
    runs = [run for run in runs if run.has(panel.key)]
    if not runs:
        return None
    steps = runs_lib.common_steps(runs, panel.key)
    if any(len(run.series(panel.key)[0]) != len(steps) for run in runs):
        warnings.append(
            f"{label}: the runs log {panel.key} at different steps; "
            f"plotting the {len(steps)} steps that all of them log"
        )
    if len(steps) == 0:
        return None

    stacked, epochs = [], None
    for run in runs:
        run_steps, run_epochs, values = run.series(panel.key)
        if panel.smoothed:
            values = moving_average(values, smooth)
        keep = np.isin(run_steps, steps)
        stacked.append(values[keep] * panel.scale)
        if epochs is None:
            epochs = run_epochs[keep]
    stacked = np.stack(stacked)
    return Curve(label, len(runs), epochs, stacked.mean(axis=0), stacked.min(axis=0),
                 stacked.max(axis=0))


def draw_panel(
    axes, curves: Sequence[Curve], panel: Panel, colors: dict[str, tuple], max_epoch: float
) -> None:
    """Draw each setting's mean line and, for several runs, its min..max band.

    Every panel spans epochs 0 to `max_epoch`, so panels of one figure line up.
    """
    for curve in curves:
        color = colors[curve.label]
        if curve.num_runs > 1:
            axes.fill_between(curve.epochs, curve.low, curve.high, color=color, alpha=0.2,
                              linewidth=0)
        axes.plot(curve.epochs, curve.mean, color=color, linewidth=1.6,
                  marker="o" if panel.markers else None, markersize=4,
                  label=legend_label(curve))
    axes.set_title(panel.title, fontsize=11)
    axes.set_xlabel("epoch")
    axes.set_ylabel(panel.ylabel)
    margin = 0.02 * max_epoch if max_epoch > 0 else 0.01
    axes.set_xlim(-margin, max_epoch + margin)
    axes.grid(True, alpha=0.3)
    if panel.key == "learning_rate":
        axes.ticklabel_format(axis="y", style="sci", scilimits=(-2, 3))


def legend_label(curve: Curve) -> str:
    if curve.num_runs > 1:
        return f"{curve.label} ({curve.num_runs} seeds)"
    return curve.label


def figure_note(curves_by_panel: dict[str, list[Curve]], smooth: int) -> str:
    """Explain the lines, bands and smoothing below the plots."""
    notes = []
    if any(curve.num_runs > 1 for curves in curves_by_panel.values() for curve in curves):
        notes.append("Line: mean over the seeds of a setting. Band: min to max.")
    if smooth > 1:
        notes.append(f"Training curves: centred moving average of {smooth} logged values, "
                     "fewer at the ends. kNN and learning rate as logged.")
    return " ".join(notes)


def plot_runs(
    runs: Sequence[runs_lib.Run], output_dir: str, smooth: int = DEFAULT_SMOOTH
) -> tuple[list[str], list[str]]:
    """Write the figures of `runs` into `output_dir` and return the paths and the warnings.

    Raises RunsError, before anything is written, when no run logs any of the plotted metrics.
    """
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot

    groups = runs_lib.group_runs(runs)
    palette = pyplot.get_cmap("tab10").colors
    colors = {label: palette[index % len(palette)] for index, label in enumerate(groups)}
    warnings: list[str] = []
    curves_by_panel = {}
    for panel in PANELS:
        curves = [setting_curve(label, group, panel, smooth, warnings)
                  for label, group in groups.items()]
        curves = [curve for curve in curves if curve is not None]
        if curves:
            curves_by_panel[panel.key] = curves
        else:
            warnings.append(f"no run logs {panel.key}; {panel.key}.png is not written")
    if not curves_by_panel:
        raise runs_lib.RunsError(
            "no run logs any of " + ", ".join(panel.key for panel in PANELS)
            + "; check that the workdirs are pretraining workdirs with train or kNN lines"
        )
    note = figure_note(curves_by_panel, smooth)
    max_epoch = max((float(curve.epochs.max()) for curves in curves_by_panel.values()
                     for curve in curves), default=0.0)

    os.makedirs(output_dir, exist_ok=True)
    written = []
    for panel in PANELS:
        if panel.key not in curves_by_panel:
            continue
        figure, axes = pyplot.subplots(figsize=(6.4, 4.4))
        draw_panel(axes, curves_by_panel[panel.key], panel, colors, max_epoch)
        axes.legend(fontsize=8, loc="best")
        written.append(_save(figure, os.path.join(output_dir, f"{panel.key}.png"), note))
        pyplot.close(figure)

    written.append(
        _plot_overview(pyplot, curves_by_panel, colors, max_epoch, note, output_dir)
    )
    return written, warnings


def _plot_overview(
    pyplot, curves_by_panel, colors, max_epoch: float, note: str, output_dir: str
) -> str:
    """Draw every panel in a grid of four columns, with the legend in a cell of its own."""
    panels = [panel for panel in PANELS if panel.key in curves_by_panel]
    columns = 4
    rows = (len(panels) + 1 + columns - 1) // columns
    figure, grid = pyplot.subplots(rows, columns, figsize=(4.3 * columns, 3.6 * rows),
                                   squeeze=False)
    cells = list(grid.flat)
    for axes, panel in zip(cells, panels):
        draw_panel(axes, curves_by_panel[panel.key], panel, colors, max_epoch)
    for axes in cells[len(panels):]:
        axes.axis("off")

    # One legend entry per setting, taken from the panel with the most settings.
    source = max(panels, key=lambda panel: len(curves_by_panel[panel.key]))
    handles, labels = cells[panels.index(source)].get_legend_handles_labels()
    cells[len(panels)].legend(handles, labels, loc="center", fontsize=10, frameon=False)
    path = _save(figure, os.path.join(output_dir, "overview.png"), note)
    pyplot.close(figure)
    return path


def _save(figure, path: str, note: str) -> str:
    if note:
        # Keep about 0.4 inch at the bottom for two lines of the note.
        bottom = 0.4 / figure.get_figheight()
        figure.tight_layout(rect=(0, bottom, 1, 1))
        figure.text(0.01, 0.1 * bottom, note, fontsize=7, color="0.3", wrap=True)
    else:
        figure.tight_layout()
    figure.savefig(path, dpi=120)
    return path


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="python -m experiments.plot",
        description="Plot the training curves of pretraining workdirs against epochs.",
    )
    parser.add_argument("--workdir", action="append", default=[],
                        help="Workdir of a pretraining run; repeat for several runs.")
    parser.add_argument("--label", action="append", default=[],
                        help="Legend label of the matching --workdir, given once per workdir; "
                             "runs with the same label are averaged as seeds. Default: the "
                             "config's kind, plus the target view when it is not weak.")
    parser.add_argument("--output_dir", default=None,
                        help="Directory for the PNG files. Default: DIR/plots for a single "
                             "--workdir; required for several.")
    parser.add_argument("--smooth", type=int, default=DEFAULT_SMOOTH,
                        help="Width, an odd number of logged values, of the centred moving "
                             "average applied to the training curves (not to kNN or learning "
                             f"rate). 1 draws them as logged. Default: {DEFAULT_SMOOTH}.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    try:
        if args.smooth < 1 or args.smooth % 2 == 0:
            raise runs_lib.RunsError(
                f"--smooth={args.smooth} is invalid; use an odd number of logged values such as "
                "3 or 5, or 1 for no smoothing"
            )
        if args.output_dir is None and len(args.workdir) > 1:
            raise runs_lib.RunsError(
                f"--output_dir is required with {len(args.workdir)} workdirs"
            )
        # The figures show no linear-probe result, so linear_eval.json is not read.
        runs = runs_lib.load_runs(args.workdir, args.label, read_linear=False)
        output_dir = args.output_dir or os.path.join(args.workdir[0], "plots")
        written, warnings = plot_runs(runs, output_dir, args.smooth)
    except runs_lib.RunsError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1

    for warning in warnings:
        print(f"warning: {warning}", file=sys.stderr)
    for path in written:
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
