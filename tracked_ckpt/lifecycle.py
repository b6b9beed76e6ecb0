"""A checkpoint's life after training: fork a new run from it, promote it to the MLflow Model Registry.

Fork. ``CheckpointManager(save_dir, fork_from="RUN@best")`` makes a new run that starts from that checkpoint: the
first ``load()`` restores the parent's checkpoint (the fork has none of its own yet), the run's tags and page
name the parent (``tracked_ckpt.forked_from``), and the parent's metric history up to the fork step is copied so
the charts are continuous. A relaunch finds the fork by its ``save_dir`` like any run and resumes it as itself.
MLflow's own ``mlflow.parentRunId`` is not used: it means "part of" (nested runs), folds the fork under a
collapsed parent row in the runs table, and cannot cross experiments.

Promote. ``promote("RUN@best", name="cartpole", alias="prod")`` registers the checkpoint in the Model Registry
the MLflow 3 way: its own LoggedModel (models.py: made when it was recorded, or now for an older one; linked to
the run at the checkpoint's step, an ``MLmodel`` file with a ``tracked_ckpt`` flavor naming the checkpoint) becomes
a model version with ``source="models:/<model_id>"``. A checkpoint that is already a version of that name is not
registered again: the existing version is returned (``Promoted.existing``). The UI's model pages read ``MLmodel``
and link the version to its run and logged model. The weights are not copied: ``load("models:/NAME@ALIAS", model)``
resolves the version to its run and checkpoint and loads it verified (size, BLAKE3, weights_only), and the run's
``tracked_ckpt.promoted`` tag keeps retention and ``prune`` from ever deleting it. A fork's origin is kept the
same way (``tracked_ckpt.fork_origins`` on the parent run).
"""

from __future__ import annotations

import contextlib
import logging
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from mlflow.entities import Metric
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from .catalog import Resolved, RunCatalog
from .errors import CheckpointNotFoundError, ConfigError, TrackedCkptError
from .models import FLAVOR, MODEL_TAG_CHECKPOINT, MODEL_TAG_DIGEST, MODEL_TAG_STEP, CheckpointModels, model_tags
from .models import checkpoint_digest as manifest_digest
from .refs import is_model_uri, parse, parse_model, parse_ref, ref_for
from .runtags import (
    TAG_COUNT,
    TAG_FORK_ORIGINS,
    TAG_FORKED_FROM,
    TAG_PARENT_RUN,
    TAG_PARENT_STEP,
    TAG_PROMOTED,
    monitor_of,
    promoted_paths,
)
from .store import http as _http
from .store.run_store import RunStore, describe_mlflow_error, redact

log = logging.getLogger(__name__)

__all__ = ["FLAVOR", "MODEL_TAG_CHECKPOINT", "MODEL_TAG_DIGEST", "MODEL_TAG_STEP", "Fork", "Promoted", "promote"]


# ------------------------------------------------------------------------------------------------ naming


def resolve_source(client: MlflowClient, text: str) -> tuple[RunCatalog, Resolved]:
    """The committed checkpoint named by ``runs:/RUN/checkpoints/NAME``, ``RUN[@latest|best|STEP]``,
    ``models:/<model_id>`` (a checkpoint's LoggedModel) or ``models:/NAME@ALIAS`` / ``models:/NAME/VERSION``."""
    from .maintenance import resolve

    if is_model_uri(text):
        run_id, path = registered_checkpoint(client, text)
        catalog = RunCatalog(RunStore(client, run_id))
        return catalog, Resolved(path, catalog.manifest(path))
    ref = parse(text)
    catalog = RunCatalog(RunStore(client, ref.run_id))
    return catalog, resolve(catalog, ref)


def registered_checkpoint(client: MlflowClient, uri: str) -> tuple[str, str]:
    """(run_id, checkpoint path) of a ``models:/`` reference: a checkpoint's LoggedModel or a promoted version."""
    server = redact(str(client.tracking_uri))
    ref = parse_model(uri)
    try:
        with _http.bounded():
            if ref.model_id is not None:
                lm = client.get_logged_model(ref.model_id)
                what, tags = f"logged model {ref.model_id}", lm.tags
            else:
                if ref.alias is not None:
                    mv = client.get_model_version_by_alias(str(ref.name), ref.alias)
                else:
                    mv = client.get_model_version(str(ref.name), str(ref.version))
                what, tags = f"version {mv.version} of {mv.name!r}", mv.tags
    except MlflowException as e:
        if e.error_code in ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND"):
            hint = "`tracked-ckpt ls RUN` lists checkpoints" if ref.model_id else "`tracked-ckpt promote` registers one"
            kind = "logged model" if ref.model_id else "model version"
            raise CheckpointNotFoundError(
                f"{uri!r} names no {kind} at {server} ({e.message}); it may have been deleted with its "
                f"checkpoint; {hint}"
            ) from None
        raise describe_mlflow_error(e, f"look up {uri}", server) from e
    checkpoint = (tags or {}).get(MODEL_TAG_CHECKPOINT)
    if not checkpoint:
        raise CheckpointNotFoundError(
            f"{uri!r} ({what}) was not made by tracked_ckpt: it names no checkpoint (tag {MODEL_TAG_CHECKPOINT}); "
            "load it with MLflow's own flavor loader instead"
        )
    return parse_ref(checkpoint)  # the path is checked: a tag is no reason to read outside checkpoints/


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
            if not is_model_uri(self.source):
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
        # The parent's retention and prune keep this checkpoint from now on: the fork's tag must name a folder.
        _add_to_tag(catalog.store, TAG_FORK_ORIGINS, r.path)
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
    existing: bool = False  # True: the checkpoint was already this version of ``name`` (nothing new registered)

    @property
    def uri(self) -> str:
        return f"models:/{self.name}@{self.alias}" if self.alias else f"models:/{self.name}/{self.version}"


def promote(source: str, name: str, *, alias: str | None = None, tracking_uri: str | None = None) -> Promoted:
    """Register checkpoint ``source`` (``RUN@best``, ``runs:/...``) as a version of registered model ``name``.

    The checkpoint is verified first; the version's model is the checkpoint's own LoggedModel (made now if it
    has none). Promoting a checkpoint that is already a version of ``name`` registers nothing: it returns that
    version (``existing=True``), with ``alias`` moved to it. ``load(promoted.uri, model)`` loads it back.
    """
    from .store.reading import read_client

    if not name or "/" in name or "@" in name:
        raise ConfigError(f"name={name!r}: pass a registered model name without '/' or '@'")
    client = read_client(tracking_uri)
    server = redact(str(client.tracking_uri))
    catalog, r = resolve_source(client, source)
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-") as tmp:
        catalog.fetch_verified(r, Path(tmp))  # never register what would not load
    ref = ref_for(catalog.run_id, r.path)
    step = r.manifest.step
    tags = model_tags(catalog.run_id, r.path, r.manifest)
    # Retention must never delete what the registry points at: tag first, register second.
    _add_to_tag(catalog.store, TAG_PROMOTED, r.path)
    models = CheckpointModels(catalog.store)
    model_id = models.ready_model(r.path) or models.record(r.path, r.manifest)
    models.pointer(model_id, r.path, r.manifest)  # the MLmodel the version pages read
    try:
        with _http.bounded():
            mv = _existing_version(client, name, catalog.run_id, ref)
            existing = mv is not None
            if mv is None:
                try:
                    client.create_registered_model(name, description="Checkpoints registered by tracked_ckpt")
                except MlflowException as e:
                    if e.error_code != "RESOURCE_ALREADY_EXISTS":
                        raise
                mv = client.create_model_version(name, source=_version_source(client, model_id), run_id=catalog.run_id,
                                                 tags=tags, model_id=model_id,
                                                 description=f"{ref} (step {step})")  # fmt: skip
            if alias:
                client.set_registered_model_alias(name, alias, mv.version)
        models.note_version(model_id, name, str(mv.version))
    except MlflowException as e:
        raise describe_mlflow_error(e, f"register {ref} as model {name!r}", server) from e
    if existing:
        log.info("%s (step %d) is already version %s of model %r: nothing registered%s", ref, step, mv.version, name,
                 f"; alias @{alias} set on it" if alias else "")  # fmt: skip
    else:
        log.info("promoted %s (step %d) to model %r version %s%s", ref, step, name, mv.version,
                 f" @{alias}" if alias else "")  # fmt: skip
    return Promoted(name, str(mv.version), alias, str(mv.model_id or model_id), catalog.run_id, step, ref, existing)


def _existing_version(client: MlflowClient, name: str, run_id: str, ref: str) -> Any:
    """The version of ``name`` that already registers checkpoint ``ref`` (the oldest), or None."""
    quoted = name.replace("'", "\\'")
    found = client.search_model_versions(f"name = '{quoted}' and run_id = '{run_id}'")
    same = [mv for mv in found if (mv.tags or {}).get(MODEL_TAG_CHECKPOINT) == ref]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def _version_source(client: MlflowClient, model_id: str) -> str:
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
    return str(client.get_logged_model(model_id).artifact_location)


def checkpoint_digest(r: Resolved) -> str:
    """One digest for a checkpoint: its state.pt's BLAKE3, or for a DCP folder the BLAKE3 of its file digests."""
    return manifest_digest(r.manifest)


def _add_to_tag(store: RunStore, key: str, path: str) -> None:
    """Add a checkpoint folder's name to a run's comma-separated tag (promoted, fork origins)."""
    names = {p.rpartition("/")[2] for p in promoted_paths(store.tags(), key)} | {path.rpartition("/")[2]}
    store.set_tags({key: ",".join(sorted(names))})


def promoted_checkpoints(tags: dict[str, str]) -> list[str]:
    """The checkpoint folders of a run that ``promote`` registered (kept by retention), sorted."""
    return sorted(promoted_paths(tags))

