"""Checks of a pretraining workdir before an evaluation command loads anything.

The checks read the file system only, so the evaluation commands report a wrong workdir before
they import JAX.
"""

import os


def workdir_error(workdir: str, step: int | None, results_file: str) -> str | None:
    """Return why `workdir` cannot be evaluated at `step`, or None.

    The workdir must hold a pretraining run's config.json and a finished checkpoint (of `step`
    when it is given), and the evaluation must be able to write `results_file` into it.
    """
    if not os.path.isdir(workdir):
        return (f"Invalid --workdir={workdir!r}: no such directory. Give the workdir of a "
                "pretraining run.")
    if not os.path.isfile(os.path.join(workdir, "config.json")):
        return (f"Invalid --workdir={workdir!r}: it has no config.json, so it is not the "
                "workdir of a pretraining run.")
    directory = os.path.join(workdir, "checkpoints")
    # Finished checkpoints are directories named by their step. Unfinished saves carry a
    # suffix (STEP.orbax-checkpoint-tmp).
    steps = sorted(int(name) for name in (os.listdir(directory) if os.path.isdir(directory)
                                          else []) if name.isdigit())
    if not steps:
        return (f"No checkpoint in {directory}. The pretraining run saves one every "
                "checkpoint_every_steps steps and at its end.")
    if step is not None and step not in steps:
        return f"Invalid --step={step}: {directory} has the steps {steps}."
    results_path = os.path.join(workdir, results_file)
    if os.path.isdir(results_path):
        return (f"{results_path} is a directory, so the result cannot be written there. Move "
                "it away and run again.")
    if not os.access(workdir, os.W_OK) or (
        os.path.exists(results_path) and not os.access(results_path, os.W_OK)
    ):
        return (f"Cannot write {results_path}: the workdir or the file is read-only. Make it "
                "writable, or copy the run to a writable directory.")
    return None
