"""Recovery of a run's recorder: attaching to a run an earlier process left behind, or attaching late.

``recover`` indexes the run's committed checkpoints, records the queue an earlier process left, removes dead
saves' leftovers and repairs lagging summary tags and LoggedModels; ``recover_offline`` indexes the local copies
while the server is unreachable, and ``connect`` (on the publisher thread) does the deferred work when it first
answers. Plain functions of the recorder (``RunRecorder`` delegates to them); they see it through ``Attaching``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from typing import Protocol

from .catalog import Resolved, RunCatalog
from .errors import StoreError
from .manifest import ARTIFACT_PREFIX
from .publishing import Recording
from .runtags import TAG_LATEST

log = logging.getLogger(__name__)


class Attaching(Recording, Protocol):
    """What recovery reads and writes of a run's recorder, beyond what publishing does."""

    catalog: RunCatalog
    taken: set[str]
    _deferred: Callable[[], None] | None

    def local_committed(self) -> list[Resolved]: ...


def recover(rec: Attaching) -> None:
    """Index the run's committed checkpoints (MLflow's and the local queue); repair lagging summary tags."""
    found = rec.catalog.scan()
    rec.taken = {p.rpartition("/")[2] for p in rec.catalog.listed}
    rec.index = {r.path: r.info for r in found}
    queued = rec.outbox.pending(rec.run_id)
    if queued:  # committed locally by an earlier process and never recorded: record them now
        log.info("recording %d queued checkpoint(s) of run %s from %s", len(queued), rec.run_id, rec.outbox.dir)
        drained = rec.publisher.drained(rec.publish_timeout)
        # The queue before the scan: an entry the publisher records meanwhile is in one or the other, never lost.
        queued = rec.outbox.pending(rec.run_id)
        found = rec.catalog.scan()
        if drained:
            rec.index = {r.path: r.info for r in found}
    _clean_leftovers(rec, found, {p.name for p in queued})
    rec.taken |= {p.name for p in rec.outbox.pending(rec.run_id)}
    tags = rec.store.tags_at_open
    if found and tags.get(TAG_LATEST) != found[-1].path and not rec.outbox.pending(rec.run_id):
        log.warning("run %s: latest tag %r lags behind committed checkpoint %s (an interrupted save); repairing it",
                    rec.run_id, tags.get(TAG_LATEST), found[-1].path)  # fmt: skip
        rec.store.set_tags(rec.summary_tags())
    if not rec.outbox.pending(rec.run_id):
        _reconcile_models(rec, found)


def _reconcile_models(rec: Attaching, found: list[Resolved]) -> None:
    """Repair what a crash left between a checkpoint and its LoggedModel; give older checkpoints theirs."""
    if rec.models is None:
        return
    try:
        rec.models.reconcile({r.path: r.manifest for r in found})
    except StoreError as e:
        log.warning("run %s: could not bring its logged models in line with its checkpoints (%s); the next "
                    "owner of the run, or `tracked-ckpt models %s`, tries again", rec.run_id, e, rec.run_id)


def recover_offline(rec: Attaching) -> None:
    """Index the verified local copies in ``save_dir`` (the server is unreachable)."""
    rec.index = {r.path: r.info for r in rec.local_committed()}
    root = rec.local.root / rec.run_id
    rec.taken = {d.name for d in root.iterdir()} if root.is_dir() else set()
    rec.taken |= {p.name for p in rec.outbox.pending(rec.run_id)}


def connect(rec: Attaching) -> None:
    """The server answers for the first time (publisher thread): the work an offline start deferred."""
    assert rec._deferred is not None
    rec.store.connect()
    rec._deferred()  # the manager's part: lease, RUNNING status, run-page note
    local = rec.index
    found = rec.catalog.scan()
    rec.taken |= {p.rpartition("/")[2] for p in rec.catalog.listed}
    queued = {f"{ARTIFACT_PREFIX}/{p.name}" for p in rec.outbox.pending(rec.run_id)}
    # MLflow's committed checkpoints, plus local ones that are only queued (published one by one next).
    merged = {r.path: r.info for r in found}
    rec.index = {**merged, **{p: c for p, c in local.items() if p in queued and p not in merged}}
    rec._deferred = None
    log.info("MLflow at %s answers: run %s attached (%d checkpoints recorded, %d queued)",
             rec.store.server, rec.run_id, len(merged), len(queued))  # fmt: skip


def _clean_leftovers(rec: Attaching, found: list[Resolved], queued: set[str]) -> None:
    """Remove what dead saves left behind: uncommitted artifact folders, local copies retention had deleted.

    Only the lease holder runs this, so nothing here can be another live writer's save in progress.
    """
    # A folder whose manifest exists but does not parse (torn, or written by a newer tracked_ckpt) is kept.
    committed = {r.path.rpartition("/")[2] for r in found} | {p.rpartition("/")[2] for p in rec.catalog.unreadable}
    for name in sorted(rec.taken - committed - queued):
        log.info("removing uncommitted artifact folder %s/%s of run %s (a save that died)", ARTIFACT_PREFIX, name,
                 rec.run_id)  # fmt: skip
        try:
            rec.store.delete(f"{ARTIFACT_PREFIX}/{name}")
        except StoreError as e:
            log.warning("could not remove uncommitted artifact folder %s: %s", name, e)
    local_run = rec.local.root / rec.run_id
    if local_run.is_dir():
        for d in local_run.iterdir():
            if d.name not in committed and d.name not in queued:
                rec.local.remove(rec.run_id, d.name)
