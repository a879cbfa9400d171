"""Command-line handling shared by the absl entry points of experiments/."""

import sys

from absl import flags


def parse_flags(argv: list[str]) -> list[str]:
    """Parse the flags, exiting with a one-line error (status 1) for an invalid one.

    Pass it to `app.run(main, flags_parser=parse_flags)`.
    """
    try:
        return flags.FLAGS(argv)
    except flags.Error as error:
        sys.exit(f"error: {error}")


def reject_arguments(argv: list[str]) -> None:
    """Exit with a one-line error when `argv` has anything besides the program name."""
    if len(argv) > 1:
        sys.exit(f"error: unexpected arguments {' '.join(argv[1:])}; every setting is a "
                 "--flag=value (see --help).")
