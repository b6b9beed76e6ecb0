"""Module-level helpers for scripts and notebooks: restore from a run ID without a manager.

These only read the run: nothing is logged, no run is created or marked.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from mlflow.tracking import MlflowClient

from .catalog import RunCatalog, Which
from .errors import CheckpointNotFoundError, StoreError
from .loading import load_latest_verified, load_resolved
from .policies import check_mode
from .reading import read_client, reading
from .state import Stateful, TrainingState
from .store import RunStore

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
    metric: str = "reward",
    mode: str = "max",
    cache_dir: str | Path | None = None,
) -> dict[str, Any]:
    """Restore checkpoint ``which`` ("latest", "best" by ``metric``/``mode``, or a step) of run ``run_id``.

    Returns the checkpoint's metadata. Raises CheckpointNotFoundError when the run has no such
    checkpoint, RunNotFoundError for an unknown run, CheckpointMismatchError when it does not fit,
    StoreNotFoundError when the tracking store does not exist (none is created).
    """
    with reading():
        catalog = RunCatalog(RunStore(read_client(tracking_uri), run_id))
        state = TrainingState(model, optimizer, scheduler, scaler, dict(extra or {}))
        cache = Path(cache_dir) if cache_dir is not None else None
        if which == "latest":
            got = load_latest_verified(catalog, state, lambda r: cache)
            if got is None:
                raise CheckpointNotFoundError(f"run {run_id} has no committed checkpoint")
            return got[1]
        r = catalog.resolve(which, metric, check_mode(mode))
        return load_resolved(catalog, r, state, cache)


def sync(save_dir: str | Path, *, tracking_uri: str | None = None, timeout: float = 300.0) -> dict[str, int]:
    """Record in MLflow every checkpoint still queued in ``save_dir``'s outbox (after an outage).

    Returns {run_id: number still queued} — all zeros when everything was recorded. The tracking URI
    defaults to the one ``save_dir`` was used with (from its pointer file), then MLflow's own resolution.
    """
    from mlflow.exceptions import MlflowException

    from .local import LocalDir
    from .maintenance import monitor_of
    from .manager import CheckpointManager
    from .outbox import Outbox

    root = Path(save_dir)
    pointer = LocalDir(root).read_pointer() or {}
    uri = tracking_uri or pointer.get("tracking_uri") or None
    left: dict[str, int] = {}
    class Syncer(CheckpointManager):
        """Drains the outbox as the run's own manager would, but leaves the run's status alone."""

        def _find_run(self, run_id: str | None, experiment: str | None, run_name: str | None) -> tuple[str, str]:
            self._owns_run_status = False
            assert run_id is not None
            return run_id, "sync"

    for run_id in sorted({p.run_id for p in Outbox(root).pending()}):
        try:
            # Keep the run's own definition of "best": the summary tags are recomputed on publish.
            tags = MlflowClient(tracking_uri=uri).get_run(run_id).data.tags
            metric, mode = monitor_of(tags)
            Syncer(root, run_id=run_id, tracking_uri=uri, publish_timeout=timeout, monitor=metric, mode=mode).close()
        except (StoreError, MlflowException) as e:  # still unreachable: everything stays queued, for the next try
            log.warning("run %s: %s", run_id, e)
        left[run_id] = len(Outbox(root).pending(run_id))
    return left
