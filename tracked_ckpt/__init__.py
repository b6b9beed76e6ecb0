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
    ConfigError,
    DataPositionMismatchError,
    ExperimentNotFoundError,
    InvalidMetadataError,
    RunLockedError,
    RunNotFoundError,
    SaveError,
    StoreError,
    StoreNotFoundError,
    TrackedCkptError,
    UnsafeCheckpointError,
)
from .policies import (
    CheckpointInfo,
    EveryInterval,
    EveryNSteps,
    KeepBest,
    KeepEvery,
    KeepLast,
    OnImprovement,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
)

if TYPE_CHECKING:
    from .api import load, log_eval
    from .export import export_model, warm_start
    from .following import follow
    from .lifecycle import promote
    from .manager import CheckpointManager
    from .store.run_store import RunStore
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
    "follow": ".following",
    "log_eval": ".api",
    "RunStore": ".store.run_store",  # the storage seam (store_factory=): subclass it to inject faults or wrap calls
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
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointMismatchError",
    "CheckpointNotFoundError",
    "ConfigError",
    "DataPositionMismatchError",
    "EveryInterval",
    "EveryNSteps",
    "ExperimentNotFoundError",
    "InvalidMetadataError",
    "KeepBest",
    "KeepEvery",
    "KeepLast",
    "OnImprovement",
    "RetentionPolicy",
    "RunLockedError",
    "RunNotFoundError",
    "RunStore",
    "SaveContext",
    "SaveError",
    "SavePolicy",
    "StoreError",
    "StoreNotFoundError",
    "TrackedCkptError",
    "UnsafeCheckpointError",
    "__version__",
    "export_model",
    "follow",
    "list_checkpoints",
    "list_runs",
    "load",
    "log_eval",
    "promote",
    "warm_start",
]
