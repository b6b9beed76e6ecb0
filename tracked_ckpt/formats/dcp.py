"""The DCP format ("dcp"): the torch.distributed.checkpoint folder saved under torchrun, restored without running code.

Each rank writes its shard with ``dcp.save``, then ``stage_rank`` (its RNG, its data position, the hashes of its
files); rank 0 gathers every rank's entries into one manifest (``DCP_FOLDER.describe``). ``DCP_FOLDER`` restores
it at any world size, collectively under torchrun or in one process, and reads the model's tensors alone.

Stock DCP unpickles ``.metadata`` with plain ``pickle`` and non-tensor values with ``weights_only=False``:
a planted ``.metadata`` runs code inside ``dcp.load``. Here ``.metadata`` goes through an Unpickler that
resolves only DCP's metadata classes, torch sizes/dtypes/layouts and a few builtins; non-tensor values go
through ``torch.load(weights_only=True)``; and every storage path named in ``.metadata`` must be a file the
manifest lists (so it cannot point outside the verified folder). Callers verify manifest digests first.
"""

from __future__ import annotations

import io
import json
import logging
import pathlib
import pickle
import warnings
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint import filesystem as dcp_fs
from torch.distributed.checkpoint import metadata as dcp_md
from torch.distributed.checkpoint._traverse import set_element
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import FileSystemReader
from torch.distributed.checkpoint.planner import ReadItem
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.checkpoint.state_dict_loader import load as dcp_load

from .. import data
from .._faults import fault_point
from ..errors import CheckpointCorruptError, CheckpointMismatchError, TrackedCkptError, UnsafeCheckpointError
from ..manifest import FileEntry, Manifest, hash_file, write_file
from ..safe_load import unsafe_pickle_error
from ..state import TrainingState, cuda_rng_states, host_rng_json, restore
from ._base import ONE, FormatBase, Job

log = logging.getLogger(__name__)

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
        raise unsafe_pickle_error(e, where, f"value {fqn!r}") from None


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


# ------------------------------------------------------------------------------------------ state <-> DCP


def _optimizers(state: TrainingState) -> tuple[torch.optim.Optimizer, ...]:
    return (state.optimizer,) if isinstance(state.optimizer, torch.optim.Optimizer) else ()


def dcp_state(state: TrainingState) -> dict[str, Any]:
    """The state dict DCP saves: model/optimizer through get_state_dict (FQN keys, DTensor shards), rest as is."""
    sd: dict[str, Any] = {}
    if isinstance(state.model, torch.nn.Module):
        msd, osd = get_state_dict(state.model, _optimizers(state))
        sd["model"] = msd
        if _optimizers(state):
            sd["optimizer"] = osd
    positions = state.positions()  # per rank: data.py writes them beside the shards, not into DCP
    for name, obj in state.parts().items():
        if name not in positions:
            sd.setdefault(name, obj.state_dict())
    return sd


def _apply(sd: Mapping[str, Any], state: TrainingState) -> None:
    if isinstance(state.model, torch.nn.Module):
        set_state_dict(
            state.model,
            _optimizers(state),
            model_state_dict=sd["model"],
            optim_state_dict=sd.get("optimizer", {}),
        )
    positions = state.positions()
    for name, obj in state.parts().items():
        if name in positions:
            continue
        if name not in ("model", "optimizer") or not isinstance(state.model, torch.nn.Module):
            obj.load_state_dict(sd[name])


def rng_file(rank: int) -> str:
    return f"rng-{rank}.json"


def rng_json() -> dict[str, Any]:
    """This rank's Python, NumPy, torch and CUDA RNG state, all as JSON."""
    torch_states = {"torch": torch.get_rng_state().tolist(), "cuda": [s.tolist() for s in cuda_rng_states()]}
    return {**host_rng_json(), **torch_states}


def restore_rng(data: Mapping[str, Any]) -> None:
    def as_bytes(xs: list[int]) -> torch.Tensor:
        return torch.tensor(xs, dtype=torch.uint8)

    rng = {"torch": as_bytes(data["torch"]), "cuda": [as_bytes(c) for c in data.get("cuda", [])]}
    restore({"rng": rng}, data, TrainingState())


def _dcp_error(e: CheckpointException, where: str) -> TrackedCkptError:
    """DCP raises CheckpointException (a BaseException) wrapping each rank's error; surface ours, else wrap."""
    for exc, _trace in e.failures.values():
        if isinstance(exc, TrackedCkptError):
            return exc
    first = next(iter(e.failures.values()), (e, None))[0]
    text = f"{type(first).__name__}: {first}"
    if "Missing key" in text or "size" in text.lower():
        return CheckpointMismatchError(f"{where} does not fit the objects passed to load(): {text}")
    return CheckpointCorruptError(f"{where}: DCP failed ({text})")


def _safe_load(template: dict[str, Any], reader: SafeReader, where: str, group: Any = None) -> None:
    """``dcp.load`` into ``template`` through ``reader``; its refusal (else DCP's error) raised as ours."""
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)  # one process: intended
            dcp_load(template, storage_reader=reader, planner=SafeLoadPlanner(where), process_group=group)
    except CheckpointException as e:
        raise reader.refused or _dcp_error(e, where) from None
    except (RuntimeError, AssertionError) as e:
        if reader.refused is not None:
            raise reader.refused from None
        raise CheckpointMismatchError(f"{where} does not fit the objects passed to load(): {e}") from e


def load_dcp_folder(
    folder: pathlib.Path, manifest: Manifest, state: TrainingState, where: str, group: Any = None, rank: int = 0
) -> None:
    """Restore a verified DCP checkpoint folder into ``state`` (collective when ``group`` is given)."""
    data_files = {f.name for f in manifest.files if f.name.endswith(".distcp")}
    if METADATA_NAME not in {f.name for f in manifest.files}:
        raise CheckpointCorruptError(f"{where}: the manifest lists no {METADATA_NAME}")
    world = dist.get_world_size(group) if group is not None else 1
    positions = data.read_rank_file(folder, manifest, state, rank, world, where)  # before anything is changed
    template = dcp_state(state)
    _safe_load(template, SafeReader(folder, data_files, where), where, group)
    _apply(template, state)
    data.restore(positions, state)
    if rng_file(rank) in {f.name for f in manifest.files}:
        restore_rng(json.loads((folder / rng_file(rank)).read_text()))  # RNG last
    elif any(f.name.startswith("rng-") for f in manifest.files):
        log.warning("%s was saved by %d ranks; rank %d keeps its current RNG state", where, manifest.world_size, rank)


def model_weights(folder: Path, m: Manifest, where: str) -> dict[str, torch.Tensor]:
    """Read the ``model.*`` tensors of a verified DCP folder into fresh CPU tensors (any saved world size)."""
    md = load_metadata((folder / METADATA_NAME).read_bytes(), where)
    template: dict[str, torch.Tensor] = {}
    for fqn, entry in md.state_dict_metadata.items():
        if fqn.startswith("model.") and isinstance(entry, dcp_md.TensorStorageMetadata):
            template[fqn[len("model.") :]] = torch.empty(entry.size, dtype=entry.properties.dtype)
    if not template:
        raise CheckpointCorruptError(f"{where} holds no model tensors (saved without a model?); nothing to read")
    data_files = {f.name for f in m.files if f.name.endswith(".distcp")}
    _safe_load({"model": template}, SafeReader(folder, data_files, where), where)
    return template


def stage_rank(staging: Path, rank: int, rng: Mapping[str, Any] | None, position: bytes | None) -> list[FileEntry]:
    """After ``dcp.save`` into ``staging``: write this rank's RNG and data position, hash its files; their entries.

    Rank 0 also answers for DCP's ``.metadata``. Each rank's entries are gathered by rank 0 into one manifest.
    """
    mine: list[FileEntry] = []
    if rng is not None:
        mine.append(write_file(staging / rng_file(rank), json.dumps(rng).encode()))
    if position is not None:
        mine.append(write_file(staging / data.data_file(rank), position))
    names = [p.name for p in staging.glob(f"__{rank}_*.distcp")]
    if rank == 0:
        names.append(METADATA_NAME)
    for n in sorted(names):
        mine.append(FileEntry(n, *hash_file(staging / n)))
    fault_point(f"dcp_written:{rank}")  # tests: a rank dies with its shard written, nothing committed
    return mine


class DcpFolder(FormatBase):
    """A torch.distributed.checkpoint folder (see the module doc): restored at any world size, or in one process."""

    name = "dcp"
    sharded = True

    def restore_files(self, m: Manifest, where: str, weights_only: bool = False) -> set[str] | None:
        return None  # the model's tensors lie in every rank's shard

    def restore(
        self, folder: Path, m: Manifest, state: TrainingState, where: str, only: set[str] | None = None, job: Job = ONE
    ) -> None:
        """Collective when ``job.group`` is given (every rank of it calls this); its world size is the group's."""
        load_dcp_folder(folder, m, state, where, job.group, job.rank)

    def model_weights(self, folder: Path, m: Manifest, where: str) -> dict[str, Any]:
        return dict(model_weights(folder, m, where))


DCP_FOLDER = DcpFolder()
