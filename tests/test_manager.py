"""CheckpointManager against the real local MLflow store (sqlite + ./mlruns)."""

from __future__ import annotations

import copy
import logging
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from conftest import ROOT, TinyNet, make_training, run_python, train_steps
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager, KeepLast
from tracked_ckpt.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    ConfigError,
    InvalidMetadataError,
    RunNotFoundError,
    UnsafeCheckpointError,
)
from tracked_ckpt.manifest import MANIFEST_NAME, FileEntry, Manifest, hash_file
from tracked_ckpt.runtags import TAG_BEST, TAG_LATEST, TAG_LATEST_STEP


def artifact(mgr: CheckpointManager, ref: str, name: str) -> Path:
    assert mgr.store.local_dir is not None
    return mgr.store.local_dir / ref.split("/", 2)[2] / name


def test_public_api_is_pinned() -> None:
    assert sorted(tracked_ckpt.__all__) == sorted([
        "CheckpointCorruptError", "CheckpointManager", "CheckpointMismatchError", "CheckpointNotFoundError",
        "EveryInterval", "EveryNSteps", "KeepBest", "KeepEvery", "KeepLast", "OnImprovement", "RunNotFoundError",
        "TrackedCkptError", "__version__", "export_model", "list_checkpoints", "list_runs", "load", "promote",
        "warm_start", "follow", "log_eval",
        # every error a user can catch, and the extension seams (custom policies, the store)
        "ConfigError", "ExperimentNotFoundError", "InvalidMetadataError", "RunLockedError", "SaveError",
        "StoreError", "StoreNotFoundError", "UnsafeCheckpointError", "DataPositionMismatchError",
        "CheckpointInfo", "RetentionPolicy", "SaveContext", "SavePolicy", "RunStore",
    ])  # fmt: skip
    for name in tracked_ckpt.__all__:
        assert getattr(tracked_ckpt, name) is not None, name
    # every exception class in errors.py is reachable from the top level
    import tracked_ckpt.errors as errors

    raised = {n for n, v in vars(errors).items() if isinstance(v, type) and issubclass(v, Exception)}
    assert raised <= set(tracked_ckpt.__all__), raised - set(tracked_ckpt.__all__)


def test_round_trip_restores_everything_and_returns_metadata(tmp_path: Path, experiment: str) -> None:
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 5)
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        assert mgr.get_latest_checkpoint() is None
        assert mgr.load(model, opt, scheduler=sched) == {}
        saved_model, saved_opt, saved_sched = copy.deepcopy((model.state_dict(), opt.state_dict(), sched.state_dict()))
        meta = {"epoch": 2, "steps": 5, "reward": np.float64(0.75), "current_loss": torch.tensor(0.5),
                "lr": np.float32(0.01), "tag": "warmup", "layers": [1, 2], "done": False}  # fmt: skip
        ref = mgr.save(model, opt, meta, scheduler=sched)
        assert ref.startswith(f"runs:/{mgr.run_id}/checkpoints/")
        assert mgr.get_latest_checkpoint() == ref
        train_steps(model, opt, sched, 3)  # perturb everything
        got = mgr.load(model, opt, checkpoint_path=ref, scheduler=sched)
    assert got == {"epoch": 2, "steps": 5, "reward": 0.75, "current_loss": 0.5, "lr": pytest.approx(0.01),
                   "tag": "warmup", "layers": [1, 2], "done": False}  # fmt: skip
    assert isinstance(got["epoch"], int) and isinstance(got["steps"], int)
    for k, v in saved_model.items():
        assert torch.equal(model.state_dict()[k], v)
    assert torch.equal(opt.state_dict()["state"][0]["exp_avg"], saved_opt["state"][0]["exp_avg"])
    assert sched.state_dict() == saved_sched
    run = MlflowClient().get_run(mgr.run_id)
    assert run.data.metrics["reward"] == 0.75 and run.data.metrics["epoch"] == 2 and run.data.metrics["steps"] == 5
    assert "tag" not in run.data.metrics and "done" not in run.data.metrics
    assert run.data.tags[TAG_LATEST_STEP] == "5" and run.data.tags[TAG_BEST] == run.data.tags[TAG_LATEST]
    assert run.info.status == "FINISHED"


def test_metadata_that_cannot_be_recorded_is_refused_naming_the_key(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        with pytest.raises(InvalidMetadataError, match=r"metadata\['when'\].*datetime"):
            import datetime

            mgr.save(model, opt, {"step": 1, "when": datetime.datetime.now()})
        with pytest.raises(InvalidMetadataError, match=r"metadata\['steps'\]=1\.5"):
            mgr.save(model, opt, {"steps": 1.5})
        with pytest.raises(InvalidMetadataError, match=r"metadata\['nested'\] is a dict with non-string keys"):
            mgr.save(model, opt, {"nested": {1: "a"}})
        with pytest.raises(ConfigError, match="nothing to save"):
            mgr.save(metadata={"step": 1})
        assert mgr.get_latest_checkpoint() is None  # nothing half-saved
        assert not list((tmp_path / "ck" / ".staging").glob("*"))


DROP_IN = """
import sys, torch
from tracked_ckpt import CheckpointManager
torch.manual_seed(0)
model = torch.nn.Linear(3, 1)
optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
mgr = CheckpointManager(save_dir="./training_checkpoints")
metadata = mgr.load(model, optimizer)
start_epoch, steps = metadata.get("epoch", 0), metadata.get("steps", 0)
for e in range(start_epoch, start_epoch + 2):
    for _ in range(5):
        steps += 1
        loss = model(torch.randn(4, 3)).pow(2).mean()
        optimizer.zero_grad(); loss.backward(); optimizer.step()
        if steps % 5 == 0:
            ref = mgr.save(model, optimizer, {"epoch": e + 1, "steps": steps, "current_loss": loss.item()})
print("RUN", mgr.run_id, "START", start_epoch, steps, "LATEST", mgr.get_latest_checkpoint())
print("W", model.weight.detach().tolist())
"""


def test_original_design_script_resumes_same_run_even_without_save_dir(tmp_path: Path, experiment: str) -> None:
    """The issue's drop-in script, launched three times as a real process, in one working directory."""
    (tmp_path / "train.py").write_text(DROP_IN)
    env = {"MLFLOW_EXPERIMENT_NAME": experiment}

    def launch() -> list[str]:
        return run_python((tmp_path / "train.py").read_text(), tmp_path, env).split()

    first = launch()
    second = launch()
    assert first[1] == second[1]  # same MLflow run
    assert first[3:5] == ["0", "10"] and second[3:5] == ["2", "20"]
    shutil.rmtree(tmp_path / "training_checkpoints")  # the files now only exist in MLflow
    third = launch()
    assert third[1] == first[1] and third[3:5] == ["4", "30"]
    assert third[6].endswith("step-00000030")


def test_bitwise_resume_after_mid_epoch_kill(tmp_path: Path, experiment: str) -> None:
    job = [sys.executable, str(ROOT / "tests" / "resume_job.py"), "--experiment"]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    straight = subprocess.run([*job, experiment + "-a", "--save-dir", "a", "--out", "a.pt"], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=120)  # fmt: skip
    assert straight.returncode == 0, straight.stderr
    killed = subprocess.run([*job, experiment + "-b", "--save-dir", "b", "--out", "b.pt", "--die-after-step", "7"],
                            cwd=tmp_path, env=env, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert killed.returncode == 17 and not (tmp_path / "b.pt").exists()
    resumed = subprocess.run([*job, experiment + "-b", "--save-dir", "b", "--out", "b.pt"], cwd=tmp_path, env=env,
                             capture_output=True, text=True, timeout=120)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr
    assert "resumed_at=4" in resumed.stdout  # mid-epoch 0 (6 batches per epoch)
    a, b = torch.load(tmp_path / "a.pt", weights_only=True), torch.load(tmp_path / "b.pt", weights_only=True)
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["opt"]["state"][0]["exp_avg_sq"], b["opt"]["state"][0]["exp_avg_sq"])


def test_resume_without_rng_is_not_bitwise(tmp_path: Path, experiment: str) -> None:
    """The control for the test above: the comparison would catch a missing RNG restore."""
    model, opt, sched = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, save_rng=False) as mgr:
        mgr.save(model, opt, {"step": 1}, scheduler=sched)
        torch.randn(3)
        expected = torch.randn(3)
        mgr.load(model, opt, scheduler=sched)
        assert not torch.equal(torch.randn(3), expected)
    with CheckpointManager(tmp_path / "ck2", experiment=experiment + "x") as mgr:
        mgr.save(model, opt, {"step": 1}, scheduler=sched)
        expected = torch.randn(3)
        mgr.load(model, opt, scheduler=sched)
        assert torch.equal(torch.randn(3), expected)


def test_decoy_files_in_save_dir_change_nothing(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        ref = mgr.save(model, opt, {"step": 10})
        decoy = tmp_path / "ck" / mgr.run_id / "step-99999999"
        shutil.copytree(tmp_path / "ck" / mgr.run_id / "step-00000010", decoy)
        (tmp_path / "ck" / "checkpoint_step_999999.pt").write_bytes(b"decoy")
        (tmp_path / "ck" / "latest.pt").write_bytes(b"decoy")
        run_id = mgr.run_id
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        assert mgr.run_id == run_id
        assert mgr.get_latest_checkpoint() == ref
        assert mgr.load(model, opt)["step"] == 10
        assert list(mgr.checkpoints()["step"]) == [10]


def test_uncommitted_checkpoint_in_mlflow_is_never_resolved(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        ref = mgr.save(model, opt, {"step": 10, "reward": 1.0})
        # A save killed mid-upload: data files of a newer step, no manifest (the commit marker).
        half = tmp_path / "half"
        half.mkdir()
        torch.save(model.state_dict(), half / "state.pt")
        MlflowClient().log_artifact(mgr.run_id, str(half / "state.pt"), "checkpoints/step-00000020")
        assert mgr.get_latest_checkpoint() == ref
        assert list(mgr.checkpoints()["step"]) == [10]
        with pytest.raises(CheckpointNotFoundError, match="at step 20"):
            mgr.load(model, opt, which=20)
        with pytest.raises(CheckpointNotFoundError, match="not a committed checkpoint"):
            mgr.load(model, opt, checkpoint_path=f"runs:/{mgr.run_id}/checkpoints/step-00000020")
        # The next save does not overwrite the leftover folder: it picks a fresh name.
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        new_ref = mgr.save(model, opt, {"step": 20})
        assert new_ref.endswith("checkpoints/step-00000020.2")
        assert mgr.get_latest_checkpoint() == new_ref


@pytest.mark.parametrize(
    "bad_tag",
    ["checkpoints/step-00000099", "../../../etc", "checkpoints/../../x", "/abs/path", "checkpoints/a%2F..%2Fb", ""],
)
def test_stale_or_tampered_latest_tag_is_checked_not_trusted(
    tmp_path: Path, experiment: str, bad_tag: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        mgr.save(model, opt, {"step": 1})
        ref = mgr.save(model, opt, {"step": 2})
        MlflowClient().set_tag(mgr.run_id, TAG_LATEST, bad_tag)
        with caplog.at_level(logging.WARNING):
            assert mgr.get_latest_checkpoint() == ref
        assert mgr.load(model, opt)["step"] == 2
    assert bad_tag == "" or "does not point at a valid checkpoint" in caplog.text


def test_tag_that_disagrees_with_manifest_is_not_trusted(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        old = mgr.save(model, opt, {"step": 1})
        ref = mgr.save(model, opt, {"step": 2})
        MlflowClient().set_tag(mgr.run_id, TAG_LATEST, old.split("/", 2)[2])  # rolled back by someone
        assert mgr.get_latest_checkpoint() == ref


def test_retention_deletes_locally_and_in_mlflow_and_keeps_protected(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, retention=KeepLast(2)) as mgr:
        for step, reward in [(1, 0.1), (2, 0.9), (3, 0.2), (4, 0.3), (5, 0.4)]:
            mgr.save(model, opt, {"step": step, "reward": reward})
        listed = sorted(e.path for e in mgr.store.list("checkpoints"))
        assert listed == ["checkpoints/step-00000002", "checkpoints/step-00000004", "checkpoints/step-00000005"]
        assert sorted(p.name for p in (tmp_path / "ck" / mgr.run_id).iterdir()) == [p.rsplit("/")[1] for p in listed]
        tags = MlflowClient().get_run(mgr.run_id).data.tags
        assert tags["tracked_ckpt.count"] == "3" and "step 3" in tags["tracked_ckpt.pruned_last"]
        run_id = mgr.run_id
    # A new process resumed from step 5; step 5 stays while it is the resume point, even if not kept by policy.
    with CheckpointManager(tmp_path / "ck", experiment=experiment, retention=KeepLast(1)) as mgr:
        assert mgr.run_id == run_id
        mgr.load(model, opt, which=4)
        for step in (6, 7):
            mgr.save(model, opt, {"step": step, "reward": 0.0})
        assert sorted(mgr.checkpoints()["step"]) == [2, 4, 7]  # best (0.9), resumed-from, latest


def test_bad_run_ids_and_resume_modes(tmp_path: Path, experiment: str) -> None:
    with pytest.raises(RunNotFoundError, match="0123456789abcdef.*does not exist"):
        CheckpointManager(tmp_path / "a", run_id="0123456789abcdef")
    with pytest.raises(RunNotFoundError, match="does not exist"):
        tracked_ckpt.load("0123456789abcdef", TinyNet())
    client = MlflowClient()
    run = client.create_run(client.create_experiment(experiment))
    client.delete_run(run.info.run_id)
    with pytest.raises(RunNotFoundError, match="is deleted"):
        CheckpointManager(tmp_path / "b", run_id=run.info.run_id)
    with pytest.raises(CheckpointNotFoundError, match="resume='must'"):
        CheckpointManager(tmp_path / "c", experiment=experiment, resume="must")
    with pytest.raises(ConfigError, match="resume='sometimes'"):
        CheckpointManager(tmp_path / "d", resume="sometimes")  # type: ignore[arg-type]
    with pytest.raises(ConfigError, match="drop one"):
        CheckpointManager(tmp_path / "d", resume="never", run_id="abc")
    with pytest.raises(ConfigError, match="mode='up'"):
        CheckpointManager(tmp_path / "d", mode="up")


def test_resume_never_starts_a_new_run_and_must_resumes(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        mgr.save(model, opt, {"step": 3})
        first = mgr.run_id
    with CheckpointManager(tmp_path / "ck", experiment=experiment, resume="never") as mgr:
        assert mgr.run_id != first and mgr.load(model, opt) == {}
        second = mgr.run_id
    # the pointer now names the second run, which has no checkpoint: must refuses it
    with pytest.raises(CheckpointNotFoundError, match=second):
        CheckpointManager(tmp_path / "ck", experiment=experiment, resume="must")
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:  # the failed one left no lock behind
        assert mgr.run_id == second
    with CheckpointManager(tmp_path / "other", run_id=first, resume="must") as mgr:
        assert mgr.load(model, opt)["step"] == 3


def test_mismatched_architecture_lists_differences_and_touches_nothing(tmp_path: Path, experiment: str) -> None:
    model, opt, sched = make_training(hidden=8)
    train_steps(model, opt, sched, 1)  # so that the optimizer has per-parameter state
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        mgr.save(model, opt, {"step": 1})
        other, other_opt, _ = make_training(hidden=16, seed=5)
        before = copy.deepcopy(other.state_dict())
        rng_before = torch.get_rng_state()
        with pytest.raises(CheckpointMismatchError) as err:
            mgr.load(other, other_opt)
        msg = str(err.value)
        assert "fc1.weight" in msg and "(8, 4)" in msg and "(16, 4)" in msg and "nothing was changed" in msg
        assert "optimizer state" in msg
        for k, v in before.items():
            assert torch.equal(other.state_dict()[k], v)
        assert torch.equal(torch.get_rng_state(), rng_before)
        with pytest.raises(CheckpointMismatchError, match="no 'scheduler' state"):
            mgr.load(model, opt, scheduler=torch.optim.lr_scheduler.StepLR(opt, 1))


def _corrupt(path: Path, how: str) -> None:
    data = bytearray(path.read_bytes())
    if how == "truncate":
        data = data[: len(data) // 2]
    else:
        data[len(data) // 2] ^= 0x01
    # Write a new file (not in place): the artifact and the local copy are hard links of one inode.
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(bytes(data))
    os.replace(tmp, path)


@pytest.mark.parametrize("how", ["truncate", "flip"])
def test_corrupt_latest_falls_back_but_explicit_step_raises(
    tmp_path: Path, experiment: str, how: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        mgr.save(model, opt, {"step": 1})
        ref = mgr.save(model, opt, {"step": 2})
        shutil.rmtree(tmp_path / "ck" / mgr.run_id)  # no local cache: the artifact store is the source
        _corrupt(artifact(mgr, ref, "state.pt"), how)
        with pytest.raises(CheckpointCorruptError, match=rf"{mgr.run_id}.*step 2.*'state.pt'"):
            mgr.load(model, opt, which=2)
        with caplog.at_level(logging.WARNING):
            assert mgr.load(model, opt)["step"] == 1
        assert "falling back" in caplog.text
        # the corrupt checkpoint is never deserialized: torch.load would fail loudly on a truncated zip
        with pytest.raises(CheckpointCorruptError, match="truncated" if how == "truncate" else "BLAKE3"):
            tracked_ckpt.load(mgr.run_id, model, which=2)


def test_corrupt_local_cache_is_caught_too(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        ref = mgr.save(model, opt, {"step": 1})
        _corrupt(tmp_path / "ck" / mgr.run_id / "step-00000001" / "state.pt", "flip")
        with pytest.raises(CheckpointCorruptError, match="BLAKE3"):
            mgr.load(model, opt, checkpoint_path=ref)


def test_all_checkpoints_corrupt_raises_instead_of_fresh_start(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        ref = mgr.save(model, opt, {"step": 1})
        _corrupt(artifact(mgr, ref, "state.pt"), "flip")
        assert mgr.load(model, opt)["step"] == 1  # the verified local copy in save_dir still serves
        shutil.rmtree(tmp_path / "ck" / mgr.run_id)
        with pytest.raises(CheckpointCorruptError, match="BLAKE3"):
            mgr.load(model, opt)


def _plant(mgr: CheckpointManager, tmp: Path, payload: object, step: int) -> str:
    """An attacker with write access to the run: a payload plus a manifest whose digests match it."""
    folder = tmp / "planted"
    folder.mkdir()
    torch.save(payload, folder / "state.pt")
    size, digest = hash_file(folder / "state.pt")
    m = Manifest(run_id=mgr.run_id, step=step, seq=99, created=0.0, files=(FileEntry("state.pt", size, digest),))
    (folder / MANIFEST_NAME).write_text(m.to_json())
    path = f"checkpoints/step-{step:08d}"
    client = MlflowClient()
    client.log_artifact(mgr.run_id, str(folder / "state.pt"), path)
    client.log_artifact(mgr.run_id, str(folder / MANIFEST_NAME), path)
    client.set_tag(mgr.run_id, TAG_LATEST, path)
    client.set_tag(mgr.run_id, TAG_LATEST_STEP, str(step))
    return path


class Evil:
    def __init__(self, marker: str) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[object, tuple[str]]:
        return (os.system, (f"touch {self.marker}",))


def test_planted_malicious_pickle_is_refused_even_with_force_env(
    tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    marker = tmp_path / "PWNED"
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        mgr.save(model, opt, {"step": 1})
        _plant(mgr, tmp_path, {"model": Evil(str(marker))}, step=50)
        with pytest.raises(UnsafeCheckpointError, match=r"'state.pt'.*(posix|os)\.system.*step 50|step 50.*system"):
            mgr.load(model, opt, which=50)
        assert mgr.load(model, opt)["step"] == 1  # latest falls back past it, with a warning
        with pytest.raises(UnsafeCheckpointError, match="system"):
            tracked_ckpt.load(mgr.run_id, model, which=50)
    assert not marker.exists()


def test_manifest_from_another_run_is_refused(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "a", experiment=experiment) as a, \
         CheckpointManager(tmp_path / "b", experiment=experiment, resume="never") as b:  # fmt: skip
        ref = a.save(model, opt, {"step": 1})
        folder = artifact(a, ref, "")
        for f in folder.iterdir():
            MlflowClient().log_artifact(b.run_id, str(f), "checkpoints/step-00000001")
        with pytest.raises(CheckpointCorruptError, match=f"belongs to run {a.run_id}"):
            b.load(model, opt, checkpoint_path=f"runs:/{b.run_id}/checkpoints/step-00000001")
        with pytest.raises(CheckpointNotFoundError):  # resolution skips it (with a warning)
            b.load(model, opt, which=1)


def test_same_step_twice_never_overwrites(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        first = mgr.save(model, opt, {"step": 5, "reward": 1.0})
        train_steps(model, opt, torch.optim.lr_scheduler.StepLR(opt, 10), 1)
        second = mgr.save(model, opt, {"step": 5, "reward": 2.0})
        assert first != second
        df = mgr.checkpoints()
        assert list(df["step"]) == [5, 5] and list(df["reward"]) == [1.0, 2.0]
        assert list(df["is_latest"]) == [False, True]
        assert mgr.load(model, opt, which=5)["reward"] == 2.0


def test_manager_beside_users_own_mlflow_run(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    # start_run(experiment_id=...), not set_experiment(): that one also exports MLFLOW_EXPERIMENT_ID to the session.
    with mlflow.start_run(experiment_id=MlflowClient().create_experiment(experiment)) as run:
        mlflow.log_param("lr", 0.01)
        with CheckpointManager(tmp_path / "ck") as mgr:
            assert mgr.run_id == run.info.run_id
            mgr.save(model, opt, {"step": 1, "reward": 3.0})
            mlflow.log_metric("user_metric", 1.0, step=1)
        assert MlflowClient().get_run(run.info.run_id).info.status == "RUNNING"  # the user's run, the user's call
    data = MlflowClient().get_run(run.info.run_id).data
    assert data.params["lr"] == "0.01" and data.metrics["user_metric"] == 1.0 and data.metrics["reward"] == 3.0


def test_mlflow_run_id_env_attaches(tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = MlflowClient()
    run = client.create_run(client.create_experiment(experiment))
    monkeypatch.setenv("MLFLOW_RUN_ID", run.info.run_id)
    with CheckpointManager(tmp_path / "ck") as mgr:
        assert mgr.run_id == run.info.run_id


def test_module_load_by_run_id_latest_best_and_step(tmp_path: Path, experiment: str) -> None:
    model, opt, sched = make_training()
    states = {}
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        for step, reward in [(10, 0.5), (20, 0.9), (30, 0.1)]:
            train_steps(model, opt, sched, 1)
            mgr.save(model, opt, {"step": step, "reward": reward})
            states[step] = copy.deepcopy(model.state_dict())
        assert mgr.get_best_checkpoint() is not None and mgr.get_best_checkpoint().endswith("step-00000020")  # type: ignore[union-attr]
        run_id = mgr.run_id
    fresh = TinyNet()
    assert tracked_ckpt.load(run_id, fresh)["step"] == 30
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in states[30].items())
    assert tracked_ckpt.load(run_id, fresh, which="best")["step"] == 20
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in states[20].items())
    assert tracked_ckpt.load(run_id, fresh, which="best", metric="reward", mode="min")["step"] == 30
    assert tracked_ckpt.load(run_id, fresh, which=10)["reward"] == 0.5
    with pytest.raises(CheckpointNotFoundError, match="at step 11"):
        tracked_ckpt.load(run_id, fresh, which=11)
    with pytest.raises(CheckpointNotFoundError, match="metric 'accuracy'"):
        tracked_ckpt.load(run_id, fresh, which="best", metric="accuracy")


def test_views_have_typed_columns_across_runs(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    for i in range(2):
        with CheckpointManager(tmp_path / f"ck{i}", experiment=experiment) as mgr:
            mgr.save(model, opt, {"step": 1, "epoch": 0, "reward": 0.5 + i})
            mgr.save(model, opt, {"step": 2, "epoch": 1, "reward": 0.2, "loss": 0.3})
    df = tracked_ckpt.list_checkpoints(experiment=experiment)
    assert len(df) == 4
    assert str(df["step"].dtype) == "Int64" and str(df["epoch"].dtype) == "Int64"
    assert str(df["created"].dtype).startswith("datetime64") and str(df["created"].dt.tz) == "UTC"
    assert df["reward"].dtype == "float64" and df["loss"].isna().sum() == 2
    assert df.groupby("run_id")["is_latest"].sum().tolist() == [1, 1]
    runs = tracked_ckpt.list_runs(experiment)
    assert len(runs) == 2 and runs["checkpoints"].tolist() == [2, 2]
    assert sorted(runs["best_value"].tolist()) == [0.5, 1.5]


def test_user_facing_example_in_docstring_runs(tmp_path: Path, experiment: str) -> None:
    """The worked example in the CheckpointManager module docstring, executed as written."""
    import tracked_ckpt.manager as m

    example = textwrap.dedent(m.__doc__.split("::", 1)[1].split("Which run, and")[0])  # type: ignore[union-attr]
    model, optimizer, _ = make_training()
    namespace = {"model": model, "optimizer": optimizer, "total_steps": 250, "epoch": 0,
                 "train_one_step": lambda m, o: 1.0, "experiment": experiment}  # fmt: skip
    os.chdir(tmp_path)
    exec(compile(example.replace('experiment="cartpole"', "experiment=experiment"), "example", "exec"), namespace)
    df = namespace["mgr"].checkpoints()  # type: ignore[attr-defined]
    assert list(df["step"]) == [100, 200]


def test_a_manifest_from_a_newer_version_is_never_cleaned_up(tmp_path: Path, experiment: str) -> None:
    """Attaching removes dead saves' leftovers, but a folder whose manifest it cannot read is not one."""
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        old = mgr.save(model, opt, {"step": 1})
        mgr.save(model, opt, {"step": 2})
        manifest = artifact(mgr, old, MANIFEST_NAME)
        newer = manifest.read_text().replace('"format_version": 1', '"format_version": 99')
        manifest.unlink()  # a new inode: the local copy keeps the original
        manifest.write_text(newer)
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        assert manifest.read_text() == newer  # still there, untouched
        with pytest.raises(CheckpointCorruptError, match="format_version 99"):
            mgr.load(model, opt, checkpoint_path=old)
        assert mgr.load(model, opt)["step"] == 2


def test_experiment_of_another_runs_save_dir_is_ignored_and_said(
    tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        mgr.save(model, opt, {"step": 1})
        run_id = mgr.run_id
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path / "ck", experiment=f"{experiment}-b") as again:
        assert again.run_id == run_id  # the save_dir's run resumes, where it is
    assert f"experiment='{experiment}-b' is ignored: save_dir {tmp_path / 'ck'} belongs to run {run_id}" in caplog.text
    assert f"of experiment '{experiment}'" in caplog.text and "pass another save_dir" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING), CheckpointManager(tmp_path / "ck", experiment=experiment):
        pass
    assert "is ignored" not in caplog.text  # its own experiment: nothing to say
