"""From a reference to a committed checkpoint: the one place that opens a run's catalog and resolves a reference.

Every form of refs.py's grammar comes here: ``RUN``, ``RUN@latest|best|STEP``, ``runs:/RUN/checkpoints/NAME``,
``models:/<model_id>`` and ``models:/NAME@ALIAS|VERSION`` (MLflow's model APIs name the run and the folder).
"best" is always by the run's *own* monitor (its ``tracked_ckpt.monitor`` tag, written by the manager that saved
it) unless the caller names a metric. Stores are made by ``store_factory`` (the seam ``CheckpointManager`` takes):
a test's subclass of ``RunStore`` sees every call a command makes, the registry lookups included.
"""

from __future__ import annotations

from mlflow.tracking import MlflowClient

from .catalog import Resolved, RunCatalog
from .errors import CheckpointNotFoundError, StoreError
from .models import MODEL_TAG_CHECKPOINT
from .refs import ModelRef, Ref, Which, parse_any, parse_ref
from .store.reading import read_client
from .store.run_store import RunStore, StoreFactory
from .store.tracking import TrackingStore, not_found


def open_catalog(
    run_id: str,
    tracking_uri: str | None = None,
    *,
    client: MlflowClient | None = None,
    store_factory: StoreFactory = RunStore,
    connect: bool = True,
) -> RunCatalog:
    """The catalog of ``run_id``; RunNotFoundError for an unknown or deleted run, StoreError if unreachable.

    Without ``client``: one on the existing store ``tracking_uri`` names (StoreNotFoundError, none created).
    ``connect=False``: the run is read on first use (a follower polling a server that is not up yet).
    """
    return RunCatalog(store_factory(client or read_client(tracking_uri), run_id, connect=connect))


def server_store(client: MlflowClient, store_factory: StoreFactory = RunStore) -> TrackingStore:
    """The seam's calls that name no run (the registry, logged models by id): a store of no run, never connected."""
    return store_factory(client, "", connect=False)


def locate(
    text: str,
    *,
    client: MlflowClient | None = None,
    tracking_uri: str | None = None,
    store_factory: StoreFactory = RunStore,
    which: Which | None = None,
) -> tuple[RunCatalog, Ref]:
    """The run a reference names (its catalog) and what to pick in it; ``which`` applies to a bare run ID."""
    client = client or read_client(tracking_uri)
    ref = parse_any(text)
    if isinstance(ref, ModelRef):
        run_id, path = model_checkpoint(server_store(client, store_factory), ref, text)
        ref = Ref(run_id, path=path)
    elif which is not None and not ref.explicit:
        ref = Ref(ref.run_id, which=which)
    return open_catalog(ref.run_id, client=client, store_factory=store_factory), ref


def select(catalog: RunCatalog, ref: Ref, metric: str | None = None, mode: str | None = None) -> Resolved:
    """The committed checkpoint ``ref`` names in ``catalog``; CheckpointNotFoundError when there is none."""
    if ref.path is not None:
        return Resolved(ref.path, catalog.manifest(ref.path))
    return catalog.resolve(ref.which, metric, mode)  # "best": the run's own monitor unless metric/mode name one


def resolve(
    text: str,
    *,
    client: MlflowClient | None = None,
    tracking_uri: str | None = None,
    store_factory: StoreFactory = RunStore,
    which: Which | None = None,
    metric: str | None = None,
    mode: str | None = None,
) -> tuple[RunCatalog, Resolved]:
    """The run's catalog and the committed checkpoint any reference of the grammar names."""
    catalog, ref = locate(text, client=client, tracking_uri=tracking_uri, store_factory=store_factory, which=which)
    return catalog, select(catalog, ref, metric, mode)


def model_checkpoint(store: TrackingStore, ref: ModelRef, uri: str) -> tuple[str, str]:
    """(run_id, checkpoint path) of a ``models:/`` reference: a checkpoint's LoggedModel or a promoted version."""
    try:
        if ref.model_id is not None:
            lm = store.logged_model(ref.model_id)
            what, tags = f"logged model {ref.model_id}", lm.tags
        else:
            mv = store.model_version(str(ref.name), alias=ref.alias, version=ref.version)
            what, tags = f"version {mv.version} of {mv.name!r}", mv.tags
    except StoreError as e:
        if not not_found(e):
            raise
        hint = "`tracked-ckpt ls RUN` lists checkpoints" if ref.model_id else "`tracked-ckpt promote` registers one"
        kind = "logged model" if ref.model_id else "model version"
        said = getattr(e.__cause__, "message", None) or str(e)
        raise CheckpointNotFoundError(
            f"{uri!r} names no {kind} at {store.server} ({said}); it may have been deleted with its checkpoint; {hint}"
        ) from None
    checkpoint = (tags or {}).get(MODEL_TAG_CHECKPOINT)
    if not checkpoint:
        raise CheckpointNotFoundError(
            f"{uri!r} ({what}) was not made by tracked_ckpt: it names no checkpoint (tag {MODEL_TAG_CHECKPOINT}); "
            "load it with MLflow's own flavor loader instead"
        )
    return parse_ref(checkpoint)  # the path is checked: a tag is no reason to read outside checkpoints/
