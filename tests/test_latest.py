"""The newest committed checkpoint wins, whoever reads "latest", even when the run's tags lag behind it.

A save killed between its manifest upload (the commit marker) and the tag update leaves the tags naming an older
checkpoint. Produced here by a real SIGKILL at that point (``TRACKED_CKPT_FAULT=tags@3``) and, for the adapters,
by a subclass of the real store whose tag writes are lost once the last manifest has landed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, make_training
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager
from tracked_ckpt.catalog import RunCatalog
from tracked_ckpt.cli import cli
from tracked_ckpt.frameworks.folders import fetch_checkpoint, record_folder
from tracked_ckpt.frameworks.hf import resume_folder
from tracked_ckpt.frameworks.lightning import resume_path
from tracked_ckpt.manifest import Manifest
from tracked_ckpt.runtags import TAG_LATEST_STEP
from tracked_ckpt.store.run_store import RunStore

KILLED = """
import sys, torch
from tracked_ckpt import CheckpointManager
model = torch.nn.Linear(2, 2)
with CheckpointManager(sys.argv[1], experiment=sys.argv[2]) as mgr:
    print("RUN_ID", mgr.run_id, flush=True)
    for step in (10, 20, 30):
        torch.nn.init.constant_(model.weight, step)
        mgr.save(model, metadata={"step": step, "reward": step})
"""


def plant_uncommitted(run_id: str, tmp_path: Path, name: str = "step-00000099") -> None:
    """A folder that looks like a newer checkpoint but has no manifest: a save that died mid-upload."""
    junk = tmp_path / "state.pt"
    junk.write_bytes(b"not committed")
    MlflowClient().log_artifact(run_id, str(junk), f"checkpoints/{name}")


class CountingCatalog(RunCatalog):
    def __init__(self, store: RunStore) -> None:
        super().__init__(store)
        self.read: list[str] = []

    def manifest(self, path: str) -> Manifest:
        self.read.append(path)
        return super().manifest(path)


def test_every_reader_finds_a_checkpoint_committed_by_a_save_killed_before_its_tags(
    tmp_path: Path, experiment: str
) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TRACKED_CKPT_FAULT": "tags@3"}
    p = subprocess.run([sys.executable, "-c", KILLED, str(tmp_path / "ckpt"), experiment], env=env, timeout=180,
                       capture_output=True, text=True)  # fmt: skip
    assert p.returncode == -9, p.stderr[-3000:]
    run_id = p.stdout.split()[1]
    plant_uncommitted(run_id, tmp_path)
    assert MlflowClient().get_run(run_id).data.tags[TAG_LATEST_STEP] == "20"  # the tags lag behind step 30

    catalog = CountingCatalog(RunStore(MlflowClient(), run_id))
    assert catalog.resolve("latest").manifest.step == 30
    # Not every manifest: the tagged one, then only the folders that can be newer (step 30, and 99 which has none).
    assert sorted(catalog.read) == ["checkpoints/step-00000020", "checkpoints/step-00000030",
                                    "checkpoints/step-00000099"]  # fmt: skip
    assert catalog.resolve("best", "reward", "max").manifest.step == 30  # the tags still name step 20 as the best

    model = torch.nn.Linear(2, 2)
    assert tracked_ckpt.load(run_id, model)["step"] == 30 and bool((model.weight == 30).all())
    out = CliRunner().invoke(cli, ["show", run_id, "--format", "json"], catch_exceptions=False).stdout
    assert json.loads(out)["step"] == 30 and "latest" in json.loads(out)["markers"]
    with CheckpointManager(tmp_path / "other", run_id=run_id) as mgr:
        assert str(mgr.get_latest_checkpoint()).endswith("checkpoints/step-00000030")


class LostTagsStore(RunStore):
    """The real store, except that once a step >= ``lag_from`` is published, tracked_ckpt tag writes are lost."""

    lag_from = 3
    lost = False

    def publish(self, step: int, metrics: dict[str, float], tags: dict[str, str], *args: Any, **kw: Any) -> None:
        LostTagsStore.lost = LostTagsStore.lost or step >= self.lag_from
        super().publish(step, metrics, self._kept(tags), *args, **kw)

    def set_tags(self, tags: dict[str, str]) -> None:
        super().set_tags(self._kept(tags))

    def _kept(self, tags: dict[str, str]) -> dict[str, str]:
        return {k: v for k, v in tags.items() if not (self.lost and k.startswith("tracked_ckpt."))}


@pytest.mark.parametrize("fmt", ["lightning", "hf-trainer", "accelerate"])
def test_adapters_resume_from_the_newest_committed_folder(tmp_path: Path, experiment: str, fmt: str) -> None:
    LostTagsStore.lost, LostTagsStore.lag_from = False, 3
    with CheckpointManager(tmp_path / "ckpt", experiment=experiment, store_factory=LostTagsStore) as mgr:
        for step in (1, 2, 3):
            folder = tmp_path / "written" / (f"epoch={step}.ckpt" if fmt == "lightning" else f"checkpoint-{step}")
            folder.mkdir(parents=True)
            torch.save({"global_step": step}, folder / ("model.ckpt" if fmt == "lightning" else "state.pt"))
            record_folder(mgr, folder, {"loss": 1.0 / step}, format=fmt, step=step)
        run_id = mgr.run_id
    plant_uncommitted(run_id, tmp_path, "step-00000004")
    assert MlflowClient().get_run(run_id).data.tags[TAG_LATEST_STEP] == "2"
    if fmt == "lightning":
        got = torch.load(resume_path(run_id, tmp_path / "restore"), weights_only=True)
    elif fmt == "hf-trainer":
        got = torch.load(Path(resume_folder(run_id, tmp_path / "out")) / "state.pt", weights_only=True)
    else:  # what load_state fetches before accelerator.load_state
        got = torch.load(fetch_checkpoint(run_id, tmp_path / "restore", format=fmt)[0] / "state.pt", weights_only=True)
    assert got == {"global_step": 3}


def test_a_step_below_one_already_saved_is_named_so_that_latest_still_finds_it(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    LostTagsStore.lost, LostTagsStore.lag_from = False, 10**9
    with CheckpointManager(tmp_path / "ckpt", experiment=experiment, store_factory=LostTagsStore) as mgr:
        mgr.save(model, opt, {"step": 40})
        mgr.save(model, opt, {"step": 50})
        LostTagsStore.lag_from = 0  # from now on the tags are lost: they keep naming step 50
        ref = mgr.save(model, opt, {"step": 45})  # as after a resume from an older checkpoint
        run_id = mgr.run_id
    assert ref.endswith("checkpoints/step-00000045.3")
    assert MlflowClient().get_run(run_id).data.tags[TAG_LATEST_STEP] == "50"
    assert RunCatalog(RunStore(MlflowClient(), run_id)).resolve("latest").manifest.step == 45
