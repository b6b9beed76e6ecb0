"""A node's own copy of the checkpoint its ranks resume from: only what they read, fetched once per node.

On resume at the world size a DCP checkpoint was saved at, every rank reads mostly its own shard
(``__<rank>_0.distcp``) and a few small items of the others (replicated values such as optimizer step counts,
which DCP stores once). So each rank asks DCP's own load planner which byte ranges it will read, then:

- a file it reads half or more of, and ``.metadata``, ``rng-<rank>.json``, ``data-<rank>.pt``: fetched whole into
  the node's verified copy ``save_dir/<run_id>/<name>/`` and checked against the manifest (size, BLAKE3). A file
  already there and verified is not fetched again: a relaunch on the same node downloads nothing it holds, and the
  ranks of one node fetch under one file lock, so each file comes once per node however many ranks read it;
- the few ranges it reads of other files: fetched as ranges (no file of the node) into a private view of the
  checkpoint, which DCP then reads through the usual restricted reader (formats/dcp.py). A ranged read is not
  covered by the file's digest: the manifest hashes whole files. Stores that cannot serve ranges (S3 presigned
  downloads) get whole files instead.

At another world size (resharding) the whole checkpoint is fetched as before (sharded.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

from ..catalog import Resolved, RunCatalog
from ..errors import CheckpointCorruptError, StoreError
from ..formats.dcp import METADATA_NAME, SafeLoadPlanner, dcp_state, load_metadata, rng_file
from ..manifest import FileEntry, verify_file
from ..state import TrainingState

log = logging.getLogger(__name__)
WHOLE = 0.5  # a rank that reads this share of a file or more fetches all of it (verified, kept for the node)


def node_view(catalog: RunCatalog, r: Resolved, state: TrainingState, folder: Path, view: Path, rank: int) -> int:
    """Build ``view``: this rank's readable view of checkpoint ``r`` backed by the node's copy in ``folder``.

    Returns the bytes this rank downloaded. Every whole file in the view is a hard link to a verified file of the
    node's copy; ranges of other files are sparse files holding only the bytes DCP will read.
    """
    m, where = r.manifest, f"checkpoint {r.path} of run {catalog.run_id} (step {r.manifest.step})"
    entries = {f.name: f for f in m.files}
    own = [n for n in (METADATA_NAME, rng_file(rank), f"data-{rank}.pt") if n in entries]
    fetched = _ensure_whole(catalog, r, folder, [entries[n] for n in own], where)
    reads = reads_of(state, (folder / METADATA_NAME).read_bytes(), where)
    whole = [n for n, spans in reads.items() if sum(b for _, b in spans) >= WHOLE * entries[n].size]
    view.mkdir(parents=True, exist_ok=True)
    ranged: dict[str, list[tuple[int, int]]] = {}
    for name, spans in reads.items():
        if name not in whole and not _verified(folder / name, entries[name], where):
            ranged[name] = spans
    for name, spans in ranged.items():
        got = _fetch_ranges(catalog, f"{r.path}/{name}", spans, view / name, entries[name].size)
        if got is None:
            whole.append(name)  # the store serves whole files only
        else:
            fetched += got
    fetched += _ensure_whole(catalog, r, folder, [entries[n] for n in whole], where)
    for name in [*own, *whole, *(n for n in reads if n not in ranged)]:
        if not (view / name).exists():
            _link(folder / name, view / name)
    return fetched


def reads_of(state: TrainingState, metadata: bytes, where: str) -> dict[str, list[tuple[int, int]]]:
    """The byte ranges (offset, length) of each data file that DCP's load planner reads for this rank's state."""
    md = load_metadata(metadata, where)
    planner = SafeLoadPlanner(where)
    planner.set_up_planner(dcp_state(state), md, False)
    out: dict[str, list[tuple[int, int]]] = {}
    for item in planner.create_local_plan().items:
        info = md.storage_data[item.storage_index]
        out.setdefault(info.relative_path, []).append((int(info.offset), int(info.length)))
    return out


def _ensure_whole(catalog: RunCatalog, r: Resolved, folder: Path, files: list[FileEntry], where: str) -> int:
    """Fetch into ``folder`` each file not already there and verified; once per node (a lock in save_dir)."""
    fetched = 0
    if not files:
        return 0
    folder.mkdir(parents=True, exist_ok=True)
    with _node_lock(folder):
        for f in files:
            if _verified(folder / f.name, f, where):
                continue
            with tempfile.TemporaryDirectory(prefix=".fetch-", dir=folder.parent) as tmp:
                try:
                    got = catalog.store.fetch(f"{r.path}/{f.name}", Path(tmp))
                except (FileNotFoundError, StoreError) as e:
                    raise CheckpointCorruptError(f"{where}: file {f.name!r} cannot be read: {e}") from e
                verify_file(got.path, f, where, digest=got.blake3)
                part = folder / f".{f.name}.part"
                if got.path.is_relative_to(tmp):  # downloaded: move it; a local store's own file: copy it
                    os.replace(got.path, part)
                else:
                    shutil.copyfile(got.path, part)
                os.replace(part, folder / f.name)
                fetched += f.size
    return fetched


def _verified(path: Path, f: FileEntry, where: str) -> bool:
    try:
        verify_file(path, f, where)
        return True
    except CheckpointCorruptError:
        return False


def _fetch_ranges(catalog: RunCatalog, path: str, spans: list[tuple[int, int]], dst: Path, size: int) -> int | None:
    """Write the ranges of ``path`` that DCP reads into a sparse file ``dst`` of the full size; None: no ranges."""
    got = 0
    with dst.open("wb") as out:
        out.truncate(size)
        for offset, length in _merged(spans):
            data = catalog.store.read_range(path, offset, length)
            if data is None:
                dst.unlink()
                return None
            out.seek(offset)
            out.write(data)
            got += len(data)
    return got


def _merged(spans: list[tuple[int, int]], gap: int = 64 << 10) -> Iterator[tuple[int, int]]:
    """Ranges sorted and merged when they touch or lie within ``gap`` bytes: fewer requests, a few bytes more."""
    start, end = -1, -1
    for a, n in sorted(spans):
        if start >= 0 and a <= end + gap:
            end = max(end, a + n)
            continue
        if start >= 0:
            yield start, end - start
        start, end = a, a + n
    if start >= 0:
        yield start, end - start


@contextlib.contextmanager
def _node_lock(folder: Path) -> Iterator[None]:
    lock = folder.parent / f".{folder.name}.fetch-lock"
    with lock.open("a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def _link(src: Path, dst: Path) -> None:
    try:
        os.link(src, dst)
    except OSError:
        shutil.copyfile(src, dst)
