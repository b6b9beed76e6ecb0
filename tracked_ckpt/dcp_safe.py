"""Read DCP (torch.distributed.checkpoint) folders without running code from them.

Stock DCP unpickles ``.metadata`` with plain ``pickle`` and non-tensor values with ``weights_only=False``:
a planted ``.metadata`` runs code inside ``dcp.load``. Here ``.metadata`` goes through an Unpickler that
resolves only DCP's metadata classes, torch sizes/dtypes/layouts and a few builtins; non-tensor values go
through ``torch.load(weights_only=True)``; and every storage path named in ``.metadata`` must be a file the
manifest lists (so it cannot point outside the verified folder). Callers verify manifest digests first.
"""

from __future__ import annotations

import io
import pathlib
import pickle
import re
from collections.abc import Collection
from typing import Any

import torch
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import ReadItem

from .errors import CheckpointCorruptError, TrackedCkptError, UnsafeCheckpointError

METADATA_NAME = ".metadata"

_ALLOWED: dict[tuple[str, str], Any] = {
    **{
        (dcp_md.__name__, name): getattr(dcp_md, name)
        for name in (
            "Metadata",
            "MetadataIndex",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        )
    },
    (dcp_fs.__name__, "_StorageInfo"): dcp_fs._StorageInfo,
    ("torch", "Size"): torch.Size,
    ("torch.serialization", "_get_layout"): torch.serialization._get_layout,
    # StorageMeta.checkpoint_id records where the checkpoint was written; a path object is inert.
    ("pathlib", "PosixPath"): pathlib.PosixPath,
    ("pathlib", "PurePosixPath"): pathlib.PurePosixPath,
    ("pathlib", "WindowsPath"): pathlib.PurePosixPath,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("builtins", "slice"): slice,
    ("collections", "OrderedDict"): dict,
}
_TORCH_CONSTANTS = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    def __init__(self, f: io.BufferedIOBase, where: str) -> None:
        super().__init__(f)
        self.where = where

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        if module == "torch" and isinstance(getattr(torch, name, None), _TORCH_CONSTANTS):
            return getattr(torch, name)
        raise UnsafeCheckpointError(
            f"{self.where}: {METADATA_NAME} asks to unpickle the global {module}.{name}, which is not part of DCP "
            "metadata; it was tampered with (or written by an unknown DCP version). Nothing was loaded"
        )


def load_metadata(data: bytes, where: str) -> dcp_md.Metadata:
    """Unpickle DCP ``.metadata`` bytes, allowing only DCP's own metadata types."""
    try:
        md = _MetadataUnpickler(io.BytesIO(data), where).load()
    except UnsafeCheckpointError:
        raise
    except Exception as e:
        raise CheckpointCorruptError(f"{where}: {METADATA_NAME} is not readable DCP metadata: {e}") from e
    if not isinstance(md, dcp_md.Metadata):
        raise CheckpointCorruptError(f"{where}: {METADATA_NAME} holds a {type(md).__name__}, not DCP Metadata")
    return md


def load_bytes_safely(value: io.BytesIO, fqn: str, where: str) -> Any:
    """A DCP non-tensor value (scheduler fields, ints, strings), unpickled with weights_only=True."""
    try:
        return torch.load(value, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"global ([\w.]+)", str(e))
        culprit = found.group(1) if found else "an unsupported object"
        raise UnsafeCheckpointError(
            f"{where}: value {fqn!r} asks to unpickle {culprit}, which weights_only loading refuses; "
            "it was not written by tracked_ckpt (or was tampered with). Nothing was loaded"
        ) from None


class SafeReader(FileSystemReader):
    """A FileSystemReader whose metadata may name only ``allowed_files`` and holds only DCP types."""

    def __init__(self, path: str | pathlib.Path, allowed_files: Collection[str], where: str) -> None:
        super().__init__(path)
        self.allowed_files = frozenset(allowed_files)
        self.where = where
        self.refused: TrackedCkptError | None = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> dcp_md.Metadata:
        # DCP folds a reader's exception into an AssertionError's text: keep ours to re-raise it as is.
        try:
            return self._read_metadata(kwargs.get("rank"))
        except TrackedCkptError as e:
            self.refused = self.refused or e
            raise

    def _read_metadata(self, rank: int | None) -> dcp_md.Metadata:
        if rank is not None:
            raise CheckpointCorruptError(f"{self.where}: per-rank DCP metadata is not part of the manifest")
        md = load_metadata(pathlib.Path(self.path, METADATA_NAME).read_bytes(), self.where)
        for info in (md.storage_data or {}).values():
            rel = getattr(info, "relative_path", None)
            if rel not in self.allowed_files or rel == METADATA_NAME:
                raise CheckpointCorruptError(
                    f"{self.where}: {METADATA_NAME} points at {rel!r}, which is not a data file of the manifest; "
                    "refusing to read outside the verified checkpoint"
                )
        if getattr(md, "storage_meta", None) is None:
            md.storage_meta = dcp_md.StorageMeta()
        md.storage_meta.load_id = self.load_id  # type: ignore[union-attr]
        return md


class SafeLoadPlanner(DefaultLoadPlanner):
    """DefaultLoadPlanner, except that non-tensor values are unpickled with weights_only=True."""

    def __init__(self, where: str) -> None:
        super().__init__()
        self.where = where

    def load_bytes(self, read_item: ReadItem, value: io.BytesIO) -> None:
        fqn = read_item.dest_index.fqn
        obj = load_bytes_safely(value, fqn, self.where)
        if self.flatten_state_dict:
            set_element(self.original_state_dict, self.mappings[fqn], obj)
        else:
            self.state_dict[fqn] = obj
