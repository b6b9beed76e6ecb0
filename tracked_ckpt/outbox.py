"""What local commits still owe MLflow: a durable outbox in ``save_dir``, drained in order by one thread.

Every checkpoint is queued here (fsynced) *before* its local commit, so a checkpoint committed in
``save_dir`` is always either recorded in MLflow or waiting here: in the same process (the publisher
thread retries), in the next process (drained when a manager attaches to the run) or through
``tracked-ckpt sync``. Replays do not duplicate anything: artifacts are re-uploaded under the same names
with the same bytes, and metrics are logged with the timestamp fixed at commit time, which MLflow stores
once.

The publisher knows when the server is down. A call that fails (refused, 5xx, or no answer within its own
budget, see ``_http``) starts an *outage*: from then on a save does not wait for MLflow at all, and the
publisher probes the server with one short call every 1, 2, 2, ... seconds; the first probe that answers
ends the outage and the backlog is recorded in order. A save waits for its record at most
``publish_timeout`` seconds, and only while the server is believed up.
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
    upload_only: bool = False  # another node's share of a checkpoint: its files only, rank 0's node records it


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


class NotReady(Exception):
    """The entry's local commit is still in progress: end this pass; the committing save kicks the next one."""


class Waiting(NotReady):
    """The entry waits for files that other nodes upload: end this pass and retry it after a short back-off."""


class PermanentStoreError(StoreError):
    """A failure that retrying will not fix (permission, bad request): reported to the caller."""


PROBE_INTERVALS = (1.0, 2.0)  # seconds between probes during an outage (then the last, repeated): back within ~2 s
WAIT_INTERVALS = (0.2, 0.2, 0.2, 0.5, 1.0)  # seconds between passes while an entry waits for other nodes (then 1 s)


class Publisher:
    """Drains the outbox in order on one daemon thread; callers wait for it with a time budget.

    ``drain_once()`` is the whole of one pass (probe if in an outage, then publish what is queued) and
    ``run_once()`` the thread's loop body (wait out the back-off, then a pass): tests call them inline, without the
    thread (``start=False``), with their own ``clock`` and ``wait``, to make outage scenarios deterministic.
    """

    def __init__(
        self,
        outbox: Outbox,
        run_id: str,
        publish: Callable[[Pending], None],
        server: str,
        *,
        probe: Callable[[], None] | None = None,
        on_connect: Callable[[], None] | None = None,
        start: bool = True,
        clock: Callable[[], float] = time.monotonic,
        wait: Callable[[threading.Condition, float | None], object] = threading.Condition.wait,
    ) -> None:
        self.outbox = outbox
        self.run_id = run_id
        self._publish = publish
        self._probe = probe
        self._on_connect = on_connect  # run once, before the first publish, when the server first answers
        self._server = server
        self._clock, self._wait = clock, wait  # the back-off's clock and its wait (on the condition, so kicks wake it)
        self._cond = threading.Condition()
        self._wake = False
        self._stopped = False
        self._done: set[int] = set()  # seqs published by this publisher
        self._failed: dict[int, StoreError] = {}  # seqs that failed permanently (not retried until woken)
        self._in_outage = False
        self._probes_failed = 0  # consecutive failed probes of the current outage
        self._passes = 0  # completed drain_once() passes
        self._passes_failed = 0  # consecutive passes that ended in a transient failure
        self._waits = 0  # consecutive passes that ended Waiting (for other nodes' files)
        self._waiting_on: str | None = None  # what the entry at the head of the queue waits for, if it does
        self._refusal: PermanentStoreError | None = None  # the last refusal, until a save reports it
        self._warned = False  # one warning per outage
        self._current: tuple[int, float] | None = None  # (step, since) of the checkpoint being published now
        self._thread: threading.Thread | None = None
        if start:
            self._thread = threading.Thread(target=self._run, name=f"tracked_ckpt-publisher-{run_id[:8]}", daemon=True)
            self._thread.start()

    @property
    def in_outage(self) -> bool:
        return self._in_outage

    def kick(self) -> None:
        with self._cond:
            self._wake = True
            self._cond.notify_all()

    def wait_for(self, seq: int, timeout: float) -> bool:
        """True once ``seq`` is recorded in MLflow; False after ``timeout``, or at once during an outage.

        Raises the PermanentStoreError of an entry that the server refused for good.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            while seq not in self._done:
                if seq in self._failed:
                    raise self._failed.pop(seq)
                left = deadline - time.monotonic()
                if left <= 0 or self._in_outage:
                    return False
                self._cond.wait(left)
            return True

    def take_refusal(self) -> PermanentStoreError | None:
        """A refusal found in the background (no save was waiting), once: the next save reports it."""
        with self._cond:
            refusal, self._refusal = self._refusal, None
        return refusal

    def note_outage(self) -> None:
        """The server was found unreachable elsewhere (an offline start, already reported): probe, do not wait."""
        with self._cond:
            self._in_outage, self._warned = True, True
            self._cond.notify_all()

    def note_timeout(self, step: int, timeout: float) -> None:
        """A save gave up waiting: the server hangs, or an upload is slow; later saves do not wait until it answers."""
        with self._cond:
            self._in_outage = True
            current, waiting = self._current, self._waiting_on
        if waiting is not None:
            self._warn(f"has not got every file of checkpoint step {step} yet ({waiting})", step)
        elif current is None:
            self._warn(f"did not answer within {timeout:.0f} s", step)
        else:  # nothing tells a large upload that is still moving from a server that stopped answering
            self._warn(f"has been recording checkpoint step {current[0]} for {self._clock() - current[1]:.0f} s "
                       "(a large upload still running, or a server that does not answer)", step)  # fmt: skip

    def _warn(self, what: str, step: int | None) -> None:
        with self._cond:
            if self._warned:
                return
            self._warned = True
        which = f"checkpoint step {step} is" if step is not None else "checkpoints are"
        log.warning(
            "MLflow at %s %s: %s committed locally and queued in %s; training goes on without waiting for MLflow, "
            "and the queue is recorded once the server answers. This warning is shown once per outage",
            self._server, what, which, self.outbox.dir,
        )  # fmt: skip

    def drained(self, timeout: float) -> bool:
        """Wait until nothing of this run is queued (or ``timeout``); True when empty.

        During an outage this gives up as soon as one probe has failed: waiting longer records nothing.
        """
        deadline = time.monotonic() + timeout
        with self._cond:
            probes_at_start, passes_at_start = self._probes_failed, self._passes
        self.kick()
        while self.outbox.pending(self.run_id):
            with self._cond:
                if time.monotonic() >= deadline or (self._failed and self._passes > passes_at_start):
                    return False
                if self._in_outage and self._probes_failed > probes_at_start:
                    return False
                self._cond.wait(min(0.05, max(0.0, deadline - time.monotonic())))
        return True

    def stop(self) -> None:
        with self._cond:
            self._stopped = True
            self._cond.notify_all()

    def _run(self) -> None:
        while self.run_once():
            pass

    def run_once(self) -> bool:
        """The thread's loop body: wait for a kick or the back-off, then one pass; False once stopped."""
        with self._cond:
            if not self._wake and not self._stopped:
                # Back off on failed probes and on failed passes alike (a probe can answer while uploads fail).
                self._wait(self._cond, self._interval())
            if self._stopped:
                return False
            self._wake = False
        try:
            self.drain_once()
        except Exception:  # never let the thread die: entries stay queued for the next pass or process
            log.exception("the publisher of run %s failed a pass; its queue stays in %s", self.run_id,
                          self.outbox.dir)  # fmt: skip
            with self._cond:
                self._in_outage = True
        return True

    def _interval(self) -> float | None:
        """Seconds until the next pass without a kick: None waits for one (nothing to retry)."""
        if self._in_outage:
            tries = max(self._probes_failed, self._passes_failed)
            return PROBE_INTERVALS[min(tries, len(PROBE_INTERVALS) - 1)]
        if self._waits:
            return WAIT_INTERVALS[min(self._waits - 1, len(WAIT_INTERVALS) - 1)]
        return None

    def drain_once(self) -> bool:
        """One pass: probe during an outage, connect once, publish the queue in order. True when it is empty."""
        try:
            return self._pass()
        finally:
            with self._cond:
                self._passes += 1
                self._cond.notify_all()

    def _pass(self) -> bool:
        with self._cond:
            self._failed.clear()  # each pass retries everything; a refusal that persists is reported again
        if self._in_outage and self._probe is not None:
            try:
                self._probe()
            except StoreError as e:
                with self._cond:
                    self._probes_failed += 1
                    self._cond.notify_all()
                log.debug("MLflow at %s still unreachable: %s", self._server, e)
                return False
            except Exception as e:  # e.g. RunNotFoundError: the run was deleted meanwhile; retrying will not help
                refused = StoreError(f"{type(e).__name__}: {e}")
                refused.transient = False
                with self._cond:
                    self._in_outage = False
                self._fail(refused, None)
                return False
        if self._on_connect is not None:
            try:
                self._on_connect()
            except StoreError as e:
                self._fail(e, None)
                return False
            except Exception as e:  # e.g. RunLockedError: another live writer took the run meanwhile
                refused = StoreError(f"{type(e).__name__}: {e}")
                refused.transient = False
                self._fail(refused, None)
                return False
            self._on_connect = None
        for p in self.outbox.pending(self.run_id):
            if self._stopped:
                return False
            with self._cond:
                self._current = (p.step, self._clock())
            try:
                self._publish(p)
            except Waiting as e:
                with self._cond:
                    self._waits += 1
                    self._waiting_on = str(e)
                log.debug("checkpoint step %d waits: %s", p.step, e)
                return False
            except NotReady:
                return False
            except StoreError as e:
                self._fail(e, p)
                return False
            except Exception:  # never let the publisher die silently: the entry stays queued
                if not self._in_outage:  # once, not at every retry
                    log.exception("publishing checkpoint step %d failed; it stays queued in %s", p.step,
                                  self.outbox.dir)  # fmt: skip
                self._fail(StoreError("unexpected error (logged above)"), p)
                return False
            finally:
                with self._cond:
                    self._current = None
            self.outbox.done(p)
            if self._in_outage:
                log.warning("MLflow at %s recorded queued checkpoint step %d; recording the rest of the queue",
                            self._server, p.step)  # fmt: skip
            with self._cond:
                self._in_outage, self._probes_failed, self._warned, self._refusal = False, 0, False, None
                self._passes_failed = self._waits = 0
                self._waiting_on = None
                self._done.add(p.seq)
                self._cond.notify_all()
        if self._in_outage:  # nothing was queued, but the probe answered: the outage is over
            with self._cond:
                self._in_outage, self._probes_failed, self._warned = False, 0, False
                self._cond.notify_all()
        return True

    def _fail(self, e: StoreError, p: Pending | None) -> None:
        if not e.transient:
            what = f"checkpoint step {p.step}" if p is not None else f"attaching to run {self.run_id}"
            log.error("MLflow refused %s (%s); it stays queued in %s", what, e, self.outbox.dir)
            with self._cond:  # every queued save waits behind this one: report it to each
                for q in self.outbox.pending(self.run_id):
                    self._failed[q.seq] = PermanentStoreError(str(e))
                self._refusal = PermanentStoreError(str(e))
                self._cond.notify_all()
            return
        with self._cond:
            self._in_outage = True
            self._passes_failed += 1
            self._cond.notify_all()  # savers waiting for their record stop waiting now
        self._warn(f"is unreachable ({e})", p.step if p is not None else None)
