"""The writing side of a run's recorder: naming the next checkpoint, and its local commit (queued first).

``plan`` gives a save its folder name and manifest fields; ``commit`` commits a staged folder in ``save_dir`` —
the same for every kind of checkpoint (a training state, a sharded DCP folder or a node's share of one, another
library's folder): the outbox entry is added once the files are durable and before the rename that commits
(``LocalDir.commit``), so a committed checkpoint is always either recorded or queued.
"""

from __future__ import annotations

import shutil
import time
from collections.abc import Collection
from pathlib import Path
from typing import Any

from ..catalog import info_of, name_step
from ..errors import SaveError
from ..local import LocalDir
from ..manifest import ARTIFACT_PREFIX, Manifest
from ..outbox import Outbox, Pending
from ..runtags import METRIC_BYTES, METRIC_COMMIT_S
from ..state import Metadata
from .ledger import Ledger


class Writer:
    def __init__(self, run_id: str, local: LocalDir, outbox: Outbox, ledger: Ledger) -> None:
        self.run_id, self.local, self.outbox, self.ledger = run_id, local, outbox, ledger
        self._next_seq: int | None = None  # from the index and the queue at the first save
        self._top = ((0, 0), -(2**63))  # ((id, len) of taken, the highest step named in it): plan()'s cache

    def next_seq(self) -> int:
        queued = self.outbox.pending(self.run_id)
        return max([c.seq for c in self.ledger.index.values()] + [p.seq for p in queued], default=0) + 1

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
        name = name if name not in self.ledger.taken and step >= self._top_step() else f"{name}.{seq}"
        self.ledger.taken.add(name)
        return name, fields_of(step, seq, meta, self.ledger.resumed_from)

    def _top_step(self) -> int:
        """The highest step among the folder names in use (cached: ``taken`` only grows, or is replaced)."""
        taken = self.ledger.taken
        key = (id(taken), len(taken))
        if self._top[0] != key:
            steps = [parsed[0] for parsed in map(name_step, taken) if parsed is not None]
            self._top = (key, max(steps, default=-(2**63)))
        return self._top[1]

    def commit(
        self, staging: Path, name: str, manifest: Manifest, *, held: Collection[str] | None, record: bool,
        since: float,
    ) -> Path:  # fmt: skip
        """Commit the durable files in ``staging`` as ``name`` with ``manifest`` (queued first); the local copy.

        ``held``: the manifest's files that ``staging`` holds (None: all of them); the others are another node's.
        ``record``: False queues an upload-only entry (this node's share; another node records the checkpoint).
        Until the commit is over the publisher leaves the entry alone (``NotReady``): it would find no folder yet.
        """
        if held is not None:
            _check_held(staging, manifest, held)
        final = self.local.folder(self.run_id, name)
        entry = Pending(self.run_id, manifest.seq, name, manifest.step, int(manifest.created * 1000), not record)
        self.ledger.committing(manifest.seq)
        try:
            self.local.commit(staging, final, manifest, (self.outbox, entry))
        except BaseException:
            self.ledger.committed(manifest.seq, None)
            raise
        if record:  # costs are logged with the record; an upload-only entry has none
            self.ledger.note_cost(manifest.seq, METRIC_COMMIT_S, time.perf_counter() - since)
            self.ledger.note_cost(manifest.seq, METRIC_BYTES, float(manifest.size))
        path = f"{ARTIFACT_PREFIX}/{name}"
        self.ledger.committed(manifest.seq, info_of(manifest, path) if record else None)
        return final


def _check_held(staging: Path, manifest: Manifest, held: Collection[str]) -> None:
    names = {f.name for f in manifest.files}
    wrong = sorted(n for n in held if n not in names or not (staging / n).is_file())
    if wrong:
        shutil.rmtree(staging, ignore_errors=True)
        raise SaveError(
            f"step {manifest.step}: {', '.join(wrong[:3])} should be in {staging} and in the manifest, and is not; "
            "nothing was committed (a bug in the caller: pass held= the files this node wrote)"
        )


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
