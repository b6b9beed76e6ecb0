"""The ``Format`` protocol, and what the formats share: the manifest they describe themselves with, the digest."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

from ..manifest import FileEntry, Manifest, build_manifest
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


class FormatBase:
    """Defaults of a ``Format``: named ``name``, written by tracked_ckpt in one process, weights mixed in."""

    name = ""
    own = True
    sharded = False

    def describe(
        self, run_id: str, files: Iterable[FileEntry], fields: Mapping[str, Any], world_size: int = 1
    ) -> Manifest:
        return build_manifest(run_id, files, fields, format=self.name, world_size=world_size)

    def weight_files(self, m: Manifest) -> set[str] | None:
        return None

    def digest(self, m: Manifest) -> str:
        """A single file's BLAKE3, else the BLAKE3 of every file's name and digest (order-free)."""
        if len(m.files) == 1:
            return f"blake3:{m.files[0].blake3}"
        import blake3

        joined = "\n".join(f"{f.name} {f.blake3}" for f in sorted(m.files, key=lambda f: f.name))
        return f"blake3-files:{blake3.blake3(joined.encode()).hexdigest()}"
