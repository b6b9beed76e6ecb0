"""Record a checkpoint folder another library wrote, and fetch one back verified: what every adapter shares.

A recorded folder goes through the same pipeline as a tracked_ckpt save (``CheckpointManager.record_folder``, then
recording/): its files are hard-linked into ``save_dir`` staging (on the training thread: the library may rotate
the folder away as soon as ``record_folder`` returns), then, on the manager's recording thread, fsynced and hashed,
the manifest (``format`` naming the library, step, epoch, metrics, and ``source``, the folder's own name) is
written last, then the outbox, the rename, and the publisher uploads the files and the manifest to
``checkpoints/step-N/`` of the run. A crash before that local commit leaves only a staging folder, swept and never
resolved. Fetching resolves latest / best / a step in MLflow, verifies every file (size and BLAKE3) and copies the
folder to ``dest/<source>``.
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from ..catalog import Resolved, RunCatalog
from ..errors import CheckpointCorruptError, CheckpointNotFoundError
from ..formats import format_of
from ..manifest import Manifest, verify_file
from ..progress import human_bytes
from ..refs import Which, ref_for
from ..resolver import open_catalog
from ..runtags import monitor_of
from ..store.reading import reading

if TYPE_CHECKING:
    from ..manager import CheckpointManager

log = logging.getLogger(__name__)

K = TypeVar("K")
SOURCE_KEY = "source"  # the manifest metadata key naming the folder (or file) as the library called it


def record_folder(
    mgr: CheckpointManager,
    folder: str | Path,
    metadata: Mapping[str, Any] | None = None,
    *,
    format: str = "folder",
    step: int | None = None,
) -> str:
    """Record ``folder`` (written by another library) as a checkpoint of ``mgr``'s run; returns its reference.

    ``metadata`` numbers become metrics at the step as for ``mgr.save``; the folder's name is kept as
    ``metadata["source"]``, and ``fetch_folder`` recreates it under that name. Returns once the files are
    hard-linked; the commit and the record follow in the background (``mgr.wait()`` waits for them, and raises
    their SaveError, as the next ``record_folder`` and ``mgr.close()`` do).
    """
    src = Path(folder)
    return mgr.record_folder(src, {**(metadata or {}), SOURCE_KEY: src.name}, format=format, step=step)


def record_files(
    mgr: CheckpointManager,
    src: Path,
    source: str,
    found: list[tuple[str, Path]],
    metadata: Mapping[str, Any] | None = None,
    *,
    format: str,
    step: int | None = None,
) -> str:
    """``record_folder`` of the (name, file) pairs ``found`` of ``src``, recorded under the source name ``source``."""
    return mgr.record_folder(src, {**(metadata or {}), SOURCE_KEY: source}, format=format, step=step, files=found)


def delete_removed(mgr: CheckpointManager, sources: dict[K, str], removed: Callable[[K], bool]) -> None:
    """Delete from the run each recorded checkpoint whose source the library removed (``mgr.delete_removed``)."""
    mgr.delete_removed(sources, removed)


def recorded_sources(mgr: CheckpointManager, format: str) -> dict[str, str]:
    """{source name: checkpoint path} of the run's committed checkpoints of ``format`` (one scan)."""
    return {
        str(r.manifest.metadata.get(SOURCE_KEY)): r.path
        for r in mgr.committed()
        if r.manifest.format == format and SOURCE_KEY in r.manifest.metadata
    }


def fetch_folder(
    run_id: str,
    dest: str | Path,
    *,
    which: Which = "latest",
    format: str | None = None,
    tracking_uri: str | None = None,
    metric: str | None = None,
    mode: str | None = None,
) -> Path:
    """Download checkpoint ``which`` of run ``run_id``, verified, to ``dest/<source>``; returns that path.

    ``which``: "latest" (falling back past a checkpoint that fails verification, with a warning), "best" (by
    ``metric``/``mode``, default the run's own monitor) or a step. ``format`` restricts the candidates to one
    library's checkpoints. An existing ``dest/<source>`` is reused only if it verifies; else CheckpointCorruptError.
    """
    return fetch_checkpoint(
        run_id, dest, which=which, format=format, tracking_uri=tracking_uri, metric=metric, mode=mode
    )[0]


def fetch_checkpoint(
    run_id: str,
    dest: str | Path,
    *,
    which: Which = "latest",
    format: str | None = None,
    tracking_uri: str | None = None,
    metric: str | None = None,
    mode: str | None = None,
) -> tuple[Path, Manifest]:
    """``fetch_folder``, and the checkpoint's manifest (step, epoch, metrics, metadata)."""
    dest = Path(dest)
    with reading():
        catalog = open_catalog(run_id, tracking_uri)
        if which == "latest":
            candidates: Iterator[Resolved] = (
                r for r in catalog.candidates_latest_first() if format is None or r.manifest.format == format
            )
        else:
            metric, checked_mode = monitor_of(catalog.store.tags(), metric, mode)
            candidates = iter([catalog.resolve(which, metric, checked_mode)])
        first_error: Exception | None = None
        for r in candidates:
            try:
                return _fetch_one(catalog, r, dest), r.manifest
            except CheckpointCorruptError as e:
                if which != "latest":
                    raise
                first_error = first_error or e
                log.warning("%s; falling back to the previous checkpoint", e)
    if first_error is not None:
        raise first_error
    kind = f" of format {format!r}" if format else ""
    raise CheckpointNotFoundError(
        f"run {run_id} has no committed checkpoint{kind}; `tracked-ckpt ls {run_id}` lists what it has"
    )


def _fetch_one(catalog: RunCatalog, r: Resolved, dest: Path) -> Path:
    m = r.manifest
    if format_of(m).own:
        raise CheckpointNotFoundError(
            f"{ref_for(catalog.run_id, r.path)} is a tracked_ckpt {m.format!r} checkpoint, not a library's folder; "
            "restore it with tracked_ckpt.load(run_id, model, optimizer)"
        )
    source = str(m.metadata.get(SOURCE_KEY) or r.path.rpartition("/")[2])
    target = dest / source
    where = f"checkpoint {ref_for(catalog.run_id, r.path)} (step {m.step})"
    if target.exists():
        for f in m.files:  # a folder fetched earlier: reused only when it is exactly this checkpoint
            verify_file(target / f.name, f, f"{where}, already at {target}")
        log.info("step %d of run %s already at %s (verified)", m.step, catalog.run_id, target)
        return target
    t0 = time.perf_counter()
    dest.mkdir(parents=True, exist_ok=True)
    part = dest / f".{source}.{uuid.uuid4().hex[:8]}.part"
    try:
        with tempfile.TemporaryDirectory(prefix="tracked_ckpt-", dir=dest) as tmp:
            folder = catalog.fetch_verified(r, Path(tmp))
            for f in m.files:
                (part / f.name).parent.mkdir(parents=True, exist_ok=True)
                # A copy, never a link: the library may write into what it resumes from; the record stays intact.
                shutil.copyfile(folder / f.name, part / f.name)
        part.rename(target)
    finally:
        shutil.rmtree(part, ignore_errors=True)
    log.info("fetched step %d of run %s to %s (%s) in %.2f s", m.step, catalog.run_id, target, human_bytes(m.size),
             time.perf_counter() - t0)  # fmt: skip
    return target
