"""Checkpoint formats: how each kind of checkpoint folder is staged, described, restored and read for weights.

Three kinds, one ``Format`` each (the torchtitan / torchsnapshot shape):

- ``torch_file.TORCH_FILE`` ("torch"): a single process's state, ``model.pt`` + ``state.pt`` + ``rng.json``;
- ``dcp.DCP_FOLDER`` ("dcp"): a torch.distributed.checkpoint folder of per-rank shards, saved under torchrun;
- ``foreign.LibraryFolder`` ("folder", "lightning", "hf-trainer", "accelerate"): a folder another library wrote,
  recorded as it is and handed back to that library (``tracked_ckpt.frameworks``).

``format_of(manifest)`` picks one; callers ask it instead of branching on ``manifest.format``. Writing differs by
what each kind is given (a payload, a rank's shard, a library's folder), so each module has its own ``stage``; what
follows the staging (the manifest, restoring, model weights, the digest) is this protocol. A format sits below
loading, the catalog and the recorder: it reads a folder that they fetched and verified, and never fetches itself.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..errors import CheckpointCorruptError
from ..manifest import FOREIGN_FORMATS, FileEntry, Manifest
from ..state import TrainingState


@dataclass(frozen=True)
class Job:
    """The job a restore runs in: its world size (a data position fits one), this rank, and the group of a
    collective restore under torchrun (None: this process restores alone, whatever the saved world size)."""

    world_size: int = 1
    rank: int = 0
    group: Any = None


ONE = Job()  # one process


class Format(Protocol):
    """What every kind of checkpoint folder answers for itself."""

    name: str  # manifest.format
    own: bool  # written by tracked_ckpt (restored by load()); else a library's folder (fetched by fetch_folder())
    sharded: bool  # each rank writes its own files (and may upload them itself)

    def describe(
        self, run_id: str, files: Iterable[FileEntry], fields: Mapping[str, Any], world_size: int = 1
    ) -> Manifest:
        """The manifest of a checkpoint of this format whose ``files`` are staged (``fields``: what was planned)."""
        ...

    def restore_files(self, m: Manifest, where: str, weights_only: bool = False) -> set[str] | None:
        """The files a restore reads (None: all); raises when ``load()`` cannot restore this checkpoint."""
        ...

    def restore(
        self, folder: Path, m: Manifest, state: TrainingState, where: str, only: set[str] | None = None, job: Job = ONE
    ) -> None:
        """Restore the verified ``folder`` (the files ``only``, else all) into ``state``, RNG last."""
        ...

    def weight_files(self, m: Manifest) -> set[str] | None:
        """The files that hold the model's weights alone (None: they are mixed in with the rest)."""
        ...

    def model_weights(self, folder: Path, m: Manifest, where: str) -> dict[str, Any]:
        """The model's state dict (CPU, possibly memory-mapped) from the verified ``folder``."""
        ...

    def digest(self, m: Manifest) -> str:
        """One digest for the checkpoint (what a registered model version is pinned to)."""
        ...


def format_of(m: Manifest) -> Format:
    """The format of checkpoint ``m``."""
    return format_named(m.format)


def format_named(name: str) -> Format:
    """The format called ``name`` (a manifest's ``format`` field)."""
    if name == "torch":
        from .torch_file import TORCH_FILE

        return TORCH_FILE
    if name == "dcp":
        from .dcp import DCP_FOLDER  # torch.distributed.checkpoint: imported only for a DCP checkpoint

        return DCP_FOLDER
    if name in FOREIGN_FORMATS:
        from .foreign import LibraryFolder

        return LibraryFolder(name)
    raise CheckpointCorruptError(
        f"checkpoint format {name!r} is unknown; this tracked_ckpt reads 'torch', 'dcp' and "
        f"{', '.join(map(repr, FOREIGN_FORMATS))}. Upgrade tracked_ckpt to read it"
    )


__all__ = ["ONE", "Format", "Job", "format_named", "format_of"]
