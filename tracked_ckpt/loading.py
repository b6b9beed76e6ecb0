"""Load a resolved checkpoint into live objects: fetch what its format reads, verify, let the format restore it.

Order matters: every file is checked against the manifest before anything is unpickled; the payload is
unpickled only with ``weights_only=True`` (passed explicitly, so ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD``
cannot flip it); the live objects are touched only after the whole payload was checked to fit them
(``tracked_ckpt.formats``: each format keeps these rules for its own files).
"""

from __future__ import annotations

import logging
import tempfile
import time
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

from .catalog import Resolved, RunCatalog
from .errors import CheckpointCorruptError, CheckpointNotFoundError
from .formats import Job, format_of
from .progress import human_bytes
from .refs import ref_for
from .state import TrainingState

log = logging.getLogger(__name__)


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
    A DCP checkpoint (saved under torchrun) is restored here in one process, whatever its world size.
    """
    where = f"checkpoint {ref_for(catalog.run_id, r.path)} (step {r.manifest.step})"
    t0 = time.perf_counter()
    fmt = format_of(r.manifest)
    only = fmt.restore_files(r.manifest, where, weights_only)  # raises, before any download, if it cannot restore
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-") as tmp:
        folder = catalog.fetch_verified(r, Path(tmp), cache_dir, only)
        fmt.restore(folder, r.manifest, state, where, only, Job(world_size))
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
