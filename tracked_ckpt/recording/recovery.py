"""Recovery of a run's recorder: attaching to a run an earlier process left behind, or attaching late.

``recover`` indexes the run's committed checkpoints, records the queue an earlier process left, removes dead
saves' leftovers and repairs lagging summary tags and LoggedModels; ``recover_offline`` indexes the local copies
while the server is unreachable, and ``connect`` (on the publisher thread) merges what MLflow has with the local
index when the server first answers. It writes what it finds into the ledger; it never calls the recorder.
"""

from __future__ import annotations

import logging

from ..catalog import Resolved, RunCatalog
from ..errors import StoreError
from ..local import LocalDir
from ..manifest import ARTIFACT_PREFIX
from ..models import CheckpointModels
from ..outbox import Outbox, Publisher
from ..runtags import TAG_LATEST
from ..store.run_store import RunStore
from .ledger import Ledger
from .live import LiveRun
from .retention import Retention

log = logging.getLogger(__name__)


class Recovery:
    def __init__(
        self, store: RunStore, catalog: RunCatalog, live: LiveRun, ledger: Ledger, outbox: Outbox,
        publisher: Publisher, retention: Retention, models: CheckpointModels | None, publish_timeout: float,
    ) -> None:  # fmt: skip
        self.store, self.catalog, self.live, self.ledger, self.outbox = store, catalog, live, ledger, outbox
        self.publisher, self.retention, self.models = publisher, retention, models
        self.publish_timeout = publish_timeout

    @property
    def run_id(self) -> str:
        return self.store.run_id

    @property
    def local(self) -> LocalDir:
        return self.live.local

    def recover(self) -> None:
        """Index the run's committed checkpoints (MLflow's and the local queue); repair lagging summary tags."""
        ledger = self.ledger
        found = self.catalog.scan()
        ledger.taken = {p.rpartition("/")[2] for p in self.catalog.listed}
        ledger.index = {r.path: r.info for r in found}
        queued = self.outbox.pending(self.run_id)
        if queued:  # committed locally by an earlier process and never recorded: record them now
            log.info("recording %d queued checkpoint(s) of run %s from %s", len(queued), self.run_id, self.outbox.dir)
            drained = self.publisher.drained(self.publish_timeout)
            # The queue before the scan: an entry the publisher records meanwhile is in one or the other, never lost.
            queued = self.outbox.pending(self.run_id)
            found = self.catalog.scan()
            if drained:
                ledger.index = {r.path: r.info for r in found}
        self._clean_leftovers(found, {p.name for p in queued})
        ledger.taken |= {p.name for p in self.outbox.pending(self.run_id)}
        tags = self.store.tags_at_open
        if found and tags.get(TAG_LATEST) != found[-1].path and not self.outbox.pending(self.run_id):
            log.warning("run %s: latest tag %r lags behind committed checkpoint %s (an interrupted save); repairing "
                        "it", self.run_id, tags.get(TAG_LATEST), found[-1].path)  # fmt: skip
            self.store.set_tags(self.retention.summary_tags())
        if not self.outbox.pending(self.run_id):
            self._reconcile_models(found)

    def _reconcile_models(self, found: list[Resolved]) -> None:
        """Repair what a crash left between a checkpoint and its LoggedModel; give older checkpoints theirs."""
        if self.models is None:
            return
        try:
            self.models.reconcile({r.path: r.manifest for r in found})
        except StoreError as e:
            log.warning("run %s: could not bring its logged models in line with its checkpoints (%s); the next "
                        "owner of the run, or `tracked-ckpt models %s`, tries again", self.run_id, e, self.run_id)

    def recover_offline(self) -> None:
        """Index the verified local copies in ``save_dir`` (the server is unreachable)."""
        self.ledger.index = {r.path: r.info for r in self.live.local_committed()}
        root = self.local.root / self.run_id
        self.ledger.taken = {d.name for d in root.iterdir()} if root.is_dir() else set()
        self.ledger.taken |= {p.name for p in self.outbox.pending(self.run_id)}

    def connect(self) -> None:
        """The server answers for the first time (publisher thread): merge MLflow's index with the local one."""
        local = self.ledger.index
        found = self.catalog.scan()
        self.ledger.taken |= {p.rpartition("/")[2] for p in self.catalog.listed}
        queued = {f"{ARTIFACT_PREFIX}/{p.name}" for p in self.outbox.pending(self.run_id)}
        # MLflow's committed checkpoints, plus local ones that are only queued (published one by one next).
        merged = {r.path: r.info for r in found}
        self.ledger.index = {**merged, **{p: c for p, c in local.items() if p in queued and p not in merged}}
        log.info("MLflow at %s answers: run %s attached (%d checkpoints recorded, %d queued)",
                 self.store.server, self.run_id, len(merged), len(queued))  # fmt: skip

    def _clean_leftovers(self, found: list[Resolved], queued: set[str]) -> None:
        """Remove what dead saves left behind: uncommitted artifact folders, local copies retention had deleted.

        Only the lease holder runs this, so nothing here can be another live writer's save in progress.
        """
        # A folder whose manifest exists but does not parse (torn, or written by a newer tracked_ckpt) is kept.
        committed = {r.path.rpartition("/")[2] for r in found}
        committed |= {p.rpartition("/")[2] for p in self.catalog.unreadable}
        for name in sorted(self.ledger.taken - committed - queued):
            log.info("removing uncommitted artifact folder %s/%s of run %s (a save that died)", ARTIFACT_PREFIX, name,
                     self.run_id)  # fmt: skip
            try:
                self.store.delete(f"{ARTIFACT_PREFIX}/{name}")
            except StoreError as e:
                log.warning("could not remove uncommitted artifact folder %s: %s", name, e)
        local_run = self.local.root / self.run_id
        if local_run.is_dir():
            for d in local_run.iterdir():
                if d.name not in committed and d.name not in queued:
                    self.local.remove(self.run_id, d.name)
