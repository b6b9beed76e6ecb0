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

The run is found, in order, from ``run_id=``, ``MLFLOW_RUN_ID``, an active ``mlflow.start_run()`` run, the
pointer file in ``save_dir``, and the run tagged with this ``save_dir``; otherwise a new run is created
(see runs.py).
"""

from __future__ import annotations

import atexit
import logging
import os
import signal
import threading
import time
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, Literal

from mlflow.tracking import MlflowClient

from .catalog import Resolved, RunCatalog, Which, parse_ref, ref_for
from .errors import CheckpointNotFoundError, ConfigError, StoreError
from .lease import DirLock, Lease
from .loading import load_latest_verified, load_resolved
from .local import LocalDir
from .manifest import ARTIFACT_PREFIX, MANIFEST_NAME, Manifest
from .policies import CheckpointInfo, RetentionPolicy, SaveContext, SavePolicy, best_of, check_mode
from .recorder import RunRecorder, fields_of
from .runs import FoundRun, find_run, known_locally
from .runtags import NOTE_MARK, TAG_BEST, TAG_LATEST, TAG_MONITOR, TAG_NOTE, monitor_value
from .snapshot import BackgroundSaver, StagingBuffers
from .state import Stateful, TrainingState, gather, split_metadata
from .store import RunStore, redact

StoreFactory = Callable[..., RunStore]  # (client, run_id, *, connect=True) -> RunStore
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
        publish_timeout: the longest a save (and ``close()``) waits for MLflow. A checkpoint is committed
            locally first; if MLflow is down, hung or failing, its upload waits in the outbox in ``save_dir``
            and is retried in the background, by the next process, or by ``tracked-ckpt sync``.
        save_on_sigterm: on SIGTERM (preemption), ``should_save()`` answers True; the next ``save()`` commits,
            closes the manager and exits with status 143.
        lease_timeout: seconds without a heartbeat after which another process may take over this run.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> CheckpointManager:
        # Under torchrun (torch.distributed initialized) the same API saves sharded DCP checkpoints.
        # Importing torch.distributed.checkpoint costs ~2 s: only when a process group is really up.
        if cls is CheckpointManager and _distributed_active():
            from .distributed import manager_class

            cls = manager_class()
        return super().__new__(cls)

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
    ) -> None:
        if resume not in ("auto", "never", "must"):
            raise ConfigError(f"resume={resume!r}: pass 'auto', 'never' or 'must'")
        if resume == "never" and run_id is not None:
            raise ConfigError(f"resume='never' starts a new run, but run_id={run_id!r} was passed; drop one")
        if save_policy is not None and not isinstance(save_policy, SavePolicy):
            raise ConfigError(f"save_policy={save_policy!r} has no should_save(ctx); use e.g. EveryNSteps(100)")
        if retention is not None and not isinstance(retention, RetentionPolicy):
            raise ConfigError(f"retention={retention!r} has no keep(...); use e.g. KeepLast(3)")
        if not publish_timeout >= 0:
            raise ConfigError(f"publish_timeout={publish_timeout!r}: pass a number of seconds >= 0")
        self.mode = check_mode(mode)
        self.monitor = monitor
        self.resume = resume
        self.save_policy = save_policy
        self.retention = retention
        self.save_rng = save_rng
        self.publish_timeout = float(publish_timeout)
        self.save_dir = Path(save_dir).expanduser().resolve()
        self.local = LocalDir(self.save_dir)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._server = redact(str(self.client.tracking_uri))
        self._store_factory = store_factory
        self._closed = False
        self._owns_run_status = True
        self._started = time.time()
        self._last_save_time: float | None = None
        self._saver = BackgroundSaver() if async_save else None
        self._buffers = StagingBuffers()
        self._pending: CheckpointInfo | None = None  # the async save in flight, until it is recorded
        self._preempted = False
        self._dir_lock = DirLock(self.save_dir)
        self._lease_timeout = lease_timeout
        try:
            self._open(run_id, experiment, run_name)
            if resume == "must" and not self.recorder.index:
                raise CheckpointNotFoundError(
                    f"resume='must' but run {self.run_id} ({self._how}) has no committed checkpoint at {self._server}"
                    " (nor in save_dir); check run_id / save_dir, or use resume='auto' to start from scratch"
                )
            self._next_seq = self.recorder.next_seq()
            self.local.sweep_staging(max_age_s=0)  # we hold the save_dir lock: any staging folder is a dead save's
            if save_on_sigterm:
                self._install_sigterm()
            atexit.register(self._close_at_exit)
            log.info("run %s (%s) at %s, save_dir %s", self.run_id, self._how, self._server, self.save_dir)
        except BaseException:
            self._abandon()  # e.g. resume="must" with no checkpoint: leave no lock, lease or thread behind
            raise

    # ---------------------------------------------------------------------------------------- the run

    @property
    def run_id(self) -> str:
        return self.store.run_id

    @property
    def outbox(self) -> Any:
        """The durable queue of checkpoints committed locally and not yet recorded in MLflow."""
        return self.recorder.outbox

    @property
    def catalog(self) -> RunCatalog:
        return self.recorder.catalog

    def _open(self, run_id: str | None, experiment: str | None, run_name: str | None) -> None:
        """Find the run and attach to it; when the server is unreachable, start from save_dir and record later."""
        try:
            found = find_run(self.client, self._server, self.local, run_id=run_id, experiment=experiment,
                             run_name=run_name, new_only=self.resume == "never")  # fmt: skip
        except StoreError as e:
            if not e.transient:
                raise
            self._open_offline(known_locally(self.client, self._server, self.local, run_id, e), e)
            return
        self._owns_run_status, self._how = found.owns_status, found.how
        try:
            self._open_online(found)
        except StoreError as e:
            if not e.transient:
                raise
            self._release_partial()
            self._open_offline(found, e)

    def _open_online(self, found: FoundRun) -> None:
        self.store = self._store_factory(self.client, found.run_id)
        # The save_dir lock is held already, so a holder that wrote through this save_dir is gone.
        self._lease = Lease(self.store, self.save_dir, interval=max(1.0, self._lease_timeout / 4),
                            timeout=self._lease_timeout)  # fmt: skip
        self._lease.acquire(self.store.tags_at_open)
        self.recorder = self._recorder()
        if found.how != "new":
            self.recorder.recover()
        others = {p.run_id for p in self.recorder.outbox.pending()} - {found.run_id}
        if others:
            log.warning("%s holds queued checkpoints of other runs %s: `tracked-ckpt sync %s` uploads them",
                        self.recorder.outbox.dir, sorted(others), self.save_dir)  # fmt: skip
        self.local.write_pointer(found.run_id, self._server, self.store.experiment_id)
        self._attach()

    def _open_offline(self, found: FoundRun, cause: StoreError) -> None:
        """The server is unreachable: resume from the verified local copies; the rest waits for the server."""
        self._owns_run_status, self._how = found.owns_status, f"{found.how}, offline"
        self.store = self._store_factory(self.client, found.run_id, connect=False)
        self._lease = Lease(self.store, self.save_dir, interval=max(1.0, self._lease_timeout / 4),
                            timeout=self._lease_timeout)  # fmt: skip
        self.recorder = self._recorder(on_connect=self._attach_late)
        self.recorder.recover_offline()
        self.recorder.publisher.note_outage()
        log.warning(
            "MLflow at %s is unreachable (%s): resuming run %s from the %d checkpoint(s) committed in %s. Saves are "
            "committed locally and queued; they, the run's status and its note are recorded once the server answers",
            self._server, cause, found.run_id, len(self.recorder.index), self.save_dir,
        )  # fmt: skip

    def _recorder(self, on_connect: Callable[[], None] | None = None) -> RunRecorder:
        return RunRecorder(self.store, self.local, monitor=self.monitor, mode=self.mode, retention=self.retention,
                           publish_timeout=self.publish_timeout, on_connect=on_connect)  # fmt: skip

    def _attach_late(self) -> None:
        """The server answered after an offline start (publisher thread): what _open_online does first."""
        self._lease.acquire(self.store.tags_at_open)
        self.local.write_pointer(self.run_id, self._server, self.store.experiment_id)
        self._attach()

    def _attach(self) -> None:
        if not self._how.startswith("new") and self._owns_run_status:
            self.store.set_status("RUNNING")
        note = self.store.tags_at_open.get(TAG_NOTE)
        if note is None or note.startswith(NOTE_MARK):
            self.store.set_tags({TAG_NOTE: self._note(), TAG_MONITOR: monitor_value(self.monitor, self.mode)})

    def _release_partial(self) -> None:
        """Undo an online attach that the server broke off half-way (before going offline)."""
        recorder: RunRecorder | None = vars(self).pop("recorder", None)
        lease: Lease | None = vars(self).pop("_lease", None)
        if recorder is not None:
            recorder.stop()
        if lease is not None:
            lease.stop()

    def _note(self) -> str:
        r = self.run_id
        return (
            f"{NOTE_MARK}\n### Checkpoints (tracked_ckpt)\n"
            f"Checkpoints of this run are the artifact folders under `{ARTIFACT_PREFIX}/`; the tags "
            f"`{TAG_LATEST}` and `{TAG_BEST}` name the latest and the best (by `{self.monitor}`, {self.mode}).\n\n"
            f"**Resume this run** from Python:\n\n```python\nfrom tracked_ckpt import CheckpointManager\n"
            f'mgr = CheckpointManager("{self.save_dir.name}", run_id="{r}")\n'
            "metadata = mgr.load(model, optimizer)\n```\n\n"
            f'or load its best checkpoint: `tracked_ckpt.load("{r}", model, which="best")`.\n\n'
            f"From the shell: `tracked-ckpt ls {r}` · `tracked-ckpt pull {r} -o ./ckpt` · "
            f"`MLFLOW_RUN_ID={r} python train.py`\n"
        )

    # ------------------------------------------------------------------------------------------ saving

    def should_save(self, step: int, metrics: Mapping[str, float] | None = None) -> bool:
        """Ask the save policy (default: always True) whether to save at ``step``; True after SIGTERM."""
        if self.save_policy is None or self._preempted:
            return True
        pending = self._pending  # an async save in flight counts as saved; read before the index
        known = list(self.recorder.index.values()) + ([pending] if pending is not None else [])
        latest = max(known, key=lambda c: c.seq, default=None)
        best = best_of(known, self.monitor, self.mode)
        ctx = SaveContext(
            step=step,
            now=time.time(),
            metrics=dict(metrics or {}),
            last_step=latest.step if latest else None,
            last_time=self._last_save_time or self._started,
            best_value=best.metrics.get(self.monitor) if best else None,
            metric=self.monitor,
            mode=self.mode,
        )
        return self.save_policy.should_save(ctx)

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
    ) -> str:
        """Save a checkpoint locally, then record it in the MLflow run. Returns its ``runs:/`` reference.

        ``metadata`` numbers (epoch, step/steps, reward, loss, ...) become MLflow metrics at the step;
        other JSON-able values go in the manifest and come back from ``load()``.
        """
        self._check_open()
        meta = split_metadata(metadata)
        state = TrainingState(model, optimizer, scheduler, scaler, dict(extra or {}))
        if not state.parts():
            raise ConfigError("save() got nothing to save: pass a model, an optimizer or extra= state")
        t0 = time.perf_counter()
        self.wait()  # at most one save in flight: its buffers are reused, its result names this one's seq
        latest_step = self._latest_step()
        seq = self._next_seq
        self._next_seq += 1
        step = step if step is not None else meta.step if meta.step is not None else seq
        payload, rng_json = gather(state, rng=self.save_rng)
        name = self.recorder.reserve(step, seq)
        fields = fields_of(step, seq, meta, self.recorder.resumed_from)
        path = f"{ARTIFACT_PREFIX}/{name}"
        if self._saver is None:
            self._commit(name, payload, rng_json, fields, latest_step, t0)
            return ref_for(self.run_id, path)
        payload = self._buffers.copy(payload)  # the state as of this call, while training goes on
        self._pending = CheckpointInfo(path, step, seq, time.time(), meta.metrics)
        self._last_save_time = time.time()
        log.debug("step %d copied to host memory in %.3f s; saving it in the background", step,
                  time.perf_counter() - t0)  # fmt: skip

        def job() -> None:
            try:
                self._commit(name, payload, rng_json, fields, latest_step, t0)
            finally:
                self._pending = None  # recorded in the index by now, or failed (wait() reports it)

        self._saver.submit(step, job)
        if self._preempted:  # SIGTERM: finish this save, then exit as a synchronous save does
            self.wait()
            self._exit_after_preemption(step)
        return ref_for(self.run_id, path)

    def _latest_step(self) -> int | None:
        index = self.recorder.index
        return max(index.values(), key=lambda c: c.seq).step if index else None

    def _commit(
        self,
        name: str,
        payload: Mapping[str, Any],
        rng_json: Mapping[str, Any],
        fields: Mapping[str, Any],
        latest_step: int | None,
        t0: float,
    ) -> None:
        """Commit locally, then hand to the recorder: what ``async_save`` runs on the worker thread."""
        step, seq = fields["step"], fields["seq"]
        queue = self.recorder.queue(name, step, seq, fields["created"])
        folder, manifest = self.local.write(self.run_id, name, payload, rng_json, fields, before_commit=queue)
        recorded = self.recorder.record(step, seq, folder)
        self._last_save_time = time.time()
        log.info(
            "saved step %d to %s (%.1f MB) in %.2f s%s", step, ref_for(self.run_id, f"{ARTIFACT_PREFIX}/{name}"),
            manifest.size / 1e6, time.perf_counter() - t0, "" if recorded else "; queued for MLflow (see outbox)",
        )  # fmt: skip
        if latest_step is not None and step < latest_step:
            log.info("step %d is below the previous latest step %d: this checkpoint is now the latest", step,
                     latest_step)  # fmt: skip
        if self._preempted and self._saver is None:  # async: save() exits on the training thread instead
            self._exit_after_preemption(step)

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
    ) -> dict[str, Any]:
        """Restore a checkpoint into the objects passed; return its metadata ({} when there is none yet).

        ``checkpoint_path`` takes a reference returned by ``save()``; otherwise ``which`` picks
        "latest" (falling back past checkpoints that fail verification), "best" or a step number.
        """
        self._check_open()
        self.wait()
        state = TrainingState(model, optimizer, scheduler, scaler, dict(extra or {}))
        if checkpoint_path is not None:
            catalog, r = self._resolve_ref(str(checkpoint_path))
            metadata = load_resolved(catalog, r, state, self._cache_for(catalog, r))
        elif which == "latest":
            got = load_latest_verified(
                self.catalog, state, lambda r: self._cache_for(self.catalog, r), self._latest_first()
            )
            if got is None:
                if self.resume == "must":
                    raise CheckpointNotFoundError(f"resume='must' but run {self.run_id} has no committed checkpoint")
                log.info("no checkpoint in run %s yet: starting from scratch", self.run_id)
                return {}
            r, metadata = got
        else:
            catalog, r = self.catalog, self._resolve_which(which)
            metadata = load_resolved(catalog, r, state, self._cache_for(catalog, r))
        if r.manifest.run_id == self.run_id:
            self.recorder.resumed_from = r.path
        return metadata

    def _latest_first(self) -> Iterator[Resolved]:
        """Candidates for "latest", newest first: never older than a checkpoint committed in save_dir.

        Checkpoints still queued (committed locally, not yet recorded) come before MLflow's latest when newer;
        with the server unreachable, the local copies are all there is.
        """
        if not self.store.connected:
            yield from reversed(self.recorder.local_committed())
            return
        queued = {f"{ARTIFACT_PREFIX}/{p.name}" for p in self.outbox.pending(self.run_id)}
        local = [r for r in reversed(self.recorder.local_committed()) if r.path in queued]
        try:
            remote = self.catalog.candidates_latest_first()
            first = next(remote, None)
        except StoreError as e:
            if not e.transient:
                raise
            log.warning("MLflow at %s is unreachable (%s): resolving 'latest' from the copies in %s", self._server, e,
                        self.save_dir)  # fmt: skip
            yield from reversed(self.recorder.local_committed())
            return
        yield from (r for r in local if first is None or r.manifest.seq > first.manifest.seq)
        if first is not None:
            yield first
            yield from remote

    def _resolve_which(self, which: Which) -> Resolved:
        if self.store.connected:
            return self.catalog.resolve(which, self.monitor, self.mode)
        local = self.recorder.local_committed()  # offline: the copies in save_dir
        if which == "best":
            chosen = best_of([r.info for r in local], self.monitor, self.mode)
            hit = next((r for r in local if chosen is not None and r.path == chosen.path), None)
        else:
            hit = next((r for r in reversed(local) if r.manifest.step == which), None)
        if hit is None:
            raise CheckpointNotFoundError(
                f"run {self.run_id}: MLflow at {self._server} is unreachable and {self.save_dir} holds no committed "
                f"checkpoint ({which}); retry once the server answers"
            )
        return hit

    def _resolve_ref(self, ref: str) -> tuple[RunCatalog, Resolved]:
        if ref.startswith("runs:/"):
            run_id, path = parse_ref(ref)
        elif ref.startswith(f"{ARTIFACT_PREFIX}/"):
            run_id, path = self.run_id, ref
        else:
            local = (
                Manifest.from_json((Path(ref) / MANIFEST_NAME).read_bytes(), str(Path(ref) / MANIFEST_NAME))
                if (Path(ref) / MANIFEST_NAME).is_file()
                else None
            )
            if local is None:
                raise CheckpointNotFoundError(
                    f"checkpoint_path={ref!r} is neither a 'runs:/...' reference nor a checkpoint folder with a "
                    f"{MANIFEST_NAME}; pass what save() returned or get_latest_checkpoint() gives"
                )
            run_id, path = local.run_id, f"{ARTIFACT_PREFIX}/{Path(ref).name}"
        if run_id == self.run_id:
            mine = next((r for r in self.recorder.local_committed() if r.path == path), None)
            if mine is not None and (not self.store.connected or self._is_queued(path)):
                return self.catalog, mine  # not in MLflow yet (queued): the verified local copy
        catalog = self.catalog if run_id == self.run_id else RunCatalog(RunStore(self.client, run_id))
        return catalog, Resolved(path, catalog.manifest(path))

    def _is_queued(self, path: str) -> bool:
        return any(f"{ARTIFACT_PREFIX}/{p.name}" == path for p in self.outbox.pending(self.run_id))

    def _cache_for(self, catalog: RunCatalog, r: Resolved) -> Path | None:
        folder = self.local.folder(catalog.run_id, r.path.rpartition("/")[2])
        return folder if folder.is_dir() else None

    def get_latest_checkpoint(self) -> str | None:
        """The ``runs:/`` reference of the latest committed checkpoint, or None."""
        self.wait()
        r = next(self._latest_first(), None)
        return ref_for(self.run_id, r.path) if r else None

    def get_best_checkpoint(self) -> str | None:
        """The ``runs:/`` reference of the best checkpoint by ``monitor``/``mode``, or None."""
        self.wait()
        try:
            r = self._resolve_which("best")
        except CheckpointNotFoundError:
            return None
        return ref_for(self.run_id, r.path)

    def checkpoints(self) -> Any:
        """A pandas DataFrame, one row per committed checkpoint of this run (see ``list_checkpoints``)."""
        from .views import checkpoints_frame

        self.wait()
        found = self.catalog.scan() if self.store.connected else []
        recorded = {r.path for r in found}
        local = [r for r in self.recorder.local_committed() if r.path not in recorded]
        queued = {f"{ARTIFACT_PREFIX}/{p.name}" for p in self.outbox.pending(self.run_id)}
        extra = [r for r in local if r.path in queued or not self.store.connected]
        rows = sorted(found + extra, key=lambda r: r.manifest.seq)
        return checkpoints_frame(self.run_id, rows, self.monitor, self.mode)

    # --------------------------------------------------------------------------------------- lifecycle

    def wait(self) -> None:
        """Block until the async save in flight (if any) is recorded; raise its SaveError if it failed.

        Reads (``load``, ``get_latest_checkpoint``, ``checkpoints``, ...) wait first, so they see every save.
        """
        if self._saver is not None:
            self._saver.wait()

    def sync(self, timeout: float | None = None) -> bool:
        """Wait until every checkpoint queued in the outbox is recorded in MLflow; False after ``timeout``."""
        self.wait()
        return self.recorder.drain(self.publish_timeout if timeout is None else timeout)

    def close(self, status: str = "FINISHED") -> None:
        """Finish the save in flight, mark the run ended (unless it is the user's own ``mlflow.start_run()``).

        Idempotent. Raises the SaveError of a background save that failed and was not yet reported.
        """
        if self._closed:
            return
        self._closed = True
        failure = self._saver.close() if self._saver is not None else None  # drain the save in flight
        self._buffers.clear()
        atexit.unregister(self._close_at_exit)
        drained = self.recorder.drain(self.publish_timeout)
        connected = self.recorder.attached
        self.recorder.stop()
        if not drained:
            log.warning("MLflow at %s did not record every checkpoint in time: they stay queued in %s and are "
                        "uploaded by the next process on this run or `tracked-ckpt sync %s`",
                        self._server, self.outbox.dir, self.save_dir)  # fmt: skip
        # Bounded: against a hung server, MLflow's own retries would stall these calls for minutes.
        final = "FAILED" if failure is not None else status

        def finish() -> None:
            if self._owns_run_status:
                try:
                    self.store.set_status(final)
                except StoreError as e:  # at interpreter exit, a failure to mark the run must not mask the outcome
                    log.debug("could not mark run %s %s: %s", self.run_id, final, e)
            self._lease.release()

        if connected:  # after an offline start that never reached the server, there is nothing to mark
            _bounded(finish, 1.0 if not drained else max(1.0, self.publish_timeout))
        else:
            self._lease.stop()
        self._dir_lock.release()
        if failure is not None:
            raise failure

    def _abandon(self) -> None:
        """Undo a half-finished __init__."""
        recorder: RunRecorder | None = vars(self).get("recorder")
        lease: Lease | None = vars(self).get("_lease")
        if recorder is not None:
            recorder.stop()
        if lease is not None:
            _bounded(lease.release, 2.0)
        self._dir_lock.release()

    def _close_at_exit(self) -> None:
        try:
            self.close()
        except Exception as e:  # at interpreter exit: report, never mask the real outcome
            log.error("closing %r at exit: %s", self, e)

    # ------------------------------------------------------------------------------------ preemption

    @property
    def preempted(self) -> bool:
        """True once SIGTERM arrived (with ``save_on_sigterm=True``)."""
        return self._preempted

    def _install_sigterm(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            raise ConfigError("save_on_sigterm=True needs the manager to be created in the main thread")
        previous = signal.getsignal(signal.SIGTERM)

        def handler(signum: int, frame: Any) -> None:
            # Only a flag: saving inside a signal handler could catch the optimizer mid-update.
            log.warning("SIGTERM received: saving a final checkpoint at the next should_save()/save(), then exiting")
            self._preempted = True
            if callable(previous):
                previous(signum, frame)

        signal.signal(signal.SIGTERM, handler)

    def _exit_after_preemption(self, step: int) -> None:
        log.warning("final checkpoint of step %d saved after SIGTERM; exiting with status 143", step)
        self.close("KILLED")
        raise SystemExit(143)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"this CheckpointManager (run {self.run_id}) is closed; create a new one to resume")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED")

    def __repr__(self) -> str:
        return f"CheckpointManager(run_id={self.run_id!r}, save_dir={str(self.save_dir)!r}, server={self._server!r})"


def _distributed_active() -> bool:
    import torch.distributed as dist

    return bool(dist.is_available() and dist.is_initialized())


def _bounded(fn: Any, timeout: float) -> None:
    """Run ``fn`` on a daemon thread and wait at most ``timeout`` seconds for it."""
    t = threading.Thread(target=fn, daemon=True, name="tracked_ckpt-close")
    t.start()
    t.join(timeout)
