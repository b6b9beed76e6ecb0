"""What local commits still owe MLflow: a durable outbox in ``save_dir``, drained in order by one thread.

Every checkpoint is queued here (fsynced) *before* its local commit, so a checkpoint committed in
``save_dir`` is always either recorded in MLflow or waiting here: in the same process (the publisher
thread retries), in the next process (drained when a manager attaches to the run) or through
``tracked-ckpt sync``. Replays do not duplicate anything: artifacts are re-uploaded under the same names
with the same bytes, and metrics are logged with the timestamp fixed at commit time, which MLflow stores
once. The training thread waits for the publisher at most ``publish_timeout`` seconds, so a down or hung
tracking server never blocks training longer than that (MLflow's own retries can stall a call for minutes).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from .errors import StoreError
from .manifest import fsync_dir

log = logging.getLogger(__name__)
OUTBOX = ".outbox"


@dataclass(frozen=True)
class Pending:
    """One checkpoint committed locally and not yet recorded in MLflow."""

    run_id: str
    seq: int
    name: str  # folder name: save_dir/<run_id>/<name> and artifact path checkpoints/<name>
    step: int
    timestamp_ms: int  # fixed at commit, so that a replayed log_batch is stored once


class Outbox:
    def __init__(self, root: Path) -> None:
        self.dir = root / OUTBOX

    def _file(self, p: Pending) -> Path:
        return self.dir / f"{p.run_id}-{p.seq:010d}.json"

    def add(self, p: Pending) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        tmp = self.dir / f".{uuid.uuid4().hex}.tmp"
        with open(tmp, "w") as f:
            json.dump(asdict(p), f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, self._file(p))
        fsync_dir(self.dir)

    def done(self, p: Pending) -> None:
        with contextlib.suppress(FileNotFoundError):
            self._file(p).unlink()

    def pending(self, run_id: str | None = None) -> list[Pending]:
        """Queued checkpoints (of ``run_id``, if given), oldest first; unreadable entries are skipped."""
        if not self.dir.is_dir():
            return []
        found = []
        for f in self.dir.glob("*.json"):
            try:
                p = Pending(**json.loads(f.read_text()))
            except (OSError, ValueError, TypeError) as e:
                log.warning("ignoring unreadable outbox entry %s: %s", f, e)
                continue
            if run_id is None or p.run_id == run_id:
                found.append(p)
        return sorted(found, key=lambda p: (p.run_id, p.seq))


class PermanentStoreError(StoreError):
    """A failure that retrying will not fix (permission, bad request): reported to the caller."""


class Publisher:
    """One daemon thread that drains the outbox in order; callers wait for it with a time budget."""

    def __init__(
        self,
        outbox: Outbox,
        run_id: str,
        publish: Callable[[Pending], None],
        server: str,
        retry_interval: float = 5.0,
    ) -> None:
        self.outbox = outbox
        self.run_id = run_id
        self._publish = publish
        self._server = server
        self._retry_interval = retry_interval
        self._cond = threading.Condition()
        self._wake = False
        self._stopped = False
        self._done: set[int] = set()  # seqs published by this publisher
        self._failed: dict[int, StoreError] = {}  # seqs that failed permanently (not retried until woken)
        self._in_outage = False
        self._thread = threading.Thread(target=self._run, name=f"tracked_ckpt-publisher-{run_id[:8]}", daemon=True)
        self._thread.start()

    def kick(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def wait_for(self, seq: int, timeout: float) -> bool:
        """True once ``seq`` is recorded in MLflow; False after ``timeout`` (it stays queued).

        Raises the PermanentStoreError of an entry that the server refused for good.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while seq not in self._done:
                if seq in self._failed:
                    raise self._failed.pop(seq)
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._cond.wait(left)
            return True

    def note_timeout(self, step: int, timeout: float) -> None:
        """A save gave up waiting: warn once per outage (a hung server never raises, it only stalls)."""
        with self._cond:
            if self._in_outage:
                return
            self._in_outage = True
        log.warning(
            "MLflow at %s did not answer within %.0f s: checkpoint step %d is committed locally and queued in %s; "
            "training goes on and the upload is retried. This warning is shown once per outage",
            self._server, timeout, step, self.outbox.dir,
        )  # fmt: skip

    def drained(self, timeout: float) -> bool:
        """Wait until nothing of this run is queued (or ``timeout``); True when empty."""
        deadline = time.monotonic() + timeout
        self.kick()
        while self.outbox.pending(self.run_id):
            with self._cond:
                if self._failed or time.monotonic() >= deadline:
                    return False
                self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._wake and not self._stopped:
                    self._cond.wait(self._retry_interval if self._in_outage else None)
                    if self._in_outage:
                        break  # time to retry
                if self._stopped:
                    return
                self._wake = False
            self._drain()

    def _drain(self) -> None:
        for p in self.outbox.pending(self.run_id):
            if self._stopped:
                return
            try:
                self._publish(p)
            except StoreError as e:
                if not e.transient:
                    log.error(
                        "MLflow refused checkpoint step %d (%s); it stays queued in %s", p.step, e, self.outbox.dir
                    )
                    with self._cond:  # every queued save waits behind this one: report it to each
                        for q in self.outbox.pending(self.run_id):
                            self._failed[q.seq] = PermanentStoreError(str(e))
                        self._cond.notify_all()
                    return
                if not self._in_outage:
                    log.warning(
                        "MLflow at %s is unreachable (%s): checkpoint step %d is committed locally and queued in %s; "
                        "retrying every %.0f s. This warning is shown once per outage",
                        self._server, e, p.step, self.outbox.dir, self._retry_interval,
                    )  # fmt: skip
                self._in_outage = True
                return
            except Exception:  # never let the publisher die silently: the entry stays queued
                log.exception("publishing checkpoint step %d failed; it stays queued in %s", p.step, self.outbox.dir)
                self._in_outage = True
                return
            self.outbox.done(p)
            if self._in_outage:
                log.warning("MLflow at %s is reachable again: queued checkpoint step %d recorded", self._server, p.step)
                self._in_outage = False
            with self._cond:
                self._done.add(p.seq)
                self._cond.notify_all()
