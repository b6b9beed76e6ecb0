"""Reads of a live run: what "latest", "best" or a step is while this process records the run.

MLflow's answer, except where ``save_dir`` knows better: a checkpoint committed locally and still queued (an
outage) is newer than what MLflow records, and with the server unreachable the verified local copies are all there
is. Reads only: nothing here writes the run or ``save_dir``.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

from ..catalog import Resolved, RunCatalog
from ..errors import CheckpointCorruptError, CheckpointNotFoundError, StoreError
from ..local import LocalDir
from ..manifest import ARTIFACT_PREFIX, MANIFEST_NAME, Manifest
from ..outbox import Outbox
from ..policies import Mode, best_of
from ..refs import Which, parse_path
from ..store.run_store import RunStore

log = logging.getLogger(__name__)


def local_copy(local: LocalDir, run_id: str, name: str) -> Resolved | None:
    """The committed local copy ``save_dir/<run>/<name>`` (manifest present, readable, of this run), or None."""
    manifest = local.folder(run_id, name) / MANIFEST_NAME
    try:
        m = Manifest.from_json(manifest.read_bytes(), str(manifest))
    except (OSError, CheckpointCorruptError):
        return None
    return Resolved(f"{ARTIFACT_PREFIX}/{name}", m) if m.run_id == run_id else None


class LiveRun:
    def __init__(
        self, store: RunStore, catalog: RunCatalog, local: LocalDir, outbox: Outbox, monitor: str, mode: Mode
    ) -> None:
        self.store, self.catalog, self.local, self.outbox = store, catalog, local, outbox
        self.monitor, self.mode = monitor, mode

    @property
    def run_id(self) -> str:
        return self.store.run_id

    def local_copy(self, name: str) -> Resolved | None:
        return local_copy(self.local, self.run_id, name)

    def local_committed(self) -> list[Resolved]:
        """The run's committed local copies, in commit order; no network."""
        root = self.local.root / self.run_id
        found = [self.local_copy(d.name) for d in root.iterdir()] if root.is_dir() else []
        return sorted((r for r in found if r is not None), key=lambda r: r.manifest.seq)

    def queued(self) -> list[Resolved]:
        """Checkpoints committed locally and not yet recorded in MLflow, in commit order (reads only those)."""
        found = [self.local_copy(p.name) for p in self.outbox.pending(self.run_id)]
        return sorted((r for r in found if r is not None), key=lambda r: r.manifest.seq)

    def latest_first(self) -> Iterator[Resolved]:
        """Candidates for "latest", newest first: never older than a checkpoint committed in save_dir.

        Queued checkpoints (committed locally, not yet recorded) come before MLflow's latest when newer; with the
        server unreachable, the local copies are all there is.
        """
        if not self.store.connected:
            yield from reversed(self.local_committed())
            return
        queued = self.queued()
        try:
            remote = self.catalog.candidates_latest_first()
            first = next(remote, None)
        except StoreError as e:
            if not e.transient:
                raise
            log.warning("MLflow at %s is unreachable (%s): resolving 'latest' from the copies in %s",
                        self.store.server, e, self.local.root)  # fmt: skip
            yield from reversed(self.local_committed())
            return
        yield from (r for r in reversed(queued) if first is None or r.manifest.seq > first.manifest.seq)
        if first is not None:
            yield first
            yield from remote

    def resolve(self, which: Which) -> Resolved:
        """"best" or a step: MLflow's answer, or with the server unreachable the copies in save_dir."""
        if self.store.connected:
            return self.catalog.resolve(which, self.monitor, self.mode)
        local = self.local_committed()
        if which == "best":
            chosen = best_of([r.info for r in local], self.monitor, self.mode)
            hit = next((r for r in local if chosen is not None and r.path == chosen.path), None)
        else:
            hit = next((r for r in reversed(local) if r.manifest.step == which), None)
        if hit is None:
            raise CheckpointNotFoundError(
                f"run {self.run_id}: MLflow at {self.store.server} is unreachable and {self.local.root} holds no "
                f"committed checkpoint ({which}); retry once the server answers"
            )
        return hit

    def best(self) -> Resolved | None:
        try:
            return self.resolve("best")
        except CheckpointNotFoundError:
            return None

    def catalog_of(self, run_id: str) -> RunCatalog:
        """This run's catalog, or a read-only one of another run on the same server (through the same seam)."""
        from ..resolver import open_catalog

        return self.catalog if run_id == self.run_id else open_catalog(run_id, client=self.store.client,
                                                                         store_factory=type(self.store))

    def fork_parent(self) -> tuple[str, Resolved] | None:
        """A fork without checkpoints of its own starts from its parent's (the run's fork tag names it)."""
        from ..lifecycle import fork_parent

        ref = fork_parent(self.store.tags_at_open)
        return None if ref is None else self.resolve_path(ref)

    def resolve_path(self, text: str) -> tuple[str, Resolved]:
        """A ``checkpoint_path`` (see refs.parse_path); this run's queued checkpoints resolve to their local copy."""
        run_id, path = parse_path(text, self.run_id)
        if run_id == self.run_id:
            name = path.rpartition("/")[2]
            mine = self.local_copy(name)
            waiting = mine is not None and any(p.name == name for p in self.outbox.pending(self.run_id))
            if mine is not None and (not self.store.connected or waiting):
                return run_id, mine
        return run_id, Resolved(path, self.catalog_of(run_id).manifest(path))

    def cache_for(self, catalog: RunCatalog, r: Resolved) -> Path | None:
        """The local copy of ``r`` in save_dir, if there is one (verified before use like any download)."""
        folder = self.local.folder(catalog.run_id, r.path.rpartition("/")[2])
        return folder if folder.is_dir() else None

    def committed(self) -> list[Resolved]:
        """Every committed checkpoint: MLflow's, plus those still queued (or only local, while offline)."""
        found = self.catalog.scan() if self.store.connected else []
        recorded = {r.path for r in found}
        extra = self.queued() if self.store.connected else self.local_committed()
        return sorted(found + [r for r in extra if r.path not in recorded], key=lambda r: r.manifest.seq)
