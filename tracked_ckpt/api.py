"""Module-level helpers for scripts and notebooks, without a manager: restore from a run (``load``), score one of
its checkpoints (``log_eval``), record what an outage left queued in a save_dir (``sync``).

None creates a run or marks one; each takes ``store_factory=``, the storage seam ``CheckpointManager`` takes.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from .data import data_parts
from .errors import CheckpointNotFoundError, TrackedCkptError
from .loading import load_latest_verified, load_resolved
from .refs import Which
from .resolver import locate, open_catalog, select
from .state import Stateful, TrainingState
from .store.reading import read_client, reading
from .store.run_store import RunStore, StoreFactory

log = logging.getLogger(__name__)


def load(
    run_id: str,
    model: Stateful | None = None,
    optimizer: Stateful | None = None,
    *,
    which: Which = "latest",
    scheduler: Stateful | None = None,
    scaler: Stateful | None = None,
    extra: Mapping[str, Stateful] | None = None,
    tracking_uri: str | None = None,
    metric: str | None = None,
    mode: str | None = None,
    cache_dir: str | Path | None = None,
    data: Stateful | Mapping[str, Stateful] | None = None,
    store_factory: StoreFactory = RunStore,
) -> dict[str, Any]:
    """Restore checkpoint ``which`` ("latest", "best", or a step) of run ``run_id``.

    "best" is by the run's own monitor (the ``monitor``/``mode`` it was saved with) unless ``metric``/``mode``
    name another.

    ``run_id`` may also be any checkpoint reference (refs.py): ``"RUN@best"``, ``"runs:/RUN/checkpoints/NAME"``, a
    checkpoint's logged model ``"models:/<model_id>"`` or a version made by ``promote``, ``"models:/NAME@ALIAS"`` /
    ``"models:/NAME/VERSION"`` (loaded, verified like any other); ``which`` applies to a bare run ID only.

    ``data`` restores the data position saved with ``save(..., data=)`` (this process: world size 1, docs/data.md).
    ``store_factory``: the storage seam, as ``CheckpointManager`` takes it (a subclass of ``RunStore``).

    Returns the checkpoint's metadata. Raises CheckpointNotFoundError when the run has no such
    checkpoint, RunNotFoundError for an unknown run, CheckpointMismatchError when it does not fit,
    StoreNotFoundError when the tracking store does not exist (none is created).
    """
    with reading():
        client = read_client(tracking_uri)
        state = TrainingState(model, optimizer, scheduler, scaler, dict(extra or {}), data_parts(data))
        cache = Path(cache_dir) if cache_dir is not None else None
        catalog, ref = locate(run_id, client=client, store_factory=store_factory, which=which)
        if ref.path is None and ref.which == "latest":  # past a checkpoint that fails verification, to an older one
            got = load_latest_verified(catalog, state, cache)
            if got is None:
                raise CheckpointNotFoundError(f"run {catalog.run_id} has no committed checkpoint")
            return got[1]
        return load_resolved(catalog, select(catalog, ref, metric, mode), state, cache)


def log_eval(
    checkpoint: Any, metrics: Mapping[str, Any], *, tracking_uri: str | None = None,
    store_factory: StoreFactory = RunStore,
) -> None:  # fmt: skip
    """Log ``metrics`` (e.g. ``{"eval/accuracy": 0.81}``) into the training run at the checkpoint's step.

    ``checkpoint``: an item ``follow`` yielded, or a ``runs:/RUN_ID/checkpoints/NAME`` reference.
    ``store_factory``: the storage seam, as ``CheckpointManager`` takes it.
    """
    if hasattr(checkpoint, "log_eval"):
        checkpoint.log_eval(metrics)
        return
    from .evals import record_eval
    from .refs import parse_ref, ref_for

    run_id, path = parse_ref(str(checkpoint))
    catalog = open_catalog(run_id, tracking_uri, store_factory=store_factory)
    manifest = catalog.manifest(path)
    record_eval(catalog.store, ref_for(run_id, path), manifest.step, metrics, catalog.store.tags_at_open)


def sync(
    save_dir: str | Path, *, tracking_uri: str | None = None, timeout: float = 300.0,
    store_factory: StoreFactory = RunStore,
) -> dict[str, int]:  # fmt: skip
    """Record in MLflow every checkpoint still queued in ``save_dir``'s outbox (after an outage).

    Returns {run_id: number still queued} — all zeros when everything was recorded. The tracking URI
    defaults to the one ``save_dir`` was used with (from its pointer file), then MLflow's own resolution.
    The run's status is left alone: sync records checkpoints, it does not end or restart a run.
    """
    from .local import LocalDir
    from .outbox import Outbox
    from .recording import RunRecorder
    from .runtags import monitor_of
    from .store.lease import DirLock, Lease

    root = Path(save_dir).expanduser().resolve()
    local = LocalDir(root)
    uri = tracking_uri or (local.read_pointer() or {}).get("tracking_uri") or None
    left: dict[str, int] = {}
    queued = sorted({p.run_id for p in Outbox(root).pending()})
    if not queued:
        return left  # nothing to do, and nothing written (not even the lock file)
    lock = DirLock(root)  # a trainer still writing this save_dir holds it: RunLockedError names it
    try:
        for run_id in queued:
            try:
                store = store_factory(MlflowClient(tracking_uri=uri), run_id)
                lease = Lease(store, root)
                lease.acquire(store.tags_at_open)
                try:
                    # The run's own definition of "best": the summary tags are recomputed on publish.
                    metric, mode = monitor_of(store.tags_at_open)
                    recorder = RunRecorder(store, local, monitor=metric, mode=mode, retention=None,
                                           publish_timeout=timeout)  # fmt: skip
                    try:
                        recorder.recover()
                    finally:
                        recorder.stop()
                finally:
                    lease.release()
            except TrackedCkptError as e:  # unreachable, refused, locked, deleted: it stays queued, for the next try
                log.warning("run %s: %s", run_id, e)
            left[run_id] = len(Outbox(root).pending(run_id))
    finally:
        lock.release()
    return left
