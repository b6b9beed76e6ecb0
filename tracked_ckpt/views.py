"""pandas views of checkpoints and runs, with stable, typed columns.

``list_checkpoints`` columns: run_id, path, ref, model_id (the checkpoint's MLflow LoggedModel, <NA> where it has
none), step (Int64), seq (Int64), epoch (Int64),
created (datetime64[ns, UTC]), size_bytes (Int64), is_latest, is_best (bool), blocked_s, commit_s, record_s
(float64: what the save cost — seconds the training thread was blocked, to commit locally, to upload; NaN where
not recorded, e.g. checkpoints of older versions), then one float64 column
per numeric metadata key logged with the checkpoints (reward, loss, ...) and per score an evaluator logged on the
run at a checkpoint's step (``log_eval``: eval/accuracy, ...).

``list_runs`` columns: run_id, run_name, experiment_id, status, start_time (datetime64[ns, UTC]),
checkpoints (Int64), latest_step (Int64), best_step (Int64), monitor, best_value (float64),
size_bytes (Int64), latest_ref, best_ref, forked_from (a fork's parent checkpoint, ``runs:/PARENT/checkpoints/NAME``;
<NA> for a run that is not a fork), fork_step (Int64). It costs one ``search_runs`` call per experiment.

Both only read: a tracking store that does not exist raises StoreNotFoundError instead of being created. Both take
``store_factory=`` (the storage seam ``CheckpointManager`` takes): every MLflow call goes through its stores.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping, Sequence
from typing import Any

import pandas as pd
from mlflow.tracking import MlflowClient

from .catalog import Resolved
from .errors import StoreError
from .evals import eval_metrics, with_scores
from .policies import Mode, best_of
from .refs import ref_for
from .resolver import open_catalog, server_store
from .runs import existing_experiment_ids
from .runtags import (
    METRIC_BLOCKED_S,
    METRIC_COMMIT_S,
    METRIC_RECORD_S,
    TAG_BEST,
    TAG_BEST_STEP,
    TAG_BEST_VALUE,
    TAG_BYTES,
    TAG_COUNT,
    TAG_FORKED_FROM,
    TAG_LATEST,
    TAG_LATEST_STEP,
    TAG_MONITOR,
    TAG_PARENT_STEP,
    monitor_of,
)
from .store.reading import read_client, reading
from .store.run_store import RunStore, StoreFactory
from .store.tracking import TrackingStore

log = logging.getLogger(__name__)

CHECKPOINT_COLUMNS = [
    "run_id",
    "path",
    "ref",
    "model_id",
    "step",
    "seq",
    "epoch",
    "created",
    "size_bytes",
    "is_latest",
    "is_best",
    "blocked_s",
    "commit_s",
    "record_s",
]
# What each save cost: the metrics logged at its step (runtags.COST_METRICS), as columns.
_COST_COLUMNS = {METRIC_BLOCKED_S: "blocked_s", METRIC_COMMIT_S: "commit_s", METRIC_RECORD_S: "record_s"}
RUN_COLUMNS = [
    "run_id",
    "run_name",
    "experiment_id",
    "status",
    "start_time",
    "checkpoints",
    "latest_step",
    "best_step",
    "monitor",
    "best_value",
    "size_bytes",
    "latest_ref",
    "best_ref",
    "forked_from",
    "fork_step",
]


def checkpoints_frame(
    run_id: str, found: Sequence[Resolved], metric: str, mode: Mode, client: RunStore | MlflowClient | None = None
) -> pd.DataFrame:
    """One row per committed checkpoint of one run, in commit order; the cost columns when ``client`` answers.

    ``client``: the run's store (or a client to make one); None: no server to ask (an outage).
    """
    costs: dict[int, dict[str, float]] = {}
    models: dict[str, str] = {}
    if client is not None:
        store = client if isinstance(client, RunStore) else RunStore(client, run_id, connect=False)
        try:
            costs = save_costs(store)
            models = model_ids(store)
        except (OSError, StoreError) as e:  # an outage: the rest of the frame needs no server
            log.debug("no cost metrics or models for run %s: %s", run_id, e)
    rows = _checkpoint_rows(run_id, found, metric, mode, costs)
    return _typed_checkpoints(pd.DataFrame([{**row, "model_id": models.get(row["path"])} for row in rows]))


def model_ids(store: RunStore) -> dict[str, str]:
    """{checkpoint path: model_id} of the run's READY LoggedModels (models.py), one search."""
    from .models import CheckpointModels

    return CheckpointModels(store).ready_ids()


def save_costs(store: RunStore) -> dict[int, dict[str, float]]:
    """{step: {"blocked_s": .., "commit_s": .., "record_s": ..}} from the run's cost metrics (one call per metric)."""
    costs: dict[int, dict[str, float]] = {}
    for key, column in _COST_COLUMNS.items():
        for m in sorted(store.history(key), key=lambda m: m.timestamp):  # the newest wins
            costs.setdefault(int(m.step), {})[column] = float(m.value)
    return costs


def _checkpoint_rows(
    run_id: str,
    found: Sequence[Resolved],
    metric: str,
    mode: Mode,
    costs: Mapping[int, dict[str, float]],
    scores: Mapping[int, Mapping[str, float]] | None = None,
) -> list[dict[str, Any]]:
    latest = max(found, key=lambda r: r.manifest.seq).path if found else None
    infos = with_scores([r.info for r in found], scores or {})
    best = best_of(infos, metric, mode)
    rows: list[dict[str, Any]] = []
    for r, info in zip(found, infos, strict=True):
        m = r.manifest
        row: dict[str, Any] = {
            "run_id": run_id,
            "path": r.path,
            "ref": ref_for(run_id, r.path),
            "step": m.step,
            "seq": m.seq,
            "epoch": m.epoch,
            "created": m.created,
            "size_bytes": m.size,
            "is_latest": r.path == latest,
            "is_best": best is not None and r.path == best.path,
            **costs.get(m.step, {}),
        }
        row.update({k: v for k, v in info.metrics.items() if k not in row})
        rows.append(row)
    return rows


def _typed_checkpoints(df: pd.DataFrame) -> pd.DataFrame:
    for col in CHECKPOINT_COLUMNS:
        if col not in df:
            df[col] = pd.Series(dtype=object)
    metric_cols = sorted(c for c in df.columns if c not in CHECKPOINT_COLUMNS)
    df = df[CHECKPOINT_COLUMNS + metric_cols].copy()
    for col in ("step", "seq", "epoch", "size_bytes"):
        df[col] = pd.array(df[col].tolist(), dtype="Int64")
    df["created"] = utc_times(df["created"], "s")
    for col in ("is_latest", "is_best"):
        df[col] = df[col].fillna(False).astype(bool)
    for col in ("run_id", "path", "ref", "model_id"):
        df[col] = df[col].astype("string")
    for col in [*_COST_COLUMNS.values(), *metric_cols]:
        df[col] = df[col].astype("float64")
    return df.reset_index(drop=True)


def tracked_runs(store: TrackingStore | MlflowClient, experiment_ids: Sequence[str]) -> list[Any]:
    """The runs of these experiments that have tracked_ckpt checkpoints, newest first (paged search_runs)."""
    tracking = store if isinstance(store, TrackingStore) else TrackingStore(store)
    runs: list[Any] = []
    token = None
    while True:
        page = tracking.search_runs(
            experiment_ids, max_results=5000, order_by=["attributes.start_time DESC"], page_token=token
        )
        runs += [r for r in page if {TAG_COUNT, TAG_LATEST, TAG_FORKED_FROM} & r.data.tags.keys()]
        token = page.token
        if not token:
            return runs


def list_checkpoints(
    run_id: str | None = None,
    *,
    experiment: str | None = None,
    tracking_uri: str | None = None,
    metric: str | None = None,
    mode: Mode | None = None,
    store_factory: StoreFactory = RunStore,
) -> pd.DataFrame:
    """Committed checkpoints of one run, or of every tracked run in an experiment, as a DataFrame."""
    with reading():
        client = read_client(tracking_uri)
        if run_id is not None:
            return checkpoints_of(client, [run_id], metric, mode, store_factory)
        tracking = server_store(client, store_factory)
        ids = existing_experiment_ids(tracking, tracking.server, experiment)
        runs = [r.info.run_id for r in tracked_runs(tracking, ids)]
        return checkpoints_of(client, runs, metric, mode, store_factory)


def checkpoints_of(
    client: MlflowClient, run_ids: Sequence[str], metric: str | None = None, mode: Mode | None = None,
    store_factory: StoreFactory = RunStore,
) -> pd.DataFrame:  # fmt: skip
    """The ``list_checkpoints`` frame of these runs."""
    rows: list[dict[str, Any]] = []
    for rid in run_ids:
        catalog = open_catalog(rid, client=client, store_factory=store_factory)
        store = catalog.store
        run_metric, run_mode = monitor_of(store.tags_at_open, metric, mode)
        scores = eval_metrics(store, store.tags_at_open)  # what evaluators logged at each step (log_eval)
        found, models = catalog.scan(), model_ids(store)
        rows += [{**row, "model_id": models.get(row["path"])}
                 for row in _checkpoint_rows(rid, found, run_metric, run_mode, save_costs(store), scores)]
    return _typed_checkpoints(pd.DataFrame(rows))


def list_runs(
    experiment: str | None = None, *, tracking_uri: str | None = None, store_factory: StoreFactory = RunStore
) -> pd.DataFrame:
    """One row per run with tracked_ckpt checkpoints in the experiment (from run tags: one query)."""
    with reading():
        tracking = server_store(read_client(tracking_uri), store_factory)
        return runs_frame(tracked_runs(tracking, existing_experiment_ids(tracking, tracking.server, experiment)))


def runs_frame(runs: Sequence[Any]) -> pd.DataFrame:
    """The ``list_runs`` frame of these MLflow runs (read from their tags)."""
    rows = []
    for run in runs:
        tags = run.data.tags
        rows.append(
            {
                "run_id": run.info.run_id,
                "run_name": run.info.run_name,
                "experiment_id": run.info.experiment_id,
                "status": run.info.status,
                "start_time": run.info.start_time,
                "checkpoints": _int(tags.get(TAG_COUNT)),
                "latest_step": _int(tags.get(TAG_LATEST_STEP)),
                "best_step": _int(tags.get(TAG_BEST_STEP)),
                "monitor": tags.get(TAG_MONITOR),
                "best_value": _float(tags.get(TAG_BEST_VALUE)),
                "size_bytes": _int(tags.get(TAG_BYTES)),
                "latest_ref": ref_for(run.info.run_id, tags[TAG_LATEST]) if TAG_LATEST in tags else None,
                "best_ref": ref_for(run.info.run_id, tags[TAG_BEST]) if TAG_BEST in tags else None,
                "forked_from": tags.get(TAG_FORKED_FROM),
                "fork_step": _int(tags.get(TAG_PARENT_STEP)),
            }
        )
    df = pd.DataFrame(rows, columns=RUN_COLUMNS)
    for col in ("checkpoints", "latest_step", "best_step", "size_bytes", "fork_step"):
        df[col] = pd.array(df[col].tolist(), dtype="Int64")
    df["start_time"] = utc_times(df["start_time"], "ms")
    df["best_value"] = df["best_value"].astype("float64")
    for col in ("run_id", "run_name", "experiment_id", "status", "monitor", "latest_ref", "best_ref", "forked_from"):
        df[col] = df[col].astype("string")
    return df


def utc_times(values: pd.Series, unit: str) -> pd.Series:
    """Epoch times (``unit`` "s" or "ms") as datetime64[ns, UTC], exact to the microsecond (not float-rounded ns)."""
    micros = (values.astype("float64") * (1e6 if unit == "s" else 1e3)).round()
    # pandas 3 picks the resolution from the data (ns, or us when empty): pin the documented one.
    return pd.to_datetime(micros, unit="us", utc=True).astype("datetime64[ns, UTC]")


def _int(v: str | None) -> int | None:
    try:
        return int(v) if v is not None else None
    except ValueError:
        return None


def _float(v: str | None) -> float:
    try:
        return float(v) if v is not None else math.nan
    except ValueError:
        return math.nan
