"""The publishing side of a run's recorder: a queued checkpoint's record in MLflow, its costs, retention.

``record`` hands a locally committed checkpoint to the publisher thread and waits for it within the budget;
``publish_pending`` (on that thread) uploads the files, the manifest last (the commit marker in MLflow), logs metrics
and summary tags in one ``log_batch`` and applies retention, which deletes checkpoints and their LoggedModels.
Plain functions of the recorder (``RunRecorder`` delegates to them); they see it through ``Recording``.
"""

from __future__ import annotations

import logging
import threading
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any, Protocol

from ._faults import fault_point
from .catalog import Resolved, info_of
from .errors import SaveError, StoreError
from .formats import format_of
from .local import LocalDir
from .manifest import ARTIFACT_PREFIX, MANIFEST_NAME, Manifest
from .models import CheckpointModels, optional
from .outbox import NotReady, Outbox, Pending, PermanentStoreError, Publisher
from .policies import CheckpointInfo, Mode, RetentionPolicy, plan_deletions
from .progress import human_bytes
from .runtags import METRIC_RECORD_S, TAG_PRUNED, TAG_SKIPPED, kept_by_tags, pruned_value
from .store.run_store import RunStore

log = logging.getLogger(__name__)


class Recording(Protocol):
    """What publishing reads and writes of a run's recorder (see RunRecorder for each attribute's meaning)."""

    store: RunStore
    local: LocalDir
    outbox: Outbox
    publisher: Publisher
    models: CheckpointModels | None
    monitor: str
    mode: Mode
    retention: RetentionPolicy | None
    publish_timeout: float
    index: dict[str, CheckpointInfo]
    resumed_from: str | None
    _warned_no_delete: bool
    _costs: dict[int, dict[str, float]]
    _skipped: list[int]
    _late: list[tuple[str, float, int, int]]
    _manifests: dict[int, CheckpointInfo]
    _committing: set[int]
    _mine: set[int]
    _local: dict[str, CheckpointInfo]
    _lock: threading.Lock

    @property
    def run_id(self) -> str: ...

    @property
    def attached(self) -> bool: ...

    def summary_tags(self) -> dict[str, str]: ...

    def _local_copy(self, name: str) -> Resolved | None: ...


def record(rec: Recording, step: int, seq: int, folder: Path) -> bool:
    """Hand a locally committed checkpoint to the publisher; wait for its record within the budget.

    True once recorded; False when it stays queued (outage, hang). SaveError if MLflow refused it for good.
    """
    rec.publisher.kick()
    try:
        recorded = rec.publisher.wait_for(seq, rec.publish_timeout)
        refusal = rec.publisher.take_refusal()  # found in the background, while no save was waiting
    except PermanentStoreError as e:
        rec.publisher.take_refusal()
        refusal = e
    if refusal is not None:
        raise SaveError(
            f"checkpoint of step {step} is committed locally at {folder} but MLflow run {rec.run_id} refuses "
            f"the queue: {refusal}. It stays queued in {rec.outbox.dir}; `tracked-ckpt sync {rec.local.root}` "
            "retries once that is fixed"
        ) from refusal
    if not recorded and not rec.publisher.in_outage and rec.publish_timeout > 0:
        rec.publisher.note_timeout(step, rec.publish_timeout)
    return recorded


def publish_pending(rec: Recording, p: Pending) -> None:
    """Record one locally committed checkpoint in MLflow, then apply retention."""
    with rec._lock:
        if p.seq in rec._committing:
            raise NotReady(p.seq)
    folder = rec.local.folder(p.run_id, p.name)
    try:
        manifest = Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), str(folder / MANIFEST_NAME))
    except FileNotFoundError:
        log.warning("queued checkpoint %s of step %d has no local folder any more (its save died before the "
                    "local commit, or it was removed): nothing to record", folder, p.step)  # fmt: skip
        return
    path = f"{ARTIFACT_PREFIX}/{p.name}"
    with rec._lock:
        costs = dict(rec._costs.get(p.seq, {}))
    if _coalesced(rec, p, path):
        # Its metrics are training history and are logged; its files would be deleted right after landing.
        rec.store.publish(manifest.step, {**manifest.metrics, **costs}, {TAG_SKIPPED: _skipped_note(rec, p)},
                          p.timestamp_ms)  # fmt: skip
        rec.local.remove(rec.run_id, p.name)
        _forget(rec, p.seq)
        return
    t0 = time.perf_counter()
    # The checkpoint's LoggedModel, made (PENDING) on the model thread while the files upload: the save waits
    # for the slower of the two. A crash leaves a PENDING model, which the next owner's reconcile deletes.
    ours = p.seq in rec._mine  # else queued by an earlier process, which may have made its model already
    models = rec.models
    model = models.submit(lambda: models.begin(path, manifest, ours=ours)) if models is not None else None
    fmt = format_of(manifest)
    for f in manifest.files:
        if not (folder / f.name).is_file() and fmt.sharded and rec.store.exists(f"{path}/{f.name}"):
            continue  # a shard that its own rank uploaded (a node-local save_dir on another node)
        sub = f.name.rpartition("/")[0]  # a foreign folder's nested file goes into the same subfolder
        rec.store.upload(folder / f.name, f"{path}/{sub}" if sub else path)
    model_id = _model_of(rec, model, p.step)
    rec.store.upload(folder / MANIFEST_NAME, path)  # the commit marker, last
    costs[METRIC_RECORD_S] = time.perf_counter() - t0
    # Replaced, never mutated: the training thread reads it (should_save) meanwhile.
    with rec._lock:
        rec.index = {**rec.index, path: info_of(manifest, path)}
    fault_point("tags")
    with rec._lock:
        late = list(rec._late)
    rec.store.publish(manifest.step, {**manifest.metrics, **costs}, rec.summary_tags(), p.timestamp_ms, late,
                      model_id=model_id)  # fmt: skip
    with rec._lock:
        del rec._late[: len(late)]
    ready = None
    if models is not None and model_id is not None:
        fault_point("model_ready")
        ready = models.submit(lambda: models.ready(model_id))  # READY while retention deletes
    _forget(rec, p.seq)
    try:
        apply_retention(rec)
    finally:
        _model_of(rec, ready, p.step)


def _model_of(rec: Recording, model: Future[Any] | None, step: int) -> Any:
    """A model call's result; an outage retries the whole entry, a refusal records the checkpoint without it."""
    try:
        return model.result() if model is not None else None
    except StoreError as e:
        if not optional(e):
            raise
        log.warning("step %d is recorded without its LoggedModel: %s (`tracked-ckpt models %s` makes it later; "
                    "logged_models=False turns them off)", step, e, rec.run_id)  # fmt: skip
        return None


def _forget(rec: Recording, seq: int) -> None:
    with rec._lock:
        rec._costs.pop(seq, None)
        rec._manifests.pop(seq, None)
        rec._local = {p: c for p, c in rec._local.items() if c.seq != seq}


def note_cost(rec: Recording, seq: int, name: str, value: float) -> None:
    """A cost of the save ``seq`` known on the saving side (blocked, commit, bytes), logged with its record."""
    with rec._lock:
        rec._costs.setdefault(seq, {})[name] = value


def note_late_cost(rec: Recording, step: int, name: str, value: float) -> None:
    """A cost known only after the save's record (a sync save's blocked time): logged with the next record."""
    with rec._lock:
        rec._late.append((name, value, step, int(time.time() * 1000)))


def flush_late_costs(rec: Recording) -> None:
    """Log the costs still waiting for a next record (at close); best effort."""
    with rec._lock:
        late, rec._late = rec._late, []
    if late and rec.attached:
        try:
            rec.store.publish(late[-1][2], {}, {}, late=late)
        except StoreError as e:
            log.debug("could not log the last save's costs: %s", e)


def _coalesced(rec: Recording, p: Pending, path: str) -> bool:
    """True when retention would delete ``p`` as soon as the checkpoints queued after it land (a backlog).

    Only with a retention policy and a newer queued checkpoint; the latest, the best and the checkpoint the run
    resumed from are never skipped (plan_deletions keeps them), so nothing that retention keeps is skipped.
    """
    queued = rec.outbox.pending(rec.run_id)
    if rec.retention is None or not queued or queued[-1].seq == p.seq:
        return False
    future = dict(rec.index)
    for q in queued:
        info = rec._manifests.get(q.seq)  # read once per queued checkpoint, not once per publish
        if info is None:
            copy = rec._local_copy(q.name)
            if copy is None:
                continue
            info = rec._manifests[q.seq] = copy.info
        future[info.path] = info
    protected = {rec.resumed_from} if rec.resumed_from else set()
    doomed = plan_deletions(list(future.values()), rec.retention, metric=rec.monitor, mode=rec.mode,
                            protected=protected)  # fmt: skip
    if path not in {c.path for c in doomed}:
        return False
    log.info("step %d: not uploaded — %d newer checkpoint(s) are queued and retention would delete it as soon as "
             "they land; its metrics are recorded", p.step, len(queued) - 1)  # fmt: skip
    return True


def _skipped_note(rec: Recording, p: Pending) -> str:
    rec._skipped = [*rec._skipped[-19:], p.step]
    return "steps " + ", ".join(map(str, rec._skipped)) + " (a backlog: retention would have deleted them)"


def apply_retention(rec: Recording) -> None:
    protected = {rec.resumed_from} if rec.resumed_from else set()
    doomed = plan_deletions(
        list(rec.index.values()), rec.retention, metric=rec.monitor, mode=rec.mode, protected=protected
    )
    if doomed:  # a checkpoint registered in the Model Registry (promote), or that a fork started from, stays
        protected |= kept_by_tags(rec.store.tags())
        doomed = plan_deletions(
            list(rec.index.values()), rec.retention, metric=rec.monitor, mode=rec.mode, protected=protected
        )
    for c in doomed:
        t0 = time.perf_counter()
        try:
            rec.store.delete(c.path)
        except StoreError as e:
            if e.transient:
                raise  # an outage: retention runs again after the next record
            if not rec._warned_no_delete:
                log.warning("retention could not delete %s from the artifact store (%s); it is deleted locally "
                            "only. This warning is shown once per manager", c.path, e)  # fmt: skip
                rec._warned_no_delete = True
        delete_model(rec, c.path)  # on the model thread; the save does not wait for it (close() does)
        rec.local.remove(rec.run_id, c.path.rpartition("/")[2])
        with rec._lock:
            rec.index = {p: c2 for p, c2 in rec.index.items() if p != c.path}
        elapsed = time.perf_counter() - t0
        log.info("deleted step %d (%s, %s) in %.2f s", c.step, c.path, human_bytes(c.size), elapsed)
    if doomed:
        rec.store.set_tags({**rec.summary_tags(), TAG_PRUNED: pruned_value(doomed)})


def delete(rec: Recording, path: str) -> None:
    """Delete one committed checkpoint from the run and ``save_dir``: what a library's own rotation removed."""
    t0 = time.perf_counter()
    gone = rec.index.get(path)
    rec.store.delete(path)
    deleting = delete_model(rec, path)
    if deleting is not None:
        deleting.result()
    rec.local.remove(rec.run_id, path.rpartition("/")[2])
    with rec._lock:  # the publisher adds to the index meanwhile
        rec.index = {p: c for p, c in rec.index.items() if p != path}
    if gone is not None:
        rec.store.set_tags({**rec.summary_tags(), TAG_PRUNED: pruned_value([gone])})
    log.info("deleted %s (%s) in %.2f s", path, f"step {gone.step}" if gone else "not indexed",
             time.perf_counter() - t0)  # fmt: skip


def delete_model(rec: Recording, path: str) -> Future[None] | None:
    """The checkpoint's LoggedModel goes with it (on the model thread); a failure is repaired by the next owner."""
    if rec.models is None:
        return None
    fault_point("model_delete")  # the checkpoint is gone, its model not yet
    models = rec.models

    def delete() -> None:
        try:
            models.delete(path)
        except StoreError as e:
            log.warning("could not delete the logged model of %s (%s); the next owner of run %s deletes it",
                        path, e, rec.run_id)  # fmt: skip

    return models.submit(delete)
