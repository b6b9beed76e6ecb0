"""The data position: where each data-parallel rank is in its data, saved as that rank's own, restored to it.

A position is the state of a torchdata ``StatefulDataLoader``, an HF ``datasets.IterableDataset`` (both are
recognized in ``extra=``) or any object passed as ``data=``. In one process it is a part of ``state.pt`` like any
other. Under torchrun every rank reads its own shard in its own order, so positions differ per rank, and DCP keeps
one copy of a value every rank saves under the same key: positions therefore never go into the DCP state; each
rank writes ``data-<rank>.pt`` beside its shard (as torchtitan keeps one loader state per data-parallel rank) and
reads its own file back. The data-parallel rank is the global rank and its size the world size (DDP, FSDP).

A position means something only at the world size it was saved at (rank 1 of 2 read every other sample; there is
no rank 1 of 3 with the same samples): another world size raises DataPositionMismatchError before anything is
restored, naming both sizes and the ways out.
"""

from __future__ import annotations

import io
from collections.abc import Collection, Mapping
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointMismatchError, DataPositionMismatchError
from .manifest import Manifest
from .safe_load import torch_load_safe
from .state import Stateful, TrainingState, settle_loaders


def data_file(rank: int) -> str:
    return f"data-{rank}.pt"


def data_parts(data: Stateful | Mapping[str, Stateful] | None) -> dict[str, Stateful]:
    """``data=`` as part names: one object is "data", a mapping's entries are "data.<name>"."""
    if data is None:
        return {}
    if isinstance(data, Mapping):
        return {f"data.{name}": obj for name, obj in data.items()}
    return {"data": data}


def check_world_size(saved: int, world: int, names: Collection[str], where: str) -> None:
    """Raise DataPositionMismatchError when positions ``names`` are to be restored at another world size."""
    if not names or saved == world:
        return
    listed = ", ".join(sorted(names))
    raise DataPositionMismatchError(
        f"{where} holds the data position ({listed}) of {saved} data-parallel rank(s), and this job has {world}; "
        f"a loader's position only means something at the world size it was saved at. Nothing was loaded. "
        f"Either resume with {saved} rank(s), or restart the epoch: load(..., skip_data=True) restores everything "
        "else (model, optimizer, scheduler, RNG) and leaves the loaders at their start, so this epoch's samples "
        "are read again",
        saved,
        world,
    )


def encode(state: TrainingState) -> bytes | None:
    """This rank's positions, serialized now (a later async write must not see the loader move on)."""
    positions = state.positions()
    if not positions:
        return None
    buf = io.BytesIO()
    torch.save({name: obj.state_dict() for name, obj in positions.items()}, buf)
    return buf.getvalue()


def read_rank_file(folder: Path, manifest: Manifest, state: TrainingState, rank: int, world: int, where: str) -> Any:
    """This rank's saved positions from a verified DCP folder, checked against ``state``; None when none asked."""
    names = set(state.positions())
    if not names:
        return None
    files = {f.name for f in manifest.files}
    if any(name.startswith("data-") for name in files):
        check_world_size(manifest.world_size, world, names, where)
    if data_file(rank) not in files:
        raise CheckpointMismatchError(
            f"{where} holds no data position for rank {rank}, but {', '.join(sorted(names))} was passed to load(); "
            "nothing was loaded. Pass it only to loads of checkpoints saved with it, or load(..., skip_data=True)"
        )
    saved = torch_load_safe(folder / data_file(rank), where)
    missing = sorted(names - set(saved))
    if missing:
        raise CheckpointMismatchError(
            f"{where} has no data position {missing} for rank {rank} (it holds {sorted(saved)}); nothing was loaded"
        )
    return saved


def restore(saved: Mapping[str, Any] | None, state: TrainingState) -> None:
    """Load the positions read by ``read_rank_file`` into the live loaders."""
    if saved is None:
        return
    for name, obj in state.positions().items():
        obj.load_state_dict(saved[name])
    settle_loaders(state)  # before the caller restores the RNG
