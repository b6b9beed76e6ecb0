"""What a run's recorder knows about its checkpoints, shared by the saving thread and the publisher thread.

The index of recorded checkpoints (replaced, never mutated: the training thread reads it while the publisher
adds to it), the checkpoints committed locally and not yet recorded (save policies see them), the folder names in
use, and each queued save's costs. One lock guards it all; every part of the recorder reads and writes it here.
"""

from __future__ import annotations

import threading
import time

from ..policies import CheckpointInfo


class Ledger:
    def __init__(self) -> None:
        self.index: dict[str, CheckpointInfo] = {}  # recorded checkpoints, by path; replaced, never mutated
        self.taken: set[str] = set()  # every folder name in use, committed or not (replaced by recovery)
        self.resumed_from: str | None = None  # retention never deletes the checkpoint the run resumed from
        self._local: dict[str, CheckpointInfo] = {}  # committed locally, not yet recorded (by path)
        self._committing: set[int] = set()  # seqs queued whose local commit is not over yet
        self._mine: set[int] = set()  # seqs this process queued (others were queued by an earlier process)
        self._costs: dict[int, dict[str, float]] = {}  # seq -> cost metrics known on the saving side
        self._late: list[tuple[str, float, int, int]] = []  # costs of earlier saves, for the next log_batch
        self._lock = threading.Lock()

    # ------------------------------------------------------------------------------------- the index

    def known(self) -> list[CheckpointInfo]:
        """Recorded checkpoints and those committed locally and still queued (an outage)."""
        with self._lock:
            return list({**self._local, **self.index}.values())

    def latest_step(self) -> int | None:
        index = self.index
        return max(index.values(), key=lambda c: c.seq).step if index else None

    def recorded(self, info: CheckpointInfo) -> None:
        with self._lock:
            self.index = {**self.index, info.path: info}

    def dropped(self, path: str) -> None:
        with self._lock:
            self.index = {p: c for p, c in self.index.items() if p != path}

    # ------------------------------------------------------------------------------- local commits

    def committing(self, seq: int) -> None:
        """A save of this process is committing ``seq`` locally: the publisher leaves its entry alone until over."""
        with self._lock:
            self._committing.add(seq)
            self._mine.add(seq)

    def committed(self, seq: int, info: CheckpointInfo | None) -> None:
        """The local commit of ``seq`` is over (``info``: committed, known to save policies; None: failed)."""
        with self._lock:
            self._committing.discard(seq)
            if info is not None:
                self._local[info.path] = info

    def is_committing(self, seq: int) -> bool:
        with self._lock:
            return seq in self._committing

    def is_mine(self, seq: int) -> bool:
        with self._lock:
            return seq in self._mine

    def forget(self, seq: int) -> None:
        """``seq`` is recorded (or skipped): nothing about it is pending any more."""
        with self._lock:
            self._costs.pop(seq, None)
            self._local = {p: c for p, c in self._local.items() if c.seq != seq}

    # ------------------------------------------------------------------------------------------ costs

    def note_cost(self, seq: int, name: str, value: float) -> None:
        with self._lock:
            self._costs.setdefault(seq, {})[name] = value

    def costs(self, seq: int) -> dict[str, float]:
        with self._lock:
            return dict(self._costs.get(seq, {}))

    def note_late_cost(self, step: int, name: str, value: float) -> None:
        with self._lock:
            self._late.append((name, value, step, int(time.time() * 1000)))

    def late(self) -> list[tuple[str, float, int, int]]:
        with self._lock:
            return list(self._late)

    def logged_late(self, n: int) -> None:
        """The first ``n`` late costs are logged."""
        with self._lock:
            del self._late[:n]

    def take_late(self) -> list[tuple[str, float, int, int]]:
        with self._lock:
            late, self._late = self._late, []
        return late
