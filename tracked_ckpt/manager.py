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
import contextlib
import io
import logging
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ._faults import fault_point
from .catalog import (
    TAG_BEST,
    TAG_BEST_STEP,
    TAG_BEST_VALUE,
    TAG_BYTES,
    TAG_COUNT,
    TAG_LATEST,
    TAG_LATEST_STEP,
    TAG_MONITOR,
    TAG_PRUNED,
    Resolved,
    RunCatalog,
    Which,
    info_of,
    parse_ref,
    ref_for,
)
from .errors import CheckpointNotFoundError, ConfigError, SaveError, StoreError
from .lease import DirLock, Lease
from .loading import load_latest_verified, load_resolved
from .local import LocalDir
from .manifest import ARTIFACT_PREFIX, MANIFEST_NAME, Manifest
from .outbox import Outbox, Pending, PermanentStoreError, Publisher
from .policies import (
    CheckpointInfo,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
    best_of,
    check_mode,
    plan_deletions,
)
from .runs import find_run
from .snapshot import BackgroundSaver, StagingBuffers
from .state import Stateful, TrainingState, gather, split_metadata
from .store import RunStore, describe_mlflow_error, redact

log = logging.getLogger(__name__)

Resume = Literal["auto", "never", "must"]
TAG_NOTE = "mlflow.note.content"
_NOTE_MARK = "<!-- tracked_ckpt -->"


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
    ) -> None:
        if resume not in ("auto", "never", "must"):
            raise ConfigError(f"resume={resume!r}: pass 'auto', 'never' or 'must'")
        if resume == "never" and run_id is not None:
            raise ConfigError(f"resume='never' starts a new run, but run_id={run_id!r} was passed; drop one")
        if save_policy is not None and not isinstance(save_policy, SavePolicy):
            raise ConfigError(f"save_policy={save_policy!r} has no should_save(ctx); use e.g. EveryNSteps(100)")
        if retention is not None and not isinstance(retention, RetentionPolicy):
            raise ConfigError(f"retention={retention!r} has no keep(...); use e.g. KeepLast(3)")
        self.mode = check_mode(mode)
        self.monitor = monitor
        self.resume = resume
        self.save_policy = save_policy
        self.retention = retention
        self.save_rng = save_rng
        self.save_dir = Path(save_dir).expanduser().resolve()
        self.local = LocalDir(self.save_dir)
        self.client = MlflowClient(tracking_uri=tracking_uri)
        self._server = redact(str(self.client.tracking_uri))
        self._closed = False
        self._owns_run_status = True
        self._warned_no_delete = False
        self._resumed_from: str | None = None
        self._started = time.time()
        self._last_save_time: float | None = None
        self._saver = BackgroundSaver() if async_save else None
        self._buffers = StagingBuffers()
        self._pending: CheckpointInfo | None = None  # the async save in flight, until it is recorded
        if not publish_timeout >= 0:
            raise ConfigError(f"publish_timeout={publish_timeout!r}: pass a number of seconds >= 0")
        self.publish_timeout = float(publish_timeout)
        self.outbox = Outbox(self.save_dir)
        self._dir_lock = DirLock(self.save_dir)
        self._preempted = False

        try:
            run_id, how = self._find_run(run_id, experiment, run_name)
            self.store = self._open_store(run_id)
            # The save_dir lock is held already, so a holder that wrote through this save_dir is gone.
            beat = max(1.0, lease_timeout / 4)
            self._lease = Lease(self.store, self.save_dir, interval=beat, timeout=lease_timeout)
            self._lease.acquire(self.store.tags_at_open)
            self.catalog = RunCatalog(self.store)
            self._index: dict[str, CheckpointInfo] = {}  # committed checkpoints of the run, by path
            self._taken: set[str] = set()  # every folder name in use, committed or not
            self._publisher = Publisher(self.outbox, run_id, self._publish_pending, self._server)
            if how != "new":
                self._recover()
            queued = self.outbox.pending(run_id)
            self._taken |= {p.name for p in queued}
            self._next_seq = max([c.seq for c in self._index.values()] + [p.seq for p in queued], default=0) + 1
            others = {p.run_id for p in self.outbox.pending()} - {run_id}
            if others:
                log.warning("%s holds queued checkpoints of other runs %s: `tracked-ckpt sync %s` uploads them",
                            self.outbox.dir, sorted(others), self.save_dir)  # fmt: skip
            if resume == "must" and not self._index:
                raise CheckpointNotFoundError(
                    f"resume='must' but run {run_id} ({how}) has no committed checkpoint at {self._server}; "
                    "check run_id / save_dir, or use resume='auto' to start from scratch"
                )
            self.local.write_pointer(run_id, self._server, self.store.experiment_id)
            self.local.sweep_staging(max_age_s=0)  # we hold the save_dir lock: any staging folder is a dead save's
            self._attach(how)
            if save_on_sigterm:
                self._install_sigterm()
            atexit.register(self._close_at_exit)
            log.info("run %s (%s) at %s, save_dir %s", run_id, how, self._server, self.save_dir)
        except BaseException:
            self._abandon()  # e.g. resume="must" with no checkpoint: leave no lock, lease or thread behind
            raise

    # ---------------------------------------------------------------------------------------- the run

    @property
    def run_id(self) -> str:
        return self.store.run_id

    def _find_run(self, run_id: str | None, experiment: str | None, run_name: str | None) -> tuple[str, str]:
        found = find_run(
            self.client, self._server, self.local, run_id=run_id, experiment=experiment, run_name=run_name,
            new_only=self.resume == "never",
        )  # fmt: skip
        self._owns_run_status = found.owns_status
        return found.run_id, found.how

    def _open_store(self, run_id: str) -> RunStore:
        return RunStore(self.client, run_id)

    def _recover(self) -> None:
        """Index the run's committed checkpoints; re-publish tags that lag behind a committed manifest."""
        tags = self.store.tags_at_open
        found = self.catalog.scan()
        self._taken = {p.rpartition("/")[2] for p in self.catalog.listed}
        self._index = {r.path: r.info for r in found}
        queued = self.outbox.pending(self.run_id)
        if queued:  # checkpoints committed locally by an earlier process and never recorded: record them now
            log.info("recording %d queued checkpoint(s) of run %s from %s", len(queued), self.run_id, self.outbox.dir)
            if self._publisher.drained(self.publish_timeout):
                found = self.catalog.scan()
        self._clean_leftovers(found)
        if found and tags.get(TAG_LATEST) != found[-1].path:
            log.warning(
                "run %s: latest tag %r lags behind committed checkpoint %s (an interrupted save); repairing it",
                self.run_id,
                tags.get(TAG_LATEST),
                found[-1].path,
            )
            self.store.set_tags(self._summary_tags())

    def _clean_leftovers(self, found: list[Resolved]) -> None:
        """Remove what dead saves left behind: uncommitted artifact folders, local copies retention had deleted.

        Only the lease holder runs this, so nothing here can be another live writer's save in progress.
        """
        # A folder whose manifest exists but does not parse (torn, or written by a newer tracked_ckpt) is kept.
        committed = {r.path.rpartition("/")[2] for r in found} | {p.rpartition("/")[2] for p in self.catalog.unreadable}
        queued = {p.name for p in self.outbox.pending(self.run_id)}
        for name in sorted(self._taken - committed - queued):
            log.info("removing uncommitted artifact folder %s/%s of run %s (a save that died)", ARTIFACT_PREFIX, name,
                     self.run_id)  # fmt: skip
            try:
                self.store.delete(f"{ARTIFACT_PREFIX}/{name}")
            except StoreError as e:
                log.warning("could not remove uncommitted artifact folder %s: %s", name, e)
        local_run = self.save_dir / self.run_id
        if local_run.is_dir():
            for d in local_run.iterdir():
                if d.name not in committed and d.name not in queued:
                    self.local.remove(self.run_id, d.name)

    def _attach(self, how: str) -> None:
        tags = self.store.tags_at_open
        if how != "new" and self._owns_run_status:
            try:
                self.client.update_run(self.run_id, status="RUNNING")
            except MlflowException as e:
                raise describe_mlflow_error(e, f"mark run {self.run_id} running", self._server) from e
        note = tags.get(TAG_NOTE)
        if note is None or note.startswith(_NOTE_MARK):
            self.store.set_tags({TAG_NOTE: self._note(), TAG_MONITOR: f"{self.monitor}:{self.mode}"})

    def _note(self) -> str:
        r = self.run_id
        return (
            f"{_NOTE_MARK}\n### Checkpoints (tracked_ckpt)\n"
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
        known = list(self._index.values()) + ([pending] if pending is not None else [])
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
        latest = self._latest_info()
        seq = self._next_seq
        self._next_seq += 1
        step = step if step is not None else meta.step if meta.step is not None else seq
        payload, rng_json = gather(state, rng=self.save_rng)
        name = self._folder_name(step, seq)
        fields = {
            "step": step,
            "seq": seq,
            "created": time.time(),
            "metrics": meta.metrics,
            "metadata": meta.values,
            "epoch": meta.epoch,
            "resumed_from": self._resumed_from,
        }
        path = f"{ARTIFACT_PREFIX}/{name}"
        self._taken.add(name)
        if self._saver is None:
            self._commit(path, payload, rng_json, fields, latest, t0)
            return ref_for(self.run_id, path)
        payload = self._buffers.copy(payload)  # the state as of this call, while training goes on
        self._pending = CheckpointInfo(path, step, seq, time.time(), meta.metrics)
        self._last_save_time = time.time()
        log.debug(
            "step %d copied to host memory in %.3f s; saving it in the background",
            step,
            time.perf_counter() - t0,
        )

        def job() -> None:
            try:
                self._commit(path, payload, rng_json, fields, latest, t0)
            finally:
                self._pending = None  # recorded in the index by now, or failed (wait() reports it)

        self._saver.submit(step, job)
        if self._preempted:  # SIGTERM: finish this save, then exit as a synchronous save does
            self.wait()
            self._exit_after_preemption(step)
        return ref_for(self.run_id, path)

    def _commit(
        self,
        path: str,
        payload: Mapping[str, Any],
        rng_json: Mapping[str, Any],
        fields: Mapping[str, Any],
        latest: CheckpointInfo | None,
        t0: float,
    ) -> None:
        """Commit locally, record in MLflow, apply retention: what ``async_save`` runs on the worker thread."""
        step = fields["step"]
        pending = Pending(self.run_id, fields["seq"], path.rpartition("/")[2], step, int(fields["created"] * 1000))

        def queue() -> None:
            self.outbox.add(pending)
            fault_point("outbox")

        folder, manifest = self.local.write(self.run_id, pending.name, payload, rng_json, fields, before_commit=queue)
        self._publisher.kick()
        try:
            recorded = self._publisher.wait_for(pending.seq, self.publish_timeout)
        except PermanentStoreError as e:
            raise SaveError(
                f"checkpoint of step {step} is committed locally at {folder} but MLflow run {self.run_id} refused "
                f"it: {e}. It stays queued in {self.outbox.dir}; `tracked-ckpt sync {self.save_dir}` retries"
            ) from e
        if not recorded:
            self._publisher.note_timeout(step, self.publish_timeout)
        self._last_save_time = time.time()
        log.info(
            "saved step %d to %s (%.1f MB) in %.2f s%s",
            step,
            ref_for(self.run_id, path),
            manifest.size / 1e6,
            time.perf_counter() - t0,
            "" if recorded else f"; MLflow did not answer within {self.publish_timeout:.0f} s: queued in the outbox",
        )
        if latest is not None and step < latest.step:
            log.info(
                "step %d is below the previous latest step %d: this checkpoint is now the latest", step, latest.step
            )
        if self._preempted and self._saver is None:  # async: save() exits on the training thread instead
            self._exit_after_preemption(step)

    def _folder_name(self, step: int, seq: int) -> str:
        name = f"step-{step:08d}"
        # Never overwrite an artifact: a step saved twice (or a crashed save's leftovers) gets a new folder.
        return name if name not in self._taken else f"{name}.{seq}"

    def _publish_pending(self, p: Pending) -> None:
        """Record one locally committed checkpoint in MLflow, then apply retention (the publisher thread)."""
        folder = self.local.folder(p.run_id, p.name)
        try:
            manifest = Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), str(folder / MANIFEST_NAME))
        except FileNotFoundError:
            log.warning("queued checkpoint %s of step %d has no local folder any more (its save died before the "
                        "local commit, or it was removed): nothing to record", folder, p.step)  # fmt: skip
            return
        self._publish(f"{ARTIFACT_PREFIX}/{p.name}", folder, manifest, p.timestamp_ms)
        self._apply_retention()

    def _publish(self, path: str, folder: Path, manifest: Manifest, timestamp_ms: int | None = None) -> None:
        for f in manifest.files:
            self.store.upload(folder / f.name, path)
        self.store.upload(folder / MANIFEST_NAME, path)  # the commit marker, last
        # Replaced, never mutated: with async_save the training thread reads it (should_save) meanwhile.
        self._index = {**self._index, path: info_of(manifest, path)}
        fault_point("tags")
        self.store.publish(manifest.step, dict(manifest.metrics), self._summary_tags(), timestamp_ms)

    def _summary_tags(self) -> dict[str, str]:
        """Tags that show the run's checkpoints at a glance in the MLflow UI (and serve list_runs)."""
        latest = self._latest_info()
        tags = {
            TAG_COUNT: str(len(self._index)),
            TAG_BYTES: str(sum(c.size for c in self._index.values())),
            TAG_MONITOR: f"{self.monitor}:{self.mode}",
        }
        if latest is not None:
            tags[TAG_LATEST], tags[TAG_LATEST_STEP] = latest.path, str(latest.step)
        best = best_of(list(self._index.values()), self.monitor, self.mode)
        if best is not None:
            tags[TAG_BEST], tags[TAG_BEST_STEP] = best.path, str(best.step)
            tags[TAG_BEST_VALUE] = repr(best.metrics[self.monitor])
        return tags

    def _latest_info(self) -> CheckpointInfo | None:
        return max(self._index.values(), key=lambda c: c.seq) if self._index else None

    def _apply_retention(self) -> None:
        protected = {self._resumed_from} if self._resumed_from else set()
        doomed = plan_deletions(
            list(self._index.values()), self.retention, metric=self.monitor, mode=self.mode, protected=protected
        )
        for c in doomed:
            t0 = time.perf_counter()
            try:
                self.store.delete(c.path)
            except StoreError as e:
                if not self._warned_no_delete:
                    log.warning(
                        "retention could not delete %s from the artifact store (%s); it is deleted locally only. "
                        "This warning is shown once per manager",
                        c.path,
                        e,
                    )
                    self._warned_no_delete = True
            self.local.remove(self.run_id, c.path.rpartition("/")[2])
            self._index = {p: c2 for p, c2 in self._index.items() if p != c.path}
            log.info("deleted step %d (%s, %.1f MB) in %.2f s", c.step, c.path, c.size / 1e6, time.perf_counter() - t0)
        if doomed:
            pruned = ", ".join(f"step {c.step}" for c in doomed)[:500]
            self.store.set_tags({**self._summary_tags(), TAG_PRUNED: pruned})

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
            got = load_latest_verified(self.catalog, state, lambda r: self._cache_for(self.catalog, r))
            if got is None:
                if self.resume == "must":
                    raise CheckpointNotFoundError(f"resume='must' but run {self.run_id} has no committed checkpoint")
                log.info("no checkpoint in run %s yet: starting from scratch", self.run_id)
                return {}
            r, metadata = got
        else:
            catalog, r = self.catalog, self.catalog.resolve(which, self.monitor, self.mode)
            metadata = load_resolved(catalog, r, state, self._cache_for(catalog, r))
        if r.manifest.run_id == self.run_id:
            self._resumed_from = r.path
        return metadata

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
        catalog = self.catalog if run_id == self.run_id else RunCatalog(RunStore(self.client, run_id))
        return catalog, Resolved(path, catalog.manifest(path))

    def _cache_for(self, catalog: RunCatalog, r: Resolved) -> Path | None:
        folder = self.local.folder(catalog.run_id, r.path.rpartition("/")[2])
        return folder if folder.is_dir() else None

    def get_latest_checkpoint(self) -> str | None:
        """The ``runs:/`` reference of the latest committed checkpoint, or None."""
        self.wait()
        r = self.catalog.latest()
        return ref_for(self.run_id, r.path) if r else None

    def get_best_checkpoint(self) -> str | None:
        """The ``runs:/`` reference of the best checkpoint by ``monitor``/``mode``, or None."""
        self.wait()
        r = self.catalog.best(self.monitor, self.mode)
        return ref_for(self.run_id, r.path) if r else None

    def checkpoints(self) -> Any:
        """A pandas DataFrame, one row per committed checkpoint of this run (see ``list_checkpoints``)."""
        from .views import checkpoints_frame

        self.wait()
        return checkpoints_frame(self.run_id, self.catalog.scan(), self.monitor, self.mode)

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
        return self._publisher.drained(self.publish_timeout if timeout is None else timeout)

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
        drained = self._publisher.drained(self.publish_timeout)
        self._publisher.stop()
        if not drained:
            log.warning("MLflow at %s did not record every checkpoint in time: they stay queued in %s and are "
                        "uploaded by the next process on this run or `tracked-ckpt sync %s`",
                        self._server, self.outbox.dir, self.save_dir)  # fmt: skip
        # Bounded: against a hung server, MLflow's own retries would stall these calls for minutes.
        final = "FAILED" if failure is not None else status

        def finish() -> None:
            _finish_run(self.client, self.run_id, self._owns_run_status, final)
            self._lease.release()

        _bounded(finish, 1.0 if not drained else max(1.0, self.publish_timeout))
        self._dir_lock.release()
        if failure is not None:
            raise failure

    def _abandon(self) -> None:
        """Undo a half-finished __init__."""
        publisher: Publisher | None = vars(self).get("_publisher")
        lease: Lease | None = vars(self).get("_lease")
        if publisher is not None:
            publisher.stop()
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


def _finish_run(client: MlflowClient, run_id: str, owns: bool, status: str = "FINISHED") -> None:
    if not owns:
        return
    # MLflow prints the run's URL here, with the tracking URI's user:password@ if it has one: not that.
    quiet = contextlib.redirect_stdout(io.StringIO()) if "@" in str(client.tracking_uri) else contextlib.nullcontext()
    try:
        with quiet:
            client.set_terminated(run_id, status=status)
    except Exception as e:  # at interpreter exit, a failure to mark the run must not mask the real outcome
        log.debug("could not mark run %s %s: %s", run_id, status, e)
