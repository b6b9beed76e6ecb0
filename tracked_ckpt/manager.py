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
pointer file in ``save_dir``, and the run tagged with this ``save_dir``; otherwise a new run is created.
"""

from __future__ import annotations

import atexit
import logging
import os
import time
import weakref
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

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
    TAG_SAVE_DIR,
    Resolved,
    RunCatalog,
    Which,
    info_of,
    parse_ref,
    ref_for,
)
from .errors import CheckpointNotFoundError, ConfigError, SaveError, StoreError
from .loading import load_latest_verified, load_resolved
from .local import LocalDir
from .manifest import ARTIFACT_PREFIX, MANIFEST_NAME, Manifest
from .policies import (
    CheckpointInfo,
    RetentionPolicy,
    SaveContext,
    SavePolicy,
    best_of,
    check_mode,
    plan_deletions,
)
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

        run_id, how = self._find_run(run_id, experiment, run_name)
        self.store = self._open_store(run_id)
        self.catalog = RunCatalog(self.store)
        self._index: dict[str, CheckpointInfo] = {}  # committed checkpoints of the run, by path
        self._taken: set[str] = set()  # every folder name in use, committed or not
        if how != "new":
            self._recover()
        if resume == "must" and not self._index:
            raise CheckpointNotFoundError(
                f"resume='must' but run {run_id} ({how}) has no committed checkpoint at {self._server}; "
                "check run_id / save_dir, or use resume='auto' to start from scratch"
            )
        self.local.write_pointer(run_id, self._server, self.store.experiment_id)
        self.local.sweep_staging()
        self._attach(how)
        self._finalizer = weakref.finalize(self, _finish_run, self.client, run_id, self._owns_run_status)
        atexit.register(self._finalizer)
        log.info("run %s (%s) at %s, save_dir %s", run_id, how, self._server, self.save_dir)

    # ---------------------------------------------------------------------------------------- the run

    @property
    def run_id(self) -> str:
        return self.store.run_id

    def _find_run(self, run_id: str | None, experiment: str | None, run_name: str | None) -> tuple[str, str]:
        if self.resume != "never":
            if run_id is not None:
                return run_id, "run_id argument"
            if os.environ.get("MLFLOW_RUN_ID"):
                return os.environ["MLFLOW_RUN_ID"], "MLFLOW_RUN_ID"
            active = _active_fluent_run_id(self.client.tracking_uri)
            if active is not None:
                self._owns_run_status = False  # the user's mlflow.start_run() ends it
                return active, "active mlflow run"
            pointer = self.local.read_pointer()
            if pointer is not None and pointer.get("tracking_uri") == self._server and self._alive(pointer["run_id"]):
                return pointer["run_id"], f"pointer in {self.save_dir}"
            found = self._search_by_save_dir(experiment)
            if found is not None:
                return found, "run tagged with this save_dir"
        exp_id = self._experiment_id(experiment)
        tags = {TAG_SAVE_DIR: str(self.save_dir)}
        try:
            run = self.client.create_run(exp_id, tags=tags, run_name=run_name)
        except MlflowException as e:
            raise describe_mlflow_error(e, f"create a run in experiment {exp_id}", self._server) from e
        return run.info.run_id, "new"

    def _alive(self, run_id: str) -> bool:
        try:
            return bool(self.client.get_run(run_id).info.lifecycle_stage == "active")
        except MlflowException:
            log.warning(
                "the run %s named in %s no longer exists at %s; looking further", run_id, self.save_dir, self._server
            )
            return False

    def _experiment_id(self, name: str | None) -> str:
        if name is None and os.environ.get("MLFLOW_EXPERIMENT_ID"):
            return os.environ["MLFLOW_EXPERIMENT_ID"]
        name = name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"
        try:
            exp = self.client.get_experiment_by_name(name)
            if exp is None:
                return str(self.client.create_experiment(name))
            if exp.lifecycle_stage == "deleted":
                raise ConfigError(f"experiment {name!r} is deleted at {self._server}; restore it or pick another name")
            return str(exp.experiment_id)
        except MlflowException as e:
            raise describe_mlflow_error(e, f"find or create experiment {name!r}", self._server) from e

    def _search_by_save_dir(self, experiment: str | None) -> str | None:
        ids = [self._experiment_id(experiment)]
        quoted = str(self.save_dir).replace("'", "\\'")
        try:
            runs = self.client.search_runs(
                ids, f"tags.`{TAG_SAVE_DIR}` = '{quoted}'", order_by=["attributes.start_time DESC"], max_results=1
            )
        except MlflowException as e:
            raise describe_mlflow_error(e, "search runs", self._server) from e
        return runs[0].info.run_id if runs else None

    def _open_store(self, run_id: str) -> RunStore:
        return RunStore(self.client, run_id)

    def _recover(self) -> None:
        """Index the run's committed checkpoints; re-publish tags that lag behind a committed manifest."""
        tags = self.store.tags()
        found = self.catalog.scan()
        self._taken = {e.path.rpartition("/")[2] for e in self.store.list(ARTIFACT_PREFIX) if e.is_dir}
        self._index = {r.path: r.info for r in found}
        if found and tags.get(TAG_LATEST) != found[-1].path:
            log.warning(
                "run %s: latest tag %r lags behind committed checkpoint %s (an interrupted save); repairing it",
                self.run_id,
                tags.get(TAG_LATEST),
                found[-1].path,
            )
            self.store.set_tags(self._summary_tags())

    def _attach(self, how: str) -> None:
        tags = self.store.tags()
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
        """Ask the save policy (default: always True) whether to save at ``step``."""
        if self.save_policy is None:
            return True
        latest = self._latest_info()
        best = best_of(list(self._index.values()), self.monitor, self.mode)
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
        latest = self._latest_info()
        seq = (max(c.seq for c in self._index.values()) if self._index else 0) + 1
        step = step if step is not None else meta.step if meta.step is not None else seq
        t0 = time.perf_counter()
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
        folder, manifest = self.local.write(self.run_id, name, payload, rng_json, fields)
        path = f"{ARTIFACT_PREFIX}/{name}"
        self._taken.add(name)
        try:
            self._publish(path, folder, manifest)
        except StoreError as e:
            raise SaveError(
                f"checkpoint of step {step} is committed locally at {folder} but could not be recorded in "
                f"MLflow run {self.run_id}: {e}"
            ) from e
        self._last_save_time = time.time()
        log.info(
            "saved step %d to %s (%.1f MB) in %.2f s",
            step,
            ref_for(self.run_id, path),
            manifest.size / 1e6,
            time.perf_counter() - t0,
        )
        if latest is not None and step < latest.step:
            log.info(
                "step %d is below the previous latest step %d: this checkpoint is now the latest", step, latest.step
            )
        self._apply_retention()
        return ref_for(self.run_id, path)

    def _folder_name(self, step: int, seq: int) -> str:
        name = f"step-{step:08d}"
        # Never overwrite an artifact: a step saved twice (or a crashed save's leftovers) gets a new folder.
        return name if name not in self._taken else f"{name}.{seq}"

    def _publish(self, path: str, folder: Path, manifest: Manifest) -> None:
        for f in manifest.files:
            self.store.upload(folder / f.name, path)
        self.store.upload(folder / MANIFEST_NAME, path)  # the commit marker, last
        self._index[path] = info_of(manifest, path)
        self.store.publish(manifest.step, dict(manifest.metrics), self._summary_tags())

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
            del self._index[c.path]
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
        r = self.catalog.latest()
        return ref_for(self.run_id, r.path) if r else None

    def get_best_checkpoint(self) -> str | None:
        """The ``runs:/`` reference of the best checkpoint by ``monitor``/``mode``, or None."""
        r = self.catalog.best(self.monitor, self.mode)
        return ref_for(self.run_id, r.path) if r else None

    def checkpoints(self) -> Any:
        """A pandas DataFrame, one row per committed checkpoint of this run (see ``list_checkpoints``)."""
        from .views import checkpoints_frame

        return checkpoints_frame(self.run_id, self.catalog.scan(), self.monitor, self.mode)

    # --------------------------------------------------------------------------------------- lifecycle

    def close(self, status: str = "FINISHED") -> None:
        """Mark the run ended (unless it belongs to the user's own ``mlflow.start_run()``). Idempotent."""
        if self._closed:
            return
        self._closed = True
        self._finalizer.detach()
        atexit.unregister(self._finalizer)
        if self._owns_run_status:
            _finish_run(self.client, self.run_id, True, status)

    def _check_open(self) -> None:
        if self._closed:
            raise ConfigError(f"this CheckpointManager (run {self.run_id}) is closed; create a new one to resume")

    def __enter__(self) -> CheckpointManager:
        return self

    def __exit__(self, exc_type: Any, exc: Any, tb: Any) -> None:
        self.close("FINISHED" if exc_type is None else "KILLED" if exc_type is KeyboardInterrupt else "FAILED")

    def __repr__(self) -> str:
        return f"CheckpointManager(run_id={self.run_id!r}, save_dir={str(self.save_dir)!r}, server={self._server!r})"


def _finish_run(client: MlflowClient, run_id: str, owns: bool, status: str = "FINISHED") -> None:
    if not owns:
        return
    try:
        client.set_terminated(run_id, status=status)
    except Exception as e:  # at interpreter exit, a failure to mark the run must not mask the real outcome
        log.debug("could not mark run %s %s: %s", run_id, status, e)


def _active_fluent_run_id(tracking_uri: str) -> str | None:
    """The run of the user's own ``mlflow.start_run()``, if any, on the same tracking URI."""
    import mlflow

    run = mlflow.active_run()
    if run is None or mlflow.get_tracking_uri() != tracking_uri:
        return None
    return str(run.info.run_id)
