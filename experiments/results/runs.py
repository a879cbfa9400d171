"""Load pretraining workdirs and group them into settings for plots and tables.

A workdir of `experiments.pretrain` contains `metrics.jsonl` (one JSON object per line, each with
an integer `step`), usually `config.json`, and optionally `linear_eval.json` (`test_top1` and
`test_top5`) and `DONE`, where `run_pretrain.sh` records the wall time as `== NAME: SECONDS s`.

Runs that share a label are seeds of one setting. The default label comes from the config: the
`kind`, followed by the target view when it is not the method's weak view.
"""

import dataclasses
import json
import math
import os
import re
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

METRICS_FILE = "metrics.jsonl"
CONFIG_FILE = "config.json"
LINEAR_EVAL_FILE = "linear_eval.json"
# Fields of a linear-evaluation entry that name its settings, listed when several entries match.
SETTING_KEYS = (
    "step", "mode", "epochs", "batch_size", "learning_rate", "holdout", "seed",
    "max_train_examples", "max_test_examples", "train_split", "test_split", "normalize_features",
)
DONE_FILE = "DONE"

# Keys that the plots and tables read. Each must be a number where it appears, and a line with
# any of them must also have a numeric `epoch`.
METRIC_KEYS = (
    "loss", "knn_top1", "learning_rate", "confidence", "positive_weight", "same_class_rate",
    "neighbor_same_class",
)

# The line that run_pretrain.sh writes into DONE when a run finishes.
_DONE_PATTERN = re.compile(r"^== .*: (\d+(?:\.\d+)?) s$")


class RunsError(ValueError):
    """An invalid workdir, metrics file or command-line value, named in the message."""


@dataclasses.dataclass
class Run:
    """One pretraining run: its records, config and optional results."""

    workdir: str
    label: str
    config: dict[str, Any]
    # The records of metrics.jsonl, in file order.
    records: list[dict[str, Any]]
    # {"test_top1", "test_top5"} as fractions from linear_eval.json, or None without that file.
    linear_eval: dict[str, float] | None
    # Pretraining wall time from DONE, or None without that file or its line.
    wall_seconds: float | None

    @property
    def seed(self) -> int | None:
        """The config's seed, or None if the config has no integer seed."""
        seed = self.config.get("seed")
        return seed if isinstance(seed, int) and not isinstance(seed, bool) else None

    @property
    def name(self) -> str:
        """Short name of the run within its setting: the seed, else the workdir's basename."""
        if self.seed is not None:
            return f"seed {self.seed}"
        return os.path.basename(os.path.normpath(self.workdir))

    def has(self, key: str) -> bool:
        """Return whether any record of the metrics file contains `key`."""
        return any(key in record for record in self.records)

    def series(self, key: str) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Return (steps, epochs, values) of the lines that have `key`, sorted by step.

        `key` is one of METRIC_KEYS, whose values read_metrics checked. A resumed run writes no
        step twice, but if a step appears again the later line wins.
        """
        by_step = {}
        for record in self.records:
            if key in record:
                by_step[record["step"]] = (float(record["epoch"]), float(record[key]))
        steps = np.array(sorted(by_step), dtype=np.int64)
        epochs = np.array([by_step[step][0] for step in steps], dtype=np.float64)
        values = np.array([by_step[step][1] for step in steps], dtype=np.float64)
        return steps, epochs, values


def default_label(config: dict[str, Any], workdir: str) -> str:
    """Name a setting after its config: the kind, plus the target view unless it is "weak".

    Without a `kind` in the config, the workdir's basename is the label.
    """
    kind = config.get("kind")
    if not isinstance(kind, str) or not kind:
        return os.path.basename(os.path.normpath(workdir))
    view = config.get("target_view", "weak")
    if view != "weak":
        return f"{kind}, {view} target"
    return kind


def read_metrics(path: str) -> list[dict[str, Any]]:
    """Parse a metrics file into its records, skipping blank lines.

    Raises RunsError naming the file and line of a line that is not a JSON object with an
    integer `step`, or whose METRIC_KEYS values or epoch are not numbers.
    """
    records = []
    with open(path, encoding="utf-8") as file:
        for line_number, text in enumerate(file, start=1):
            if not text.strip():
                continue
            try:
                record = json.loads(text)
            except json.JSONDecodeError as error:
                raise RunsError(
                    f"line {line_number} of {path} is not valid JSON ({error.msg})"
                ) from None
            if not isinstance(record, dict):
                raise RunsError(f"line {line_number} of {path} is not a JSON object")
            step = record.get("step")
            if isinstance(step, bool) or not isinstance(step, int):
                raise RunsError(f"line {line_number} of {path} has no integer 'step'")
            _check_numbers(record, path, line_number)
            records.append(record)
    if not records:
        raise RunsError(f"{path} contains no records")
    return records


def _check_numbers(record: dict[str, Any], path: str, line_number: int) -> None:
    keys = [key for key in METRIC_KEYS if key in record]
    if keys:
        keys.append("epoch")
    for key in keys:
        value = record.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunsError(
                f"line {line_number} of {path}: {key!r} is {value!r}, expected a number"
            )


def _read_json_object(path: str) -> dict[str, Any]:
    try:
        with open(path, encoding="utf-8") as file:
            content = json.load(file)
    except json.JSONDecodeError as error:
        raise RunsError(f"{path} is not valid JSON ({error.msg} at line {error.lineno})") from None
    if not isinstance(content, dict):
        raise RunsError(f"{path} is not a JSON object")
    return content


def read_linear_eval(
    path: str, settings: Mapping[str, Any] | None = None
) -> dict[str, float] | None:
    """Read `test_top1` and `test_top5` of one entry of a linear-evaluation file, if it exists.

    The file is {"entries": [...]}, as experiments/linear_eval.py writes it. `settings` selects
    the entries whose fields equal its values, and exactly one entry may remain. A file without
    a matching entry gives None. Both values must be fractions in [0, 1], as `knn_top1` is in
    metrics.jsonl.
    """
    if not os.path.exists(path):
        return None
    entries = _read_json_object(path).get("entries")
    if not isinstance(entries, list) or not all(isinstance(e, dict) for e in entries):
        raise RunsError(f"{path}: expected an object with a list of objects under 'entries'")
    settings = dict(settings or {})
    matching = [
        entry for entry in entries
        if all(key in entry and entry[key] == value for key, value in settings.items())
    ]
    if not matching:
        return None
    if len(matching) > 1:
        differing = sorted(
            key for key in set().union(*matching)
            if key in SETTING_KEYS and len({json.dumps(e.get(key)) for e in matching}) > 1
        )
        raise RunsError(
            f"{path}: {len(matching)} linear evaluations match {settings or 'no settings'}; "
            f"choose one with --linear_setting=KEY=VALUE (they differ in {', '.join(differing)})"
        )
    content = matching[0]
    result = {}
    for key in ("test_top1", "test_top5"):
        value = content.get(key)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RunsError(f"{path}: {key!r} is {value!r}, expected a number")
        if not 0 <= value <= 1:
            raise RunsError(
                f"{path}: {key!r} is {value}, expected a fraction in [0, 1] as knn_top1 is"
            )
        result[key] = float(value)
    return result


def read_wall_seconds(path: str) -> float | None:
    """Return the seconds of the last `== NAME: SECONDS s` line of a DONE file, else None."""
    if not os.path.exists(path):
        return None
    seconds = None
    with open(path, encoding="utf-8") as file:
        for line in file:
            match = _DONE_PATTERN.match(line.strip())
            if match:
                seconds = float(match.group(1))
    return seconds


def load_run(
    workdir: str,
    label: str | None = None,
    linear_settings: Mapping[str, Any] | None = None,
    *,
    read_linear: bool = True,
) -> Run:
    """Read a workdir; `label` overrides the one built from its config.

    `linear_settings` selects the linear evaluation, as in `read_linear_eval`. With
    `read_linear=False` the linear-evaluation file is not read and `linear_eval` is None.
    """
    if not os.path.isdir(workdir):
        raise RunsError(f"workdir {workdir} does not exist")
    metrics_path = os.path.join(workdir, METRICS_FILE)
    if not os.path.isfile(metrics_path):
        raise RunsError(f"workdir {workdir} has no {METRICS_FILE}; is it a pretraining workdir?")
    records = read_metrics(metrics_path)

    config_path = os.path.join(workdir, CONFIG_FILE)
    config = _read_json_object(config_path) if os.path.isfile(config_path) else {}
    if label is None:
        label = default_label(config, workdir)
    return Run(
        workdir=workdir,
        label=label,
        config=config,
        records=records,
        linear_eval=(
            read_linear_eval(os.path.join(workdir, LINEAR_EVAL_FILE), linear_settings)
            if read_linear else None
        ),
        wall_seconds=read_wall_seconds(os.path.join(workdir, DONE_FILE)),
    )


def load_runs(
    workdirs: Sequence[str],
    labels: Sequence[str] = (),
    linear_settings: Mapping[str, Any] | None = None,
    *,
    read_linear: bool = True,
) -> list[Run]:
    """Read every workdir, checking the command-line values first.

    `labels` is empty (labels from the configs) or has one label per workdir.
    `linear_settings` selects each run's linear evaluation, as in `read_linear_eval`, and
    `read_linear=False` skips the linear-evaluation files.
    """
    if not workdirs:
        raise RunsError("no --workdir given; pass one --workdir=DIR per run")
    if labels and len(labels) != len(workdirs):
        raise RunsError(
            f"{len(labels)} --label values for {len(workdirs)} --workdir values; "
            "give one --label per --workdir, in the same order, or none"
        )
    seen = set()
    for workdir in workdirs:
        real = os.path.realpath(workdir)
        if real in seen:
            raise RunsError(f"workdir {workdir} is given twice; each run may count once")
        seen.add(real)
    for label in labels:
        if not label.strip():
            raise RunsError("a --label is empty; give each run a non-empty label")
    if not labels:
        labels = [None] * len(workdirs)
    return [
        load_run(workdir, label, linear_settings, read_linear=read_linear)
        for workdir, label in zip(workdirs, labels)
    ]


def parse_setting(text: str) -> tuple[str, Any]:
    """Parse KEY=VALUE; VALUE is read as JSON (1, 1.0, true, "a") and else kept as a string."""
    key, separator, value = text.partition("=")
    if not separator or not key:
        raise RunsError(f"invalid --linear_setting {text!r}: expected KEY=VALUE, e.g. mode=features")
    try:
        return key, json.loads(value)
    except json.JSONDecodeError:
        return key, value


def group_runs(runs: Sequence[Run]) -> dict[str, list[Run]]:
    """Group runs by label, keeping the order in which the labels first appear."""
    groups: dict[str, list[Run]] = {}
    for run in runs:
        groups.setdefault(run.label, []).append(run)
    return groups


def common_steps(runs: Sequence[Run], key: str) -> np.ndarray:
    """Return the steps at which every run logs `key`, sorted."""
    steps = None
    for run in runs:
        run_steps = set(run.series(key)[0].tolist())
        steps = run_steps if steps is None else steps & run_steps
    return np.array(sorted(steps or ()), dtype=np.int64)


def mean_and_std(values: Sequence[float]) -> tuple[float, float]:
    """Return the mean and the sample standard deviation (NaN for fewer than two values)."""
    array = np.asarray(values, dtype=np.float64)
    mean = float(array.mean()) if array.size else math.nan
    std = float(array.std(ddof=1)) if array.size > 1 else math.nan
    return mean, std
