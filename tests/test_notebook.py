"""The analysis path: the pandas views, and notebooks/analyze_checkpoints.ipynb run top to bottom by nbclient.

Both read the store the demo job populated (tests/demo_store.py: `python -m tracked_ckpt demo` into a tmp sqlite
database); the query-count test reads the access log of a real `mlflow server` over that store. The notebook runs as
`jupyter lab` and `jupyter nbconvert --execute` run it: the kernel in the notebook's own folder (`notebooks/` of a
clone whose root holds the demo's `mlflow.db`), without MLFLOW_TRACKING_URI.
"""

from __future__ import annotations

import re
import shutil
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import nbformat
import pandas as pd
import pytest
from demo_store import DEMO_EXPERIMENT, DemoStore, demo_server, demo_store
from mlflow.tracking import MlflowClient
from nbclient import NotebookClient

import tracked_ckpt
from tracked_ckpt.runtags import (
    TAG_BEST,
    TAG_BEST_STEP,
    TAG_BEST_VALUE,
    TAG_COUNT,
    TAG_LATEST,
    TAG_LATEST_STEP,
    TAG_PARENT_RUN,
    TAG_PARENT_STEP,
)
from tracked_ckpt.views import CHECKPOINT_COLUMNS, RUN_COLUMNS

NOTEBOOK = Path(__file__).resolve().parent.parent / "notebooks" / "analyze_checkpoints.ipynb"
UTC_NS = "datetime64[ns, UTC]"


@pytest.fixture(scope="module")
def store(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DemoStore:
    return demo_store(request.config, tmp_path_factory)


@dataclass(frozen=True)
class Executed:
    nb: Any
    clone: Path  # a clone's layout: the demo's mlflow.db at its root, the notebook in notebooks/
    before: list[str]  # the files of the clone before the notebook ran
    uri: str


def files(root: Path) -> list[str]:
    return sorted(p.relative_to(root).as_posix() for p in root.rglob("*"))


def execute(nb: Any, cwd: Path, allow_errors: bool = False) -> Any:
    """Run ``nb`` as Jupyter does: the kernel in ``cwd``, with this environment less MLFLOW_TRACKING_URI."""
    with pytest.MonkeyPatch.context() as mp:
        mp.delenv("MLFLOW_TRACKING_URI", raising=False)  # conftest sets it for the tests; a user's shell has none
        client = NotebookClient(
            nb,
            timeout=180,
            kernel_name="python3",
            allow_errors=allow_errors,
            resources={"metadata": {"path": str(cwd)}},
        )
        client.execute()
    return nb


@pytest.fixture(scope="module")
def executed(store: DemoStore, tmp_path_factory: pytest.TempPathFactory) -> Executed:
    """The committed notebook run from notebooks/ of a clone where the demo ran at the root."""
    clone = tmp_path_factory.mktemp("clone")
    (clone / "notebooks").mkdir()
    shutil.copy(NOTEBOOK, clone / "notebooks" / NOTEBOOK.name)
    shutil.copy(store.root / "server.db", clone / "mlflow.db")  # the demo's store (its artifacts stay where they are)
    before = files(clone)
    nb = execute(nbformat.read(NOTEBOOK, as_version=4), clone / "notebooks")
    nbformat.write(nb, tmp_path_factory.mktemp("notebook") / NOTEBOOK.name)  # kept for a look after a failure
    return Executed(nb, clone, before, f"sqlite:///{clone / 'mlflow.db'}")


def outputs(nb: Any) -> list[dict[str, Any]]:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]


def test_notebook_runs_top_to_bottom_and_restores_the_best_checkpoint(executed: Executed, store: DemoStore) -> None:
    run, executed = executed, executed.nb
    errors = [o for o in outputs(executed) if o["output_type"] == "error"]
    assert errors == []
    text = "".join(o.get("text", "") for o in outputs(executed) if o["output_type"] == "stream")
    assert f"tracking URI: {run.uri}\n" in text  # found ../mlflow.db from notebooks/
    tags = MlflowClient(run.uri).get_run(store.run_id).data.tags
    assert f"best: run {store.run_id}, step {tags[TAG_BEST_STEP]}, " in text
    assert f"(runs:/{store.run_id}/{tags[TAG_BEST]})" in text
    found = re.search(r"restored best ([\d.]+), untrained ([\d.]+)", text)
    assert found, text
    restored, untrained = map(float, found.groups())
    assert restored > untrained + 10  # the trained weights were really loaded into the policy
    assert any("image/png" in o.get("data", {}) for o in outputs(executed)), "no plot was drawn"
    said = rf"fork ([0-9a-f]{{32}}) of {store.run_id} at step (\d+): continues its parent up to there: True"
    fork = re.search(said, text)
    assert fork, text  # the last cell forked the run (docs/lifecycle.md) and compared the two reward histories
    fork_tags = MlflowClient(run.uri).get_run(fork.group(1)).data.tags
    assert (fork_tags[TAG_PARENT_RUN], fork_tags[TAG_PARENT_STEP]) == (store.run_id, fork.group(2))
    tables = [o["data"]["text/html"] for o in outputs(executed) if "text/html" in o.get("data", {})]
    assert len(tables) == 2 and store.run_id in tables[0] and "is_best" in tables[1]


def test_notebook_writes_nothing_into_the_clone_and_says_where_it_wrote(executed: Executed) -> None:
    run = executed
    assert files(run.clone) == run.before  # no notebooks/mlflow.db, notebooks/mlruns, notebooks/fork_checkpoints
    text = "".join(o.get("text", "") for o in outputs(run.nb) if o["output_type"] == "stream")
    wrote = r"wrote: run ([0-9a-f]{32}) in experiment '[^']+' of (\S+), its checkpoints under (\S+); save_dir (.+)"
    said = re.search(wrote, text)
    assert said, text
    assert said.group(2) == run.uri
    artifacts, save_dir = Path(said.group(3).removeprefix("file://")), Path(said.group(4).strip())
    assert not artifacts.is_relative_to(run.clone) and not save_dir.is_relative_to(run.clone)
    assert any(artifacts.rglob("MANIFEST.json")) and (save_dir / "tracked_ckpt.json").is_file()
    shutil.rmtree(save_dir)  # the notebook's fork save_dir, in the system's temporary folder


def first_cell() -> Any:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nb.cells = [c for c in nb.cells if c.cell_type == "code"][:1]
    return nb


def test_a_copy_next_to_a_store_finds_it(store: DemoStore, tmp_path: Path) -> None:
    shutil.copy(store.root / "server.db", tmp_path / "mlflow.db")
    nb = execute(first_cell(), tmp_path)
    text = "".join(o.get("text", "") for o in outputs(nb) if o["output_type"] == "stream")
    assert f"tracking URI: sqlite:///{tmp_path / 'mlflow.db'}\n" in text


def test_without_a_store_it_stops_and_creates_none(tmp_path: Path) -> None:
    nb = execute(first_cell(), tmp_path, allow_errors=True)
    (error,) = [o for o in outputs(nb) if o["output_type"] == "error"]
    assert error["ename"] == "FileNotFoundError"
    assert f"no mlflow.db in {tmp_path} or any folder above it" in error["evalue"], error["evalue"]
    assert "MLFLOW_TRACKING_URI" in error["evalue"]
    assert list(tmp_path.iterdir()) == []  # nothing created: no mlflow.db, no mlruns


def test_notebook_is_committed_without_outputs() -> None:
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    code = [c for c in nb.cells if c.cell_type == "code"]
    assert code and all(c.outputs == [] and c.execution_count is None for c in code)


# ------------------------------------------------------------------------------------------------ views


def test_list_checkpoints_has_stable_typed_columns(store: DemoStore) -> None:
    df = tracked_ckpt.list_checkpoints(experiment=DEMO_EXPERIMENT, tracking_uri=store.uri)
    assert list(df.columns) == [*CHECKPOINT_COLUMNS, "loss", "reward"]
    expected = {"step": "Int64", "seq": "Int64", "epoch": "Int64", "size_bytes": "Int64", "created": UTC_NS}
    expected |= {"is_latest": "bool", "is_best": "bool", "reward": "float64", "loss": "float64"}
    expected |= {"run_id": "string", "path": "string", "ref": "string"}
    assert {c: str(df[c].dtype) for c in expected} == expected
    assert df.step.tolist() == [5, 10, 15] and df.seq.tolist() == [1, 2, 3]
    assert df.is_latest.tolist() == [False, False, True] and df.is_best.sum() == 1
    tags = MlflowClient(store.uri).get_run(store.run_id).data.tags
    assert df.loc[df.is_best, "path"].item() == tags[TAG_BEST]
    assert df.loc[df.is_best, "reward"].item() == float(tags[TAG_BEST_VALUE])
    age = pd.Timestamp.now(tz="UTC") - df.created
    assert ((age > pd.Timedelta(0)) & (age < pd.Timedelta(hours=1))).all()  # seconds read as seconds, in UTC
    one_run = tracked_ckpt.list_checkpoints(store.run_id, tracking_uri=store.uri)
    pd.testing.assert_frame_equal(one_run, df)


def test_list_runs_has_stable_typed_columns(store: DemoStore) -> None:
    df = tracked_ckpt.list_runs(DEMO_EXPERIMENT, tracking_uri=store.uri)
    assert list(df.columns) == RUN_COLUMNS
    ints = {c: "Int64" for c in ("checkpoints", "latest_step", "best_step", "size_bytes")}
    strings = {c: "string" for c in ("run_id", "run_name", "experiment_id", "status", "monitor", "latest_ref")}
    expected = {**ints, **strings, "start_time": UTC_NS, "best_value": "float64"}
    assert {c: str(df[c].dtype) for c in expected} == expected
    (row,) = df.itertuples()
    assert (row.run_id, row.run_name, row.checkpoints, row.latest_step) == (store.run_id, "cartpole-reinforce", 3, 15)
    assert row.monitor == "reward:max" and row.latest_ref == f"runs:/{store.run_id}/checkpoints/step-00000015"
    assert abs(pd.Timestamp.now(tz="UTC") - row.start_time) < pd.Timedelta(hours=1)


def test_empty_views_keep_their_columns_and_types(store: DemoStore) -> None:
    name = f"empty-{uuid.uuid4().hex[:8]}"
    MlflowClient(store.uri).create_experiment(name)
    runs = tracked_ckpt.list_runs(name, tracking_uri=store.uri)
    ckpts = tracked_ckpt.list_checkpoints(experiment=name, tracking_uri=store.uri)
    assert runs.empty and list(runs.columns) == RUN_COLUMNS and str(runs.start_time.dtype) == UTC_NS
    assert ckpts.empty and list(ckpts.columns) == CHECKPOINT_COLUMNS and str(ckpts.created.dtype) == UTC_NS
    assert str(runs.checkpoints.dtype) == "Int64" and str(ckpts.step.dtype) == "Int64"


def api_calls(log: Path, fn: Callable[[], object]) -> list[str]:
    """The MLflow REST calls the server logged while ``fn`` ran (its access log, one line per request)."""
    start = log.stat().st_size
    fn()
    seen, calls = -1, []
    while len(calls) != seen:  # the access line is written just after the response: wait until it settles
        seen = len(calls)
        time.sleep(0.5)
        text = log.read_bytes()[start:].decode(errors="replace")
        calls = re.findall(r'"(?:GET|POST) /api/2\.0/mlflow/([a-z/-]+)', text)
    return calls


@pytest.mark.server
def test_views_cost_a_bounded_number_of_queries(request: pytest.FixtureRequest, tmp_path_factory: Any) -> None:
    server = demo_server(request.config, tmp_path_factory)
    client = MlflowClient(server.url)
    name = f"bounded-{uuid.uuid4().hex[:8]}"
    exp_id = client.create_experiment(name)
    for i in range(4):  # runs as the manager's tags describe them; list_runs reads nothing else
        tags = {TAG_COUNT: "2", TAG_LATEST: "checkpoints/step-00000002", TAG_LATEST_STEP: "2", TAG_BEST_STEP: "1"}
        client.create_run(exp_id, tags=tags, run_name=f"r{i}")
    runs = api_calls(server.log, lambda: tracked_ckpt.list_runs(name, tracking_uri=server.url))
    assert runs == ["experiments/get-by-name", "runs/search"]  # two queries, whatever the number of runs
    ckpts = api_calls(
        server.log, lambda: tracked_ckpt.list_checkpoints(experiment=DEMO_EXPERIMENT, tracking_uri=server.url)
    )
    # two per experiment, then per run one get-run, one search of its logged models (the model_id column) and one
    # history per cost column (blocked/commit/record); the manifests are read from the artifact store
    assert ckpts == ["experiments/get-by-name", "runs/search", "runs/get", "logged-models/search",
                     *["metrics/get-history"] * 3]  # fmt: skip
