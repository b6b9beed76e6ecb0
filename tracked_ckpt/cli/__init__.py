"""The ``tracked-ckpt`` command: list, inspect, pull, verify and prune checkpoints recorded in MLflow runs.

Kept apart from the library: only this package prints or configures logging. MLflow, torch and pandas are
imported inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

from collections.abc import Sequence

# Importing the command modules registers their commands on the group.
from . import follow, reading, writing  # noqa: F401
from .errors import EXIT_CODES_HELP as EXIT_CODES_HELP
from .errors import classify as classify
from .group import REF_HELP as REF_HELP
from .group import cli as cli
from .output import _checkpoints_table as _checkpoints_table
from .output import iso_utc as iso_utc


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``tracked-ckpt``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="tracked-ckpt")
