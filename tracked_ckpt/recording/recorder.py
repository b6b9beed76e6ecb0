"""The recording half of a save: everything a run's checkpoints owe MLflow, behind one object.

Every kind of save goes through ``RunRecorder``: the single-process save, the sharded DCP save, a library's
folder (frameworks/) and ``tracked-ckpt sync``. A save is *planned* (``plan``: folder name, manifest fields),
*staged* by its caller in a staging folder (``LocalDir.stage`` for a training state), then *committed* by the one
``commit``: locally (files and manifest durable, outbox entry, rename: writing.py), then handed to the publisher
thread, which uploads the files, the manifest last (the commit marker in MLflow), logs metrics and summary tags in
one ``log_batch`` and applies retention (publishing.py, retention.py). Reads of the live run (latest, best, a
path) come from live.py; attaching to a run an earlier process left behind from recovery.py. The parts share the
run's bookkeeping through the ledger (ledger.py) and never call back up into this facade.

It can start *offline* (the server unreachable when the job starts): the index then comes from the verified
local copies in ``save_dir``, saves queue, and the deferred work (the lease, the run's RUNNING status and note,
the scan of what MLflow already has) runs on the publisher thread when the server first answers.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Collection, Iterator, Mapping
from pathlib import Path
from typing import Any

from ..catalog import Resolved, RunCatalog
from ..errors import StoreError
from ..formats import format_of
from ..local import LocalDir
from ..manifest import ARTIFACT_PREFIX, Manifest
from ..models import CheckpointModels
from ..outbox import Outbox, Publisher
from ..policies import CheckpointInfo, Mode, RetentionPolicy, SaveContext, best_of
from ..progress import human_bytes
from ..refs import Which, ref_for
from ..state import Metadata
from ..store.run_store import RunStore
from .ledger import Ledger
from .live import LiveRun
from .publishing import Publishing, wait_for_record
from .recovery import Recovery
from .retention import Retention
from .writing import Writer

log = logging.getLogger(__name__)


class RunRecorder:
    """Plan, commit, publish, keep, read and recover one run's checkpoints."""

    def __init__(
        self,
        store: RunStore,
        local: LocalDir,
        *,
        monitor: str,
        mode: Mode,
        retention: RetentionPolicy | None,
        publish_timeout: float,
        on_connect: Callable[[], None] | None = None,
        start: bool = True,
        logged_models: bool = True,
    ) -> None:
        self.store, self.local = store, local
        self.monitor, self.mode = monitor, mode
        self.publish_timeout = publish_timeout
        self.outbox = Outbox(local.root)
        self.catalog = RunCatalog(store)
        self.models = CheckpointModels(store) if logged_models else None  # one LoggedModel per checkpoint
        self.ledger = Ledger()
        self.live = LiveRun(store, self.catalog, local, self.outbox, monitor, mode)
        self.writer = Writer(store.run_id, local, self.outbox, self.ledger)
        self.retention = Retention(store, local, self.outbox, self.ledger, self.models, policy=retention,
                                   monitor=monitor, mode=mode)  # fmt: skip
        self.publishing = Publishing(store, local, self.ledger, self.retention, self.models)
        self._deferred = on_connect
        self.publisher = Publisher(
            self.outbox, store.run_id, self.publishing.publish, store.server, probe=store.probe,
            on_connect=self._connect if on_connect is not None else None, start=start,
        )  # fmt: skip
        self.recovery = Recovery(store, self.catalog, self.live, self.ledger, self.outbox, self.publisher,
                                 self.retention, self.models, publish_timeout)  # fmt: skip

    @property
    def run_id(self) -> str:
        return self.store.run_id

    @property
    def attached(self) -> bool:
        """False after an offline start until the server first answers (and the deferred work is done)."""
        return self._deferred is None

    @property
    def index(self) -> dict[str, CheckpointInfo]:
        """The run's recorded checkpoints, by path (replaced, never mutated)."""
        return self.ledger.index

    @property
    def resumed_from(self) -> str | None:
        return self.ledger.resumed_from

    @resumed_from.setter
    def resumed_from(self, path: str | None) -> None:
        self.ledger.resumed_from = path  # retention never deletes the checkpoint the run resumed from

    # ------------------------------------------------------------------------------------- attaching

    def recover(self) -> None:
        """Index the run's committed checkpoints (MLflow's and the local queue); repair lagging summary tags."""
        self.recovery.recover()

    def recover_offline(self) -> None:
        """Index the verified local copies in ``save_dir`` (the server is unreachable)."""
        self.recovery.recover_offline()

    def _connect(self) -> None:
        """The server answers for the first time (publisher thread): the work an offline start deferred."""
        assert self._deferred is not None
        self.store.connect()
        self._deferred()  # the manager's part: lease, RUNNING status, run-page note
        self.recovery.connect()
        self._deferred = None

    # ---------------------------------------------------------------------------------------- saving

    def save_context(
        self, step: int, metrics: Mapping[str, float] | None, pending: CheckpointInfo | None, last_time: float
    ) -> SaveContext:
        """What a save policy decides on: the index (plus the async save in flight), the time of the last save."""
        known = self.ledger.known() + ([pending] if pending is not None else [])
        latest = max(known, key=lambda c: c.seq, default=None)
        best = best_of(known, self.monitor, self.mode)
        return SaveContext(
            step=step, now=time.time(), metrics=dict(metrics or {}), last_step=latest.step if latest else None,
            last_time=last_time, best_value=best.metrics.get(self.monitor) if best else None, metric=self.monitor,
            mode=self.mode,
        )  # fmt: skip

    def next_seq(self) -> int:
        return self.writer.next_seq()

    def plan(self, meta: Metadata, step: int | None) -> tuple[str, dict[str, Any]]:
        """The next checkpoint's folder name and manifest fields (see writing.Writer.plan)."""
        return self.writer.plan(meta, step)

    def commit(
        self,
        staging: Path,
        name: str,
        manifest: Manifest,
        t0: float,
        *,
        held: Collection[str] | None = None,
        record: bool = True,
        since: float | None = None,
        wait: bool = True,
    ) -> Path:
        """Commit a staged checkpoint locally (queued first), then wait for its record; returns the local copy.

        Every kind of save ends here. ``staging`` holds the files, durable (``LocalDir.stage`` for a training
        state, ``LocalDir.stage_foreign`` for a library's folder, a DCP save's own for a shard); ``manifest`` lists
        every file of the checkpoint. ``held``: those ``staging`` holds (None: all it holds; the manifest's others
        are another node's, and the record waits until they are in the store). ``record=False``: this node's share
        only, uploaded and never recorded from here. ``t0``: when the save began (logged); ``since``: when its
        staging began (the commit cost), default now. The wait for the record is bounded by ``publish_timeout``;
        ``wait=False`` does not wait (a checkpoint spread over several nodes is recorded once they have all uploaded).
        """
        since = time.perf_counter() if since is None else since
        latest = self.ledger.latest_step()
        folder = self.writer.commit(staging, name, manifest, held=held, record=record, since=since)
        timeout = self.publish_timeout if wait else 0.0  # wait=False: recorded in the background (many nodes)
        recorded = wait_for_record(self.publisher, self.outbox, manifest.step, manifest.seq, folder,
                                   timeout)  # fmt: skip
        self._saved(manifest, name, recorded, latest, t0, record)
        return folder

    def delete(self, path: str) -> None:
        """Delete one committed checkpoint from the run and ``save_dir``: what a library's own rotation removed."""
        self.retention.delete(path)

    def _saved(self, m: Manifest, name: str, recorded: bool, latest: int | None, t0: float, record: bool) -> None:
        ref = ref_for(self.run_id, f"{ARTIFACT_PREFIX}/{name}")
        elapsed = time.perf_counter() - t0
        if not record:
            log.info("committed this node's share of step %d (%s) in %.2f s; %s", m.step, ref, elapsed,
                     "uploaded" if recorded else "queued for upload (see outbox)")  # fmt: skip
            return
        ranks = f", {m.world_size} ranks" if format_of(m).sharded else ""
        queued = "" if recorded else "; queued for MLflow (see outbox)"
        log.info("saved step %d to %s (%s%s) in %.2f s%s", m.step, ref, human_bytes(m.size), ranks, elapsed,
                 queued)  # fmt: skip
        if latest is not None and m.step < latest:
            log.info("step %d is below the previous latest step %d: this checkpoint is now the latest", m.step, latest)

    # ------------------------------------------------------------------------------------------ costs

    def note_cost(self, seq: int, name: str, value: float) -> None:
        """A cost of the save ``seq`` known on the saving side (blocked, commit, bytes), logged with its record."""
        self.ledger.note_cost(seq, name, value)

    def note_late_cost(self, step: int, name: str, value: float) -> None:
        """A cost known only after the save's record (a sync save's blocked time): logged with the next record."""
        self.ledger.note_late_cost(step, name, value)

    def flush_late_costs(self) -> None:
        """Log the costs still waiting for a next record (at close); best effort."""
        late = self.ledger.take_late()
        if late and self.attached:
            try:
                self.store.publish(late[-1][2], {}, {}, late=late)
            except StoreError as e:
                log.debug("could not log the last save's costs: %s", e)

    def apply_retention(self) -> None:
        self.retention.apply()

    def summary_tags(self) -> dict[str, str]:
        return self.retention.summary_tags()

    # --------------------------------------------------------------------------------------- reading

    def local_committed(self) -> list[Resolved]:
        return self.live.local_committed()

    def queued(self) -> list[Resolved]:
        return self.live.queued()

    def latest_first(self) -> Iterator[Resolved]:
        return self.live.latest_first()

    def resolve(self, which: Which) -> Resolved:
        return self.live.resolve(which)

    def best(self) -> Resolved | None:
        return self.live.best()

    def catalog_of(self, run_id: str) -> RunCatalog:
        return self.live.catalog_of(run_id)

    def fork_parent(self) -> tuple[str, Resolved] | None:
        return self.live.fork_parent()

    def resolve_path(self, text: str) -> tuple[str, Resolved]:
        return self.live.resolve_path(text)

    def cache_for(self, catalog: RunCatalog, r: Resolved) -> Path | None:
        return self.live.cache_for(catalog, r)

    def committed(self) -> list[Resolved]:
        return self.live.committed()

    # ------------------------------------------------------------------------------------- lifecycle

    def drain(self, timeout: float) -> bool:
        return self.publisher.drained(timeout)

    def stop(self) -> None:
        self.publisher.stop()
        if self.models is not None:  # a deletion left on the model thread: bounded like the record itself
            self.models.close(min(self.publish_timeout, 10.0))
