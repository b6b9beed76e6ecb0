"""One writer per run: a heartbeat lease in the run's tags, plus an OS lock on ``save_dir``.

MLflow's run status says nothing reliable about whether a process is still training (SIGKILL leaves a run
RUNNING; an uncaught exception can leave it FINISHED), so the manager keeps its own: the tag
``tracked_ckpt.lease`` holds {host, pid, save_dir, job, token, heartbeat, interval}, refreshed every ``interval``
seconds. A newcomer finds the lease (``verdict``) and:

- takes it at once from a holder known to be gone: a dead process on this host, an earlier manager of this
  process, a holder that wrote through this ``save_dir`` (whose lock the newcomer holds), an earlier incarnation of
  the same job (``job_identity``: the scheduler stopped it before relaunching), or a heartbeat older than
  ``timeout``;
- refuses at once a holder known to be alive: a live process on this host;
- otherwise (a holder on another host, whose process it cannot see) watches the tag: a heartbeat that advances is
  a live holder, refused as soon as seen (within one of the holder's heartbeat intervals); a heartbeat that stays
  still expires, and the lease is taken over ``timeout`` seconds after it was written. So a relaunch on fresh nodes
  right after a SIGKILL waits out the dead job's lease by itself instead of failing.

Tags have no compare-and-set, so two writers starting within the same instant are not excluded by the tag alone;
the ``flock`` on ``save_dir`` closes that gap for writers sharing a directory. The clock and the sleep are
injectable, so the rules and the waiting are tested without threads or sleeps (tests/test_lease_unit.py).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import logging
import os
import socket
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Literal

from ..errors import RunLockedError, StoreError
from .run_store import RunStore

log = logging.getLogger(__name__)
TAG_LEASE = "tracked_ckpt.lease"
LOCK_NAME = ".lock"
JOB_ENV = "TRACKED_CKPT_JOB_ID"  # a job identity the user gives, stable across the job's relaunches
POLL_S = 2.0  # how often a waiting newcomer re-reads the lease (at most; never more often than it beats)
Action = Literal["take", "refuse", "wait"]


def job_identity(env: Mapping[str, str]) -> str | None:
    """The job this process belongs to, as its launcher names it across relaunches; None when nothing says.

    ``TRACKED_CKPT_JOB_ID`` (the user's) first, then torchrun's rendezvous id (``--rdzv-id``; its default "none"
    names nothing, and ``--standalone`` draws a new one per launch), then ``SLURM_JOB_ID`` (kept by a requeue) with
    its ``SLURM_STEP_ID`` (two ``srun`` steps of one allocation are two jobs; a requeue numbers them alike again).
    """
    if env.get(JOB_ENV):
        return f"user:{env[JOB_ENV]}"
    rdzv = env.get("TORCHELASTIC_RUN_ID", "")
    if rdzv and rdzv != "none":
        return f"torchelastic:{rdzv}"
    if env.get("SLURM_JOB_ID"):
        step = env.get("SLURM_STEP_ID")
        return f"slurm:{env['SLURM_JOB_ID']}" + (f".{step}" if step else "")
    return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@dataclass(frozen=True)
class Holder:
    """Who holds (or would hold) a run's lease, as its tag says."""

    host: str
    pid: int
    save_dir: str | None = None
    job: str | None = None
    token: str = ""
    heartbeat: float = 0.0
    interval: float | None = None  # the holder's heartbeat interval (older leases do not say)

    @classmethod
    def parse(cls, raw: str | None) -> Holder | None:
        """The holder named by a lease tag; None for no tag or one that cannot be read (taken over)."""
        if not raw:
            return None
        try:
            v = json.loads(raw)
            interval = v.get("interval")
            return cls(host=str(v["host"]), pid=int(v["pid"]), save_dir=v.get("save_dir"), job=v.get("job"),
                       token=str(v.get("token", "")), heartbeat=float(v["heartbeat"]),
                       interval=None if interval is None else float(interval))  # fmt: skip
        except (ValueError, KeyError, TypeError, AttributeError):
            return None

    def __str__(self) -> str:
        return f"host {self.host} pid {self.pid}" + (f" (job {self.job})" if self.job else "")


def verdict(
    held: Holder, me: Holder, now: float, timeout: float, alive: Callable[[int], bool] = _pid_alive
) -> tuple[Action, str]:
    """Whether ``me`` takes the lease ``held`` now, refuses to (its holder is alive), or must watch it; and why."""
    age = now - held.heartbeat
    if held.host == me.host:
        if held.pid == me.pid:
            return "take", "it is an earlier manager of this process"
        if held.save_dir is not None and held.save_dir == me.save_dir:
            return "take", "it wrote through this save_dir, whose lock this process holds"
        if not alive(held.pid):
            return "take", "its process is gone"
        if age < timeout:
            return "refuse", "a live process on this host"
    elif held.job is not None and held.job == me.job:
        return "take", f"it is an earlier incarnation of this job ({me.job})"
    if age >= timeout:
        return "take", f"its heartbeat is {age:.0f} s old"
    return "wait", ""


class DirLock:
    """An exclusive, non-blocking flock on ``save_dir/.lock``; the kernel releases it when the process dies."""

    def __init__(self, root: Path) -> None:
        self.created = not root.exists()  # made by this lock: removed by discard() if nothing else came of it
        root.mkdir(parents=True, exist_ok=True)
        self.path = root / LOCK_NAME
        self._f: IO[str] | None = open(self.path, "a+")  # noqa: SIM115 - held for the manager's lifetime
        try:
            fcntl.flock(self._f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            self._f.seek(0)
            holder = self._f.read().strip() or "unknown"
            self._f.close()
            self._f = None
            raise RunLockedError(
                f"save_dir {root} is in use by another live process ({holder}); two writers must not share a "
                "save_dir. Stop the other process or pass another save_dir"
            ) from None
        self._f.seek(0)
        self._f.truncate()
        self._f.write(f"host {socket.gethostname()} pid {os.getpid()}\n")
        self._f.flush()

    def release(self) -> None:
        if self._f is not None:
            with contextlib.suppress(OSError):
                fcntl.flock(self._f, fcntl.LOCK_UN)
            self._f.close()
            self._f = None

    def discard(self) -> None:
        """Release, and remove the save_dir this lock created when it holds nothing but the lock file.

        For a manager that failed to start (a fork of a step the parent no longer has, ``resume="must"``...):
        the user's folder is left as it was found. The file goes while still locked, so no other process can
        have taken it in between.
        """
        root = self.path.parent
        if self._f is not None and self.created and [p.name for p in root.iterdir()] == [LOCK_NAME]:
            with contextlib.suppress(OSError):
                self.path.unlink()
                root.rmdir()
        self.release()


class Lease:
    """A run's lease held by this process: acquired once (waiting out a stale one), refreshed by a heartbeat.

    Args:
        clock: wall-clock seconds (heartbeats are compared across hosts); sleep: waits that many seconds.
        env: where the job identity is read (``job_identity``); the process environment by default.
        start: run the heartbeat on a daemon thread; tests pass False and call ``beat()`` themselves.
    """

    def __init__(
        self, store: RunStore, save_dir: Path, *, interval: float = 15.0, timeout: float = 60.0,
        clock: Callable[[], float] = time.time, sleep: Callable[[float], None] = time.sleep,
        env: Mapping[str, str] | None = None, start: bool = True,
    ) -> None:  # fmt: skip
        self.store = store
        self.save_dir = str(save_dir)
        self.interval = interval
        self.timeout = timeout
        self.clock, self.sleep, self.start = clock, sleep, start
        self.job = job_identity(os.environ if env is None else env)
        self.token = uuid.uuid4().hex
        self.acquired = False
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def me(self) -> Holder:
        return Holder(host=socket.gethostname(), pid=os.getpid(), save_dir=self.save_dir, job=self.job,
                      token=self.token, heartbeat=self.clock(), interval=self.interval)  # fmt: skip

    def _value(self) -> str:
        me = self.me()
        return json.dumps({"host": me.host, "pid": me.pid, "save_dir": me.save_dir, "job": me.job, "token": me.token,
                           "heartbeat": me.heartbeat, "interval": me.interval})  # fmt: skip

    def acquire(self, tags: dict[str, str]) -> None:
        """Take the lease (waiting out a stale one) and start the heartbeat; RunLockedError if a live holder has it."""
        held = Holder.parse(tags.get(TAG_LEASE))
        if held is not None:
            self._take_over(held)
        self.store.set_tags({TAG_LEASE: self._value()})
        self.acquired = True
        if self.start and (self._thread is None or not self._thread.is_alive()):  # acquired again after a retry
            self._thread = threading.Thread(target=self._beat, name="tracked_ckpt-lease", daemon=True)
            self._thread.start()

    def _take_over(self, held: Holder) -> None:
        action, why = verdict(held, self.me(), self.clock(), self.timeout)
        if action == "wait":
            action, why, held = self._watch(held)
        if action == "refuse":
            age = self.clock() - held.heartbeat
            raise RunLockedError(
                f"run {self.store.run_id} is being written by {held} (heartbeat {age:.0f} s ago: {why}; the lease "
                f"expires after {self.timeout:.0f} s without one). Stop that process, or resume into a new run with "
                f"resume='never'; a relaunch of the same job takes over at once when both name the job alike "
                f"({JOB_ENV}, torchrun --rdzv-id or SLURM_JOB_ID)"
            )
        log.warning("taking over the lease of run %s from %s: %s", self.store.run_id, held, why)

    def _watch(self, held: Holder) -> tuple[Action, str, Holder]:
        """Re-read the lease until its heartbeat advances (a live holder), it is released, or it expires."""
        age = self.clock() - held.heartbeat
        left = min(self.timeout, max(0.0, self.timeout - age))  # bounded even if the holder's clock runs ahead
        deadline, poll = self.clock() + left, min(POLL_S, self.interval)
        beats = f"every {held.interval:.0f} s" if held.interval else "regularly"
        log.warning(
            "run %s is held by %s, heartbeat %.0f s ago: waiting up to %.0f s for its lease to expire (a live holder "
            "beats %s and is refused as soon as it does)", self.store.run_id, held, age, left, beats,
        )  # fmt: skip
        next_note = self.clock() + 10.0
        while (remaining := deadline - self.clock()) > 0:
            self.sleep(min(poll, remaining))
            now = Holder.parse(self.store.tags().get(TAG_LEASE))
            if now is None:
                return "take", "it released the lease", held
            if (now.token, now.heartbeat) != (held.token, held.heartbeat):
                action, why = verdict(now, self.me(), self.clock(), self.timeout)
                if action == "take":
                    return action, why, now
                alive = "its heartbeat advanced" if now.token == held.token else "it took the lease meanwhile"
                return "refuse", f"{alive} while this process waited", now
            if self.clock() >= next_note:
                log.info("run %s: still waiting for the lease of %s, %.0f s left", self.store.run_id, held,
                         max(0.0, deadline - self.clock()))  # fmt: skip
                next_note += 10.0
        since = self.clock() - held.heartbeat
        if since < 0:  # its clock runs ahead of this host's: what counted is the time this process waited
            return "take", f"its heartbeat did not advance in {left:.0f} s", held
        return "take", f"no heartbeat for {since:.0f} s", held

    def beat(self) -> None:
        """One heartbeat (the thread's body); an outage is the outbox's to report: the lease simply ages."""
        try:
            self.store.set_tags({TAG_LEASE: self._value()})
        except StoreError as e:
            log.debug("lease heartbeat failed: %s", e)

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            self.beat()

    def stop(self) -> None:
        """Stop the heartbeat; the tag stays and expires (the server is unreachable, or another process took over)."""
        self._stop.set()

    def release(self) -> None:
        self.stop()
        if not self.acquired:
            return  # never acquired (an offline start that never reached the server)
        with contextlib.suppress(StoreError):
            self.store.delete_tag(TAG_LEASE)
