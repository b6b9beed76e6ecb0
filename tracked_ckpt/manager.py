"""CheckpointManager: the facade a training script talks to.

Example — a script that resumes where it stopped, every time it is launched::

    from tracked_ckpt import CheckpointManager, EveryNSteps, KeepLast, KeepBest

    with CheckpointManager("./training_checkpoints", experiment="cartpole",
                           save_policy=EveryNSteps(100), retention=KeepLast(3) | KeepBest(1)) as mgr:
        meta = mgr.load(model, optimizer)            # {} on the first launch
        step = meta.get("step", 0)
        while step < total_steps:
            step += 1
            reward = train_one_step(model, optimizer)
            if mgr.should_save(step):
                mgr.save(model, optimizer, {"step": step, "epoch": epoch, "reward": reward})

Which run, and what happens when its server is unreachable: session.py and runs.py. What a save records, and
how: recording/.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
import uuid
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Literal, TypeVar

from mlflow.tracking import MlflowClient

from .catalog import Resolved, RunCatalog
from .data import data_parts
from .distributed.ranks import current as current_ranks
from .distributed.ranks import node_of
from .errors import ConfigError, StoreError
from .local import LocalDir, checked_foreign
from .manifest import ARTIFACT_PREFIX
from .outbox import Outbox
from .policies import CheckpointInfo, RetentionPolicy, SavePolicy, check_mode
from .preemption import EXIT_STATUS, SigtermFlag
from .recording import RunRecorder
from .refs import Which, ref_for
from .restoring import Restorer
from .runtags import METRIC_BLOCKED_S
from .session import Options, RunSession, StoreFactory
from .snapshot import BackgroundSaver, StagingBuffers
from .state import Metadata, Stateful, TrainingState, gather, split_metadata
from .store.lease import DirLock
from .store.run_store import RunStore, redact

T = TypeVar("T")
K = TypeVar("K")
log = logging.getLogger(__name__)

Resume = Literal["auto", "never", "must"]


class CheckpointManager:
    """Save, find and restore training checkpoints recorded in an MLflow run.

    Args:
        save_dir: local directory for staging and the verified local copies (and the run pointer).
        experiment: MLflow experiment name for a new run (default: MLflow's own, ``MLFLOW_EXPERIMENT_NAME``
            or "Default"); created if missing.
        run_id: attach to this run (resume by run ID). Default: ``MLFLOW_RUN_ID``, then auto-discovery.
        tracking_uri: default: MLflow's own resolution (``MLFLOW_TRACKING_URI``, else ``sqlite:///mlflow.db``).
        resume: "auto" (continue the run found, else start fresh), "never" (always a new run),
            "must" (raise CheckpointNotFoundError unless a committed checkpoint exists).
        save_policy: decides ``should_save(step)``, e.g. ``EveryNSteps(100) | EveryInterval.hours(1)``.
        retention: what to keep, e.g. ``KeepLast(3) | KeepBest(1)``; None keeps everything.
        monitor, mode: the metric that defines "best" and its direction.
        save_rng: record Python/NumPy/torch RNG state in every checkpoint and restore it on load.
        async_save: ``save()`` returns once the state is copied to host memory (staging buffers reused across
            saves); the rest runs on a background thread. A second ``save()`` first waits for the one in
            flight; ``wait()``/``close()`` raise its SaveError if it failed.
        publish_timeout: the longest a save (and ``close()``) waits for MLflow to record it. A checkpoint is
            committed locally first; if MLflow is down, hung or failing, it waits in the outbox in ``save_dir``
            and is recorded in the background once the server answers (later saves of a known outage do not wait
            at all), by the next process, or by ``tracked-ckpt sync``. With the server unreachable at start, a run
            known locally (``run_id=``, ``MLFLOW_RUN_ID``, the pointer in ``save_dir``) resumes from ``save_dir``.
        save_on_sigterm: on SIGTERM (preemption), ``should_save()`` answers True; the next ``save()`` commits,
            closes the manager and exits with status 143 (under torchrun: on every rank, together).
        lease_timeout: seconds without a heartbeat after which another process may take over this run.
        store_factory: makes the run's storage seam, ``(client, run_id, *, connect=True) -> RunStore``; tests
            pass a subclass of ``RunStore`` that injects faults.
        fork_from: start a *new* run from this checkpoint of another run (``"RUN@best"``, ``"RUN@120"``,
            ``"runs:/RUN/checkpoints/NAME"``, ``"models:/NAME@ALIAS"``): the first ``load()`` restores it, the run
            records its parent, and a relaunch resumes the fork itself (lifecycle.py, docs/lifecycle.md).
        fork_metrics: with ``fork_from``, copy the parent's metric history up to the fork step into the new run.
        logged_models: make each recorded checkpoint an MLflow LoggedModel (the experiment's Models tab, the run
            page's models, ``models:/<model_id>``), with no copy of its weights (models.py); False: none.
    """

    def __init__(
        self,
        save_dir: str | os.PathLike[str] = "./checkpoints",
        *,
        experiment: str | None = None,
        run_id: str | None = None,
        run_name: str | None = None,
        tracking_uri: str | None = None,
        resume: Resume = "auto",
        save_policy: SavePolicy | None = None,
        retention: RetentionPolicy | None = None,
        monitor: str = "reward",
        mode: str = "max",
        save_rng: bool = True,
        async_save: bool = False,
        publish_timeout: float = 30.0,
        save_on_sigterm: bool = False,
        lease_timeout: float = 60.0,
        store_factory: StoreFactory = RunStore,
        fork_from: str | None = None,
        fork_metrics: bool = True,
        logged_models: bool = True,
    ) -> None:
        if resume == "never" and run_id is not None:
            raise ConfigError(f"resume='never' starts a new run, but run_id={run_id!r} was passed; drop one")
        self.options = Options(
            monitor=monitor, mode=check_mode(mode), resume=resume, save_policy=save_policy, retention=retention,
            save_rng=save_rng, publish_timeout=float(publish_timeout), lease_timeout=lease_timeout,
            store_factory=store_factory, logged_models=logged_models,
        )  # fmt: skip
        self.save_dir = Path(save_dir).expanduser().resolve()
        self.local = LocalDir(self.save_dir)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._server = redact(str(self.client.tracking_uri))
        self._closed = False
        self._started = time.time()
        self._last_save_time: float | None = None
        self._ranks = current_ranks()  # SingleProcess, or TorchRun under torchrun (distributed/ranks.py)
        self._lock = threading.Lock()  # the plan and the save context, read by the training thread, set by the saver
        self._saver = BackgroundSaver() if async_save else None
        self._recording = BackgroundSaver("tracked_ckpt-record")  # a library's folders (frameworks.record_folder)
        self._buffers = StagingBuffers()
        self._pending: CheckpointInfo | None = None  # the async save in flight, until it is recorded
        self._sigterm = SigtermFlag()
        self._session = RunSession(self.client, self.local, self.options)
        self._sharded: Any = None  # under torchrun: the ShardedWriter (distributed/sharded.py)
        # A node: the ranks sharing this save_dir on this host. Its lowest rank holds the save_dir (lock, outbox).
        self._node = node_of(self._ranks, self.save_dir)
        self._dir_lock = DirLock(self.save_dir) if self._node[0] == self._ranks.rank else None
        # Rank 0 alone decides which run and holds it (lease, status, records); the others join its run.
        try:
            opened = self._ranks.on_rank0(lambda: self._open(run_id, experiment, run_name, fork_from, fork_metrics))
            if self._ranks.distributed:  # the other ranks join rank 0's run; each node's leader its save_dir
                from .distributed.sharded import join_ranks

                self._sharded = join_ranks(self._ranks, self._session, opened, self._node,  # type: ignore[arg-type]
                                           self.options.save_rng)  # fmt: skip
            if save_on_sigterm:
                self._sigterm.install()
            atexit.register(self._close_at_exit)
        except BaseException:
            self._abandon()  # e.g. resume="must" with no checkpoint: leave no lock, lease or thread behind
            raise

    def _open(self, run_id: str | None, experiment: str | None, run_name: str | None, fork_from: str | None,
              fork_metrics: bool) -> str:  # fmt: skip
        self._session.open(run_id, experiment, run_name, fork_from, fork_metrics)
        self.local.sweep_staging(max_age_s=0)  # we hold the save_dir lock: any staging folder is a dead save's
        log.info("run %s (%s) at %s, save_dir %s", self.run_id, self._session.how, self._server, self.save_dir)
        return self.run_id

    @property
    def run_id(self) -> str:
        return self.store.run_id

    @property
    def store(self) -> RunStore:
        """The storage seam of this run (``store_factory``'s)."""
        return self._session.store

    @property
    def recorder(self) -> RunRecorder:
        """The recording pipeline: index, outbox, publisher, retention."""
        return self._session.recorder

    @property
    def outbox(self) -> Outbox:
        """The durable queue of checkpoints committed locally and not yet recorded in MLflow."""
        return self.recorder.outbox

    @property
    def catalog(self) -> RunCatalog:
        """This run's checkpoints as MLflow records them (the read side, catalog.py)."""
        return self.recorder.catalog

    # ------------------------------------------------------------------------------------------ saving

    def should_save(self, step: int, metrics: Mapping[str, float] | None = None) -> bool:
        """Ask the save policy (default: always True) whether to save at ``step``; True after SIGTERM.

        Under torchrun, rank 0's answer on every rank (a time-based policy would otherwise disagree).
        """
        if self.options.save_policy is None or self._preempted():
            return True
        return self._ranks.on_rank0(lambda: self._should_save(step, metrics))

    def _should_save(self, step: int, metrics: Mapping[str, float] | None) -> bool:
        assert self.options.save_policy is not None
        with self._lock:  # an async save in flight counts as saved
            ctx = self.recorder.save_context(step, metrics, self._pending, self._last_save_time or self._started)
        return self.options.save_policy.should_save(ctx)

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
        """Save a checkpoint locally, then record it in the MLflow run. Returns its ``runs:/`` reference.

        ``metadata`` numbers (epoch, step/steps, reward, loss, samples, tokens, ...) become MLflow metrics at the
        step; other JSON-able values go in the manifest and come back from ``load()``. ``data`` (or a torchdata
        ``StatefulDataLoader``/HF ``IterableDataset`` in ``extra``) is the data position, saved per rank (data.py).
        Under torchrun every rank calls it; each writes its shard (distributed/sharded.py).
        """
        meta, state = self._begin_save(model, optimizer, metadata, scheduler, scaler, extra, data)
        t0 = time.perf_counter()
        name, fields, token = self._ranks.on_rank0(lambda: self._plan(meta, step))
        step, seq, path = fields["step"], fields["seq"], f"{ARTIFACT_PREFIX}/{name}"
        background = self._saver is not None
        rest = self._stage(name, token, fields, state, background, t0)
        if not background:
            rest()
            self._last_save_time = time.time()
            if self._ranks.is_rank0:
                self.recorder.note_late_cost(step, METRIC_BLOCKED_S, time.perf_counter() - t0)
            self._exit_if_preempted(step)
            return ref_for(self.run_id, path)
        assert self._saver is not None
        with self._lock:
            self._pending = CheckpointInfo(path, step, seq, time.time(), meta.metrics)
            self._last_save_time = time.time()
        log.debug("step %d staged in %.3f s; saving it in the background", step, time.perf_counter() - t0)

        def job() -> None:
            try:
                rest()
                self._last_save_time = time.time()
            finally:
                with self._lock:
                    self._pending = None  # recorded in the index by now, or failed (wait() reports it)

        if self._ranks.is_rank0:
            self.recorder.note_cost(seq, METRIC_BLOCKED_S, time.perf_counter() - t0)
        self._saver.submit(step, job)
        self._exit_if_preempted(step)  # SIGTERM: finish this save, then exit as a synchronous save does
        return ref_for(self.run_id, path)

    def _plan(self, meta: Metadata, step: int | None) -> tuple[str, dict[str, Any], str]:
        """Rank 0's decision: the checkpoint's folder name, its fields and the staging folder every rank writes."""
        with self._lock:
            name, fields = self.recorder.plan(meta, step)
        return name, fields, uuid.uuid4().hex

    def _stage(self, name: str, token: str, fields: dict[str, Any], state: TrainingState, background: bool,
               t0: float) -> Callable[[], None]:  # fmt: skip
        """Take what the save needs from the training state now; return the rest (written, committed, recorded)."""
        if self._sharded is not None:
            stage: Callable[[], None] = self._sharded.stage(name, token, fields, state, background, t0)
            return stage
        payload, rng_json = gather(state, rng=self.options.save_rng)
        if background:
            payload = self._buffers.copy(payload)  # the state as of this call, while training goes on
        return lambda: self._commit_state(name, payload, rng_json, fields, t0)

    def _begin_save(
        self, model: Stateful | None, optimizer: Stateful | None, metadata: Mapping[str, Any] | None,
        scheduler: Stateful | None, scaler: Stateful | None, extra: Mapping[str, Stateful] | None,
        data: Stateful | Mapping[str, Stateful] | None = None,
    ) -> tuple[Metadata, TrainingState]:  # fmt: skip
        """Check the arguments of a save; wait for the one in flight (at most one: its buffers are reused)."""
        self._check_open()
        meta = split_metadata(metadata)
        state = TrainingState(model, optimizer, scheduler, scaler, dict(extra or {}), data_parts(data))
        if not state.parts():
            raise ConfigError("save() got nothing to save: pass a model, an optimizer or extra= state")
        self.wait()
        return meta, state

    def _commit_state(self, name: str, payload: Mapping[str, Any], rng_json: Mapping[str, Any],
                      fields: Mapping[str, Any], t0: float) -> None:  # fmt: skip
        """Stage a single-process state (model.pt, state.pt), then the one commit."""
        t1 = time.perf_counter()
        staging, manifest = self.local.stage(self.run_id, payload, rng_json, fields)
        self.recorder.commit(staging, name, manifest, t0, since=t1)

    # ----------------------------------------------------------------------------------------- loading

    def load(
        self,
        model: Stateful | None = None,
        optimizer: Stateful | None = None,
        checkpoint_path: str | os.PathLike[str] | None = None,
        *,
        which: Which = "latest",
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        extra: Mapping[str, Stateful] | None = None,
        data: Stateful | Mapping[str, Stateful] | None = None,
        skip_data: bool = False,
    ) -> dict[str, Any]:
        """Restore a checkpoint into the objects passed; return its metadata ({} when there is none yet).

        ``checkpoint_path`` takes a reference returned by ``save()``; otherwise ``which`` picks
        "latest" (falling back past checkpoints that fail verification), "best" or a step number.
        The data position (``data``, loaders in ``extra``) is restored only at the world size it was saved at
        (else DataPositionMismatchError, nothing changed); ``skip_data=True`` restores everything else and
        leaves the loaders where they are (the epoch restarts).
        """
        self._check_open()
        self.wait()
        state = TrainingState(model, optimizer, scheduler, scaler, dict(extra or {}), data_parts(data))
        if skip_data and state.positions():
            log.info("skip_data: the data position (%s) is not restored", ", ".join(sorted(state.positions())))
            state = state.without_positions()
        restorer = Restorer(self._ranks, self.recorder, self.local, self.options.resume)
        return restorer.load(state, None if checkpoint_path is None else str(checkpoint_path), which)

    def get_latest_checkpoint(self) -> str | None:
        """The ``runs:/`` reference of the latest committed checkpoint, or None."""
        self.wait()
        r = next(self.recorder.latest_first(), None)
        return ref_for(self.run_id, r.path) if r else None

    def get_best_checkpoint(self) -> str | None:
        """The ``runs:/`` reference of the best checkpoint by ``monitor``/``mode``, or None."""
        self.wait()
        r = self.recorder.best()
        return ref_for(self.run_id, r.path) if r else None

    def checkpoints(self) -> Any:
        """A pandas DataFrame, one row per committed checkpoint of this run (see ``list_checkpoints``)."""
        from .views import checkpoints_frame

        self.wait()
        o, client = self.options, self.client if self.store.connected else None
        return checkpoints_frame(self.run_id, self.recorder.committed(), o.monitor, o.mode, client)

    # ------------------------------------------------------------ a library's own checkpoints (frameworks/)

    def record_folder(
        self, folder: str | os.PathLike[str], metadata: Mapping[str, Any] | None = None, *, format: str = "folder",
        step: int | None = None, files: list[tuple[str, Path]] | None = None,
    ) -> str:  # fmt: skip
        """Record ``folder``, a checkpoint another library wrote (``format``), in this run; returns its reference.

        ``files``: the (name, path) pairs to record (default: every file under ``folder``); ``metadata`` as for
        ``save()``. Returns once the files are hard-linked into ``save_dir`` (the library may rotate them away);
        the commit and the record follow on the recording thread: ``wait()`` waits for them and raises their error.
        """
        src = Path(folder)
        found = checked_foreign(src, files, format)
        self._check_open()
        self.wait()  # the save in flight (an async save of the manager's own, or the previous folder): one at a time
        t0 = time.perf_counter()
        name, fields = self.recorder.plan(split_metadata(metadata), step)
        staging, names = self.local.link_foreign(found, src)

        def commit() -> None:
            t1 = time.perf_counter()
            manifest = self.local.stage_foreign(self.run_id, staging, names, fields, format)
            self.recorder.commit(staging, name, manifest, t0, since=t1)

        self._recording.submit(fields["step"], commit)
        self._last_save_time = time.time()
        return ref_for(self.run_id, f"{ARTIFACT_PREFIX}/{name}")

    def delete_removed(self, recorded: dict[K, str], removed: Callable[[K], bool]) -> None:
        """Delete from the run each recorded checkpoint whose source the library removed (``removed(key)``).

        ``recorded`` maps the library's name for a checkpoint to its path; entries deleted are dropped from it. Runs
        on the recording thread behind the save in flight, without waiting; with MLflow unreachable a deletion
        waits for the next call (a warning): the training loop never fails on it.
        """

        def delete() -> None:
            for key, path in list(recorded.items()):
                if not removed(key):
                    continue
                try:
                    self.recorder.delete(path)
                except StoreError as e:
                    log.warning("run %s: could not delete %s, which the library removed (%s); retrying after the "
                                "next save", self.run_id, path, e)  # fmt: skip
                    continue
                recorded.pop(key, None)

        self._recording.submit(-1, delete, wait=False)

    def committed(self) -> list[Resolved]:
        """Every committed checkpoint of this run (recorded, or queued while MLflow is out), in commit order."""
        self.wait()
        return self.recorder.committed()

    # --------------------------------------------------------------------------------------- lifecycle

    def wait(self) -> None:
        """Block until the async save in flight (if any) is recorded; raise its SaveError if it failed.

        Reads (``load``, ``get_latest_checkpoint``, ``checkpoints``, ...) wait first, so they see every save.
        """
        if self._saver is not None:
            self._saver.wait()
        self._recording.wait()

    @property
    def saving(self) -> bool:
        """True while a background save is being written or recorded."""
        return self._saver is not None and self._saver.busy

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until every checkpoint queued in the outbox is recorded in MLflow; False after ``timeout``."""
        self.wait()
        limit = self.options.publish_timeout if timeout is None else timeout
        mine = self.recorder.drain(limit) if self._dir_lock is not None else True  # each node drains its own outbox
        return all(self._ranks.gather(mine))

    def close(self, status: str = "FINISHED") -> None:
        """Finish the save in flight, mark the run ended (unless it is the user's own ``mlflow.start_run()``).

        Idempotent. Raises the SaveError of a background save that failed and was not yet reported.
        """
        if self._closed:
            return
        self._closed = True
        failure = self._saver.close() if self._saver is not None else None  # drain the save in flight
        failure = failure or self._recording.close()
        self._buffers.clear()
        atexit.unregister(self._close_at_exit)
        self._session.close("FAILED" if failure is not None else status, leads_node=self._dir_lock is not None)
        if self._dir_lock is not None:
            self._dir_lock.release()
        if failure is not None:
            raise failure

    def _abandon(self) -> None:
        """Undo a half-finished __init__."""
        session: RunSession | None = vars(self).get("_session")
        if session is not None:
            session.abandon()
        if self._dir_lock is not None:
            self._dir_lock.discard()  # a save_dir made for this manager and left empty goes too

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as e:  # at interpreter exit: report, never mask the real outcome
            log.error("closing %r at exit: %s", self, e)

    # ------------------------------------------------------------------------------------ preemption

    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived (with ``save_on_sigterm=True``)."""
        return self._sigterm.raised

    def _preempted(self) -> bool:
        """True once SIGTERM reached this process, or (under torchrun) any rank: torchrun signals each rank
        at a slightly different instant, and the ranks must agree to save one final checkpoint together."""
        return self._sigterm.installed and self._ranks.any(self._sigterm.raised)

    def _exit_if_preempted(self, step: int) -> None:
        """After a save: if SIGTERM arrived (anywhere), finish the save in flight, close, exit with status 143."""
        if self._preempted():
            self.wait()  # an async save in flight is the final checkpoint
            log.warning("final checkpoint of step %d saved after SIGTERM; exiting with status %d", step, EXIT_STATUS)
            self.close("KILLED")
            raise SystemExit(EXIT_STATUS)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"this CheckpointManager (run {self.run_id}) is closed; create a new one to resume")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED")

    def __repr__(self) -> str:
        return f"CheckpointManager(run_id={self.run_id!r}, save_dir={str(self.save_dir)!r}, server={self._server!r})"

