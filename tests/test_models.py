"""Each kept checkpoint is an MLflow 3 LoggedModel (models.py): made by the publisher, READY once committed,
deleted with its checkpoint, repaired by the next owner after a crash, reused by promote, loaded by models:/<id>.

The main scenario runs against the session's sqlite store and a real `mlflow server`; an outage goes through the
fault proxy; crashes are real SIGKILLs at named fault points in a second process.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import assert_same_state, run_python
from fault_proxy import FaultProxy
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager, KeepBest, KeepLast
from tracked_ckpt.cli import cli
from tracked_ckpt.errors import CheckpointNotFoundError, StoreError
from tracked_ckpt.lifecycle import promote
from tracked_ckpt.models import MODEL_TAG_CHECKPOINT
from tracked_ckpt.runtags import TAG_FORK_ORIGINS
from tracked_ckpt.store.run_store import RunStore

REWARDS = {10: 1.0, 20: 5.0, 30: 2.0, 40: 3.0, 50: 0.5}  # not monotonic: the best (20) is an old one
KEPT = [20, 40, 50]  # KeepLast(2) | KeepBest(1)


class Net(torch.nn.Module):
    """About 1 MB of weights (plus Adam's state): big enough that a copy of them would show in the model's bytes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = torch.nn.Linear(256, 256)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.as_tensor(self.fc(x))


def train(save_dir: Path, experiment: str, tracking_uri: str | None = None, **kw: Any) -> tuple[str, dict[int, Net]]:
    torch.manual_seed(0)
    model = Net()
    opt = torch.optim.Adam(model.parameters())
    saved: dict[int, Net] = {}
    with CheckpointManager(save_dir, experiment=experiment, tracking_uri=tracking_uri,
                           retention=KeepLast(2) | KeepBest(1), **kw) as mgr:  # fmt: skip
        for step, reward in REWARDS.items():
            model(torch.randn(4, 256)).sum().backward()
            opt.step()
            mgr.save(model, opt, {"step": step, "reward": reward, "loss": 1 / step})
            saved[step] = Net()
            saved[step].load_state_dict(model.state_dict())
        return mgr.run_id, saved


def live_models(client: MlflowClient, run_id: str, **kw: Any) -> list[Any]:
    exp = client.get_run(run_id).info.experiment_id
    return list(client.search_logged_models([exp], filter_string=f"source_run_id = '{run_id}'", **kw))


def model_bytes(client: MlflowClient, lm: Any) -> int:
    repo = get_artifact_repository(lm.artifact_location, tracking_uri=client.tracking_uri)
    return sum(f.file_size or 0 for f in repo.list_artifacts())


def step_of(lm: Any) -> int:
    return int(lm.params["step"])


@pytest.fixture(params=["local", pytest.param("server", marks=pytest.mark.server)])
def tracking_uri(request: pytest.FixtureRequest) -> str | None:
    return request.getfixturevalue("mlflow_server") if request.param == "server" else None


def test_the_kept_checkpoints_are_the_runs_logged_models_ready_with_step_and_metrics_best_first(
    tracking_uri: str | None, tmp_path: Path, experiment: str
) -> None:
    run_id, saved = train(tmp_path / "ck", experiment, tracking_uri)
    client = MlflowClient(tracking_uri)
    by_reward = live_models(client, run_id, order_by=[{"field_name": "metrics.reward", "ascending": False}])
    assert [step_of(lm) for lm in by_reward] == [20, 40, 50]  # exactly the kept ones, the best first
    outputs = {o.model_id: o.step for o in client.get_run(run_id).outputs.model_outputs}
    for lm in by_reward:
        step = step_of(lm)
        assert str(lm.status).endswith("READY") and lm.name == f"step-{step:08d}" and outputs[lm.model_id] == step
        assert {m.key: (m.value, m.step) for m in lm.metrics} == {
            "reward": (REWARDS[step], step), "loss": (1 / step, step), "step": (float(step), step),
        }  # fmt: skip
        assert lm.params["folder"] == f"checkpoints/step-{step:08d}" and lm.params["format"] == "torch"
        assert lm.params["digest"].startswith("blake3:")
        assert lm.tags[MODEL_TAG_CHECKPOINT] == f"runs:/{run_id}/checkpoints/step-{step:08d}"
        # No second copy of the weights: no artifacts (promote adds an MLmodel pointer, below).
        assert model_bytes(client, lm) == 0
    # The deleted checkpoints' models are gone too (the run's output links stay: MLflow cannot remove them).
    deleted = [mid for mid, step in outputs.items() if step in (10, 30)]
    assert len(deleted) == 2
    for mid in deleted:
        with pytest.raises(Exception, match="not found|does not exist|RESOURCE_DOES_NOT_EXIST"):
            client.get_logged_model(mid)
    # MLflow's model reference loads the checkpoint; list_checkpoints names the model.
    best = by_reward[0].model_id
    fresh = Net()
    meta = tracked_ckpt.load(f"models:/{best}", fresh, tracking_uri=tracking_uri)
    assert meta["step"] == 20
    assert_same_state(fresh, saved[20])
    frame = tracked_ckpt.list_checkpoints(run_id, tracking_uri=tracking_uri)
    assert dict(zip(frame.step, frame.model_id, strict=True)) == {step_of(lm): lm.model_id for lm in by_reward}
    with pytest.raises(CheckpointNotFoundError, match="names no logged model"):
        tracked_ckpt.load(f"models:/{deleted[0]}", fresh, tracking_uri=tracking_uri)


def test_cli_reads_and_promote_go_through_mlflows_model_references(tmp_path: Path, experiment: str) -> None:
    run_id, _saved = train(tmp_path / "ck", experiment)
    client = MlflowClient()
    model_id = next(lm.model_id for lm in live_models(client, run_id) if step_of(lm) == 40)
    runner = CliRunner()
    shown = runner.invoke(cli, ["show", f"models:/{model_id}"])
    assert shown.exit_code == 0 and "step       40" in shown.stdout, shown.output
    pulled = runner.invoke(cli, ["pull", f"models:/{model_id}", "-o", str(tmp_path / "out")])
    assert pulled.exit_code == 0 and (tmp_path / "out" / "state.pt").is_file(), pulled.output
    name = f"n-{experiment}"
    p = promote(f"models:/{model_id}", name, alias="prod")  # the checkpoint's own model is registered
    assert (p.model_id, p.step, p.existing) == (model_id, 40, False)
    # Its one artifact now: the MLmodel pointer the version pages read, < 1% of the checkpoint's bytes.
    ckpt_bytes = sum(f.file_size for f in client.list_artifacts(run_id, "checkpoints/step-00000040"))
    assert 0 < model_bytes(client, client.get_logged_model(model_id)) < ckpt_bytes / 100
    for ref in (f"models:/{name}@prod", f"models:/{name}/1", f"models:/{model_id}"):
        verified = runner.invoke(cli, ["verify", ref])
        assert verified.exit_code == 0 and "OK" in verified.stdout and "step 40" in verified.stdout, verified.output
    assert len(live_models(client, run_id)) == 3  # promote made no model of its own
    bad = runner.invoke(cli, ["show", "models:/nothing"])
    assert bad.exit_code == 2 and "models:/<model_id>" in bad.output


def test_logged_models_false_makes_none_and_the_models_command_gives_an_existing_run_its_models(
    tmp_path: Path, experiment: str
) -> None:
    run_id, _ = train(tmp_path / "ck", experiment, logged_models=False)
    client = MlflowClient()
    assert live_models(client, run_id) == []
    result = CliRunner().invoke(cli, ["models", run_id])
    assert result.exit_code == 0 and "3 created, 0 deleted" in result.stdout, result.output
    models = live_models(client, run_id)
    assert sorted(step_of(lm) for lm in models) == KEPT and all(str(lm.status).endswith("READY") for lm in models)
    again = CliRunner().invoke(cli, ["models", run_id])
    assert "0 created, 0 deleted" in again.stdout, again.output


@pytest.mark.parametrize("fault", ["model_delete", "model_ready@3"])
def test_a_crash_between_a_checkpoint_and_its_model_is_repaired_by_the_next_owner(
    fault: str, tmp_path: Path, experiment: str
) -> None:
    # model_delete: killed after retention deleted step 10's files, before its model (a READY model of nothing);
    # model_ready@3: killed after step 30 was committed, before its model was READY (a PENDING model).
    code = f"""
import torch
from tracked_ckpt import CheckpointManager, KeepLast
m = torch.nn.Linear(2, 2)
with CheckpointManager({str(tmp_path / "ck")!r}, experiment={experiment!r}, retention=KeepLast(2)) as mgr:
    print("RUN_ID", mgr.run_id, flush=True)
    for step in (10, 20, 30):
        mgr.save(m, None, {{"step": step, "reward": float(step)}})
"""
    with pytest.raises(AssertionError, match="subprocess failed"):
        run_python(code, tmp_path, env={"TRACKED_CKPT_FAULT": fault})
    client = MlflowClient()
    run_id = client.search_runs([client.get_experiment_by_name(experiment).experiment_id])[0].info.run_id
    left = {step_of(lm): str(lm.status).rpartition(".")[2] for lm in live_models(client, run_id)}
    if fault == "model_delete":  # step 30's READY runs beside retention on the model thread: either, at the kill
        assert left.pop(30) in ("READY", "PENDING")
        assert left == {10: "READY", 20: "READY"}  # 10: a READY model of a deleted checkpoint
    else:
        assert left == {10: "READY", 20: "READY", 30: "PENDING"}
    with CheckpointManager(tmp_path / "ck", experiment=experiment, retention=KeepLast(2)) as mgr:
        assert mgr.run_id == run_id
    models = live_models(client, run_id)
    assert sorted((step_of(lm), str(lm.status).rpartition(".")[2]) for lm in models) == [(20, "READY"), (30, "READY")]


def test_a_fork_keeps_its_origin_from_the_parents_retention_and_prune(tmp_path: Path, experiment: str) -> None:
    m = torch.nn.Linear(2, 2)
    with CheckpointManager(tmp_path / "parent", experiment=experiment, retention=KeepLast(2)) as parent:
        for step in (10, 20):
            parent.save(m, None, {"step": step, "reward": 1.0})
        with CheckpointManager(tmp_path / "fork", experiment=experiment, fork_from=f"{parent.run_id}@10") as fork:
            assert fork.load(torch.nn.Linear(2, 2))["step"] == 10
        for step in (30, 40):  # retention would delete 10 and 20; 10 is the fork's origin
            parent.save(m, None, {"step": step, "reward": 1.0})
        parent_id = parent.run_id
    client = MlflowClient()
    assert client.get_run(parent_id).data.tags[TAG_FORK_ORIGINS] == "step-00000010"
    kept = [a.path.rpartition("/")[2] for a in client.list_artifacts(parent_id, "checkpoints")]
    assert kept == ["step-00000010", "step-00000030", "step-00000040"]
    assert sorted(step_of(lm) for lm in live_models(client, parent_id)) == [10, 30, 40]
    prune = CliRunner().invoke(cli, ["prune", parent_id, "--keep-last", "1", "--dry-run"])
    assert "fork origin" in prune.stdout and "would delete 1" in prune.stdout, prune.stdout
    done = CliRunner().invoke(cli, ["prune", parent_id, "--keep-last", "1"])
    assert done.exit_code == 0, done.output
    assert sorted(step_of(lm) for lm in live_models(client, parent_id)) == [10, 40]  # prune deleted 30's model


# ------------------------------------------------------------------------------------------------- outage


@pytest.fixture
def proxy(mlflow_server: str) -> Iterator[FaultProxy]:
    p = FaultProxy(mlflow_server)
    yield p
    p.close()


@pytest.mark.server
def test_an_outage_queues_the_model_with_its_checkpoint_and_records_it_after(
    proxy: FaultProxy, mlflow_server: str, tmp_path: Path, experiment: str
) -> None:
    m = torch.nn.Linear(2, 2)
    direct = MlflowClient(mlflow_server)
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=proxy.url, publish_timeout=2) as mgr:
        mgr.save(m, None, {"step": 10, "reward": 1.0})
        proxy.set_mode("refuse")
        mgr.save(m, None, {"step": 20, "reward": 2.0})  # committed locally, queued with its model
        assert [step_of(lm) for lm in live_models(direct, mgr.run_id)] == [10]
        proxy.set_mode("pass")
        deadline = time.monotonic() + 120
        while len(mgr.outbox.pending(mgr.run_id)) and time.monotonic() < deadline:
            time.sleep(0.2)
        run_id = mgr.run_id
    models = live_models(direct, run_id, order_by=[{"field_name": "metrics.reward", "ascending": False}])
    assert [(step_of(lm), str(lm.status).rpartition(".")[2]) for lm in models] == [(20, "READY"), (10, "READY")]
    assert {x.key: x.step for x in models[0].metrics}["reward"] == 20


class RefusingModels(RunStore):
    """A server that refuses LoggedModels for good (a permission, an MLflow 2 server): checkpoints still record."""

    def _call(self, fn: Any, action: str) -> Any:
        if action.startswith("create the logged model"):
            err = StoreError(f"MLflow at {self.server} failed to {action}: 404 ENDPOINT_NOT_FOUND")
            err.transient = True  # what a 404 from an MLflow 2 server looks like to describe_mlflow_error
            raise err
        return super()._call(fn, action)


def test_a_server_refusing_logged_models_still_records_every_checkpoint(
    tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    m = torch.nn.Linear(2, 2)
    with CheckpointManager(tmp_path / "ck", experiment=experiment, store_factory=RefusingModels) as mgr:
        for step in (10, 10):  # the second is step-00000010.2: a name MLflow would refuse as is
            mgr.save(m, None, {"step": step, "reward": 1.0})
        assert mgr.outbox.pending(mgr.run_id) == []
        run_id = mgr.run_id
    assert [c.path for c in MlflowClient().list_artifacts(run_id, "checkpoints")] == [
        "checkpoints/step-00000010", "checkpoints/step-00000010.2"]  # fmt: skip
    assert "recorded without its LoggedModel" in caplog.text
    CliRunner().invoke(cli, ["models", run_id])  # made later, with a name MLflow accepts
    assert sorted(lm.name for lm in live_models(MlflowClient(), run_id)) == ["step-00000010", "step-00000010_2"]
