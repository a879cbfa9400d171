"""Choose the linear probe's feature scaling and learning rate on held-out training images.

Computes the backbone features of a workdir's newest checkpoint once (test-time view), holds out
5,000 training images (fixed seed) and trains the "features" mode head for 100 epochs with
each scaling x learning rate pair. It prints the held-out and test top-1 of the final epoch and
the best held-out top-1 over epochs. The choice is made on the held-out column only.

Usage:
    python -m experiments.results.linear_lr_grid --workdir=DIR [--scalings=none,l2,std]
        [--learning_rates=10,1,0.1] [--holdout=5000]
"""

import argparse
import sys
from collections.abc import Sequence

import numpy as np

SCALINGS = ("none", "l2", "std")


def scale(features: np.ndarray, scaling: str, reference: np.ndarray) -> np.ndarray:
    """Return `features` as is, L2-normalised, or standardised with `reference`'s statistics."""
    if scaling == "none":
        return features
    if scaling == "l2":
        return features / np.linalg.norm(features, axis=1, keepdims=True)
    return (features - reference.mean(0)) / (reference.std(0) + 1e-6)


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m experiments.results.linear_lr_grid",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", required=True, help="Pretraining workdir.")
    parser.add_argument("--scalings", default="none,l2,std",
                        help="Comma-separated feature scalings among none, l2, std.")
    parser.add_argument("--learning_rates", default="10,1,0.1",
                        help="Comma-separated base learning rates.")
    parser.add_argument("--holdout", type=int, default=5000,
                        help="Training images held out for the choice.")
    return parser.parse_args(argv)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(sys.argv[1:] if argv is None else argv)
    scalings = args.scalings.split(",")
    unknown = [name for name in scalings if name not in SCALINGS]
    if unknown:
        print(f"error: unknown scaling {unknown[0]!r}; use one of {', '.join(SCALINGS)}",
              file=sys.stderr)
        return 1
    try:
        learning_rates = [float(value) for value in args.learning_rates.split(",")]
    except ValueError:
        print(f"error: invalid --learning_rates {args.learning_rates!r}; expected numbers "
              "separated by commas", file=sys.stderr)
        return 1

    from ascl_jax import data as data_lib
    from ascl_jax import sharding
    from ascl_jax.evaluation import linear

    config = linear.read_run_config(args.workdir)
    model_config, backbone, variables = linear.load_frozen_backbone(args.workdir)
    extract = linear.BackboneFeatures(
        backbone, variables, mesh=sharding.create_mesh(), image_size=config["image_size"],
        mean=model_config["mean"], std=model_config["std"],
    )

    def features_of(split):
        source = data_lib.load_source(config["dataset"], split, data_dir=config["data_dir"],
                                      image_size=config["image_size"])
        return extract(source)

    train_features, train_labels = features_of(config["train_split"])
    test_features, test_labels = features_of(config["test_split"])
    order = np.random.default_rng(0).permutation(len(train_features))
    holdout_rows, fit_rows = order[:args.holdout], order[args.holdout:]
    num_classes = int(train_labels.max()) + 1
    print(f"step {model_config['step']}: mean feature norm "
          f"{np.linalg.norm(train_features, axis=1).mean():.3f}")
    print("| scaling | learning rate | held-out top-1, final | best held-out top-1 | "
          "test top-1, final |")
    print("|---|---|---|---|---|")
    for scaling in scalings:
        reference = train_features[fit_rows]
        for learning_rate in learning_rates:
            settings = linear.LinearEvalSettings(mode="features", learning_rate=learning_rate)
            eval_sets = {
                "holdout": (scale(train_features[holdout_rows], scaling, reference),
                            train_labels[holdout_rows]),
                "test": (scale(test_features, scaling, reference), test_labels),
            }
            _, history = linear.train_on_features(
                scale(reference, scaling, reference), train_labels[fit_rows], eval_sets, settings,
                num_classes,
            )
            best = max(record["holdout_top1"] for record in history)
            print(f"| {scaling} | {learning_rate:g} | {100 * history[-1]['holdout_top1']:.2f} | "
                  f"{100 * best:.2f} | {100 * history[-1]['test_top1']:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
