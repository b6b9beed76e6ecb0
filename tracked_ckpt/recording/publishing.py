"""The publishing side of a run's recorder: one queued checkpoint's record in MLflow (publisher thread).

``Publishing.publish`` is what the publisher calls for each outbox entry. A *recording* entry uploads the files
its folder holds, then, for every file of the manifest it does not hold (another node's share of a sharded
checkpoint), checks the store's listing (name and size) and is ``Waiting`` until every one has landed; then the
manifest (the commit marker in MLflow, last), metrics and summary tags in one ``log_batch``, the LoggedModel, and
retention. An *upload-only* entry (another node's share) uploads its folder's files and nothing else: rank 0's
node records the checkpoint once they have landed. ``wait_for_record`` is the saving side: wait within the budget.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future
from pathlib import Path
from typing import Any

from .._faults import fault_point
from ..catalog import info_of
from ..errors import SaveError, StoreError
from ..local import LocalDir
from ..manifest import ARTIFACT_PREFIX, MANIFEST_NAME, FileEntry, Manifest
from ..models import CheckpointModels, optional
from ..outbox import NotReady, Outbox, Pending, PermanentStoreError, Publisher, Waiting
from ..runtags import METRIC_RECORD_S, TAG_SKIPPED
from ..store.run_store import RunStore
from .ledger import Ledger
from .retention import Retention

log = logging.getLogger(__name__)


def wait_for_record(publisher: Publisher, outbox: Outbox, step: int, seq: int, folder: Path, timeout: float) -> bool:
    """Hand a locally committed checkpoint to the publisher; wait for its record within ``timeout``.

    True once recorded; False when it stays queued (outage, hang). SaveError if MLflow refused it for good.
    """
    publisher.kick()
    try:
        recorded = publisher.wait_for(seq, timeout)
        refusal = publisher.take_refusal()  # found in the background, while no save was waiting
    except PermanentStoreError as e:
        publisher.take_refusal()
        refusal = e
    if refusal is not None:
        raise SaveError(
            f"checkpoint of step {step} is committed locally at {folder} but MLflow run {publisher.run_id} refuses "
            f"the queue: {refusal}. It stays queued in {outbox.dir}; `tracked-ckpt sync {outbox.dir.parent}` "
            "retries once that is fixed"
        ) from refusal
    if not recorded and not publisher.in_outage and timeout > 0:
        publisher.note_timeout(step, timeout)
    return recorded


class Publishing:
    def __init__(
        self, store: RunStore, local: LocalDir, ledger: Ledger, retention: Retention, models: CheckpointModels | None
    ) -> None:
        self.store, self.local, self.ledger, self.retention, self.models = store, local, ledger, retention, models
        self._uploaded: set[int] = set()  # seqs whose own files are uploaded (a Waiting entry does not redo them)
        self._waiting: set[int] = set()  # seqs whose wait for other nodes' files was logged (once each)
        self.dropped: set[str] = set()  # another node's shares that rank 0 no longer wants (skipped, deleted)

    @property
    def run_id(self) -> str:
        return self.store.run_id

    def publish(self, p: Pending) -> None:
        """Record one locally committed checkpoint in MLflow (or upload an upload-only entry's files)."""
        if self.ledger.is_committing(p.seq):
            raise NotReady(p.seq)
        folder = self.local.folder(p.run_id, p.name)
        try:
            manifest = Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), str(folder / MANIFEST_NAME))
        except FileNotFoundError:
            log.warning("queued checkpoint %s of step %d has no local folder any more (its save died before the "
                        "local commit, or it was removed): nothing to record", folder, p.step)  # fmt: skip
            return
        path = f"{ARTIFACT_PREFIX}/{p.name}"
        if p.upload_only and p.name in self.dropped:
            log.info("step %d: this node's share is not uploaded: rank 0 no longer keeps the checkpoint (retention, "
                     "or a backlog it skipped)", p.step)  # fmt: skip
            self.local.remove(self.run_id, p.name)
            return
        if p.upload_only:
            self._upload_held(folder, path, manifest)
            self._forget(p.seq)
            return
        if self.retention.coalesced(p, path):
            # Its metrics are training history and are logged; its files would be deleted right after landing.
            self.store.publish(manifest.step, {**manifest.metrics, **self.ledger.costs(p.seq)},
                               {TAG_SKIPPED: self.retention.skipped_note(p)}, p.timestamp_ms)  # fmt: skip
            self.local.remove(self.run_id, p.name)
            self._forget(p.seq)
            return
        self._record(p, folder, path, manifest)

    def _record(self, p: Pending, folder: Path, path: str, manifest: Manifest) -> None:
        t0 = time.perf_counter()
        costs = self.ledger.costs(p.seq)
        elsewhere = [f for f in manifest.files if not (folder / f.name).is_file()]
        # The checkpoint's LoggedModel, made (PENDING) on the model thread while the files upload: the save waits
        # for the slower of the two. A crash leaves a PENDING model, which the next owner's reconcile deletes.
        model = None if elsewhere else self._begin_model(p, path, manifest)
        if p.seq not in self._uploaded:
            self._upload_held(folder, path, manifest)
        if elsewhere:  # other nodes' files: the manifest goes only once every one of them is in the store
            self._uploaded.add(p.seq)  # a Waiting entry's next pass does not upload its own files again
            self._check_landed(p, path, elsewhere)
            model = self._begin_model(p, path, manifest)
        model_id = self._model_of(model, p.step)
        self.store.upload(folder / MANIFEST_NAME, path)  # the commit marker, last
        costs[METRIC_RECORD_S] = time.perf_counter() - t0
        self.ledger.recorded(info_of(manifest, path))
        fault_point("tags")
        late = self.ledger.late()
        self.store.publish(manifest.step, {**manifest.metrics, **costs}, self.retention.summary_tags(),
                           p.timestamp_ms, late, model_id=model_id)  # fmt: skip
        self.ledger.logged_late(len(late))
        ready = None
        if self.models is not None and model_id is not None:
            fault_point("model_ready")
            models = self.models
            ready = models.submit(lambda: models.ready(model_id))  # READY while retention deletes
        self._forget(p.seq)
        try:
            self.retention.apply()
        finally:
            self._model_of(ready, p.step)

    def _upload_held(self, folder: Path, path: str, manifest: Manifest) -> None:
        """Upload the manifest's files that ``folder`` holds (all of them, on one node)."""
        for f in manifest.files:
            if not (folder / f.name).is_file():
                continue  # another node's file: that node uploads it
            sub = f.name.rpartition("/")[0]  # a foreign folder's nested file goes into the same subfolder
            self.store.upload(folder / f.name, f"{path}/{sub}" if sub else path)

    def _check_landed(self, p: Pending, path: str, elsewhere: list[FileEntry]) -> None:
        """Waiting until every file of ``elsewhere`` is in the store at its manifest size (one listing per folder)."""
        landed: dict[str, int | None] = {}
        for sub in sorted({f.name.rpartition("/")[0] for f in elsewhere}):
            landed |= {e.path: e.size for e in self.store.list(f"{path}/{sub}" if sub else path) if not e.is_dir}
        absent = [f.name for f in elsewhere if landed.get(f"{path}/{f.name}") != f.size]
        if not absent:
            return
        if p.seq not in self._waiting:
            self._waiting.add(p.seq)
            log.info("step %d: waiting for %d file(s) that other nodes upload (%s) before recording it", p.step,
                     len(absent), ", ".join(absent[:3]) + (", ..." if len(absent) > 3 else ""))  # fmt: skip
        raise Waiting(f"{len(absent)} of its files from other nodes are not in the store yet, e.g. {absent[0]}")

    def _begin_model(self, p: Pending, path: str, manifest: Manifest) -> Future[Any] | None:
        if self.models is None:
            return None
        models, ours = self.models, self.ledger.is_mine(p.seq)  # else queued by an earlier process
        return models.submit(lambda: models.begin(path, manifest, ours=ours))

    def _model_of(self, model: Future[Any] | None, step: int) -> Any:
        """A model call's result; an outage retries the whole entry, a refusal records the checkpoint without it."""
        try:
            return model.result() if model is not None else None
        except StoreError as e:
            if not optional(e):
                raise
            log.warning("step %d is recorded without its LoggedModel: %s (`tracked-ckpt models %s` makes it "
                        "later; logged_models=False turns them off)", step, e, self.run_id)  # fmt: skip
            return None

    def _forget(self, seq: int) -> None:
        self.ledger.forget(seq)
        self.retention.forget(seq)
        self._uploaded.discard(seq)
        self._waiting.discard(seq)
