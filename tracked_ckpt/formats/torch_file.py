"""The single-process format ("torch"): the model's weights in ``model.pt``, the rest in ``state.pt``, RNG as JSON.

::

    checkpoints/step-00000100/
      model.pt        {"model": ...}: what a follower or an export fetches alone
      state.pt        optimizer, scheduler, scaler, extra, data positions, torch/CUDA RNG
      rng.json        Python and NumPy RNG (no pickle)
      MANIFEST.json

Checkpoints before 0.3 hold everything in ``state.pt``; both load. Files are unpickled with ``weights_only=True``
only, and the live objects are touched only after the whole payload was checked to fit them.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch

from .._faults import fault_point
from ..data import check_world_size
from ..errors import CheckpointCorruptError
from ..manifest import FileEntry, HashingWriter, Manifest, write_file
from ..safe_load import torch_load_safe
from ..state import MODEL_FILE, RNG_FILE, STATE_FILE, TrainingState, check_fits, restore, split_files
from ._base import ONE, FormatBase, Job


def stage(staging: Path, payload: Mapping[str, Any], rng_json: Mapping[str, Any]) -> list[FileEntry]:
    """Write ``payload`` (and ``rng_json``) durably into ``staging``; their manifest entries."""
    files = [_torch_save(part, staging / name) for name, part in split_files(payload)]
    if rng_json:
        files.append(write_file(staging / RNG_FILE, json.dumps(rng_json).encode()))
    return files


def _torch_save(payload: Mapping[str, Any], path: Path) -> FileEntry:
    # An open file object (not a path) so that ENOSPC surfaces as OSError rather than an opaque
    # "unexpected pos" RuntimeError, and so the digest is computed while writing, not by re-reading.
    with open(path, "wb") as f:
        w = HashingWriter(f)
        try:
            torch.save(dict(payload), w)  # type: ignore[arg-type]
        except RuntimeError as e:
            if w.error is not None:  # a failed write (ENOSPC, EIO): report that, not torch's "unexpected pos"
                raise w.error from e
            raise
        f.flush()
        fault_point("fsync")
        os.fsync(f.fileno())
    return FileEntry(path.name, w.size, w.hexdigest())


def read_payload(folder: Path, names: set[str], where: str) -> dict[str, Any]:
    """The tensor payload of the torch files among ``names`` (state.pt, and model.pt where the layout has it)."""
    payload: dict[str, Any] = {}
    for name in (STATE_FILE, MODEL_FILE):
        if name in names:
            payload.update(torch_load_safe(folder / name, where))
    return payload


class TorchFile(FormatBase):
    name = "torch"

    def restore_files(self, m: Manifest, where: str, weights_only: bool = False) -> set[str] | None:
        if STATE_FILE not in {f.name for f in m.files}:
            raise CheckpointCorruptError(f"{where}: the manifest lists no {STATE_FILE}")
        return self.weight_files(m) if weights_only else None

    def restore(
        self, folder: Path, m: Manifest, state: TrainingState, where: str, only: set[str] | None = None, job: Job = ONE
    ) -> None:
        """Every rank of a torchrun job restores the whole of it (one process saved it)."""
        names = {f.name for f in m.files}
        payload = read_payload(folder, only or names, where)
        rng_json = json.loads((folder / RNG_FILE).read_text()) if RNG_FILE in names and not only else {}
        saved_positions = [name for name in state.positions() if name in payload]
        check_world_size(m.world_size, job.world_size, saved_positions, where)  # a torchrun job, one state.pt
        check_fits(payload, state, where)
        restore(payload, rng_json, state)

    def weight_files(self, m: Manifest) -> set[str] | None:
        return {MODEL_FILE} if any(f.name == MODEL_FILE for f in m.files) else None

    def model_weights(self, folder: Path, m: Manifest, where: str) -> dict[str, Any]:
        payload = read_payload(folder, self.weight_files(m) or {STATE_FILE}, where)
        if not isinstance(payload.get("model"), Mapping):
            raise CheckpointCorruptError(f"{where} holds no model state (saved without a model?); nothing to read")
        return dict(payload["model"])

    def digest(self, m: Manifest) -> str:
        """``state.pt``'s BLAKE3 (what it was before model.pt was split out of it)."""
        main = next((f for f in m.files if f.name == STATE_FILE), m.files[0])
        return f"blake3:{main.blake3}"


TORCH_FILE = TorchFile()
