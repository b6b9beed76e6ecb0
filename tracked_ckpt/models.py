"""Each committed checkpoint as an MLflow 3 LoggedModel: the Models tab lists them, the run page shows their steps.

MLflow 3's own answer for deep-learning checkpoints is a LoggedModel per checkpoint, linked to its run at a step
and ranked by metrics logged on it. tracked_ckpt gives every recorded checkpoint one, without a second copy of
the weights: the model has no artifacts until ``promote`` registers it and writes a small ``MLmodel`` file whose
``tracked_ckpt`` flavor names the checkpoint (the UI's version pages read it; one call less per save).
``load("models:/<model_id>", model)`` follows the model's ``tracked_ckpt.checkpoint`` tag. Per checkpoint::

    name      the folder name (step-00000120)          source_run_id  the run
    params    folder, step, format, digest             tags           tracked_ckpt.checkpoint / step / digest
    metrics   the checkpoint's own (reward, loss...), at its step (logged in the record's one log_batch)
    status    PENDING while its files upload, READY once the checkpoint is committed in MLflow

The publisher makes it as part of the record (an outage queues it with the rest). Retention and ``prune`` delete
it with its checkpoint; ``reconcile`` (run by the next owner of the run, and ``tracked-ckpt models``) repairs a
crash in between, removes a dead save's PENDING model and gives older checkpoints theirs. Every MLflow call goes
through the run's store (store/tracking.py), so a test's store subclass sees them.
"""

from __future__ import annotations

import logging
import queue
import re
import tempfile
import threading
from collections.abc import Callable, Mapping
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from .errors import ConfigError, StoreError
from .manifest import Manifest
from .refs import ModelRef, parse_ref, ref_for
from .store.run_store import RunStore

log = logging.getLogger(__name__)
T = TypeVar("T")

FLAVOR = "tracked_ckpt"
MODEL_TAG_CHECKPOINT = "tracked_ckpt.checkpoint"  # on the LoggedModel and the model version: runs:/RUN/checkpoints/NAME
MODEL_TAG_STEP = "tracked_ckpt.step"
MODEL_TAG_DIGEST = "tracked_ckpt.digest"
MODEL_TYPE = "tracked_ckpt checkpoint"


def checkpoint_digest(m: Manifest) -> str:
    """One digest for a checkpoint: its state.pt's BLAKE3, or for a folder of files the BLAKE3 of their digests."""
    from .formats import format_of

    return format_of(m).digest(m)


def model_tags(run_id: str, path: str, m: Manifest) -> dict[str, str]:
    """The tags that tie a LoggedModel (and a model version) to its checkpoint."""
    checkpoint = ref_for(run_id, path)
    return {MODEL_TAG_CHECKPOINT: checkpoint, MODEL_TAG_STEP: str(m.step), MODEL_TAG_DIGEST: checkpoint_digest(m)}


def model_name(path: str) -> str:
    """The LoggedModel's name: the folder name, with what MLflow refuses in a name (``/:.%"'``) as ``_``."""
    return re.sub(r"[/:.%\"']", "_", path.rpartition("/")[2])


def optional(e: StoreError) -> bool:
    """True when a model call failed for good (refused, or a server without LoggedModels: MLflow < 3 answers 404):
    the checkpoint is recorded without its model rather than queued forever."""
    return not e.transient or "404" in str(e) or "ENDPOINT_NOT_FOUND" in str(e)


def is_ready(model: Any) -> bool:
    return str(model.status).rpartition(".")[2] == "READY"


class CheckpointModels:
    """The LoggedModels of one run's checkpoints: make one per record, delete it with its checkpoint, repair.

    ``ids`` maps a checkpoint path to its models (one, unless a crash left a duplicate); it is filled as models
    are made and, the first time a path is not in it, from one search of the run's models.
    """

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.ids: dict[str, list[str]] = {}
        self._searched = False
        self._linked: set[str] = set()  # model ids whose run output link exists (log_outputs is not idempotent)
        self._queue: queue.SimpleQueue[tuple[Future[Any], Callable[[], Any]] | None] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None

    def submit(self, fn: Callable[[], T]) -> Future[T]:
        """Run ``fn`` on this run's one model thread: the publisher uploads meanwhile (a save waits for the slower).

        One thread, so the model calls of a checkpoint stay in order (create before READY, a retry after the try).
        A daemon, like the publisher: a call stuck on a hung server never holds the process at exit.
        """
        if self._thread is None:
            self._thread = threading.Thread(target=self._work, name="tracked_ckpt-models", daemon=True)
            self._thread.start()
        future: Future[T] = Future()
        self._queue.put((future, fn))
        return future

    def _work(self) -> None:
        while (item := self._queue.get()) is not None:
            future, fn = item
            if future.set_running_or_notify_cancel():
                try:
                    future.set_result(fn())
                except BaseException as e:  # handed to whoever waits on it
                    future.set_exception(e)

    def close(self, timeout: float) -> None:
        """Let the model thread finish what is queued (a retired checkpoint's model deletion), ``timeout`` at most.

        What it does not finish (a hung server) is repaired by the run's next owner (``reconcile``).
        """
        if self._thread is not None:
            self._queue.put(None)
            self._thread.join(timeout)
            self._thread = None

    # ------------------------------------------------------------------------------------------ making

    def begin(self, path: str, m: Manifest, *, ours: bool = True) -> str:
        """The PENDING model of checkpoint ``path`` (made once, reused on a retry), linked at its step.

        Two calls: create (tags and params in one), the run's output link. ``ours``: the checkpoint was saved by
        this process; else (queued by an earlier one) a model it made first is looked for. The MLmodel pointer is
        written when a model version needs it (``pointer``): one call less per save.
        """
        existing = self.ids.get(path) if ours else self.lookup(path)
        model_id = existing[-1] if existing else self._create(path, m)
        self._link(model_id, m.step, bool(existing))
        return model_id

    def _link(self, model_id: str, step: int, existing: bool) -> None:
        """The run's output link to the model at ``step`` (once: MLflow refuses a second link of the same pair)."""
        if existing and model_id not in self._linked:  # an earlier process (or try) made it: linked already?
            self._read_links()
        if model_id in self._linked:
            return
        from mlflow.entities import LoggedModelOutput

        try:
            self.store.log_outputs(self.store.run_id, [LoggedModelOutput(model_id, step)],
                                   f"link model {model_id} to step {step}")  # fmt: skip
        except StoreError:
            self._read_links()  # MLflow allows one link per (run, model): a lost answer must not block the queue
            if model_id not in self._linked:
                raise
        self._linked.add(model_id)

    def _read_links(self) -> None:
        run = self.store.run()
        self._linked |= {o.model_id for o in (run.outputs.model_outputs if run.outputs else [])}

    def _create(self, path: str, m: Manifest) -> str:
        run_id = self.store.run_id
        tags = model_tags(run_id, path, m)
        params = {"folder": path, "step": str(m.step), "format": m.format, "digest": tags[MODEL_TAG_DIGEST]}
        lm = self.store.create_logged_model(
            self.store.experiment_id, f"create the logged model of {path}",
            name=model_name(path), source_run_id=run_id, tags=tags, params=params, model_type=MODEL_TYPE,
        )  # fmt: skip
        self.ids[path] = [*self.ids.get(path, []), lm.model_id]
        return str(lm.model_id)

    def pointer(self, model_id: str, path: str, m: Manifest) -> None:
        """Give the model its one artifact, an MLmodel naming the checkpoint, unless it has it (promote needs it)."""
        lm = self.store.logged_model(model_id)
        repo = self._repo(lm)
        names = self.store._call(lambda: [f.path for f in repo.list_artifacts()], f"list model {model_id}")
        if "MLmodel" not in names:
            self.store._call(lambda: self._write_pointer(lm, repo, path, m), f"write the MLmodel of {path}")

    def note_version(self, model_id: str, name: str, version: str) -> None:
        """Name the model version on its LoggedModel (tag ``mlflow.modelVersions``: the Models tab's "Registered
        models" column), as MLflow's own ``register_model`` and its server do; a local store needs it done here."""
        import json

        lm = self.store.logged_model(model_id)
        versions = json.loads((lm.tags or {}).get("mlflow.modelVersions") or "[]")
        entry = {"name": name, "version": str(version)}
        if entry not in versions:
            tags = {"mlflow.modelVersions": json.dumps([*versions, entry])}
            self.store.set_logged_model_tags(model_id, tags)

    def _repo(self, lm: Any) -> Any:
        from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository

        return get_artifact_repository(lm.artifact_location, tracking_uri=self.store.client.tracking_uri)

    def _write_pointer(self, lm: Any, repo: Any, path: str, m: Manifest) -> None:
        """An MLmodel whose flavor names the checkpoint (the UI's model version pages read it)."""
        from mlflow.models import Model

        flavor = {
            "checkpoint": ref_for(self.store.run_id, path), "step": m.step, "digest": checkpoint_digest(m),
            "format": m.format, "world_size": m.world_size, "library_version": m.library_version,
            "load": f"tracked_ckpt.load('{ModelRef(model_id=lm.model_id).uri}', model)",
        }  # fmt: skip
        with tempfile.TemporaryDirectory(prefix="tracked_ckpt-") as tmp:
            mlmodel = Model(artifact_path=model_name(path), run_id=self.store.run_id, flavors={FLAVOR: flavor},
                            model_id=lm.model_id)  # fmt: skip
            mlmodel.save(str(Path(tmp) / "MLmodel"))
            repo.log_artifact(str(Path(tmp) / "MLmodel"))

    def ready(self, model_id: str) -> None:
        """READY: its checkpoint is committed in MLflow (the manifest uploaded) and its metrics are logged."""
        self.store.finalize_logged_model(model_id)

    def record(self, path: str, m: Manifest) -> str:
        """A READY model for an already committed checkpoint, its metrics on it (promote, reconcile)."""
        import time

        from mlflow.entities import Metric

        model_id = self.begin(path, m)
        now = int(time.time() * 1000)
        metrics = [Metric(k, v, now, m.step, model_id=model_id, run_id=self.store.run_id) for k, v in m.metrics.items()]
        if metrics:  # logged on the run as well, at the same step: the values it already has there
            self.store.log_batch(self.store.run_id, f"log metrics of {path}", metrics=metrics)
        self.ready(model_id)
        return model_id

    # ----------------------------------------------------------------------------------------- finding

    def search(self) -> list[Any]:
        """Every live LoggedModel of this run that tracked_ckpt made (any status), all pages."""
        found: list[Any] = []
        token = None
        experiments, run = [self.store.experiment_id], f"source_run_id = '{self.store.run_id}'"
        while True:
            page = self.store.search_logged_models(experiments, run, f"search the logged models of run "
                                                   f"{self.store.run_id}", max_results=1000, page_token=token)
            found += [lm for lm in page if MODEL_TAG_CHECKPOINT in (lm.tags or {})]
            token = page.token
            if not token:
                return found

    def _load(self) -> list[Any]:
        models = self.search()
        ids: dict[str, list[str]] = {}
        for lm in sorted(models, key=lambda lm: lm.creation_timestamp):
            path = _path_of(lm)
            if path is not None:
                ids.setdefault(path, []).append(lm.model_id)
        self.ids, self._searched = ids, True
        self._linked |= {lm.model_id for lm in models if is_ready(lm)}  # READY: its record (link first) was whole
        return models

    def _registered(self) -> set[str]:
        """The ids of the run's models that a registered model version points at (one registry search)."""
        run = f"run_id = '{self.store.run_id}'"
        versions = self.store.search_model_versions(run, "search the run's model versions")
        return {str(mv.model_id) for mv in versions if getattr(mv, "model_id", None)}

    def lookup(self, path: str) -> list[str]:
        if path not in self.ids and not self._searched:
            self._load()
        return list(self.ids.get(path, []))

    def ready_ids(self) -> dict[str, str]:
        """{checkpoint path: its READY model's id} (the oldest, if a path has several), in one search."""
        ids: dict[str, str] = {}
        for lm in sorted(self.search(), key=lambda lm: lm.creation_timestamp, reverse=True):
            path = _path_of(lm)
            if path is not None and is_ready(lm):
                ids[path] = lm.model_id
        return ids

    def ready_model(self, path: str) -> str | None:
        """The READY model of checkpoint ``path``, if it has one (one search the first time)."""
        models = [lm for lm in self.search() if _path_of(lm) == path and is_ready(lm)]
        return min(models, key=lambda lm: lm.creation_timestamp).model_id if models else None

    # ---------------------------------------------------------------------------------------- deleting

    def delete(self, path: str) -> None:
        """Delete the models of checkpoint ``path`` (after the checkpoint itself; ``reconcile`` repairs a crash)."""
        for model_id in self.lookup(path):
            self.store.delete_logged_model(model_id, f"delete model {model_id} of {path}")
        self.ids.pop(path, None)

    def reconcile(self, kept: Mapping[str, Manifest]) -> dict[str, int]:
        """Make the run's models match its committed checkpoints ``kept`` (path -> manifest).

        Deletes the models of checkpoints that are gone and those a crash left (PENDING: a save that died before
        its record ended; a second READY one: a record replayed by the next process); makes the missing ones
        (checkpoints recorded before this feature, or with it off). A model that a registered model version
        points at is never deleted. Returns counts: created, deleted.
        """
        models = self._load()
        registered = self._registered()
        first_ready: dict[str, str] = {}
        for lm in sorted(models, key=lambda lm: lm.creation_timestamp):
            if is_ready(lm) and _path_of(lm) in kept:
                first_ready.setdefault(str(_path_of(lm)), lm.model_id)
        doomed = [lm for lm in models
                  if lm.model_id not in registered and first_ready.get(_path_of(lm) or "") != lm.model_id]  # fmt: skip
        for lm in doomed:
            why = "its checkpoint is gone" if _path_of(lm) not in kept else "a duplicate or unfinished record"
            log.info("run %s: deleting logged model %s (%s): %s", self.store.run_id, lm.model_id, lm.name, why)
            self.store.delete_logged_model(lm.model_id, f"delete model {lm.model_id}")
        gone = {lm.model_id for lm in doomed}
        self.ids = {p: [i for i in ids if i not in gone] for p, ids in self.ids.items()}
        self.ids = {p: ids for p, ids in self.ids.items() if ids}
        missing = [p for p in kept if p not in self.ids]
        for path in missing:
            self.record(path, kept[path])
        if missing:
            log.info("run %s: %d checkpoint(s) given their logged model", self.store.run_id, len(missing))
        return {"created": len(missing), "deleted": len(doomed)}


def _path_of(lm: Any) -> str | None:
    """The checkpoint path a model's tag names (None when the tag is not a checkpoint reference)."""
    try:
        return parse_ref((lm.tags or {}).get(MODEL_TAG_CHECKPOINT, ""))[1]
    except ConfigError:
        return None
