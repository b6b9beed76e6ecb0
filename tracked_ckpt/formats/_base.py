"""What the formats share: the manifest they describe themselves with, and the digest of a folder of files."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

from ..manifest import FileEntry, Manifest, build_manifest


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
