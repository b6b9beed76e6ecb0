"""Load a resolved checkpoint into live objects: verify, deserialize safely, check fit, restore.

Order matters: every file is checked against the manifest before anything is unpickled; the payload is
unpickled only with ``weights_only=True`` (passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
cannot flip it); the live objects are touched only after the whole payload was checked to fit them.
"""

from __future__ import annotations

import json
import logging
import pickle
import re
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import torch

from .catalog import Resolved, RunCatalog
from .data import check_world_size
from .errors import CheckpointCorruptError, CheckpointMismatchError, CheckpointNotFoundError, UnsafeCheckpointError
from .manifest import FOREIGN_FORMATS, Manifest
from .progress import human_bytes
from .refs import ref_for
from .state import MODEL_FILE, RNG_FILE, STATE_FILE, TrainingState, check_fits, restore

log = logging.getLogger(__name__)


def unsafe_pickle_error(e: pickle.UnpicklingError, where: str, what: str) -> UnsafeCheckpointError:
    """The weights_only unpickler refused a global: name it, and ``what`` asked for it."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"global ([\w.]+)", str(e))
    culprit = found.group(1) if found else "an unsupported object"
    return UnsafeCheckpointError(
        f"{where}: {what} asks to unpickle {culprit}, which weights_only loading refuses; "
        "it was not written by tracked_ckpt (or was tampered with). Nothing was loaded"
    )


def torch_load_safe(path: Path, where: str) -> dict[str, Any]:
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise unsafe_pickle_error(e, where, f"file {path.name!r}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointCorruptError(f"{where}: file {path.name!r} is not a readable torch file: {e}") from e
    if not isinstance(payload, dict):
        raise CheckpointCorruptError(f"{where}: {path.name!r} holds a {type(payload).__name__}, not a dict")
    return payload


def weight_files(m: Manifest) -> set[str] | None:
    """The files that hold the model's weights alone ({model.pt}), or None when they are mixed in with the rest."""
    return {MODEL_FILE} if any(f.name == MODEL_FILE for f in m.files) else None


def read_payload(folder: Path, names: set[str], where: str) -> dict[str, Any]:
    """The tensor payload of the torch files among ``names`` (state.pt, and model.pt where the layout has it)."""
    payload: dict[str, Any] = {}
    for name in (STATE_FILE, MODEL_FILE):
        if name in names:
            payload.update(torch_load_safe(folder / name, where))
    return payload


def load_resolved(
    catalog: RunCatalog,
    r: Resolved,
    state: TrainingState,
    cache_dir: Path | None = None,
    weights_only: bool = False,
    world_size: int = 1,
) -> dict[str, Any]:
    """Verify, deserialize, check fit, restore (RNG last); return the checkpoint's metadata.

    ``weights_only``: fetch and read only the model's file where the layout allows (``state`` holds a model alone).
    """
    where = f"checkpoint {ref_for(catalog.run_id, r.path)} (step {r.manifest.step})"
    t0 = time.perf_counter()
    if r.manifest.format == "dcp":  # saved under torchrun; restored here in one process, whatever its world size
        from .distributed.sharded import load_resolved_dcp

        load_resolved_dcp(catalog, r, state, cache_dir)
        return dict(r.manifest.metadata)
    if r.manifest.format in FOREIGN_FORMATS:
        raise CheckpointMismatchError(
            f"{where} is a {r.manifest.format!r} folder that its own library wrote, not a tracked_ckpt state; fetch "
            f"it with tracked_ckpt.frameworks.fetch_folder({catalog.run_id!r}, dest) and resume it with that library "
            "(docs/lightning.md, docs/huggingface.md, docs/accelerate.md)"
        )
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-") as tmp:
        names = {f.name for f in r.manifest.files}
        if STATE_FILE not in names:
            raise CheckpointCorruptError(f"{where}: the manifest lists no {STATE_FILE}")
        only = weight_files(r.manifest) if weights_only else None
        folder = catalog.fetch_verified(r, Path(tmp), cache_dir, only)
        payload = read_payload(folder, only or names, where)
        rng_json = json.loads((folder / RNG_FILE).read_text()) if RNG_FILE in names and not only else {}
        saved_positions = [name for name in state.positions() if name in payload]
        check_world_size(r.manifest.world_size, world_size, saved_positions, where)  # a torchrun job, one state.pt
        check_fits(payload, state, where)
        restore(payload, rng_json, state)
    log.info(
        "restored step %d from %s (%s) in %.2f s",
        r.manifest.step,
        ref_for(catalog.run_id, r.path),
        human_bytes(sum(f.size for f in r.manifest.files if only is None or f.name in only)),
        time.perf_counter() - t0,
    )
    return dict(r.manifest.metadata)


def first_that_loads(
    candidates: Iterable[Resolved], load_one: Callable[[Resolved], dict[str, Any]]
) -> tuple[Resolved, dict[str, Any]] | None:
    """Load the first of ``candidates`` (newest first) that verifies, falling back (with a warning) past corrupt ones.

    Returns None only when there is no candidate; if every one fails verification, the newest one's error is
    raised (never a silent fresh start).
    """
    first_error: Exception | None = None
    for r in candidates:
        try:
            return r, load_one(r)
        except (CheckpointCorruptError, CheckpointNotFoundError) as e:
            first_error = first_error or e
            log.warning("%s; falling back to the previous checkpoint", e)
    if first_error is not None:
        raise first_error
    return None


def load_latest_verified(
    catalog: RunCatalog, state: TrainingState, cache_dir: Path | None = None
) -> tuple[Resolved, dict[str, Any]] | None:
    """The newest checkpoint of ``catalog``'s run that verifies, restored into ``state`` (see first_that_loads)."""
    return first_that_loads(catalog.candidates_latest_first(), lambda r: load_resolved(catalog, r, state, cache_dir))
