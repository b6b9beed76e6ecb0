"""Checkpoints under torchrun: every rank writes its DCP shard, rank 0 records the checkpoint in MLflow.

Under torchrun (``torch.distributed`` initialized) the one ``CheckpointManager`` gets a ``TorchRun`` ranks
collaborator (ranks.py) and saves through ``ShardedWriter`` (every rank must make the same calls). A checkpoint is
then a folder of DCP files::

    checkpoints/step-00000100/
      __0_0.distcp  __1_0.distcp   each rank's shard (written, hashed and uploaded by that rank)
      .metadata                    DCP's index of the shards (rank 0)
      rng-0.json  rng-1.json       each rank's Python/NumPy/torch RNG state
      data-0.pt  data-1.pt         each rank's data position, if a loader was saved (data.py)
      MANIFEST.json                format "dcp", world_size, every file's size and BLAKE3: uploaded last, by rank 0

Rank 0 alone talks to MLflow for decisions (which run, which folder name, latest/best, tags, retention) and
broadcasts the answer over a dedicated gloo group; collectives never share the training process group, so a
background save (``async_save=True``) cannot interleave with FSDP/DDP traffic. Loading verifies every file
against the manifest on every rank, then restores through ``dcp.load`` with a restricted reader
(``formats/dcp.py``), so a checkpoint saved at one world size (or with DDP) loads at another (or into FSDP2).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, cast

from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from ..catalog import Resolved, RunCatalog
from ..data import encode as data_position
from ..errors import SaveError
from ..formats import Job, format_of
from ..formats.dcp import DCP_FOLDER, dcp_state, rng_json, stage_rank
from ..local import STAGING
from ..manifest import FileEntry, Manifest
from ..recording import RunRecorder
from ..refs import ref_for
from ..session import RunSession
from ..state import TrainingState
from .node_copy import node_view
from .ranks import TorchRun, portable

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------- saving


class ShardedWriter:
    """Every rank writes its DCP shard durably; each node commits its files locally (manifest last) and queues them."""

    def __init__(self, ranks: TorchRun, save_dir: Path, recorder: RunRecorder, node: list[int], save_rng: bool) -> None:
        self.ranks, self.save_dir, self.recorder = ranks, save_dir, recorder
        self.node = node  # the ranks sharing this save_dir, lowest (the node's leader) first
        self.save_rng = save_rng

    def stage(self, name: str, token: str, fields: dict[str, Any], state: TrainingState, background: bool,
              t0: float) -> Callable[[], None]:  # fmt: skip
        """Start writing this rank's shard; return the rest of the save (run now, or on the save thread).

        In the background, DCP's own async save copies the state before this returns; the rest waits for its
        files, then commits.
        """
        step = fields["step"]
        staging = self.save_dir / STAGING / token  # rank 0's: ranks sharing a disk write one folder
        staging.mkdir(parents=True, exist_ok=True)
        rng = rng_json() if self.save_rng else None
        position = data_position(state)  # now: an async write must not see the loaders move on
        sd = dcp_state(state)
        group = self.ranks.io_group
        try:
            if not background:
                dcp_save(sd, checkpoint_id=staging, process_group=group)
            else:
                written = dcp_async_save(sd, checkpoint_id=staging, process_group=group)
        except CheckpointException as e:
            raise SaveError(f"DCP save of step {step} failed: {e}") from None

        def rest() -> None:
            if background:
                try:
                    cast("Future[Any]", written).result()
                except CheckpointException as e:
                    raise SaveError(f"DCP async save of step {step} failed: {e}") from None
            self._finish(name, fields, staging, rng, position, t0)

        return rest

    def _finish(self, name: str, fields: dict[str, Any], staging: Path, rng: dict[str, Any] | None,
                position: bytes | None, t0: float) -> None:  # fmt: skip
        """Hash this rank's files; rank 0 then commits the folder locally and hands it to the recorder."""
        rank, step = self.ranks.rank, fields["step"]
        mine: list[FileEntry] = []
        err: BaseException | None = None
        try:
            mine = stage_rank(staging, rank, rng, position)
        except OSError as e:
            err = SaveError(f"rank {rank} could not write its shard of step {step}: {e}")
        everyone = self.ranks.gather((mine, None if err is None else portable(err, rank)), "io")
        failed = next((e for _, e in everyone if e is not None), None)
        leader = self.node[0] == rank
        if failed is not None:
            if leader:
                shutil.rmtree(staging, ignore_errors=True)
            raise failed if err is None else err
        manifest, kept = self.ranks.on_rank0(lambda: (self._manifest(fields, everyone), kept_names(self.recorder)),
                                             "io")  # fmt: skip
        # Each node commits the files its own ranks wrote (node-local disks), durably, and queues them in its own
        # outbox; rank 0's entry records the checkpoint once every node's files are in the store.
        held = {f.name for r in self.node for f in everyone[r][0]}
        whole = held == {f.name for f in manifest.files}
        commit_err: BaseException | None = None
        if leader:
            try:
                self.recorder.commit(staging, name, manifest, t0, held=None if whole else held,
                                     record=rank == 0, wait=whole)  # fmt: skip
            except Exception as e:  # reported on every rank by agree() below
                commit_err = e
        self.ranks.agree(commit_err, "io")  # save() returns once every node's local commit is done
        if leader and rank != 0:
            prune_node(self.recorder, {*kept, name})

    def _manifest(self, fields: dict[str, Any], everyone: list[Any]) -> Manifest:
        files = tuple(sorted((f for entries, _ in everyone for f in entries), key=lambda f: f.name))
        return DCP_FOLDER.describe(self.recorder.run_id, files, fields, world_size=self.ranks.world_size)


def join_ranks(ranks: TorchRun, session: RunSession, run_id: str, node: list[int], save_rng: bool) -> ShardedWriter:
    """After rank 0 opened the run: the other ranks join it, each node's leader cleans its save_dir (a dead save's
    staging, copies the run no longer keeps) and starts its publisher; returns this rank's sharded writer."""
    leader = node[0] == ranks.rank
    if not ranks.is_rank0:
        session.join(run_id, shares=leader)
        if leader:  # another node's leader: what a dead save left here is garbage
            session.local.sweep_staging(max_age_s=0)
    kept = ranks.on_rank0(lambda: kept_names(session.recorder))
    if leader and not ranks.is_rank0:
        prune_node(session.recorder, kept)  # copies retention dropped while this node was away
    return ShardedWriter(ranks, session.local.root, session.recorder, node, save_rng)


def kept_names(recorder: RunRecorder) -> set[str]:
    """Rank 0's answer to "which checkpoints does the run keep": recorded, or committed and queued."""
    recorded = {path.rpartition("/")[2] for path in recorder.index}
    return recorded | {p.name for p in recorder.outbox.pending(recorder.run_id)}


def prune_node(recorder: RunRecorder, kept: set[str]) -> None:
    """Another node's leader drops its copies of checkpoints the run no longer keeps (retention, dead saves);
    what its own outbox still has to upload stays."""
    queued = {p.name for p in recorder.outbox.pending(recorder.run_id)}
    recorder.publishing.dropped.update(queued - kept)  # its publisher skips them (and removes their copies)
    gone = recorder.local.prune(recorder.run_id, kept | queued)
    if gone:
        log.info("removed %d local copies the run no longer keeps from %s: %s", len(gone), recorder.local.root,
                 ", ".join(gone))  # fmt: skip


# ------------------------------------------------------------------------------------------ loading


def load_on_ranks(ranks: TorchRun, catalog: RunCatalog, r: Resolved, state: TrainingState, cache_dir: Path | None,
                  node_folder: Path) -> None:  # fmt: skip
    """Restore one checkpoint on every rank: a DCP folder through ``dcp.load`` (any saved world size), a
    single-process checkpoint whole on each rank. A failure on any rank fails the load on all (no rank hangs).

    At the saved world size each node fetches only what its ranks read into ``node_folder`` (node_copy.py).
    """
    where = f"checkpoint {ref_for(catalog.run_id, r.path)} (step {r.manifest.step})"
    t0 = time.perf_counter()
    fmt = format_of(r.manifest)
    if not fmt.sharded:  # a single-process checkpoint: every rank restores the whole of it
        from ..loading import load_resolved

        err: BaseException | None = None
        try:
            load_resolved(catalog, r, state, cache_dir, world_size=ranks.world_size)
        except Exception as e:  # any failure on one rank must reach every rank's agree(), or they hang
            err = e
        ranks.agree(err)
        log.info("rank %d restored %s in %.2f s", ranks.rank, where, time.perf_counter() - t0)
        return
    scratch = node_folder.parent.parent / STAGING
    scratch.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(prefix=f"load-{ranks.rank}-", dir=scratch) as tmp:
        folder, err, fetched = Path(tmp), None, 0
        try:
            if r.manifest.world_size == ranks.world_size:
                folder = Path(tmp) / "view"
                fetched = node_view(catalog, r, state, node_folder, folder, ranks.rank)
            else:  # resharding: DCP may read any file
                folder = catalog.fetch_verified(r, Path(tmp), cache_dir)
        except Exception as e:  # likewise: a download that fails on one rank only
            err = e
        ranks.agree(err)  # every rank verified its copy before any rank enters dcp.load
        fmt.restore(folder, r.manifest, state, where, None, Job(ranks.world_size, ranks.rank, ranks.ctl_group))
    log.info("rank %d restored %s in %.2f s (%d bytes downloaded)", ranks.rank, where, time.perf_counter() - t0,
             fetched)  # fmt: skip
