"""tracked_ckpt: PyTorch checkpoints recorded in, and resolved through, an MLflow run.

See ``CheckpointManager`` for a complete example.
"""

from __future__ import annotations

from ._version import __version__
from .api import load
from .errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    RunNotFoundError,
    TrackedCkptError,
)
from .manager import CheckpointManager
from .policies import EveryInterval, EveryNSteps, KeepBest, KeepEvery, KeepLast, OnImprovement
from .views import list_checkpoints, list_runs

__all__ = [
    "CheckpointCorruptError",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "EveryInterval",
    "EveryNSteps",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "OnImprovement",
    "RunNotFoundError",
    "TrackedCkptError",
    "__version__",
    "list_checkpoints",
    "list_runs",
    "load",
]
