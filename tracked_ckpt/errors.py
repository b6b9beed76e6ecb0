"""The exceptions tracked_ckpt raises.

Each subclasses a built-in as well, so ``except FileNotFoundError`` in a user's script keeps working::

    TrackedCkptError
     ├── CheckpointNotFoundError  (FileNotFoundError)  no committed checkpoint matches the request
     ├── RunNotFoundError         (LookupError)        the run ID is unknown or the run was deleted
     ├── ExperimentNotFoundError  (LookupError)        no active experiment has that name
     ├── StoreNotFoundError       (FileNotFoundError)  a read found no tracking store at the URI (made none)
     ├── CheckpointCorruptError   (ValueError)         size, digest or manifest check failed before loading
     │    └── UnsafeCheckpointError                    the payload asks for a global outside weights_only
     ├── CheckpointMismatchError  (ValueError)         the checkpoint does not fit the model/optimizer
     │    └── DataPositionMismatchError                 its data position was saved at another world size
     ├── InvalidMetadataError     (TypeError)          a metadata value cannot be recorded
     ├── ConfigError              (ValueError)         a CheckpointManager argument is wrong
     ├── StoreError               (OSError)            MLflow (tracking server or artifact store) failed
     ├── RunLockedError           (RuntimeError)       another live process holds the run's lease
     └── SaveError                (RuntimeError)       a save (often a background one) failed; names the step

Messages state the value at fault, the situation, and what to do.
"""

from __future__ import annotations

from typing import Any


class TrackedCkptError(Exception):
    """Base class of every error raised by tracked_ckpt."""


class CheckpointNotFoundError(TrackedCkptError, FileNotFoundError):
    """No committed checkpoint matches the request."""


class RunNotFoundError(TrackedCkptError, LookupError):
    """The MLflow run does not exist (or was deleted)."""


class ExperimentNotFoundError(TrackedCkptError, LookupError):
    """No active MLflow experiment has the name asked for (reads never create one)."""


class StoreNotFoundError(TrackedCkptError, FileNotFoundError):
    """A read-only call found no tracking store where the URI points (a missing sqlite file or folder).

    MLflow would create an empty store there; reads refuse instead, naming the URI and how to point elsewhere.
    """


class CheckpointCorruptError(TrackedCkptError, ValueError):
    """A checkpoint failed verification (size, digest, manifest) before anything was deserialized."""


class UnsafeCheckpointError(CheckpointCorruptError):
    """The payload needs a Python global that the weights_only unpickler refuses."""


class CheckpointMismatchError(TrackedCkptError, ValueError):
    """The checkpoint does not fit the live model/optimizer; nothing was changed."""


class DataPositionMismatchError(CheckpointMismatchError):
    """The data position (loader state per data-parallel rank) was saved at another world size; nothing changed."""

    def __init__(self, message: str, saved_world_size: int, world_size: int) -> None:
        super().__init__(message)
        self.saved_world_size = saved_world_size
        self.world_size = world_size

    def __reduce__(self) -> tuple[Any, ...]:  # torchrun hands errors between ranks by pickle
        return (type(self), (str(self), self.saved_world_size, self.world_size))


class InvalidMetadataError(TrackedCkptError, TypeError):
    """A metadata value is neither a number nor JSON-serializable."""


class ConfigError(TrackedCkptError, ValueError):
    """A CheckpointManager or policy argument is invalid."""


class StoreError(TrackedCkptError, OSError):
    """The MLflow tracking server or artifact store refused or failed a request."""

    transient = True  # False when retrying cannot help (permission, authentication, validation)
    error_code = ""  # MLflow's code (RESOURCE_DOES_NOT_EXIST, ...) when MLflow answered with one


class RunLockedError(TrackedCkptError, RuntimeError):
    """Another live process is writing this run (or this save_dir); the message names it."""


class SaveError(TrackedCkptError, RuntimeError):
    """A save failed; the message names the step. Checkpoints committed earlier are untouched."""
