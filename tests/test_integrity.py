"""Integrity: whatever is wrong with a checkpoint's files or manifest is caught before anything is unpickled.

Truncated and bit-flipped files are covered in test_manager.py; here: a missing file, an extra file, and a
manifest that is missing, unparsable or of an unknown version. Resolving "latest" falls back past them with a
warning; an explicit request raises an error naming the file, the run and the step.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

import pytest
from conftest import make_training
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager
from tracked_ckpt.errors import CheckpointCorruptError, CheckpointNotFoundError


def two_checkpoints(tmp_path: Path, experiment: str) -> tuple[CheckpointManager, str, Path]:
    """A manager with steps 1 and 2 saved, and no local cache: the artifact store is the only source."""
    model, opt, _ = make_training()
    mgr = CheckpointManager(tmp_path / "ck", experiment=experiment)
    mgr.save(model, opt, {"step": 1})
    ref = mgr.save(model, opt, {"step": 2})
    shutil.rmtree(tmp_path / "ck" / mgr.run_id)
    assert mgr.store.local_dir is not None
    return mgr, ref, mgr.store.local_dir / ref.split("/", 2)[2]


def replace(path: Path, data: bytes) -> None:
    # A new inode: the artifact and the (removed) local copy were hard links of one file.
    tmp = path.with_name(path.name + ".new")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def assert_falls_back(mgr: CheckpointManager, caplog: pytest.LogCaptureFixture, names: str) -> None:
    model, opt, _ = make_training(seed=4)
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        assert mgr.load(model, opt)["step"] == 1
        assert tracked_ckpt.load(mgr.run_id, model)["step"] == 1
    assert names in caplog.text and "step-00000002" in caplog.text, caplog.text


def test_missing_file_is_named_and_latest_falls_back(
    tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    mgr, ref, folder = two_checkpoints(tmp_path, experiment)
    with mgr:
        (folder / "rng.json").unlink()
        model, opt, _ = make_training()
        for load in (lambda: mgr.load(model, opt, which=2), lambda: mgr.load(model, opt, checkpoint_path=ref)):
            with pytest.raises(CheckpointCorruptError, match=rf"{mgr.run_id}.*step 2.*'rng.json'.*missing"):
                load()
        assert_falls_back(mgr, caplog, "'rng.json'")


def test_extra_file_in_the_folder_is_refused_but_upload_temporaries_are_not(
    tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    mgr, ref, folder = two_checkpoints(tmp_path, experiment)
    with mgr:
        (folder / "payload.pkl").write_bytes(b"not listed in the manifest")
        # An upload in flight elsewhere (write a hidden temp, then rename) must not make step 1 unusable.
        (folder.parent / "step-00000001" / ".state.pt.0a1b2c3d.tmp").write_bytes(b"partial")
        model, opt, _ = make_training()
        for load in (lambda: mgr.load(model, opt, which=2), lambda: mgr.load(model, opt, checkpoint_path=ref)):
            with pytest.raises(CheckpointCorruptError, match=rf"{mgr.run_id}.*step 2.*\['payload.pkl'\]"):
                load()
        assert_falls_back(mgr, caplog, "'payload.pkl'")
        (folder / "payload.pkl").unlink()
        assert mgr.load(model, opt, which=2)["step"] == 2


@pytest.mark.parametrize("how", ["unparsable", "unknown version", "missing"])
def test_bad_manifest(tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture, how: str) -> None:
    mgr, ref, folder = two_checkpoints(tmp_path, experiment)
    manifest = folder / "MANIFEST.json"
    with mgr:
        if how == "missing":
            manifest.unlink()
        elif how == "unparsable":
            replace(manifest, manifest.read_bytes()[:-40])  # cut mid-way, as a torn write would
        else:
            data = json.loads(manifest.read_bytes())
            data["format_version"] = 2
            replace(manifest, json.dumps(data).encode())
        model, opt, _ = make_training()
        if how == "missing":
            # No manifest is the definition of an uncommitted checkpoint (a save that died mid-upload).
            with pytest.raises(CheckpointNotFoundError, match=rf"{mgr.run_id}.*at step 2"):
                mgr.load(model, opt, which=2)
            with pytest.raises(CheckpointNotFoundError, match=rf"{ref}.*not a committed checkpoint"):
                mgr.load(model, opt, checkpoint_path=ref)
        else:
            what = "unparsable" if how == "unparsable" else "format_version 2.*Upgrade tracked_ckpt"
            named = rf"{mgr.run_id}/checkpoints/step-00000002/MANIFEST.json.*{what}"
            with pytest.raises(CheckpointCorruptError, match=rf"{mgr.run_id}.*step 2 is unusable.*{named}"):
                mgr.load(model, opt, which=2)
            with pytest.raises(CheckpointCorruptError, match=rf"{mgr.run_id}.*step 2 is unusable"):
                tracked_ckpt.load(mgr.run_id, model, which=2)
            with pytest.raises(CheckpointCorruptError, match=named):
                mgr.load(model, opt, checkpoint_path=ref)
        assert_falls_back(mgr, caplog, "does not point at a valid checkpoint")
        assert [int(s) for s in mgr.checkpoints()["step"]] == [1]


@pytest.mark.server
def test_downloads_land_in_a_temporary_folder_and_are_verified_first(
    mlflow_server: str, tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    downloads = tmp_path / "tmp"
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=mlflow_server) as mgr:
        mgr.save(model, opt, {"step": 1})
        ref = mgr.save(model, opt, {"step": 2})
        shutil.rmtree(tmp_path / "ck" / mgr.run_id)
        extra = tmp_path / "extra.bin"
        extra.write_bytes(b"planted")
        MlflowClient(mlflow_server).log_artifact(mgr.run_id, str(extra), ref.split("/", 2)[2])
        with pytest.raises(CheckpointCorruptError, match=r"step 2.*\['extra.bin'\]"):
            mgr.load(model, opt, which=2)
        assert list(downloads.iterdir()) == []  # nothing downloaded stays behind
        assert mgr.load(model, opt)["step"] == 1  # latest falls back, over HTTP
        assert list(downloads.iterdir()) == []
        assert not (tmp_path / "ck" / mgr.run_id).exists()  # downloads never land in save_dir's cache
