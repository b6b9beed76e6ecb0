"""Which MLflow run a CheckpointManager writes: found by run ID, environment, pointer or tag, else created.

Order: ``run_id=``, ``MLFLOW_RUN_ID`` (MLflow's own convention), the user's active ``mlflow.start_run()`` on the
same tracking URI, the pointer file in ``save_dir``, the newest run tagged with this ``save_dir`` (so a deleted
``save_dir`` still resumes), else a new run. ``resume="never"`` skips straight to a new run.

With the server unreachable, ``known_locally`` answers from what needs no server (the same order, minus the
search by tag): a job can then resume from its ``save_dir``, but no new run can be created.

Experiments are looked up here too: ``experiment_id`` (creating one if missing, for writers) and
``existing_experiment_ids`` (read-only, for the views and the CLI); ``ui_link`` is a run's page in the MLflow UI.
Each takes an ``MlflowClient`` or a ``TrackingStore`` (store/tracking.py, a test's subclass): MLflow is asked through
the store only.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from mlflow.entities import Param
from mlflow.tracking import MlflowClient

from .errors import ConfigError, ExperimentNotFoundError, RunNotFoundError, StoreError
from .runtags import TAG_SAVE_DIR, short_path
from .store import http as _http
from .store.tracking import TrackingStore, describe_mlflow_error

if TYPE_CHECKING:  # local.py imports torch (~3 s): the CLI's reads import this module and need none
    from .local import LocalDir

log = logging.getLogger(__name__)
Tracking = MlflowClient | TrackingStore  # what these functions ask MLflow through

TAG_EXPERIMENT_KIND = "mlflow.experimentKind"  # MLflow's word for what an experiment is for
KIND_TRAINING = "custom_model_development"  # model training (the other: "genai_development")


@dataclass(frozen=True)
class FoundRun:
    run_id: str
    how: str  # for the log line: "run_id argument", "MLFLOW_RUN_ID", "pointer in ...", "new", ...
    owns_status: bool  # False for the user's own mlflow.start_run(): the user ends it


def _store(client: Tracking) -> TrackingStore:
    return client if isinstance(client, TrackingStore) else TrackingStore(client)


def find_run(
    client: Tracking,
    server: str,
    local: LocalDir,
    *,
    run_id: str | None,
    experiment: str | None,
    run_name: str | None,
    new_only: bool,
) -> FoundRun:
    """The run to write (see the module doc); StoreError (transient) when the server does not answer."""
    with _http.bounded():
        try:
            return _find_run(_store(client), server, local, run_id=run_id, experiment=experiment, run_name=run_name,
                             new_only=new_only)  # fmt: skip
        except OSError as e:  # requests' connection errors outside MlflowException
            if isinstance(e, StoreError):
                raise
            raise describe_mlflow_error(e, "reach the tracking server", server) from e


def known_locally(
    client: Tracking, server: str, local: LocalDir, run_id: str | None, cause: StoreError
) -> FoundRun:
    """The run named without asking the server (argument, MLFLOW_RUN_ID, active run, pointer), else StoreError."""
    named = _named(client, run_id)
    if named is not None:
        return named
    pointer = local.read_pointer()
    if pointer is not None and pointer.get("tracking_uri") == server:
        return FoundRun(pointer["run_id"], f"pointer in {local.root}", True)
    err = StoreError(
        f"MLflow at {server} is unreachable ({cause}) and {local.root} names no run to resume (no {local.root.name}/"
        "tracked_ckpt.json for this server, no run_id= or MLFLOW_RUN_ID): a new run cannot be created offline. "
        "Check that the tracking server is up, or pass the run ID to resume"
    )
    err.transient = cause.transient
    raise err


def _named(client: Tracking, run_id: str | None) -> FoundRun | None:
    """The run named by the argument, MLFLOW_RUN_ID or the user's active mlflow.start_run(): no server needed."""
    if run_id is not None:
        return FoundRun(run_id, "run_id argument", True)
    if os.environ.get("MLFLOW_RUN_ID"):
        return FoundRun(os.environ["MLFLOW_RUN_ID"], "MLFLOW_RUN_ID", True)
    active = _active_fluent_run_id(_store(client).client.tracking_uri)
    return FoundRun(active, "active mlflow run", False) if active is not None else None


def _find_run(
    store: TrackingStore,
    server: str,
    local: LocalDir,
    *,
    run_id: str | None,
    experiment: str | None,
    run_name: str | None,
    new_only: bool,
) -> FoundRun:
    save_dir = local.root
    if not new_only:
        named = _named(store, run_id)
        if named is not None:
            return named
        pointer = local.read_pointer()
        if pointer is not None and pointer.get("tracking_uri") == server and _alive(store, pointer["run_id"], local):
            _warn_if_other_experiment(store, experiment, pointer, save_dir)
            return FoundRun(pointer["run_id"], f"pointer in {save_dir}", True)
        found = _search_by_save_dir(store, server, save_dir, experiment)
        if found is not None:
            return FoundRun(found, "run tagged with this save_dir", True)
    exp_id = experiment_id(store, server, experiment)
    # The full path as a param: the UI shows params whole, and a relaunch after `rm -r save_dir` searches it.
    new_id = store.create_run(exp_id, {TAG_SAVE_DIR: short_path(str(save_dir))}, run_name,
                              [Param(TAG_SAVE_DIR, str(save_dir))])  # fmt: skip
    return FoundRun(new_id, "new", True)


def experiment_id(client: Tracking, server: str, name: str | None) -> str:
    """The experiment's ID (created if missing); default: MLFLOW_EXPERIMENT_ID/NAME, else "Default"."""
    env_id, name = _default_experiment(name)
    if env_id is not None:
        return env_id
    store = _store(client)
    exp = store.experiment_by_name(name)
    if exp is None:
        # UIs that read this tag (MLflow 3.x before 3.17's toggle, Databricks) open the experiment in their
        # training view, not the GenAI one. Only experiments created here get it: one the user made keeps
        # whatever kind they gave it. (3.17 takes the view from the link: see ui_link.)
        return store.create_experiment(name, {TAG_EXPERIMENT_KIND: KIND_TRAINING})
    if exp.lifecycle_stage == "deleted":
        raise ConfigError(f"experiment {name!r} is deleted at {server}; restore it or pick another name")
    return str(exp.experiment_id)


def existing_experiment_ids(client: Tracking, server: str, name: str | None, *, every: bool = False) -> list[str]:
    """Read-only twin of ``experiment_id``: the ID of an existing experiment, never creating one.

    Without ``name``: the default of ``experiment_id``, or with ``every`` the IDs of every active experiment.
    Raises ExperimentNotFoundError for a missing or deleted experiment.
    """
    store = _store(client)
    if name is None and every:
        return store.experiment_ids()
    env_id, name = _default_experiment(name)
    if env_id is not None:
        return [env_id]
    exp = store.experiment_by_name(name)
    if exp is None or exp.lifecycle_stage != "active":
        raise ExperimentNotFoundError(
            f"experiment {name!r} does not exist at {server}; `tracked-ckpt runs` lists the tracked runs of "
            "every experiment"
        )
    return [str(exp.experiment_id)]


def _default_experiment(name: str | None) -> tuple[str | None, str]:
    """(MLFLOW_EXPERIMENT_ID when no name is given, else None; the name to look up)."""
    if name is None and os.environ.get("MLFLOW_EXPERIMENT_ID"):
        return os.environ["MLFLOW_EXPERIMENT_ID"], ""
    return None, name or os.environ.get("MLFLOW_EXPERIMENT_NAME") or "Default"


def ui_link(base_url: str, experiment_id: str, run_id: str, page: str = "") -> str:
    """A run's page in the MLflow UI (``page``: "", "model-metrics", "artifacts/<path>"), in its training view.

    MLflow 3.17's UI picks its view from the link's ``workflowType``, else from what this browser chose last
    (GenAI in a fresh one); the experiment's ``mlflow.experimentKind`` tag is not consulted on a run page.
    """
    tail = f"/{page.strip('/')}" if page.strip("/") else ""
    return f"{base_url.rstrip('/')}/#/experiments/{experiment_id}/runs/{run_id}{tail}?workflowType=machine_learning"


def _warn_if_other_experiment(
    store: TrackingStore, experiment: str | None, pointer: dict[str, str], save_dir: Path
) -> None:
    """``experiment=`` cannot move a run: when save_dir's run lives in another experiment, say so (it resumes)."""
    if experiment is None or not pointer.get("experiment_id"):
        return
    try:
        actual = store.experiment_name(pointer["experiment_id"])
    except StoreError:
        return  # only a warning: the run itself was found
    if actual != experiment:
        log.warning(
            "experiment=%r is ignored: save_dir %s belongs to run %s of experiment %r, which this manager resumes "
            "there. For a run in %r, pass another save_dir (or resume='never' for a new run in this one)",
            experiment, save_dir, pointer["run_id"], actual, experiment,
        )  # fmt: skip


def _alive(store: TrackingStore, run_id: str, local: LocalDir) -> bool:
    try:
        return bool(store.get_run(run_id).info.lifecycle_stage == "active")
    except RunNotFoundError:
        log.warning("the run %s named in %s no longer exists; looking further", run_id, local.root)
        return False


def _search_by_save_dir(store: TrackingStore, server: str, save_dir: Path, experiment: str | None) -> str | None:
    ids = [experiment_id(store, server, experiment)]
    quoted = str(save_dir).replace("'", "\\'")
    for kind in ("params", "tags"):  # tags: runs made before the full path moved to a param
        runs = store.search_runs(
            ids, f"{kind}.`{TAG_SAVE_DIR}` = '{quoted}'", order_by=["attributes.start_time DESC"], max_results=1
        )
        if runs:
            return str(runs[0].info.run_id)
    return None


def _active_fluent_run_id(tracking_uri: str) -> str | None:
    """The run of the user's own ``mlflow.start_run()``, if any, on the same tracking URI."""
    import mlflow

    run = mlflow.active_run()
    if run is None or mlflow.get_tracking_uri() != tracking_uri:
        return None
    return str(run.info.run_id)
