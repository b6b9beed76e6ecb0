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

from ..errors import CheckpointCorruptError
from ..manifest import FOREIGN_FORMATS, Manifest
from ._base import ONE, Format, Job


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
