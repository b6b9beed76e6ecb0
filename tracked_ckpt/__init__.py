"""tracked_ckpt: PyTorch checkpoints recorded in, and resolved through, an MLflow run.

See ``CheckpointManager`` for a complete example.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from ._version import __version__
from .errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    RunNotFoundError,
    TrackedCkptError,
)
from .policies import EveryInterval, EveryNSteps, KeepBest, KeepEvery, KeepLast, OnImprovement

if TYPE_CHECKING:
    from .api import load
    from .export import export_model, warm_start
    from .lifecycle import promote
    from .manager import CheckpointManager
    from .views import list_checkpoints, list_runs

# Imported on first use: these pull in mlflow and torch (~3 s), which `tracked-ckpt --help` must not pay.
_LAZY = {
    "load": ".api",
    "CheckpointManager": ".manager",
    "list_checkpoints": ".views",
    "list_runs": ".views",
    "export_model": ".export",
    "warm_start": ".export",
    "promote": ".lifecycle",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_LAZY[name], __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))


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
    "export_model",
    "list_checkpoints",
    "list_runs",
    "load",
    "promote",
    "warm_start",
]
