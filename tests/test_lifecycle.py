"""A checkpoint after training: fork with lineage, warm start, export, promote (lifecycle.py, export.py).

Against the session's sqlite store, then once against a real `mlflow server`; a DCP checkpoint saved by 2 ranks
(one torchrun launch) is forked and exported in one process.
"""

from __future__ import annotations

import os
import random
import re
import sys
from pathlib import Path

import pytest
import safetensors.torch as safetensors_torch  # installed by the [test] extra
import torch
from click.testing import CliRunner
from conftest import TinyNet, assert_same_state, make_training, train_steps
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager, KeepLast
from tracked_ckpt.cli import cli
from tracked_ckpt.errors import CheckpointMismatchError, CheckpointNotFoundError, ConfigError
from tracked_ckpt.export import export_model, warm_start
from tracked_ckpt.lifecycle import FLAVOR, MODEL_TAG_CHECKPOINT, promote
from tracked_ckpt.runtags import TAG_FORKED_FROM, TAG_NOTE, TAG_PARENT_RUN, TAG_PARENT_STEP, TAG_PROMOTED


def train_parent(save_dir: Path, experiment: str, tracking_uri: str | None = None) -> tuple[str, dict[int, TinyNet]]:
    """A run with checkpoints at steps 10..40 (reward = step / 10); returns it and the model as of each save."""
    model, opt, sched = make_training()
    saved: dict[int, TinyNet] = {}
    with CheckpointManager(save_dir, experiment=experiment, tracking_uri=tracking_uri) as mgr:
        for step in (10, 20, 30, 40):
            train_steps(model, opt, sched, 2)
            mgr.save(model, opt, {"step": step, "reward": step / 10}, scheduler=sched)
            saved[step] = make_training(seed=step)[0]
            saved[step].load_state_dict(model.state_dict())
        return mgr.run_id, saved


@pytest.fixture
def parent(tmp_path: Path, experiment: str) -> tuple[str, dict[int, TinyNet]]:
    return train_parent(tmp_path / "parent", experiment)


# ---------------------------------------------------------------------------------------------------- fork


def test_a_fork_starts_from_the_parent_checkpoint_records_its_lineage_and_resumes_as_itself(
    parent: tuple[str, dict[int, TinyNet]], tmp_path: Path, experiment: str
) -> None:
    parent_id, saved = parent
    client = MlflowClient()
    model, opt, sched = make_training(seed=7)
    with CheckpointManager(tmp_path / "fork", experiment=experiment, fork_from=f"{parent_id}@20") as mgr:
        fork_id = mgr.run_id
        meta = mgr.load(model, opt, scheduler=sched)
        assert meta == {"step": 20, "reward": 2.0}
        assert_same_state(model, saved[20])
        assert sched.state_dict()["last_epoch"] == 4  # the whole training state, not only the weights
        train_steps(model, opt, sched, 2)
        mgr.save(model, opt, {"step": 25, "reward": 9.0}, scheduler=sched)
    assert fork_id != parent_id
    tags = client.get_run(fork_id).data.tags
    ref = f"runs:/{parent_id}/checkpoints/step-00000020"
    assert (tags[TAG_FORKED_FROM], tags[TAG_PARENT_RUN], tags[TAG_PARENT_STEP]) == (ref, parent_id, "20")
    assert f"**Forked from** run `{parent_id}` at step 20" in tags[TAG_NOTE]
    # The charts continue the parent's up to the fork step, then the fork's own points.
    history = [(m.step, m.value) for m in client.get_metric_history(fork_id, "reward")]
    assert sorted(history) == [(10, 1.0), (20, 2.0), (25, 9.0)]
    assert len(client.get_metric_history(parent_id, "reward")) == 4  # the parent is untouched
    # A relaunch (same save_dir, same arguments) continues the fork from its own latest, not the parent.
    other, opt2, sched2 = make_training(seed=8)
    with CheckpointManager(tmp_path / "fork", experiment=experiment, fork_from=f"{parent_id}@20") as again:
        assert again.run_id == fork_id
        assert again.load(other, opt2, scheduler=sched2) == {"step": 25, "reward": 9.0}
        assert_same_state(other, model)
    assert len(client.get_metric_history(fork_id, "reward")) == 3  # no second copy of the history
    # The lineage in list_runs and the CLI.
    runs = tracked_ckpt.list_runs(experiment).set_index("run_id")
    assert runs.loc[fork_id, "forked_from"] == ref and runs.loc[fork_id, "fork_step"] == 20
    assert runs.loc[parent_id, "forked_from"] is pd_na()
    out = CliRunner().invoke(cli, ["runs", "--experiment", experiment, "--tree"], catch_exceptions=False).stdout
    lines = out.splitlines()
    assert lines[1].startswith(parent_id) and lines[2].startswith(f"└─ {fork_id}"), out
    assert lines[2].rstrip().endswith(f"{parent_id} @20"), out


def pd_na() -> object:
    import pandas as pd

    return pd.NA


def test_a_fork_relaunched_before_its_first_save_starts_from_the_parent_again(
    parent: tuple[str, dict[int, TinyNet]], tmp_path: Path, experiment: str
) -> None:
    parent_id, saved = parent
    with CheckpointManager(tmp_path / "fork", experiment=experiment, fork_from=f"runs:/{parent_id}/checkpoints/"
                           "step-00000030", fork_metrics=False) as mgr:  # fmt: skip
        fork_id = mgr.run_id
    assert MlflowClient().get_metric_history(fork_id, "reward") == []  # fork_metrics=False: no history copied
    model, opt, _ = make_training(seed=3)
    with CheckpointManager(tmp_path / "fork", run_id=fork_id) as again:  # attached by ID, fork_from not repeated
        assert again.load(model, opt)["step"] == 30
    assert_same_state(model, saved[30])


def test_fork_from_is_checked(parent: tuple[str, dict[int, TinyNet]], tmp_path: Path, experiment: str) -> None:
    parent_id, _ = parent
    with pytest.raises(ConfigError, match=r"fork_from='not a ref!'.*'RUN@best'"):
        CheckpointManager(tmp_path / "x", experiment=experiment, fork_from="not a ref!")
    with pytest.raises(CheckpointNotFoundError, match="at step 999"):
        CheckpointManager(tmp_path / "y", experiment=experiment, fork_from=f"{parent_id}@999")
    assert [r.info.run_id for r in MlflowClient().search_runs(
        [MlflowClient().get_experiment_by_name(experiment).experiment_id])] == [parent_id]  # no empty run left
    assert not (tmp_path / "x").exists() and not (tmp_path / "y").exists()  # no save_dir holding only a .lock
    (tmp_path / "mine").mkdir()  # a folder that was there before stays, empty
    with pytest.raises(CheckpointNotFoundError, match="at step 999"):
        CheckpointManager(tmp_path / "mine", experiment=experiment, fork_from=f"{parent_id}@999")
    assert (tmp_path / "mine").is_dir()
    # The parent's own save_dir names a run with checkpoints that is not a fork: forking there is refused.
    with pytest.raises(ConfigError, match=rf"{parent_id}, which has checkpoints of its own and is not a fork"):
        CheckpointManager(tmp_path / "parent", experiment=experiment, fork_from=f"{parent_id}@best")


# ---------------------------------------------------------------------------------------------- warm start


class Wrapped(torch.nn.Module):
    """TinyNet under a ``module.`` prefix (DDP's naming), plus a new head the checkpoint does not have."""

    def __init__(self) -> None:
        super().__init__()
        self.module = TinyNet()
        self.head = torch.nn.Linear(2, 3)


def test_warm_start_loads_only_the_model_through_a_key_map_and_reports_what_did_not_match(
    parent: tuple[str, dict[int, TinyNet]],
) -> None:
    parent_id, saved = parent
    target = Wrapped()
    head_before = {k: v.clone() for k, v in target.head.state_dict().items()}
    rng_before = torch.get_rng_state(), random.getstate()
    report = warm_start(f"{parent_id}@best", target, key_map={"": "module."})
    assert (report.step, report.source) == (40, f"runs:/{parent_id}/checkpoints/step-00000040")
    assert report.missing == ["head.weight", "head.bias"] and report.unexpected == []
    assert_same_state(target.module, saved[40])
    assert all(torch.equal(v, target.head.state_dict()[k]) for k, v in head_before.items())
    assert torch.equal(torch.get_rng_state(), rng_before[0]) and random.getstate() == rng_before[1]  # no RNG restore
    # A function as the key map: drop fc2 and keep fc1 (renamed layers work the same way).
    plain = TinyNet()
    report = warm_start(parent_id, plain, key_map=lambda k: k if k.startswith("fc1.") else None)
    assert report.missing == ["fc2.weight", "fc2.bias"] and report.loaded == ["fc1.weight", "fc1.bias"]
    with pytest.raises(CheckpointMismatchError, match="'head.weight' is missing from the checkpoint"):
        warm_start(parent_id, Wrapped(), key_map={"": "module."}, strict=True)


def test_warm_start_with_a_shape_mismatch_names_every_key_and_changes_nothing(
    parent: tuple[str, dict[int, TinyNet]],
) -> None:
    parent_id, _ = parent
    wider = TinyNet(hidden=16)
    before = {k: v.clone() for k, v in wider.state_dict().items()}
    with pytest.raises(CheckpointMismatchError) as e:
        warm_start(parent_id, wider)
    for key in ("fc1.weight", "fc1.bias", "fc2.weight"):
        assert f"model key {key!r}: checkpoint shape" in str(e.value)
    assert "'fc2.bias'" not in str(e.value)  # same shape: not a difference
    assert all(torch.equal(v, wider.state_dict()[k]) for k, v in before.items())


# --------------------------------------------------------------------------------------------------- export


def test_export_writes_safetensors_that_load_into_a_fresh_model_with_the_source_in_the_metadata(
    parent: tuple[str, dict[int, TinyNet]], tmp_path: Path
) -> None:
    parent_id, saved = parent
    out = export_model(f"{parent_id}@20", tmp_path / "m.safetensors")
    fresh = TinyNet()
    fresh.load_state_dict(safetensors_torch.load_file(out))
    assert_same_state(fresh, saved[20])
    from safetensors import safe_open

    with safe_open(str(out), "pt") as f:
        meta = f.metadata()
    assert meta["tracked_ckpt.run_id"] == parent_id and meta["tracked_ckpt.step"] == "20"
    assert meta["tracked_ckpt.checkpoint"] == f"runs:/{parent_id}/checkpoints/step-00000020"
    assert re.fullmatch(r"blake3:[0-9a-f]{64}", meta["tracked_ckpt.digest"])
    with pytest.raises(FileExistsError, match="overwrite"):
        export_model(parent_id, out)
    # torch format, through the CLI
    result = CliRunner().invoke(cli, ["export", parent_id, "--format", "torch", "-o", str(tmp_path / "m.pt")])
    assert result.exit_code == 0, result.output
    payload = torch.load(tmp_path / "m.pt", weights_only=True)
    fresh.load_state_dict(payload["model"])
    assert_same_state(fresh, saved[40]) and payload["tracked_ckpt"]["tracked_ckpt.step"] == "40"
    again = CliRunner().invoke(cli, ["export", parent_id, "--format", "torch", "-o", str(tmp_path / "m.pt")])
    assert again.exit_code == 2 and "--force" in again.stderr


@pytest.mark.parametrize("umask", [0o022, 0o027], ids=["umask-022", "umask-027"])
def test_exported_files_are_readable_as_the_umask_allows_whatever_the_format(
    parent: tuple[str, dict[int, TinyNet]], tmp_path: Path, umask: int
) -> None:
    parent_id, _ = parent
    old = os.umask(umask)
    try:
        paths = [
            export_model(parent_id, tmp_path / "m.safetensors"),
            export_model(parent_id, tmp_path / "m.pt", format="torch"),
        ]
    finally:
        os.umask(old)
    assert [oct(p.stat().st_mode & 0o777) for p in paths] == [oct(0o666 & ~umask)] * 2  # not safetensors' own 0600


def test_without_safetensors_the_cli_says_how_to_export_in_its_own_words(
    parent: tuple[str, dict[int, TinyNet]], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    parent_id, _ = parent
    monkeypatch.setitem(sys.modules, "safetensors.torch", None)  # as if safetensors were not installed
    result = CliRunner().invoke(cli, ["export", parent_id, "-o", str(tmp_path / "m.safetensors")])
    assert result.exit_code == 2, result.output
    assert "--format torch" in result.stderr and "pip install" in result.stderr
    with pytest.raises(ConfigError, match=r"format='torch'"):
        export_model(parent_id, tmp_path / "m.safetensors")


# -------------------------------------------------------------------------------------------------- promote


def test_promote_registers_a_logged_model_of_the_run_and_loads_back_by_alias(tmp_path: Path, experiment: str) -> None:
    name = f"m-{experiment}"
    model, opt, sched = make_training()
    saved: dict[int, TinyNet] = {}
    # Retention keeps one checkpoint; the one promoted mid-training must survive every later save.
    with CheckpointManager(tmp_path / "run", experiment=experiment, retention=KeepLast(1)) as mgr:
        for step in (10, 20, 30, 40):
            train_steps(model, opt, sched, 1)
            mgr.save(model, opt, {"step": step, "reward": float(step == 20)}, scheduler=sched)
            saved[step] = TinyNet()
            saved[step].load_state_dict(model.state_dict())
            if step == 20:
                mgr.sync()
                promoted = promote(f"{mgr.run_id}@20", name, alias="prod")
        run_id = mgr.run_id
    client = MlflowClient()
    kept = [c.path for c in client.list_artifacts(run_id, "checkpoints")]
    assert kept == ["checkpoints/step-00000020", "checkpoints/step-00000040"]
    assert client.get_run(run_id).data.tags[TAG_PROMOTED] == "step-00000020"
    mv = client.get_model_version_by_alias(name, "prod")
    assert (mv.run_id, str(mv.version), mv.source) == (run_id, "1", f"models:/{promoted.model_id}")
    assert mv.tags[MODEL_TAG_CHECKPOINT] == f"runs:/{run_id}/checkpoints/step-00000020"
    lm = client.get_logged_model(promoted.model_id)
    assert lm.source_run_id == run_id and str(lm.status) in ("READY", "LoggedModelStatus.READY")
    from mlflow.artifacts import download_artifacts

    text = Path(download_artifacts(f"{lm.artifact_location}/MLmodel", dst_path=str(tmp_path))).read_text()
    assert f"{FLAVOR}:" in text and "step-00000020" in text
    # The version's model is the checkpoint's own LoggedModel (made when it was recorded), not a second one.
    outputs = client.get_run(run_id).outputs.model_outputs
    assert [o.step for o in outputs if o.model_id == promoted.model_id] == [20] and lm.name == "step-00000020"
    live = client.search_logged_models([lm.experiment_id], filter_string=f"source_run_id = '{run_id}'")
    assert sorted(m.name for m in live) == ["step-00000020", "step-00000040"]  # retention deleted 10 and 30
    fresh = TinyNet()
    assert tracked_ckpt.load("models:/" + name + "@prod", fresh) == {"step": 20, "reward": 1.0}
    assert_same_state(fresh, saved[20])
    # The same checkpoint again (the docs' CLI example, then the Python one): the same version, said so.
    again = CliRunner().invoke(cli, ["promote", f"{run_id}@20", "--name", name, "--alias", "prod"])
    assert again.exit_code == 0 and "is already" in again.stdout and "version 1" in again.stdout, again.output
    twice = promote(f"runs:/{run_id}/checkpoints/step-00000020", name)
    assert (twice.version, twice.model_id, twice.existing) == ("1", promoted.model_id, True)
    assert len(client.search_model_versions(f"name = '{name}'")) == 1
    # A second promotion through the CLI: version 2, the alias moves, both checkpoints are protected.
    result = CliRunner().invoke(cli, ["promote", f"{run_id}@40", "--name", name, "--alias", "prod"])
    assert result.exit_code == 0 and "version 2" in result.stdout, result.output
    tracked_ckpt.load(f"models:/{name}@prod", fresh)
    assert_same_state(fresh, saved[40])
    assert client.get_run(run_id).data.tags[TAG_PROMOTED] == "step-00000020,step-00000040"
    prune = CliRunner().invoke(cli, ["prune", run_id, "--keep-last", "1", "--dry-run"])
    assert "promoted" in prune.stdout and "would delete 0" in prune.stdout, prune.stdout
    with pytest.raises(CheckpointNotFoundError, match="names no model version"):
        tracked_ckpt.load(f"models:/{name}@nope", fresh)


# ------------------------------------------------------------------------------------ a real mlflow server


@pytest.mark.server
def test_fork_export_promote_against_a_real_server(mlflow_server: str, tmp_path: Path, experiment: str) -> None:
    parent_id, saved = train_parent(tmp_path / "parent", experiment, tracking_uri=mlflow_server)
    model, opt, sched = make_training(seed=5)
    with CheckpointManager(tmp_path / "fork", experiment=experiment, tracking_uri=mlflow_server,
                           fork_from=f"{parent_id}@best") as mgr:  # fmt: skip
        assert mgr.load(model, opt, scheduler=sched)["step"] == 40
        fork_id = mgr.run_id
    assert_same_state(model, saved[40])
    client = MlflowClient(mlflow_server)
    assert sorted(m.step for m in client.get_metric_history(fork_id, "reward")) == [10, 20, 30, 40]
    out = export_model(f"{parent_id}@30", tmp_path / "w.safetensors", tracking_uri=mlflow_server)
    fresh = TinyNet()
    fresh.load_state_dict(safetensors_torch.load_file(out))
    assert_same_state(fresh, saved[30])
    promoted = promote(f"{parent_id}@10", f"srv-{experiment}", alias="champion", tracking_uri=mlflow_server)
    tracked_ckpt.load(promoted.uri, fresh, tracking_uri=mlflow_server)
    assert_same_state(fresh, saved[10])
    assert client.get_model_version_by_alias(f"srv-{experiment}", "champion").run_id == parent_id


# --------------------------------------------------------------------------------- DCP at another world size


def test_fork_and_export_of_a_dcp_checkpoint_saved_by_2_ranks_in_one_process(tmp_path: Path, experiment: str) -> None:
    from test_distributed import launch, run_id_of
    from torch.distributed.checkpoint.state_dict import get_state_dict

    from tracked_ckpt.fsdp_demo import build

    args = ["--steps", "2", "--save-every", "2", "--width", "32", "--experiment", experiment, "--save-dir", "dcp"]
    (tmp_path / "saves").mkdir()
    dcp_run = run_id_of(launch(2, *args, "--dump-saves", "saves", cwd=tmp_path))
    full = torch.load(tmp_path / "saves" / "step-2.pt")
    model = build(32, seed=99)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    with CheckpointManager(tmp_path / "fork", experiment=experiment, fork_from=f"{dcp_run}@2") as mgr:
        assert mgr.load(model, opt)["step"] == 2
    msd, _ = get_state_dict(model, opt)
    for k, v in full["model"].items():
        assert torch.equal(msd[k], v), k
    out = export_model(f"{dcp_run}@2", tmp_path / "dcp.safetensors")
    weights = safetensors_torch.load_file(out)
    assert set(weights) == set(full["model"]) and all(torch.equal(weights[k], full["model"][k]) for k in weights)
    assert safetensors_meta(out)["tracked_ckpt.digest"].startswith("blake3-files:")


def safetensors_meta(path: Path) -> dict[str, str]:
    from safetensors import safe_open

    with safe_open(str(path), "pt") as f:
        return dict(f.metadata())

