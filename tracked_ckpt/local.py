"""The local side of a save: ``save_dir`` layout, staging, durable local commit, the run pointer.

::

    save_dir/
      tracked_ckpt.json            which MLflow run this directory trains (so a relaunch resumes it)
      .staging/<random>/           a save in progress; swept when stale
      <run_id>/<name>/             committed local copies: model.pt, state.pt, rng.json, MANIFEST.json (last)

A local commit is durable before anything goes to MLflow: files, then the manifest, are fsynced, then the
staging folder is renamed into place and its parent fsynced. Nothing here decides "latest": that is
MLflow's answer (see catalog.py); files in ``save_dir`` only serve as a verified cache.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import shutil
import time
import uuid
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

import torch

from ._faults import fault_point
from .errors import CheckpointCorruptError, ConfigError, SaveError
from .formats import foreign, torch_file
from .manifest import (
    FOREIGN_FORMATS,
    MANIFEST_NAME,
    Manifest,
    check_relpath,
    fsync_dir,
    write_file,
)
from .outbox import Outbox, Pending

POINTER_NAME = "tracked_ckpt.json"
STAGING = ".staging"
_STALE_STAGING_S = 3600.0


class LocalDir:
    def __init__(self, root: Path) -> None:
        self.root = root

    def folder(self, run_id: str, name: str) -> Path:
        return self.root / run_id / name

    # ------------------------------------------------------------------------------------------- pointer

    def read_pointer(self) -> dict[str, str] | None:
        try:
            data = json.loads((self.root / POINTER_NAME).read_text())
        except (OSError, ValueError):
            return None
        return data if isinstance(data, dict) and isinstance(data.get("run_id"), str) else None

    def write_pointer(self, run_id: str, tracking_uri: str, experiment_id: str) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        data = {"run_id": run_id, "tracking_uri": tracking_uri, "experiment_id": experiment_id}
        tmp = self.root / f".{POINTER_NAME}.{uuid.uuid4().hex[:8]}"
        tmp.write_text(json.dumps(data, indent=1) + "\n")
        os.replace(tmp, self.root / POINTER_NAME)

    # ------------------------------------------------------------------------------------------- writing

    def sweep_staging(self, max_age_s: float = _STALE_STAGING_S) -> None:
        """Remove staging folders left by crashed saves (older than ``max_age_s``)."""
        staging = self.root / STAGING
        if not staging.is_dir():
            return
        now = time.time()
        for d in staging.iterdir():
            with contextlib.suppress(OSError):
                if now - d.stat().st_mtime > max_age_s:
                    shutil.rmtree(d, ignore_errors=True)

    def stage(
        self, run_id: str, payload: Mapping[str, Any], rng_json: Mapping[str, Any], fields: Mapping[str, Any]
    ) -> tuple[Path, Manifest]:
        """Serialize a training state into a new staging folder, durably; return it and its manifest.

        Nothing is committed yet (``commit`` does that); the staging folder is removed on any failure.
        """
        staging = self.root / STAGING / uuid.uuid4().hex
        try:
            staging.mkdir(parents=True)
            manifest = torch_file.TORCH_FILE.describe(run_id, torch_file.stage(staging, payload, rng_json), fields)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise _save_error(e, fields.get("step"), self.root, payload_bytes(payload)) from e
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise
        return staging, manifest

    def link_foreign(self, found: list[tuple[str, Path]], src: Path) -> tuple[Path, list[str]]:
        """Hard-link (else copy) each (name, file) of ``found`` into a new staging folder; returns it and the names.

        What the training thread pays for a library's checkpoint ``src``: once linked, the library may delete or
        rotate it. Nothing is committed yet: a crash now leaves a staging folder that is swept, never resolved.
        """
        staging = self.root / STAGING / uuid.uuid4().hex
        with _removed_on_failure(staging, lambda e: SaveError(f"could not link {src} into {self.root}: {e}")):
            staging.mkdir(parents=True)
            for rel, path in found:
                _link_or_copy(path, staging / rel)
        return staging, [rel for rel, _ in found]

    def stage_foreign(
        self, run_id: str, staging: Path, names: list[str], fields: Mapping[str, Any], fmt: str
    ) -> Manifest:
        """fsync and hash the files ``link_foreign`` staged; their manifest. Removes ``staging`` on failure."""
        what = f"could not commit the {fmt} checkpoint of step {fields.get('step')} in {self.root}"
        with _removed_on_failure(staging, lambda e: SaveError(f"{what}: {e}")):
            return foreign.LibraryFolder(fmt).describe(run_id, foreign.stage(staging, names), fields)

    def commit(self, staging: Path, final: Path, manifest: Manifest, queue: tuple[Outbox, Pending]) -> None:
        """Write the manifest into ``staging`` (the commit marker, last), queue, then rename it to ``final``.

        Every other file in ``staging`` must be durable already. The outbox entry is added once everything is
        durable and before the rename that commits, so no committed checkpoint is ever missing from the outbox.
        Removes ``staging`` on failure (an OSError becomes a SaveError naming the step).
        """
        try:
            fault_point("manifest")
            write_file(staging / MANIFEST_NAME, manifest.to_json().encode())
            fsync_dir(staging)
            outbox, entry = queue
            outbox.add(entry)
            fault_point("outbox")
            fault_point("rename")
            final.parent.mkdir(parents=True, exist_ok=True)
            if final.exists():  # a leftover of a crashed save under the same name: never the committed one
                shutil.rmtree(final)
            os.rename(staging, final)
            fsync_dir(final.parent)
        except OSError as e:
            shutil.rmtree(staging, ignore_errors=True)
            raise _save_error(e, manifest.step, self.root, manifest.size) from e
        except BaseException:
            shutil.rmtree(staging, ignore_errors=True)
            raise

    def remove(self, run_id: str, name: str) -> None:
        shutil.rmtree(self.folder(run_id, name), ignore_errors=True)

    def prune(self, run_id: str, keep: Collection[str]) -> list[str]:
        """Remove this run's checkpoint folders not named in ``keep`` (another node's copies that retention dropped
        or that were never committed); returns their names."""
        root = self.root / run_id
        gone = sorted(d.name for d in root.iterdir() if d.is_dir() and d.name not in keep) if root.is_dir() else []
        for name in gone:
            self.remove(run_id, name)
        return gone


def checked_foreign(src: Path, files: list[tuple[str, Path]] | None, fmt: str) -> list[tuple[str, Path]]:
    """The (name, file) pairs of a library's checkpoint ``src`` to record (``files``, default every file under it)."""
    if fmt not in FOREIGN_FORMATS:
        raise ConfigError(f"format={fmt!r}: pass one of {', '.join(map(repr, FOREIGN_FORMATS))}")
    if files is None:
        return foreign_files(src)
    for rel, _ in files:
        try:
            check_relpath(rel, "file name")
        except CheckpointCorruptError as e:
            raise SaveError(f"checkpoint {src}: {e}; rename that file to record it") from e
    return files


def foreign_files(src: Path) -> list[tuple[str, Path]]:
    """Every file under ``src`` as (relative POSIX name, path), sorted; SaveError for what cannot be recorded."""
    if not src.is_dir():
        raise SaveError(f"{src} is not a folder (it does not exist, or is a file); pass the checkpoint folder")
    found = []
    for path in sorted(src.rglob("*")):
        rel = path.relative_to(src).as_posix()
        if path.is_symlink() or not (path.is_dir() or path.is_file()):
            raise SaveError(f"{path} in checkpoint folder {src} is a symlink or special file; record real files only")
        if path.is_dir():
            continue
        try:
            check_relpath(rel, "file name")
        except CheckpointCorruptError as e:
            raise SaveError(f"checkpoint folder {src}: {e}; rename that file to record the folder") from e
        if rel == MANIFEST_NAME:
            raise SaveError(f"checkpoint folder {src} holds a {MANIFEST_NAME}, tracked_ckpt's commit marker; rename it")
        found.append((rel, path))
    if not found:
        raise SaveError(f"checkpoint folder {src} holds no file; nothing to record")
    return found


@contextlib.contextmanager
def _removed_on_failure(staging: Path, error: Callable[[OSError], SaveError]) -> Iterator[None]:
    """Remove ``staging`` if the block fails; an OSError becomes ``error(e)`` (a SaveError naming the save)."""
    try:
        yield
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        raise error(e) from e
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def _link_or_copy(src: Path, dst: Path) -> None:
    """A hard link costs nothing at any size and survives the library deleting its folder (its rotation does)."""
    if not dst.parent.is_dir():
        dst.parent.mkdir(parents=True)
    try:
        os.link(src, dst)
    except OSError:  # another filesystem, or links not supported: a copy
        shutil.copyfile(src, dst)


def payload_bytes(payload: Mapping[str, Any]) -> int:
    total = 0

    def walk(obj: Any) -> None:
        nonlocal total
        if isinstance(obj, torch.Tensor):
            total += obj.numel() * obj.element_size()
        elif isinstance(obj, Mapping):
            for v in obj.values():
                walk(v)
        elif isinstance(obj, list | tuple):
            for v in obj:
                walk(v)

    walk(payload)
    return total


def _save_error(e: OSError, step: Any, root: Path, size: int) -> SaveError:
    if e.errno == errno.ENOSPC:
        free = shutil.disk_usage(root).free if root.exists() else 0
        return SaveError(
            f"disk full while saving the checkpoint of step {step} under {root}: it needs about "
            f"{size / 1e6:.1f} MB, {free / 1e6:.1f} MB are free. Earlier checkpoints are "
            "untouched; free space (or lower retention's keep counts) and save again"
        )
    return SaveError(f"could not write the checkpoint of step {step} under {root}: {e}")
