"""The recording half of a save: everything a run's checkpoints owe MLflow, in one place.

Every kind of save goes through ``RunRecorder``: the single-process save, the sharded DCP save (rank 0's) and
``tracked-ckpt sync``. A save first commits locally (``commit_local``: files fsynced, outbox entry, rename), then
``record`` hands it to the publisher thread, which uploads the files, the manifest last (the commit marker in
MLflow), logs metrics and summary tags in one ``log_batch`` and applies retention. The recorder owns the run's
checkpoint index (what is committed, by path), the folder names in use, and recovery when it attaches to a run
that an earlier process left behind.

It can start *offline* (the server unreachable when the job starts): the index then comes from the verified
local copies in ``save_dir``, saves queue, and the deferred work (the lease, the run's RUNNING status and note,
the scan of what MLflow already has) runs on the publisher thread when the server first answers.

The publishing side (record, retention, costs) lives in ``publishing.py`` and recovery in ``recovery.py``, as
functions of the recorder that its methods delegate to.
"""

from __future__ import annotations

import logging
import shutil
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from functools import partial
from pathlib import Path
from typing import Any

from . import publishing, recovery
from ._faults import fault_point
from .catalog import Resolved, RunCatalog, info_of, name_step
from .errors import CheckpointCorruptError, CheckpointNotFoundError, SaveError, StoreError
from .formats import format_of
from .local import LocalDir
from .manifest import ARTIFACT_PREFIX, MANIFEST_NAME, Manifest
from .models import CheckpointModels
from .outbox import Outbox, Pending, Publisher
from .policies import CheckpointInfo, Mode, RetentionPolicy, SaveContext, best_of
from .progress import human_bytes
from .refs import Which, parse_path, ref_for
from .runtags import METRIC_BYTES, METRIC_COMMIT_S, summary_tags
from .state import Metadata
from .store.run_store import RunStore

log = logging.getLogger(__name__)


class RunRecorder:
    """Index, outbox, publisher, summary tags, retention and recovery of one run's checkpoints."""

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
        self.store = store
        self.local = local
        self.monitor, self.mode = monitor, mode
        self.retention = retention
        self.publish_timeout = publish_timeout
        self.outbox = Outbox(local.root)
        self.catalog = RunCatalog(store)
        self.models = CheckpointModels(store) if logged_models else None  # one LoggedModel per checkpoint
        self.index: dict[str, CheckpointInfo] = {}  # committed checkpoints, by path; replaced, never mutated
        self.taken: set[str] = set()  # every folder name in use, committed or not
        self._top = ((0, 0), -(2**63))  # ((id, len) of taken, the highest step named in it): plan()'s cache
        self.resumed_from: str | None = None  # retention never deletes the checkpoint the run resumed from
        self._warned_no_delete = False
        self._next_seq: int | None = None  # from the index and the queue at the first save
        self._costs: dict[int, dict[str, float]] = {}  # seq -> cost metrics known on the saving side
        self._skipped: list[int] = []  # steps coalesced away (not uploaded), for the run's tag
        self._late: list[tuple[str, float, int, int]] = []  # costs of earlier saves, for the next log_batch
        self._manifests: dict[int, CheckpointInfo] = {}  # queued checkpoints' infos, by seq (coalescing)
        self._committing: set[int] = set()  # seqs queued whose local commit is not over yet
        self._mine: set[int] = set()  # seqs this process queued (others were queued by an earlier process)
        self._local: dict[str, CheckpointInfo] = {}  # committed locally, not yet recorded (by path)
        self._lock = threading.Lock()  # the dicts above: the saving thread writes them, the publisher reads
        self._deferred = on_connect
        self.publisher = Publisher(
            self.outbox, store.run_id, partial(publishing.publish_pending, self), store.server, probe=store.probe,
            on_connect=partial(recovery.connect, self) if on_connect is not None else None, start=start,
        )  # fmt: skip

    @property
    def run_id(self) -> str:
        return self.store.run_id

    @property
    def attached(self) -> bool:
        """False after an offline start until the server first answers (and the deferred work is done)."""
        return self._deferred is None

    # ------------------------------------------------------------------------------------- attaching

    def recover(self) -> None:
        """Index the run's committed checkpoints (MLflow's and the local queue); repair lagging summary tags."""
        recovery.recover(self)

    def recover_offline(self) -> None:
        """Index the verified local copies in ``save_dir`` (the server is unreachable)."""
        recovery.recover_offline(self)

    def save_context(
        self, step: int, metrics: Mapping[str, float] | None, pending: CheckpointInfo | None, last_time: float
    ) -> SaveContext:
        """What a save policy decides on: the index (plus the async save in flight), the time of the last save."""
        with self._lock:  # recorded, committed locally and queued (an outage), and the async save in flight
            known = list({**self._local, **self.index}.values())
        known += [pending] if pending is not None else []
        latest = max(known, key=lambda c: c.seq, default=None)
        best = best_of(known, self.monitor, self.mode)
        return SaveContext(
            step=step, now=time.time(), metrics=dict(metrics or {}), last_step=latest.step if latest else None,
            last_time=last_time, best_value=best.metrics.get(self.monitor) if best else None, metric=self.monitor,
            mode=self.mode,
        )  # fmt: skip

    def next_seq(self) -> int:
        queued = self.outbox.pending(self.run_id)
        return max([c.seq for c in self.index.values()] + [p.seq for p in queued], default=0) + 1

    # ---------------------------------------------------------------------------------------- saving

    def plan(self, meta: Metadata, step: int | None) -> tuple[str, dict[str, Any]]:
        """The next checkpoint's folder name and manifest fields (its step defaults to metadata's, else its seq).

        A folder name is never reused: a step saved twice (or a dead save's leftovers) gets ``step-N.<seq>``, and
        so does a step below one already saved (a resume from an older checkpoint), so that the name alone tells
        a reader which folders can be newer than the tagged latest (catalog._maybe_newer).
        """
        if self._next_seq is None:
            self._next_seq = self.next_seq()
        seq, self._next_seq = self._next_seq, self._next_seq + 1
        step = step if step is not None else meta.step if meta.step is not None else seq
        name = f"step-{step:08d}"
        name = name if name not in self.taken and step >= self._top_step() else f"{name}.{seq}"
        self.taken.add(name)
        return name, fields_of(step, seq, meta, self.resumed_from)

    def _top_step(self) -> int:
        """The highest step among the folder names in use (cached: ``taken`` only grows, or is replaced)."""
        key = (id(self.taken), len(self.taken))
        if self._top[0] != key:
            steps = [parsed[0] for parsed in map(name_step, self.taken) if parsed is not None]
            self._top = (key, max(steps, default=-(2**63)))
        return self._top[1]

    def _queue(self, name: str, fields: Mapping[str, Any]) -> Callable[[], None]:
        """The step that runs between the durable staging and the rename that commits locally.

        Until the commit is over (renamed, its costs noted) the publisher leaves the entry alone (``NotReady``):
        a pass in between would find no folder yet.
        """
        pending = Pending(self.run_id, fields["seq"], name, fields["step"], int(fields["created"] * 1000))

        def add() -> None:
            with self._lock:
                self._committing.add(pending.seq)
                self._mine.add(pending.seq)
            self.outbox.add(pending)
            fault_point("outbox")

        return add

    def _committed(self, seq: int, manifest: Manifest | None = None, name: str = "") -> None:
        with self._lock:
            self._committing.discard(seq)
            if manifest is not None:  # known to save policies before MLflow records it
                self._local[f"{ARTIFACT_PREFIX}/{name}"] = info_of(manifest, f"{ARTIFACT_PREFIX}/{name}")

    def commit(
        self, name: str, payload: Mapping[str, Any], rng_json: Mapping[str, Any], fields: Mapping[str, Any], t0: float
    ) -> None:
        """A single-process save: serialize, commit locally (queued first), record."""
        latest = self._latest_step()
        t1 = time.perf_counter()
        try:
            folder, manifest = self.local.write(self.run_id, name, payload, rng_json, fields, self._queue(name, fields))
            self.note_cost(manifest.seq, METRIC_COMMIT_S, time.perf_counter() - t1)
            self.note_cost(manifest.seq, METRIC_BYTES, float(manifest.size))
        except BaseException:
            self._committed(fields["seq"])
            raise
        self._committed(fields["seq"], manifest, name)
        self._saved(manifest, name, self.record(manifest.step, manifest.seq, folder), latest, t0)

    def commit_folder(self, staging: Path, name: str, manifest: Manifest, t0: float) -> None:
        """A sharded save whose files are durable in ``staging``: manifest, queue, rename, record."""
        latest = self._latest_step()
        final = self.local.folder(self.run_id, name)
        fields = {"seq": manifest.seq, "step": manifest.step, "created": manifest.created}
        self.note_cost(manifest.seq, METRIC_BYTES, float(manifest.size))
        try:
            self.local.commit(staging, final, manifest, self._queue(name, fields))
        except OSError as e:
            self._committed(manifest.seq)
            shutil.rmtree(staging, ignore_errors=True)
            raise SaveError(f"step {manifest.step}: could not commit the checkpoint in {self.local.root}: {e}") from e
        except BaseException:
            self._committed(manifest.seq)
            raise
        self._committed(manifest.seq, manifest, name)
        self._saved(manifest, name, self.record(manifest.step, manifest.seq, final), latest, t0)

    def commit_foreign(
        self, staged: tuple[Path, list[str]], name: str, fields: Mapping[str, Any], fmt: str, t0: float
    ) -> Path:
        """A folder another library wrote (``fmt``, see FOREIGN_FORMATS), already linked into staging
        (``LocalDir.link_foreign``): fsync, hash, commit locally, record. Returns the local copy.
        """
        latest = self._latest_step()
        try:
            folder, manifest = self.local.commit_foreign(self.run_id, name, *staged, fields, fmt,
                                                         self._queue(name, fields))  # fmt: skip
        except BaseException:
            self._committed(fields["seq"])
            raise
        self._committed(fields["seq"], manifest, name)
        self._saved(manifest, name, self.record(manifest.step, manifest.seq, folder), latest, t0)
        return folder

    def delete(self, path: str) -> None:
        """Delete one committed checkpoint from the run and ``save_dir``: what a library's own rotation removed."""
        publishing.delete(self, path)

    def _latest_step(self) -> int | None:
        return max(self.index.values(), key=lambda c: c.seq).step if self.index else None

    def _saved(self, m: Manifest, name: str, recorded: bool, latest: int | None, t0: float) -> None:
        ranks = f", {m.world_size} ranks" if format_of(m).sharded else ""
        queued = "" if recorded else "; queued for MLflow (see outbox)"
        ref = ref_for(self.run_id, f"{ARTIFACT_PREFIX}/{name}")
        log.info("saved step %d to %s (%s%s) in %.2f s%s", m.step, ref, human_bytes(m.size), ranks,
                 time.perf_counter() - t0, queued)  # fmt: skip
        if latest is not None and m.step < latest:
            log.info("step %d is below the previous latest step %d: this checkpoint is now the latest", m.step, latest)

    def record(self, step: int, seq: int, folder: Path) -> bool:
        """Hand a locally committed checkpoint to the publisher; wait for its record (see publishing.record)."""
        return publishing.record(self, step, seq, folder)

    # ------------------------------------------------------------------------ publishing (publisher thread)

    def note_cost(self, seq: int, name: str, value: float) -> None:
        """A cost of the save ``seq`` known on the saving side (blocked, commit, bytes), logged with its record."""
        publishing.note_cost(self, seq, name, value)

    def note_late_cost(self, step: int, name: str, value: float) -> None:
        """A cost known only after the save's record (a sync save's blocked time): logged with the next record."""
        publishing.note_late_cost(self, step, name, value)

    def flush_late_costs(self) -> None:
        """Log the costs still waiting for a next record (at close); best effort."""
        publishing.flush_late_costs(self)

    def apply_retention(self) -> None:
        publishing.apply_retention(self)

    def summary_tags(self) -> dict[str, str]:
        return summary_tags(self.index.values(), self.monitor, self.mode)

    # --------------------------------------------------------------------------------------- reading

    def _local_copy(self, name: str) -> Resolved | None:
        """The committed local copy ``save_dir/<run>/<name>`` (manifest present, readable, of this run), or None."""
        manifest = self.local.folder(self.run_id, name) / MANIFEST_NAME
        try:
            m = Manifest.from_json(manifest.read_bytes(), str(manifest))
        except (OSError, CheckpointCorruptError):
            return None
        return Resolved(f"{ARTIFACT_PREFIX}/{name}", m) if m.run_id == self.run_id else None

    def local_committed(self) -> list[Resolved]:
        """The run's committed local copies, in commit order; no network."""
        root = self.local.root / self.run_id
        found = [self._local_copy(d.name) for d in root.iterdir()] if root.is_dir() else []
        return sorted((r for r in found if r is not None), key=lambda r: r.manifest.seq)

    def queued(self) -> list[Resolved]:
        """Checkpoints committed locally and not yet recorded in MLflow, in commit order (reads only those)."""
        found = [self._local_copy(p.name) for p in self.outbox.pending(self.run_id)]
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

    def catalog_of(self, run_id: str) -> RunCatalog:
        """This run's catalog, or a read-only one of another run on the same server."""
        return self.catalog if run_id == self.run_id else RunCatalog(RunStore(self.store.client, run_id))

    def fork_parent(self) -> tuple[str, Resolved] | None:
        """A fork without checkpoints of its own starts from its parent's (the run's fork tag names it)."""
        from .lifecycle import fork_parent

        ref = fork_parent(self.store.tags_at_open)
        return None if ref is None else self.resolve_path(ref)

    def best(self) -> Resolved | None:
        try:
            return self.resolve("best")
        except CheckpointNotFoundError:
            return None

    def resolve_path(self, text: str) -> tuple[str, Resolved]:
        """A ``checkpoint_path`` (see refs.parse_path); this run's queued checkpoints resolve to their local copy."""
        run_id, path = parse_path(text, self.run_id)
        if run_id == self.run_id:
            name = path.rpartition("/")[2]
            mine = self._local_copy(name)
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

    # ------------------------------------------------------------------------------------- lifecycle

    def drain(self, timeout: float) -> bool:
        return self.publisher.drained(timeout)

    def stop(self) -> None:
        self.publisher.stop()
        if self.models is not None:  # a deletion left on the model thread: bounded like the record itself
            self.models.close(min(self.publish_timeout, 10.0))


def fields_of(step: int, seq: int, meta: Metadata, resumed_from: str | None) -> dict[str, Any]:
    """The manifest fields every kind of save records."""
    return {
        "step": step,
        "seq": seq,
        "created": time.time(),
        "metrics": dict(meta.metrics),
        "metadata": dict(meta.values),
        "epoch": meta.epoch,
        "resumed_from": resumed_from,
    }
