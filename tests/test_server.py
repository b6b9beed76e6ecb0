"""Against a real `mlflow server` subprocess with proxied artifacts (mlflow-artifacts:), over HTTP."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch
from conftest import make_training, run_python, train_steps
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager, KeepLast
from tracked_ckpt.errors import CheckpointCorruptError

pytestmark = pytest.mark.server


def test_save_resolve_resume_over_http_in_a_fresh_process(mlflow_server: str, tmp_path: Path, experiment: str) -> None:
    model, opt, sched = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=mlflow_server,
                           retention=KeepLast(2)) as mgr:  # fmt: skip
        assert mgr.store.local_dir is None  # really the proxied artifact store
        for step in (1, 2, 3):
            train_steps(model, opt, sched, 1)
            mgr.save(model, opt, {"step": step, "reward": float(step)}, scheduler=sched)
        expected = copy.deepcopy(model.state_dict())
        run_id = mgr.run_id
        # retention deleted step 1 from the server's artifact store
        assert sorted(e.path for e in mgr.store.list("checkpoints")) == [
            "checkpoints/step-00000002", "checkpoints/step-00000003"]  # fmt: skip
    torch.save(expected, tmp_path / "expected.pt")
    # Another "machine": a fresh process, another working directory, no local files, only the run ID.
    other = tmp_path / "elsewhere"
    other.mkdir()
    out = run_python(
        f"""
import torch, tracked_ckpt
from conftest import make_training
from tracked_ckpt import CheckpointManager
model, opt, sched = make_training(seed=9)
with CheckpointManager("ck", run_id="{run_id}", tracking_uri="{mlflow_server}", resume="must") as mgr:
    meta = mgr.load(model, opt, scheduler=sched)
    exp = torch.load("{tmp_path / "expected.pt"}", weights_only=True)
    assert all(torch.equal(model.state_dict()[k], v) for k, v in exp.items())
    ref = mgr.save(model, opt, {{"step": 4, "reward": 0.0}}, scheduler=sched)
print(meta["step"], ref)
""",
        other,
    )
    step, ref = out.strip().splitlines()[-1].split()
    assert step == "3" and ref.endswith("step-00000004")
    fresh, _, _ = make_training(seed=3)
    assert tracked_ckpt.load(run_id, fresh, which="best", tracking_uri=mlflow_server)["step"] == 3
    df = tracked_ckpt.list_checkpoints(run_id, tracking_uri=mlflow_server)
    assert list(df["step"]) == [2, 3, 4]  # the second process set no retention
    assert MlflowClient(mlflow_server).get_run(run_id).data.tags["tracked_ckpt.latest_step"] == "4"


def test_downloaded_files_are_verified(mlflow_server: str, tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=mlflow_server) as mgr:
        ref = mgr.save(model, opt, {"step": 1})
        # Replace the artifact on the server with different bytes under the same name.
        bad = tmp_path / "state.pt"
        torch.save({"model": {}}, bad)
        MlflowClient(mlflow_server).log_artifact(mgr.run_id, str(bad), ref.split("/", 2)[2])
        with pytest.raises(CheckpointCorruptError, match="state.pt"):
            tracked_ckpt.load(mgr.run_id, model, which=1, tracking_uri=mlflow_server)
