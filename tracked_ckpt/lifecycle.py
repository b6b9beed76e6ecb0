"""A checkpoint's life after training: fork a new run from it, promote it to the MLflow Model Registry.

Fork. ``CheckpointManager(save_dir, fork_from="RUN@best")`` makes a new run that starts from that checkpoint: the
first ``load()`` restores the parent's checkpoint (the fork has none of its own yet), the run's tags and page
name the parent (``tracked_ckpt.forked_from``), and the parent's metric history up to the fork step is copied so
the charts are continuous. A relaunch finds the fork by its ``save_dir`` like any run and resumes it as itself.
MLflow's own ``mlflow.parentRunId`` is not used: it means "part of" (nested runs), folds the fork under a
collapsed parent row in the runs table, and cannot cross experiments.

Promote. ``promote("RUN@best", name="cartpole", alias="prod")`` registers the checkpoint in the Model Registry
the MLflow 3 way: a LoggedModel (``create_logged_model`` with ``source_run_id``, linked to the run at the
checkpoint's step by ``log_outputs``) whose artifacts are an ``MLmodel`` file with a ``tracked_ckpt`` flavor
that names the checkpoint, then a model version with ``source="models:/<model_id>"``. The UI's model
pages read ``MLmodel`` (a bare checkpoint folder has none: no flavor, no schema, no logged model to link) and link
the version to its run and logged model. The weights are not copied: ``load("models:/NAME@ALIAS", model)``
resolves the version to its run and checkpoint and loads it verified (size, BLAKE3, weights_only), and the run's
``tracked_ckpt.promoted`` tag keeps retention and ``prune`` from ever deleting it.
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from mlflow.entities import LoggedModelOutput, Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from . import _http
from .catalog import Resolved, RunCatalog
from .errors import CheckpointNotFoundError, ConfigError, TrackedCkptError
from .refs import parse, parse_ref, ref_for
from .runtags import (
    TAG_COUNT,
    TAG_FORKED_FROM,
    TAG_PARENT_RUN,
    TAG_PARENT_STEP,
    TAG_PROMOTED,
    monitor_of,
    promoted_paths,
)
from .store import RunStore, describe_mlflow_error, redact

log = logging.getLogger(__name__)

FLAVOR = "tracked_ckpt"
MODEL_TAG_CHECKPOINT = "tracked_ckpt.checkpoint"  # on the LoggedModel and the model version: runs:/RUN/checkpoints/NAME
MODEL_TAG_STEP = "tracked_ckpt.step"
MODEL_TAG_DIGEST = "tracked_ckpt.digest"


# ------------------------------------------------------------------------------------------------ naming


def resolve_source(client: MlflowClient, text: str) -> tuple[RunCatalog, Resolved]:
    """The committed checkpoint named by ``runs:/RUN/checkpoints/NAME``, ``RUN[@latest|best|STEP]`` or
    ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION`` (a version made by ``promote``)."""
    from .maintenance import resolve

    if text.startswith("models:/"):
        run_id, path = registered_checkpoint(client, text)
        catalog = RunCatalog(RunStore(client, run_id))
        return catalog, Resolved(path, catalog.manifest(path))
    ref = parse(text)
    catalog = RunCatalog(RunStore(client, ref.run_id))
    return catalog, resolve(catalog, ref)


def registered_checkpoint(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(run_id, checkpoint path) of a model version registered by ``promote``."""
    server = redact(str(client.tracking_uri))
    body = uri[len("models:/") :]
    try:
        with _http.bounded():
            if "@" in body:
                name, alias = body.split("@", 1)
                mv = client.get_model_version_by_alias(name, alias)
            elif "/" in body:
                name, version = body.rsplit("/", 1)
                mv = client.get_model_version(name, version)
            else:
                raise ConfigError(f"{uri!r}: name a version, models:/NAME@ALIAS or models:/NAME/VERSION")
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE"):
            raise CheckpointNotFoundError(
                f"{uri!r} names no model version at {server} ({e.message}); `tracked-ckpt promote` registers one"
            ) from None
        raise describe_mlflow_error(e, f"look up {uri}", server) from e
    ref = (mv.tags or {}).get(MODEL_TAG_CHECKPOINT)
    if not ref:
        raise CheckpointNotFoundError(
            f"{uri!r} (version {mv.version} of {mv.name!r}) was not registered by tracked_ckpt: it names no "
            f"checkpoint (tag {MODEL_TAG_CHECKPOINT}); load it with MLflow's own flavor loader instead"
        )
    return parse_ref(ref)  # the path is checked: a tag is no reason to read outside checkpoints/


# -------------------------------------------------------------------------------------------------- fork


@dataclass(frozen=True)
class Fork:
    """What ``CheckpointManager(fork_from=...)`` asks for: the parent checkpoint, and whether to copy history."""

    source: str
    copy_metrics: bool = True

    def __post_init__(self) -> None:
        try:
            if not isinstance(self.source, str):
                raise ConfigError(f"a {type(self.source).__name__}")
            if not self.source.startswith("models:/"):
                parse(self.source)
        except ConfigError:
            raise ConfigError(
                f"fork_from={self.source!r}: pass a checkpoint reference, 'runs:/RUN/checkpoints/NAME', 'RUN@latest',"
                " 'RUN@best', 'RUN@STEP' or 'models:/NAME@ALIAS'"
            ) from None

    def attach(self, store: RunStore, how: str) -> None:
        """On the fork's first launch, record its parent (tags, metric history); on a relaunch, check it is a fork."""
        tags = store.tags_at_open
        if TAG_FORKED_FROM in tags:
            log.info("run %s is a fork of %s: resuming the fork", store.run_id, tags[TAG_FORKED_FROM])
            return
        if how != "new" and TAG_COUNT in tags:
            raise ConfigError(
                f"fork_from={self.source!r}, but the run found ({how}) is {store.run_id}, which has checkpoints of "
                "its own and is not a fork; pass a new save_dir (or resume='never') to fork, or drop fork_from to "
                "continue that run"
            )
        try:
            catalog, r = resolve_source(store.client, self.source)
        except TrackedCkptError:
            if how == "new":  # no parent to start from: leave no empty run behind (soft-deleted, like the UI does)
                with contextlib.suppress(Exception):
                    store.client.delete_run(store.run_id)
            raise
        ref = ref_for(catalog.run_id, r.path)
        new_tags = {TAG_FORKED_FROM: ref, TAG_PARENT_RUN: catalog.run_id, TAG_PARENT_STEP: str(r.manifest.step)}
        # The parent's "best" definition, so the fork's summary and best compare like with like.
        metric, mode = monitor_of(catalog.store.tags_at_open)
        t0 = time.perf_counter()
        copied = copy_history(catalog.store, store, r.manifest.step) if self.copy_metrics else 0
        store.set_tags(new_tags)
        store.tags_at_open.update(new_tags)
        log.info("run %s forked from %s (step %d, %s:%s); %d metric points copied in %.2f s",
                 store.run_id, ref, r.manifest.step, metric, mode, copied, time.perf_counter() - t0)  # fmt: skip


def copy_history(parent: RunStore, child: RunStore, up_to_step: int) -> int:
    """Copy every metric point of ``parent`` at steps <= ``up_to_step`` into ``child`` (timestamps kept)."""
    client = parent.client
    run = parent._call(lambda: client.get_run(parent.run_id), f"get run {parent.run_id}")
    points: list[Metric] = []
    for key in sorted(run.data.metrics):
        history = parent._call(lambda k=key: client.get_metric_history(parent.run_id, k), f"read metric {key}")
        points += [Metric(key, m.value, m.timestamp, m.step) for m in history if m.step <= up_to_step]
    for i in range(0, len(points), 1000):  # MLflow's log_batch limit
        batch = points[i : i + 1000]
        child._call(lambda b=batch: client.log_batch(child.run_id, metrics=b), "copy the parent's metric history")
    return len(points)


def fork_parent(tags: dict[str, str]) -> str | None:
    """The ``runs:/`` reference of a fork's parent checkpoint, from its tags (None: not a fork)."""
    return tags.get(TAG_FORKED_FROM) or None


# ----------------------------------------------------------------------------------------------- promote


@dataclass(frozen=True)
class Promoted:
    name: str
    version: str
    alias: str | None
    model_id: str
    run_id: str
    step: int
    checkpoint: str  # runs:/RUN/checkpoints/NAME

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def promote(source: str, name: str, *, alias: str | None = None, tracking_uri: str | None = None) -> Promoted:
    """Register checkpoint ``source`` (``RUN@best``, ``runs:/...``) as a new version of registered model ``name``.

    The checkpoint is verified first. Returns the version; ``load(promoted.uri, model)`` loads it back.
    """
    from .reading import read_client

    if not name or "/" in name or "@" in name:
        raise ConfigError(f"name={name!r}: pass a registered model name without '/' or '@'")
    client = read_client(tracking_uri)
    server = redact(str(client.tracking_uri))
    catalog, r = resolve_source(client, source)
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-") as tmp:
        catalog.fetch_verified(r, Path(tmp))  # never register what would not load
    ref = ref_for(catalog.run_id, r.path)
    step = r.manifest.step
    tags = {MODEL_TAG_CHECKPOINT: ref, MODEL_TAG_STEP: str(step), MODEL_TAG_DIGEST: checkpoint_digest(r)}
    # Retention must never delete what the registry points at: tag first, register second.
    _mark_promoted(catalog.store, r.path)
    try:
        with _http.bounded():
            model_id, location = _logged_model(client, catalog.store, r, name, tags)
            try:
                client.create_registered_model(name, description="Checkpoints registered by tracked_ckpt")
            except MlflowException as e:
                if e.error_code != "RESOURCE_ALREADY_EXISTS":
                    raise
            mv = client.create_model_version(name, source=_version_source(client, model_id, location),
                                             run_id=catalog.run_id, tags=tags, model_id=model_id,
                                             description=f"{ref} (step {step})")  # fmt: skip
            if alias:
                client.set_registered_model_alias(name, alias, mv.version)
    except MlflowException as e:
        raise describe_mlflow_error(e, f"register {ref} as model {name!r}", server) from e
    log.info("promoted %s (step %d) to model %r version %s%s", ref, step, name, mv.version,
             f" @{alias}" if alias else "")  # fmt: skip
    return Promoted(name, str(mv.version), alias, model_id, catalog.run_id, step, ref)


def _version_source(client: MlflowClient, model_id: str, location: str) -> str:
    """``models:/<model_id>`` (the UI links the version to its logged model) where the registry can resolve it.

    A registry store in this process (sqlite, a database) resolves a ``models:/`` source through MLflow's *global*
    tracking URI (mlflow 3.17's own TODO), not this client's: when they differ, the LoggedModel's artifact
    location is the source instead (what MLflow would have stored), and the version still names the run.
    """
    import mlflow

    uri = str(client.tracking_uri)
    if uri.startswith(("http://", "https://")) or uri == mlflow.get_tracking_uri():
        return f"models:/{model_id}"
    log.info("registering %s by its artifact location: MLFLOW_TRACKING_URI names another store than %s",
             model_id, redact(uri))  # fmt: skip
    return location


def checkpoint_digest(r: Resolved) -> str:
    """One digest for a checkpoint: its state.pt's BLAKE3, or for a DCP folder the BLAKE3 of its file digests."""
    files = r.manifest.files
    if len(files) == 1 or r.manifest.format == "torch":
        main = next((f for f in files if f.name == "state.pt"), files[0])
        return f"blake3:{main.blake3}"
    import blake3

    joined = "\n".join(f"{f.name} {f.blake3}" for f in sorted(files, key=lambda f: f.name))
    return f"blake3-files:{blake3.blake3(joined.encode()).hexdigest()}"


def _mark_promoted(store: RunStore, path: str) -> None:
    names = {p.rpartition("/")[2] for p in promoted_paths(store.tags())} | {path.rpartition("/")[2]}
    store.set_tags({TAG_PROMOTED: ",".join(sorted(names))})


def _logged_model(
    client: MlflowClient, store: RunStore, r: Resolved, name: str, tags: dict[str, str]
) -> tuple[str, str]:
    """A READY LoggedModel of the run, linked to it at the checkpoint's step, whose MLmodel names the checkpoint."""
    from mlflow.models import Model

    step = r.manifest.step
    params = {"checkpoint": tags[MODEL_TAG_CHECKPOINT], "step": str(step), "format": r.manifest.format}
    lm = client.create_logged_model(store.experiment_id, name=name, source_run_id=store.run_id, tags=tags,
                                    params=params, model_type="tracked_ckpt checkpoint")  # fmt: skip
    flavor = {
        "checkpoint": tags[MODEL_TAG_CHECKPOINT], "step": step, "digest": tags[MODEL_TAG_DIGEST],
        "format": r.manifest.format, "world_size": r.manifest.world_size, "library_version": r.manifest.library_version,
        "load": "tracked_ckpt.load('models:/NAME@ALIAS', model)",
    }  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-") as tmp:
        mlmodel = Model(artifact_path=name, run_id=store.run_id, flavors={FLAVOR: flavor}, model_id=lm.model_id)
        mlmodel.save(str(Path(tmp) / "MLmodel"))
        client.log_model_artifacts(lm.model_id, tmp)
    # The checkpoint's metrics on the model (the Models table shows them) and the run's link to it at its step.
    now = int(time.time() * 1000)
    metrics = [Metric(k, v, now, step, model_id=lm.model_id, run_id=store.run_id)
               for k, v in r.manifest.metrics.items()]  # fmt: skip
    if metrics:
        client.log_batch(store.run_id, metrics=metrics)
    client.log_outputs(store.run_id, [LoggedModelOutput(lm.model_id, step)])
    client.finalize_logged_model(lm.model_id, "READY")
    return str(lm.model_id), str(lm.artifact_location)


def promoted_checkpoints(tags: dict[str, str]) -> list[str]:
    """The checkpoint folders of a run that ``promote`` registered (kept by retention), sorted."""
    return sorted(promoted_paths(tags))

