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

from .catalog import Resolved
from .errors import ConfigError, TrackedCkptError
from .models import FLAVOR, MODEL_TAG_CHECKPOINT, MODEL_TAG_DIGEST, MODEL_TAG_STEP, CheckpointModels, model_tags
from .models import checkpoint_digest as manifest_digest
from .refs import ModelRef, parse_any, ref_for
from .resolver import resolve, server_store
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
from .store.run_store import RunStore, StoreFactory
from .store.tracking import TrackingStore

log = logging.getLogger(__name__)

__all__ = ["FLAVOR", "MODEL_TAG_CHECKPOINT", "MODEL_TAG_DIGEST", "MODEL_TAG_STEP", "Fork", "Promoted", "promote"]


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
            parse_any(self.source)
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
            catalog, r = resolve(self.source, client=store.client, store_factory=type(store))
        except TrackedCkptError:
            if how == "new":  # no parent to start from: leave no empty run behind (soft-deleted, like the UI does)
                with contextlib.suppress(Exception):
                    store.delete_run(store.run_id)
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
    points: list[Metric] = []
    for key in sorted(parent.run().data.metrics):
        points += [Metric(key, m.value, m.timestamp, m.step) for m in parent.history(key) if m.step <= up_to_step]
    for i in range(0, len(points), 1000):  # MLflow's log_batch limit
        child.log_batch(child.run_id, "copy the parent's metric history", metrics=points[i : i + 1000])
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
        return ModelRef(name=self.name, alias=self.alias, version=self.version).uri


def promote(
    source: str, name: str, *, alias: str | None = None, tracking_uri: str | None = None,
    store_factory: StoreFactory = RunStore,
) -> Promoted:  # fmt: skip
    """Register checkpoint ``source`` (``RUN@best``, ``runs:/...``) as a version of registered model ``name``.

    The checkpoint is verified first; the version's model is the checkpoint's own LoggedModel (made now if it
    has none). Promoting a checkpoint that is already a version of ``name`` registers nothing: it returns that
    version (``existing=True``), with ``alias`` moved to it. ``load(promoted.uri, model)`` loads it back.
    ``store_factory``: the storage seam, as ``CheckpointManager`` takes it.
    """
    from .store.reading import read_client

    if not name or "/" in name or "@" in name:
        raise ConfigError(f"name={name!r}: pass a registered model name without '/' or '@'")
    client = read_client(tracking_uri)
    catalog, r = resolve(source, client=client, store_factory=store_factory)
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
    registry = server_store(client, store_factory)
    mv = _existing_version(registry, name, catalog.run_id, ref)
    existing = mv is not None
    if mv is None:
        registry.ensure_registered_model(name, "Checkpoints registered by tracked_ckpt")
        source = _version_source(registry, model_id)
        mv = registry.create_model_version(name, f"register {ref} as model {name!r}", source=source,
                                           run_id=catalog.run_id, tags=tags, model_id=model_id,
                                           description=f"{ref} (step {step})")  # fmt: skip
    if alias:
        registry.set_alias(name, alias, str(mv.version))
    models.note_version(model_id, name, str(mv.version))
    if existing:
        log.info("%s (step %d) is already version %s of model %r: nothing registered%s", ref, step, mv.version, name,
                 f"; alias @{alias} set on it" if alias else "")  # fmt: skip
    else:
        log.info("promoted %s (step %d) to model %r version %s%s", ref, step, name, mv.version,
                 f" @{alias}" if alias else "")  # fmt: skip
    return Promoted(name, str(mv.version), alias, str(mv.model_id or model_id), catalog.run_id, step, ref, existing)


def _existing_version(registry: TrackingStore, name: str, run_id: str, ref: str) -> Any:
    """The version of ``name`` that already registers checkpoint ``ref`` (the oldest), or None."""
    quoted = name.replace("'", "\\'")
    found = registry.search_model_versions(f"name = '{quoted}' and run_id = '{run_id}'",
                                           f"search the versions of model {name!r}")  # fmt: skip
    same = [mv for mv in found if (mv.tags or {}).get(MODEL_TAG_CHECKPOINT) == ref]
    return min(same, key=lambda mv: int(mv.version)) if same else None


def _version_source(registry: TrackingStore, model_id: str) -> str:
    """``models:/<model_id>`` (the UI links the version to its logged model) where the registry can resolve it.

    A registry store in this process (sqlite, a database) resolves a ``models:/`` source through MLflow's *global*
    tracking URI (mlflow 3.17's own TODO), not this client's: when they differ, the LoggedModel's artifact
    location is the source instead (what MLflow would have stored), and the version still names the run.
    """
    import mlflow

    uri = str(registry.client.tracking_uri)
    if uri.startswith(("http://", "https://")) or uri == mlflow.get_tracking_uri():
        return ModelRef(model_id=model_id).uri
    log.info("registering %s by its artifact location: MLFLOW_TRACKING_URI names another store than %s",
             model_id, registry.server)  # fmt: skip
    return str(registry.logged_model(model_id).artifact_location)


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

