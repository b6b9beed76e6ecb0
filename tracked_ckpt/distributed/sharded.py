"""Checkpoints under torchrun: every rank writes its DCP shard, rank 0 records the checkpoint in MLflow.

When ``torch.distributed`` is initialized, ``CheckpointManager(...)`` builds a ``DistributedCheckpointManager``
(same API; every rank must make the same calls). A checkpoint is then a folder of DCP files::

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
(``dcp_safe``), so a checkpoint saved at one world size (or with DDP) loads at another (or into FSDP2).
"""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import tempfile
import threading
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar, cast

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.state_dict_saver import async_save as dcp_async_save
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from .._faults import fault_point
from .._version import __version__
from ..catalog import Resolved, RunCatalog
from ..data import data_file
from ..data import encode as data_position
from ..errors import (
    SaveError,
)
from ..formats.dcp import METADATA_NAME, dcp_state, load_dcp_folder, rng_file, rng_json
from ..local import STAGING
from ..manager import CheckpointManager
from ..manifest import ARTIFACT_PREFIX, FileEntry, Manifest, hash_file, write_file
from ..preemption import EXIT_STATUS, SigtermFlag
from ..refs import ref_for
from ..runtags import METRIC_BLOCKED_S
from ..session import Options, RunSession
from ..snapshot import BackgroundSaver
from ..state import Stateful, TrainingState

log = logging.getLogger(__name__)
T = TypeVar("T")


def active() -> bool:
    """True under torchrun (or any initialized default process group)."""
    return dist.is_available() and dist.is_initialized()


def manager_class() -> type[CheckpointManager]:
    return DistributedCheckpointManager if active() else CheckpointManager


def load_resolved_dcp(catalog: RunCatalog, r: Resolved, state: TrainingState, cache_dir: Path | None) -> None:
    """Single-process load of a DCP checkpoint (any saved world size): verify, then restore."""
    where = f"checkpoint {ref_for(catalog.run_id, r.path)} (step {r.manifest.step})"
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-") as tmp:
        folder = catalog.fetch_verified(r, Path(tmp), cache_dir)
        load_dcp_folder(folder, r.manifest, state, where)


# ------------------------------------------------------------------------------------------- the manager


@dataclass(frozen=True)
class _Plan:
    name: str
    seq: int
    step: int
    token: str
    fields: dict[str, Any]


def _portable(e: BaseException, rank: int) -> BaseException:
    """The exception itself when it pickles (to re-raise it on every rank), else a SaveError describing it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return SaveError(f"rank {rank}: {type(e).__name__}: {e}")


class DistributedCheckpointManager(CheckpointManager):
    """CheckpointManager under torchrun: DCP shards per rank, one MLflow record by rank 0 (see module doc)."""

    def __init__(self, save_dir: str | os.PathLike[str] = "./checkpoints", **kwargs: Any) -> None:
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # Two gloo groups, made by every rank in the same order: control messages from the training thread,
        # and save traffic from the background thread; neither shares the training (e.g. NCCL) group.
        self._ctl = dist.new_group(backend="gloo")
        self._io = dist.new_group(backend="gloo")
        self._lock = threading.Lock()
        self._bg = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tracked_ckpt-dcp")
        self._inflight: Future[str] | None = None
        self._dcp_async = bool(kwargs.get("async_save", False))
        # async_save is DCP's own here, so the base class saves nothing in the background; SIGTERM is handled
        # below on every rank, not by the base class on rank 0 alone.
        base = {k: v for k, v in kwargs.items() if k not in ("async_save", "save_on_sigterm")}
        if self.rank == 0:
            run_id = self._on_rank0(lambda: self._init_rank0(save_dir, base))
        else:
            run_id = self._on_rank0(lambda: "")
            self._init_follower(run_id, save_dir, base)
        if kwargs.get("save_on_sigterm", False):
            self._sigterm.install()

    def _init_rank0(self, save_dir: str | os.PathLike[str], kwargs: dict[str, Any]) -> str:
        super().__init__(save_dir, **kwargs)
        return self.run_id

    def _init_follower(self, run_id: str, save_dir: str | os.PathLike[str], kwargs: dict[str, Any]) -> None:
        """Ranks > 0 never decide nor record: they write their shards; they read the run only to load."""
        from mlflow.tracking import MlflowClient

        from ..local import LocalDir
        from ..recording import RunRecorder

        self.options = o = Options.pick(kwargs)
        self.save_dir = Path(save_dir).expanduser().resolve()
        self.local = LocalDir(self.save_dir)
        self.client = MlflowClient(tracking_uri=kwargs.get("tracking_uri"))
        self._session = RunSession(self.client, self.local, o)
        self._session.owns_status = False
        self._session.store = o.store_factory(self.client, run_id, connect=False)  # connects only to download
        self._server = self.store.server
        self._closed = False
        self._sigterm = SigtermFlag()
        # A recorder that never publishes (no thread): rank 0 records; this one serves reads of the local copies.
        self._session.recorder = RunRecorder(self.store, self.local, monitor=o.monitor, mode=o.mode, retention=None,
                                             publish_timeout=o.publish_timeout, start=False)  # fmt: skip

    # ---------------------------------------------------------------------------------- collectives

    def _on_rank0(self, fn: Callable[[], T], group: Any = None) -> T:
        """Run ``fn`` on rank 0 and give every rank its result, or raise its exception on every rank."""
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except Exception as e:
                box[0] = ("err", _portable(e, 0))
                dist.broadcast_object_list(box, src=0, group=group or self._ctl)
                raise
        dist.broadcast_object_list(box, src=0, group=group or self._ctl)
        kind, value = box[0]
        if kind == "err":
            raise value
        return cast(T, value)

    def _agree(self, err: BaseException | None, group: Any = None) -> None:
        """All ranks raise the first rank's error if any rank failed (so no rank enters a collective alone)."""
        errors: list[Any] = [None] * self.world_size
        dist.all_gather_object(errors, None if err is None else _portable(err, self.rank), group=group or self._ctl)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise err if err is not None else first

    def _any_preempted(self) -> bool:
        """True on every rank once SIGTERM reached any rank (torchrun sends it to each, not at the same instant)."""
        flags: list[Any] = [False] * self.world_size
        dist.all_gather_object(flags, self._sigterm.raised, group=self._ctl)
        self._sigterm.raised = any(flags)
        return self._sigterm.raised

    def should_save(self, step: int, metrics: Mapping[str, float] | None = None) -> bool:
        """Rank 0's answer on every rank (a time-based policy would otherwise disagree); True on all after SIGTERM."""
        if self.options.save_policy is None:
            return True
        if self._sigterm.installed and self._any_preempted():
            return True
        with self._lock:
            return self._on_rank0(lambda: CheckpointManager.should_save(self, step, metrics))

    # --------------------------------------------------------------------------------------- saving

    def save(
        self,
        model: Stateful | None = None,
        optimizer: Stateful | None = None,
        metadata: Mapping[str, Any] | None = None,
        *,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        extra: Mapping[str, Stateful] | None = None,
        step: int | None = None,
        data: Stateful | Mapping[str, Stateful] | None = None,
    ) -> str:
        """Every rank writes its shard durably; rank 0 commits locally (manifest last) and queues the record."""
        meta, state = self._begin_save(model, optimizer, metadata, scheduler, scaler, extra, data)
        plan = self._on_rank0(lambda: self._plan_sharded(meta, step))
        t0 = time.perf_counter()
        staging = self.save_dir / STAGING / plan.token
        staging.mkdir(parents=True, exist_ok=True)
        rng = rng_json() if self.options.save_rng else None
        position = data_position(state)  # now: an async write must not see the loaders move on
        sd = dcp_state(state)
        if not self._dcp_async:
            try:
                dcp_save(sd, checkpoint_id=staging, process_group=self._io)
            except CheckpointException as e:
                raise SaveError(f"DCP save of step {plan.step} failed: {e}") from None
            ref = self._finish(plan, staging, rng, t0, position)
            if self.rank == 0:
                self.recorder.note_late_cost(plan.step, METRIC_BLOCKED_S, time.perf_counter() - t0)
            self._exit_if_preempted(plan.step)
            return ref
        try:
            written = dcp_async_save(sd, checkpoint_id=staging, process_group=self._io)
        except CheckpointException as e:
            raise SaveError(f"DCP async save of step {plan.step} failed: {e}") from None

        def job() -> str:
            try:
                cast("Future[Any]", written).result()
            except CheckpointException as e:
                raise SaveError(f"DCP async save of step {plan.step} failed: {e}") from None
            return self._finish(plan, staging, rng, t0, position)

        if self.rank == 0:
            self.recorder.note_cost(plan.seq, METRIC_BLOCKED_S, time.perf_counter() - t0)
        self._inflight = self._bg.submit(job)
        # Every rank asks (a collective), not only those that saw SIGTERM already: they must agree.
        self._exit_if_preempted(plan.step, finish_first=True)
        return ref_for(self.run_id, f"{ARTIFACT_PREFIX}/{plan.name}")

    def _plan_sharded(self, meta: Any, step: int | None) -> _Plan:
        with self._lock:
            name, fields = self.recorder.plan(meta, step)
        return _Plan(name, fields["seq"], fields["step"], uuid.uuid4().hex, fields)

    def _finish(self, plan: _Plan, staging: Path, rng: dict[str, Any] | None, t0: float,
                position: bytes | None) -> str:  # fmt: skip
        """Hash this rank's files; rank 0 then commits the folder locally and hands it to the recorder."""
        mine: list[FileEntry] = []
        err: BaseException | None = None
        try:
            if rng is not None:
                mine.append(write_file(staging / rng_file(self.rank), json.dumps(rng).encode()))
            if position is not None:
                mine.append(write_file(staging / data_file(self.rank), position))
            names = [p.name for p in staging.glob(f"__{self.rank}_*.distcp")]
            if self.rank == 0:
                names.append(METADATA_NAME)
            for n in sorted(names):
                size, digest = hash_file(staging / n)
                mine.append(FileEntry(n, size, digest))
            fault_point(f"dcp_written:{self.rank}")  # tests: a rank dies with its shard written, nothing committed
        except OSError as e:
            err = SaveError(f"rank {self.rank} could not write its shard of step {plan.step}: {e}")
        everyone: list[Any] = [None] * self.world_size
        dist.all_gather_object(everyone, (mine, None if err is None else _portable(err, self.rank)), group=self._io)
        failed = next((e for _, e in everyone if e is not None), None)
        # Shards that rank 0 cannot see (a node-local save_dir on another node) are uploaded by their rank now.
        absent = self._on_rank0(lambda: self._absent_ranks(staging, everyone, failed), group=self._io)
        upload_err: BaseException | None = None
        if self.rank in absent:
            try:
                self.store.connect() if not self.store.connected else None
                for f in mine:
                    self.store.upload(staging / f.name, f"{ARTIFACT_PREFIX}/{plan.name}")
            except Exception as e:  # reported on every rank by _agree below
                upload_err = SaveError(f"rank {self.rank} could not upload its shard of step {plan.step}: {e}")
        self._agree(upload_err, group=self._io)
        ref = self._on_rank0(lambda: self._commit_rank0(plan, staging, everyone, t0), group=self._io)
        if self.rank != 0:
            shutil.rmtree(staging, ignore_errors=True)  # a node-local staging copy; rank 0's is the committed one
        return ref

    def _absent_ranks(self, staging: Path, everyone: list[Any], failed: Any) -> list[int]:
        if failed is not None:
            shutil.rmtree(staging, ignore_errors=True)
            raise failed
        return [
            rank for rank, (entries, _) in enumerate(everyone)
            if any(not (staging / f.name).is_file() or (staging / f.name).stat().st_size != f.size for f in entries)
        ]  # fmt: skip

    def _commit_rank0(self, plan: _Plan, staging: Path, everyone: list[Any], t0: float) -> str:
        path = f"{ARTIFACT_PREFIX}/{plan.name}"
        files = tuple(sorted((f for entries, _ in everyone for f in entries), key=lambda f: f.name))
        manifest = Manifest(
            run_id=self.run_id,
            files=files,
            library_version=__version__,
            torch_version=torch.__version__,
            format="dcp",
            world_size=self.world_size,
            **plan.fields,
        )
        self.recorder.commit(staging, plan.name, manifest, t0)
        self._last_save_time = time.time()
        return ref_for(self.run_id, path)

    def sync(self, timeout: float | None = None) -> bool:
        """Rank 0 waits until its outbox is recorded in MLflow; every rank gets the answer (a collective)."""
        self.wait()
        return self._on_rank0(lambda: CheckpointManager.sync(self, timeout))

    @property
    def saving(self) -> bool:
        """True while a background save is being written or recorded."""
        return self._inflight is not None and not self._inflight.done()

    def wait(self) -> None:
        """Block until the save in flight (if any) is committed; raise its error on this rank if it failed."""
        pending, self._inflight = self._inflight, None
        if pending is not None:
            pending.result()
        recording: BackgroundSaver | None = vars(self).get("_recording")  # rank 0's (followers have no manager)
        if recording is not None:
            recording.wait()  # a library's folder recorded on this rank (frameworks.record_folder)

    # ------------------------------------------------------------------------------------ preemption

    def _exit_if_preempted(self, step: int, finish_first: bool = False) -> None:
        """After a save, every rank agrees whether SIGTERM arrived anywhere; then all exit 143 together."""
        if self._sigterm.installed and self._any_preempted():
            if finish_first:
                self.wait()  # the async save in flight is the final checkpoint
            log.warning("rank %d: final checkpoint of step %d saved after SIGTERM; exiting with status 143",
                        self.rank, step)  # fmt: skip
            self.close("KILLED")
            raise SystemExit(EXIT_STATUS)

    def _exit_after_preemption(self, step: int) -> None:
        """The base class's exit (inside a single-process commit) does not apply: see _exit_if_preempted."""

    # -------------------------------------------------------------------------------------- loading

    def _decide(self, fn: Callable[[], T]) -> T:
        return self._on_rank0(fn)

    def _latest_candidates(self) -> Iterator[Resolved]:
        """Rank 0's candidates, one at a time, on every rank (a corrupt one makes all ranks move to the next)."""
        candidates: Iterator[Resolved] = self.recorder.latest_first() if self.rank == 0 else iter(())
        while (r := self._on_rank0(lambda: next(candidates, None))) is not None:
            yield r

    def _load_one(self, run_id: str, r: Resolved, state: TrainingState) -> dict[str, Any]:
        catalog = self.recorder.catalog_of(run_id)
        where = f"checkpoint {ref_for(run_id, r.path)} (step {r.manifest.step})"
        t0 = time.perf_counter()
        if r.manifest.format != "dcp":  # a single-process checkpoint: every rank loads the whole of it
            from ..loading import load_resolved

            err: BaseException | None = None
            try:
                load_resolved(catalog, r, state, self.recorder.cache_for(catalog, r), world_size=self.world_size)
            except Exception as e:  # any failure on one rank must reach every rank's _agree, or they hang
                err = e
            self._agree(err)
        else:
            with tempfile.TemporaryDirectory(prefix="tracked_ckpt-") as tmp:
                folder, err = Path(tmp), None
                try:
                    folder = catalog.fetch_verified(r, Path(tmp), self.recorder.cache_for(catalog, r))
                except Exception as e:  # likewise: a download that fails on one rank only
                    err = e
                self._agree(err)  # every rank verified its copy before any rank enters dcp.load
                load_dcp_folder(folder, r.manifest, state, where, self._ctl, self.rank)
        log.info("rank %d restored %s in %.2f s", self.rank, where, time.perf_counter() - t0)
        return dict(r.manifest.metadata)

    # ------------------------------------------------------------------------------------ lifecycle

    def close(self, status: str = "FINISHED") -> None:
        if self._closed:
            return
        failure: BaseException | None = None
        try:
            self.wait()
        except BaseException as e:
            failure = e
        self._bg.shutdown(wait=True)
        if self.rank == 0:
            super().close("FAILED" if failure is not None else status)
        self._closed = True
        if failure is not None:
            raise failure
