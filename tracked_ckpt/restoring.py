"""What ``CheckpointManager.load`` does: pick the checkpoint (rank 0 decides), then restore it on every rank.

"latest" walks the run's committed checkpoints newest first and falls back past one that fails verification
(on every rank in step); a fork's first launch starts from its parent's checkpoint; "best", a step number or a
reference resolve through the live run (recording/live.py). One process restores through loading.py; under
torchrun every rank restores together (distributed/sharded.py, each node fetching only what its ranks read).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

from .catalog import Resolved
from .distributed.ranks import Ranks
from .errors import CheckpointNotFoundError
from .loading import first_that_loads, load_resolved
from .local import LocalDir
from .recording import RunRecorder
from .refs import Which, ref_for
from .state import TrainingState

log = logging.getLogger(__name__)


class Restorer:
    """Finds and restores one run's checkpoints for a manager (its ranks, recorder and save_dir)."""

    def __init__(self, ranks: Ranks, recorder: RunRecorder, local: LocalDir, resume: str) -> None:
        self.ranks, self.recorder, self.local, self.resume = ranks, recorder, local, resume

    @property
    def run_id(self) -> str:
        return self.recorder.run_id

    def load(self, state: TrainingState, checkpoint_path: str | None, which: Which) -> dict[str, Any]:
        """Restore into ``state``; the checkpoint's metadata, or {} when the run has none yet (see manager.load)."""
        rec = self.recorder
        if checkpoint_path is None and which == "latest":
            got = first_that_loads(self._latest_candidates(), lambda r: self._load_one(self.run_id, r, state))
            if got is None and (parent := self.ranks.on_rank0(rec.fork_parent)) is not None:
                got = parent[1], self._load_one(parent[0], parent[1], state)  # a fork's first launch
                log.info("fork %s starts from its parent %s", self.run_id, ref_for(parent[0], parent[1].path))
            if got is None:
                if self.resume == "must":
                    raise CheckpointNotFoundError(f"resume='must' but run {self.run_id} has no committed checkpoint")
                log.info("no checkpoint in run %s yet: starting from scratch", self.run_id)
                return {}
            r, metadata = got
        else:
            if checkpoint_path is not None:
                run_id, r = self.ranks.on_rank0(lambda: rec.resolve_path(checkpoint_path))
            else:
                run_id, r = self.ranks.on_rank0(lambda: (self.run_id, rec.resolve(which)))
            metadata = self._load_one(run_id, r, state)
        if r.manifest.run_id == self.run_id:
            rec.resumed_from = r.path
        return metadata

    def _latest_candidates(self) -> Iterator[Resolved]:
        """Rank 0's candidates, one at a time, on every rank (a corrupt one makes all ranks move to the next)."""
        candidates: Iterator[Resolved] = self.recorder.latest_first() if self.ranks.is_rank0 else iter(())
        if not self.ranks.distributed:
            yield from candidates
            return
        while (r := self.ranks.on_rank0(lambda: next(candidates, None))) is not None:
            yield r

    def _load_one(self, run_id: str, r: Resolved, state: TrainingState) -> dict[str, Any]:
        catalog = self.recorder.catalog_of(run_id)
        cache = self.recorder.cache_for(catalog, r)
        if self.ranks.distributed:
            from .distributed.sharded import load_on_ranks

            node_folder = self.local.folder(run_id, r.path.rpartition("/")[2])
            load_on_ranks(self.ranks, catalog, r, state, cache, node_folder)  # type: ignore[arg-type]
            return dict(r.manifest.metadata)
        return load_resolved(catalog, r, state, cache)
