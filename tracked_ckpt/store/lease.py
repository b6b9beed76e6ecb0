"""One writer per run: a heartbeat lease in the run's tags, plus an OS lock on ``save_dir``.

MLflow's run status says nothing reliable about whether a process is still training (SIGKILL leaves a run
RUNNING; an uncaught exception can leave it FINISHED), so the manager keeps its own: the tag
``tracked_ckpt.lease`` holds {host, pid, token, heartbeat}, refreshed every ``interval`` seconds. A second
writer fails fast while the heartbeat is fresh, unless the holder is a dead process on this host; after
``timeout`` seconds without a heartbeat the lease has expired and is taken over. Tags have no
compare-and-set, so two writers starting within the same instant are not excluded by the tag alone; the
``flock`` on ``save_dir`` closes that gap for writers sharing a directory.
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
from pathlib import Path
from typing import IO

from ..errors import RunLockedError, StoreError
from .run_store import RunStore

log = logging.getLogger(__name__)
TAG_LEASE = "tracked_ckpt.lease"
LOCK_NAME = ".lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


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
    def __init__(self, store: RunStore, save_dir: Path, *, interval: float = 15.0, timeout: float = 60.0) -> None:
        self.store = store
        self.save_dir = str(save_dir)
        self.interval = interval
        self.timeout = timeout
        self.token = uuid.uuid4().hex
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _value(self) -> str:
        return json.dumps(
            {
                "host": socket.gethostname(),
                "pid": os.getpid(),
                "save_dir": self.save_dir,
                "token": self.token,
                "heartbeat": time.time(),
            }
        )

    def acquire(self, tags: dict[str, str]) -> None:
        """Fail fast if a live holder has the run; otherwise take the lease and start the heartbeat."""
        raw = tags.get(TAG_LEASE)
        if raw:
            try:
                held = json.loads(raw)
                host, pid, beat = str(held["host"]), int(held["pid"]), float(held["heartbeat"])
            except (ValueError, KeyError, TypeError):
                held = None
            if held is not None:
                age = time.time() - beat
                # Gone for sure: a dead process on this host, an earlier (closed) manager of this very process,
                # or a holder that wrote through this save_dir, whose lock we now hold (so it closed or died).
                here = host == socket.gethostname()
                same_dir = held.get("save_dir") == self.save_dir
                dead_here = here and (pid == os.getpid() or not _pid_alive(pid) or same_dir)
                if age < self.timeout and not dead_here:
                    raise RunLockedError(
                        f"run {self.store.run_id} is being written by host {host} pid {pid} (heartbeat {age:.0f} s "
                        f"ago; the lease expires after {self.timeout:.0f} s without one). Stop that process, wait "
                        "for its lease to expire, or resume into a new run with resume='never'"
                    )
                why = "its process is gone or closed it" if dead_here else f"its heartbeat is {age:.0f} s old"
                log.warning(
                    "taking over the lease of run %s from host %s pid %d: %s", self.store.run_id, host, pid, why
                )
        self.store.set_tags({TAG_LEASE: self._value()})
        if self._thread is None or not self._thread.is_alive():  # acquired again after a retry: one heartbeat
            self._thread = threading.Thread(target=self._beat, name="tracked_ckpt-lease", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.interval):
            try:
                self.store.set_tags({TAG_LEASE: self._value()})
            except StoreError as e:  # an outage: the outbox reports it; the lease simply ages
                log.debug("lease heartbeat failed: %s", e)

    def stop(self) -> None:
        """Stop the heartbeat; the tag stays and expires (the server is unreachable, or another process took over)."""
        self._stop.set()

    def release(self) -> None:
        self.stop()
        if self._thread is None:
            return  # never acquired (an offline start that never reached the server)
        with contextlib.suppress(StoreError):
            self.store.delete_tag(TAG_LEASE)
