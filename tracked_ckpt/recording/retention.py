"""What a run keeps: retention's deletions, a backlog's coalescing, the summary tags that follow both.

Runs on the publisher thread after each record (``apply``), before a queued checkpoint's upload (``coalesced``:
one that retention would delete as soon as the newer queued ones land is not uploaded), and on a library's own
rotation (``delete``). A checkpoint's LoggedModel goes with it, on the model thread.
"""

from __future__ import annotations

import logging
import time
from concurrent.futures import Future

from .._faults import fault_point
from ..errors import StoreError
from ..local import LocalDir
from ..models import CheckpointModels
from ..outbox import Outbox, Pending
from ..policies import CheckpointInfo, Mode, RetentionPolicy, plan_deletions
from ..progress import human_bytes
from ..runtags import TAG_PRUNED, kept_by_tags, pruned_value, summary_tags
from ..store.run_store import RunStore
from .ledger import Ledger
from .live import local_copy

log = logging.getLogger(__name__)


class Retention:
    def __init__(
        self, store: RunStore, local: LocalDir, outbox: Outbox, ledger: Ledger, models: CheckpointModels | None, *,
        policy: RetentionPolicy | None, monitor: str, mode: Mode,
    ) -> None:  # fmt: skip
        self.store, self.local, self.outbox, self.ledger, self.models = store, local, outbox, ledger, models
        self.policy, self.monitor, self.mode = policy, monitor, mode
        self._manifests: dict[int, CheckpointInfo] = {}  # queued checkpoints' infos, by seq (coalescing)
        self._skipped: list[int] = []  # steps coalesced away (not uploaded), for the run's tag
        self._warned_no_delete = False

    @property
    def run_id(self) -> str:
        return self.store.run_id

    def summary_tags(self) -> dict[str, str]:
        return summary_tags(self.ledger.index.values(), self.monitor, self.mode)

    def _protected(self) -> set[str]:
        resumed = self.ledger.resumed_from
        return {resumed} if resumed else set()

    def coalesced(self, p: Pending, path: str) -> bool:
        """True when retention would delete ``p`` as soon as the checkpoints queued after it land (a backlog).

        Only with a retention policy and a newer queued checkpoint; the latest, the best and the checkpoint the run
        resumed from are never skipped (plan_deletions keeps them), so nothing that retention keeps is skipped.
        """
        queued = self.outbox.pending(self.run_id)
        if self.policy is None or not queued or queued[-1].seq == p.seq:
            return False
        future = dict(self.ledger.index)
        for q in queued:
            info = self._manifests.get(q.seq)  # read once per queued checkpoint, not once per publish
            if info is None:
                copy = local_copy(self.local, self.run_id, q.name)
                if copy is None:
                    continue
                info = self._manifests[q.seq] = copy.info
            future[info.path] = info
        doomed = plan_deletions(list(future.values()), self.policy, metric=self.monitor, mode=self.mode,
                                protected=self._protected())  # fmt: skip
        if path not in {c.path for c in doomed}:
            return False
        log.info("step %d: not uploaded — %d newer checkpoint(s) are queued and retention would delete it as soon "
                 "as they land; its metrics are recorded", p.step, len(queued) - 1)  # fmt: skip
        return True

    def skipped_note(self, p: Pending) -> str:
        """The run's tag naming the steps coalesced away, ``p`` the latest."""
        self._skipped = [*self._skipped[-19:], p.step]
        return "steps " + ", ".join(map(str, self._skipped)) + " (a backlog: retention would have deleted them)"

    def forget(self, seq: int) -> None:
        self._manifests.pop(seq, None)

    def apply(self) -> None:
        """Delete what the policy no longer keeps (run, save_dir, LoggedModel); retag the run."""
        protected = self._protected()
        doomed = plan_deletions(list(self.ledger.index.values()), self.policy, metric=self.monitor, mode=self.mode,
                                protected=protected)  # fmt: skip
        if doomed:  # a checkpoint registered in the Model Registry (promote), or that a fork started from, stays
            protected |= kept_by_tags(self.store.tags())
            doomed = plan_deletions(list(self.ledger.index.values()), self.policy, metric=self.monitor,
                                    mode=self.mode, protected=protected)  # fmt: skip
        for c in doomed:
            t0 = time.perf_counter()
            try:
                self.store.delete(c.path)
            except StoreError as e:
                if e.transient:
                    raise  # an outage: retention runs again after the next record
                if not self._warned_no_delete:
                    log.warning("retention could not delete %s from the artifact store (%s); it is deleted locally "
                                "only. This warning is shown once per manager", c.path, e)  # fmt: skip
                    self._warned_no_delete = True
            self.delete_model(c.path)  # on the model thread; the save does not wait for it (close() does)
            self.local.remove(self.run_id, c.path.rpartition("/")[2])
            self.ledger.dropped(c.path)
            elapsed = time.perf_counter() - t0
            log.info("deleted step %d (%s, %s) in %.2f s", c.step, c.path, human_bytes(c.size), elapsed)
        if doomed:
            self.store.set_tags({**self.summary_tags(), TAG_PRUNED: pruned_value(doomed)})

    def delete(self, path: str) -> None:
        """Delete one committed checkpoint from the run and ``save_dir``: what a library's own rotation removed."""
        t0 = time.perf_counter()
        gone = self.ledger.index.get(path)
        self.store.delete(path)
        deleting = self.delete_model(path)
        if deleting is not None:
            deleting.result()
        self.local.remove(self.run_id, path.rpartition("/")[2])
        self.ledger.dropped(path)  # the publisher adds to the index meanwhile
        if gone is not None:
            self.store.set_tags({**self.summary_tags(), TAG_PRUNED: pruned_value([gone])})
        log.info("deleted %s (%s) in %.2f s", path, f"step {gone.step}" if gone else "not indexed",
                 time.perf_counter() - t0)  # fmt: skip

    def delete_model(self, path: str) -> Future[None] | None:
        """The checkpoint's LoggedModel goes with it (on the model thread); a failure is repaired by the next owner."""
        if self.models is None:
            return None
        fault_point("model_delete")  # the checkpoint is gone, its model not yet
        models = self.models

        def delete() -> None:
            try:
                models.delete(path)
            except StoreError as e:
                log.warning("could not delete the logged model of %s (%s); the next owner of run %s deletes it",
                            path, e, self.run_id)  # fmt: skip

        return models.submit(delete)
