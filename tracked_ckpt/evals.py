"""Scores of a checkpoint, logged back into the training run at the checkpoint's step.

An evaluator scores checkpoint step-00000120 on held-out data; ``log_eval`` logs ``{"eval/accuracy": 0.81}`` as
metrics of the *training* run at step 120, so the MLflow UI charts them beside the training reward. The keys are
also listed in the run tag ``tracked_ckpt.evals`` (comma-separated), which is how the read side knows which run
metrics are checkpoint scores: ``list_checkpoints``/``show`` add them to a checkpoint's metrics, and "best" may be
defined by one of them (``load(run, which="best", metric="eval/accuracy")``), also long after the run ended.

When the checkpoint is an MLflow LoggedModel (a model tagged ``tracked_ckpt.checkpoint`` with its reference), the
metrics are logged linked to that model too (one entry: a model's metrics are run metrics with a ``model_id``).
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Mapping
from dataclasses import replace
from typing import Any

from mlflow.entities import Metric, RunTag

from .errors import ConfigError, StoreError
from .policies import CheckpointInfo
from .store.run_store import RunStore

log = logging.getLogger(__name__)

TAG_EVALS = "tracked_ckpt.evals"
_METRIC_NAME = re.compile(r"^[\w./\- ]{1,250}$")  # as state.py's (not imported: it pulls in torch, which ls avoids)
MODEL_TAG_CHECKPOINT = "tracked_ckpt.checkpoint"  # a checkpoint's LoggedModel names it (issue 20)


def eval_keys(tags: Mapping[str, str]) -> list[str]:
    """The metric keys logged by ``log_eval`` on a run, from its tags."""
    return sorted({k.strip() for k in tags.get(TAG_EVALS, "").split(",") if k.strip()})


def checked_metrics(metrics: Mapping[str, Any]) -> dict[str, float]:
    """``metrics`` as floats; ConfigError naming a key that MLflow would refuse or a value that is no number."""
    out: dict[str, float] = {}
    for key, value in metrics.items():
        if not isinstance(key, str) or not _METRIC_NAME.match(key) or "," in key:
            raise ConfigError(
                f"eval metric key {key!r} is not a valid MLflow metric name; use letters, digits, '_', '-', '.', '/'"
            )
        try:
            out[key] = float(value)
        except (TypeError, ValueError):
            raise ConfigError(f"eval metric {key}={value!r} is not a number; pass floats") from None
    if not out:
        raise ConfigError("log_eval got no metrics; pass a dict such as {'eval/accuracy': 0.81}")
    return out


def record_eval(
    store: RunStore,
    ref: str,
    step: int,
    metrics: Mapping[str, Any],
    tags: Mapping[str, str] | None = None,
    timestamp_ms: int | None = None,
) -> None:
    """Log ``metrics`` into ``store``'s run at ``step`` (and on the checkpoint's LoggedModel), in one call.

    ``tags``: the run's tags as last read (saves a ``get_run``); the eval-keys tag is rewritten only when a key is new.
    ``timestamp_ms``: fixed by a caller that retries, so that a call that did reach the server is not logged twice.
    """
    values = checked_metrics(metrics)
    tags = store.tags() if tags is None else tags
    known = eval_keys(tags)
    new_tags = []
    if not set(values) <= set(known):
        new_tags = [RunTag(TAG_EVALS, ",".join(sorted({*known, *values})))]
    model_id = logged_model_of(store, ref)
    now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
    batch = [Metric(k, v, now, step, model_id=model_id, run_id=store.run_id) for k, v in values.items()]
    store.log_batch(store.run_id, f"log eval metrics of step {step}", metrics=batch, tags=new_tags, synchronous=True)
    log.info("run %s: logged %s at step %d", store.run_id, ", ".join(f"{k}={v:g}" for k, v in values.items()), step)


def logged_model_of(store: RunStore, ref: str) -> str | None:
    """The id of the LoggedModel that stands for checkpoint ``ref``, if the run's checkpoints have one."""
    try:
        page = store.search_logged_models([store.experiment_id], f"source_run_id = '{store.run_id}'",
                                          f"search the logged models of run {store.run_id}", max_results=1000)
    except StoreError as e:  # a store without LoggedModels (or an old server): the run metric is what counts
        if e.transient:
            raise
        log.debug("no logged models for run %s: %s", store.run_id, e)
        return None
    ids = [lm.model_id for lm in page if (lm.tags or {}).get(MODEL_TAG_CHECKPOINT) == ref]
    return str(ids[0]) if ids else None


def metric_by_step(store: RunStore, key: str) -> dict[int, float]:
    """{step: value} of one run metric; the newest value of a step wins (a re-scored checkpoint)."""
    history = store.history(key)
    return {int(m.step): float(m.value) for m in sorted(history, key=lambda m: m.timestamp)}


def eval_metrics(store: RunStore, tags: Mapping[str, str]) -> dict[int, dict[str, float]]:
    """{step: {key: value}} of the run's eval metrics (one call per key)."""
    by_step: dict[int, dict[str, float]] = {}
    for key in eval_keys(tags):
        for step, value in metric_by_step(store, key).items():
            by_step.setdefault(step, {})[key] = value
    return by_step


def with_scores(infos: list[CheckpointInfo], scores: Mapping[int, Mapping[str, float]]) -> list[CheckpointInfo]:
    """``infos`` with the eval scores of their step added to their metrics (the manifest's own values win)."""
    return [replace(c, metrics={**scores.get(c.step, {}), **c.metrics}) for c in infos]


def last_scored_step(store: RunStore, key: str) -> int | None:
    """The highest step at which ``key`` was logged (a restarted follower continues after it); None if never."""
    steps = metric_by_step(store, key)
    return max(steps) if steps else None
