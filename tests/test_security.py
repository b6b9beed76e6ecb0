"""Hostile inputs: paths that try to leave the run's ``checkpoints/`` folder, symlinks, hostile listings.

The malicious pickle is covered in test_manager.py. Here every path that reaches tracked_ckpt from outside
(a manifest's file names, run tags, artifact listings, ``checkpoint_path=``, retention) is refused before
any I/O on it, and a RunStore subclass records every artifact path actually touched to prove it.
"""

from __future__ import annotations

import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import make_training
from mlflow.entities import FileInfo
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager, KeepLast
from tracked_ckpt.catalog import RunCatalog
from tracked_ckpt.errors import CheckpointCorruptError, CheckpointNotFoundError, ConfigError
from tracked_ckpt.manifest import MANIFEST_NAME, FileEntry, Manifest, hash_file
from tracked_ckpt.runtags import TAG_BEST, TAG_BEST_STEP, TAG_LATEST, TAG_LATEST_STEP
from tracked_ckpt.store.run_store import Entry, RunStore

# Paths a checkpoint folder or file name may never be: each tries to step out of the run or to hide.
HOSTILE = [
    "",
    ".",
    "..",
    "../state.pt",
    "../../../x",
    "/etc/passwd",
    "..\\..\\x",
    "a\\b",
    "%2e%2e/x",
    "..%2fx",
    "%2Fetc%2Fpasswd",
    "state.pt\x00.txt",
    "C:state.pt",
    " state.pt",
    "sub/../../x",
]

# Artifact paths a RunStore may be asked for: checkpoints/<name>[/<file>], nothing else.
LEGIT = re.compile(r"^checkpoints(/step-\d{8}(\.\d+)?(/[A-Za-z0-9_][A-Za-z0-9_.-]*)?)?$")


class RecordingStore(RunStore):
    """The real store, recording every artifact path it is asked to touch; can add entries to listings."""

    def __init__(self, client: MlflowClient, run_id: str, **kwargs: Any) -> None:
        super().__init__(client, run_id, **kwargs)
        self.touched: list[str] = []
        self.extra: list[Entry] = []
        self.remote = False  # True: behave like a non-local artifact store (list, download) on the same files

    @property
    def local_dir(self) -> Path | None:
        return None if self.remote else super().local_dir

    def fetch(self, path: str, tmp_dir: Path) -> Path:
        self.touched.append(path)
        return super().fetch(path, tmp_dir)

    def list(self, path: str) -> list[Entry]:
        self.touched.append(path)
        return super().list(path) + (self.extra if path == "checkpoints" else [])

    def exists(self, path: str) -> bool:
        self.touched.append(path)
        return super().exists(path)

    def delete(self, path: str) -> None:
        self.touched.append(path)
        super().delete(path)

    def only_legit_paths(self) -> bool:
        return all(LEGIT.match(p) and ".." not in p for p in self.touched)


class RecordingManager(CheckpointManager):
    """The real manager with the store injected through its seam."""

    store: RecordingStore

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, store_factory=RecordingStore, **kwargs)


def saved(tmp_path: Path, experiment: str, steps: tuple[int, ...] = (1, 2)) -> tuple[RecordingManager, list[str]]:
    model, opt, _ = make_training()
    mgr = RecordingManager(tmp_path / "ck", experiment=experiment)
    refs = [mgr.save(model, opt, {"step": s, "reward": float(s)}) for s in steps]
    shutil.rmtree(tmp_path / "ck" / mgr.run_id)  # no local cache: reads go to the artifact store
    return mgr, refs


def artifact_dir(mgr: CheckpointManager) -> Path:
    return Path(mgr.store.repo.artifact_dir)


@pytest.mark.parametrize("name", HOSTILE)
def test_manifest_file_names_that_escape_are_refused(name: str) -> None:
    m = Manifest(run_id="r", step=1, seq=1, created=0.0, files=(FileEntry(name, 1, "0" * 64),))
    with pytest.raises(CheckpointCorruptError, match=r"manifest checkpoints/step-1"):
        Manifest.from_json(m.to_json(), "checkpoints/step-1")


def test_planted_manifest_naming_files_outside_is_never_followed(
    tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    mgr, _ = saved(tmp_path, experiment, (1,))
    with mgr:
        # A valid payload outside the folder, whose digest the planted manifest carries: following it would load.
        victim = artifact_dir(mgr) / "victim.pt"
        model, opt, _ = make_training(seed=7)
        torch.save({"model": model.state_dict()}, victim)
        size, digest = hash_file(victim)
        for i, name in enumerate(["../../victim.pt", "%2e%2e/%2e%2e/victim.pt", "..\\..\\victim.pt"]):
            step = 7 + i
            folder = tmp_path / f"plant{step}"
            folder.mkdir()
            m = Manifest(run_id=mgr.run_id, step=step, seq=10 + i, created=0.0, files=(FileEntry(name, size, digest),))
            (folder / MANIFEST_NAME).write_text(m.to_json())
            MlflowClient().log_artifact(mgr.run_id, str(folder / MANIFEST_NAME), f"checkpoints/step-{step:08d}")
            MlflowClient().set_tag(mgr.run_id, TAG_LATEST, f"checkpoints/step-{step:08d}")
            MlflowClient().set_tag(mgr.run_id, TAG_LATEST_STEP, str(step))
            with pytest.raises(CheckpointCorruptError, match=rf"step {step}.*not a plain relative path"):
                mgr.load(model, opt, which=step)
            with caplog.at_level(logging.WARNING):
                assert mgr.load(model, opt)["step"] == 1
            assert "refusing it before any I/O" in caplog.text
        assert mgr.store.touched and mgr.store.only_legit_paths(), mgr.store.touched
        assert not any("victim" in p for p in mgr.store.touched)


@pytest.mark.parametrize(
    "value",
    [
        "../../../x",
        "checkpoints/../../x",
        "/etc",
        "checkpoints/step-00000001/../../..",
        "checkpoints/%2e%2e/%2e%2e",
        "checkpoints\\..\\..",
        "checkpoints/step-00000002/state.pt",
        "OTHER_RUN",  # a real checkpoint of another run, reached by '..'
    ],
)
def test_latest_and_best_tags_pointing_outside_are_ignored(
    tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture, value: str
) -> None:
    model, opt, _ = make_training(seed=3)
    with CheckpointManager(tmp_path / "other", experiment=experiment) as other:
        other.save(model, opt, {"step": 9, "reward": 99.0})
    value = value.replace("OTHER_RUN", f"../../{other.run_id}/artifacts/checkpoints/step-00000009")
    mgr, refs = saved(tmp_path, experiment)
    with mgr:
        client = MlflowClient()
        for tag, step_tag in ((TAG_LATEST, TAG_LATEST_STEP), (TAG_BEST, TAG_BEST_STEP)):
            client.set_tag(mgr.run_id, tag, value)
            client.set_tag(mgr.run_id, step_tag, "9")
        mgr.store.touched.clear()
        with caplog.at_level(logging.WARNING):
            assert mgr.get_latest_checkpoint() == refs[1]
            assert mgr.get_best_checkpoint() == refs[1]
            assert mgr.load(model, opt)["step"] == 2
            assert mgr.load(model, opt, which="best")["reward"] == 2.0
            assert tracked_ckpt.load(mgr.run_id, model)["step"] == 2
        assert f"tag tracked_ckpt.latest={value!r} does not point at a valid checkpoint" in caplog.text
        assert mgr.store.only_legit_paths(), mgr.store.touched


def test_hostile_artifact_listing_entries_are_ignored_or_refused(
    tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    mgr, refs = saved(tmp_path, experiment)
    with mgr:
        # A store that lists whatever it likes (a compromised server): the catalog ignores what is not ours.
        mgr.store.extra = [Entry(f"checkpoints/{p}", True, None) for p in HOSTILE] + [
            Entry(p, True, None) for p in ("../../x", "/etc", "checkpoints/step-00000001/../../..", "other/step-1")
        ]
        mgr.store.remote = True
        model, opt, _ = make_training()
        mgr.store.touched.clear()
        with caplog.at_level(logging.WARNING):
            found = mgr.catalog.scan()
            assert [r.path for r in found] == ["checkpoints/step-00000001", "checkpoints/step-00000002"]
            assert mgr.load(model, opt, which=1)["step"] == 1
            assert mgr.get_latest_checkpoint() == refs[1]
        assert caplog.text.count("ignoring artifact folder") >= len(HOSTILE)
        assert mgr.store.only_legit_paths(), mgr.store.touched

    # The same entries coming from MLflow's own artifact repository are refused by RunStore.list itself.
    class HostileRepo(LocalArtifactRepository):
        def list_artifacts(self, path: str | None = None) -> list[FileInfo]:
            return [*super().list_artifacts(path), FileInfo("checkpoints/../../x", True, None)]

    class HostileStore(RunStore):
        def __init__(self, client: MlflowClient, run_id: str) -> None:
            super().__init__(client, run_id)
            self._repo = HostileRepo(self.artifact_uri)

        @property
        def local_dir(self) -> Path | None:
            return None  # list through the repository, as for any non-local artifact store

    with pytest.raises(CheckpointCorruptError, match=r"artifact listing entry 'checkpoints/\.\./\.\./x'"):
        RunCatalog(HostileStore(MlflowClient(), mgr.run_id)).scan()


def test_symlinks_in_the_artifact_store_or_cache_are_refused(
    tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        for step in (1, 2, 3):
            mgr.save(model, opt, {"step": step})
        root = artifact_dir(mgr) / "checkpoints"
        outside = tmp_path / "outside"
        outside.mkdir()
        # step 3: state.pt replaced by a symlink to an identical copy outside (same digest: only the link is wrong)
        shutil.copyfile(root / "step-00000003" / "state.pt", outside / "state.pt")
        (root / "step-00000003" / "state.pt").unlink()
        (root / "step-00000003" / "state.pt").symlink_to(outside / "state.pt")
        # step 4: a whole folder that is a symlink to a well-formed checkpoint outside, named as the latest
        shutil.copytree(root / "step-00000002", outside / "step4")
        data = json.loads((outside / "step4" / MANIFEST_NAME).read_text())
        data.update(step=4, seq=4)
        (outside / "step4" / MANIFEST_NAME).write_text(json.dumps(data))
        (root / "step-00000004").symlink_to(outside / "step4", target_is_directory=True)
        MlflowClient().set_tag(mgr.run_id, TAG_LATEST, "checkpoints/step-00000004")
        MlflowClient().set_tag(mgr.run_id, TAG_LATEST_STEP, "4")
        shutil.rmtree(tmp_path / "ck" / mgr.run_id / "step-00000003")
        for step in (3, 4):
            with pytest.raises(CheckpointCorruptError, match=rf"step[- ]0*{step}.*symlink"):
                mgr.load(model, opt, which=step)
        with caplog.at_level(logging.WARNING):
            assert mgr.load(model, opt)["step"] == 2
            assert tracked_ckpt.load(mgr.run_id, model)["step"] == 2
        assert "symlink" in caplog.text
        # The verified local cache in save_dir is held to the same rule.
        cached = tmp_path / "ck" / mgr.run_id / "step-00000002" / "state.pt"
        shutil.copyfile(cached, outside / "cached.pt")
        cached.unlink()
        cached.symlink_to(outside / "cached.pt")
        with pytest.raises(CheckpointCorruptError, match=r"step 2.*'state.pt' is a symlink"):
            mgr.load(model, opt, which=2)


@pytest.mark.parametrize(
    "ref",
    [
        "runs:/RUN/../../x",
        "runs:/RUN/checkpoints/../../../x",
        "runs:/RUN/checkpoints/step-00000001/../../..",
        "runs:/RUN/checkpoints/step-00000001/state.pt",
        "runs:/RUN/%2e%2e/%2e%2e/x",
        "runs:/RUN//etc/passwd",
        "runs:/RUN/checkpoints\\..\\..\\x",
        "runs:/../checkpoints/step-00000001",
        "runs:/RUN/checkpoints/step-00000001\x00",
        "checkpoints/../../x",
        "checkpoints/step-00000001/..",
    ],
)
def test_checkpoint_path_that_escapes_is_refused_before_any_io(tmp_path: Path, experiment: str, ref: str) -> None:
    mgr, _ = saved(tmp_path, experiment, (1,))
    with mgr:
        model, opt, _ = make_training()
        mgr.store.touched.clear()
        with pytest.raises((CheckpointCorruptError, ConfigError)) as err:
            mgr.load(model, opt, checkpoint_path=ref.replace("RUN", mgr.run_id))
        assert re.search("refusing|only reads and deletes its own folders|not a checkpoint reference", str(err.value))
        assert mgr.store.touched == []


def tree(root: Path) -> dict[str, str]:
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() for p in root.rglob("*") if p.is_file()
    }


def test_retention_and_delete_touch_only_this_runs_checkpoint_folders(tmp_path: Path, experiment: str) -> None:
    # The experiment's artifacts live under tmp_path: whatever a bug here deleted, it stays in this test.
    art = tmp_path / "art"
    client = MlflowClient()
    client.create_experiment(experiment, artifact_location=str(art))
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "b", experiment=experiment) as b:
        b.save(model, opt, {"step": 1})
    notes = tmp_path / "notes.txt"
    notes.write_text("user artifact")
    with CheckpointManager(tmp_path / "a", experiment=experiment, retention=KeepLast(1)) as a:
        a.save(model, opt, {"step": 1})
        a.save(model, opt, {"step": 2})  # retention deletes step 1: a real delete happened just before
        for where in ("notes", "checkpoints_old", "model"):
            client.log_artifact(a.run_id, str(notes), where)
        client.log_artifact(b.run_id, str(notes), "notes")
        before = tree(art)
        hostile = [
            *HOSTILE,
            "../..",
            "checkpoints",
            "checkpoints/",
            "checkpoints/..",
            "checkpoints/../..",
            "checkpoints/step-00000002/../..",
            "checkpoints/step-00000002/state.pt",
            "checkpoints/step-00000002/",
            "checkpoints/%2e%2e",
            "checkpoints/..%2f..",
            "checkpoints\\..\\..",
            "checkpoints/step-00000002\x00",
            "checkpoints/ step-00000002",
            "checkpoints/*",
            "checkpoints_old",
            "notes",
            f"../{b.run_id}",
            f"../../{b.run_id}/artifacts/checkpoints/step-00000001",
            str(art / b.run_id),
            str(art),
        ]
        for path in hostile:
            with pytest.raises(CheckpointCorruptError, match="refusing|only reads and deletes its own folders"):
                a.store.delete(path)
        assert tree(art) == before
        a.save(model, opt, {"step": 3})  # retention deletes step 2, and only that folder
    after = tree(art)
    gone = {k for k in before if k not in after}
    assert gone and all(k.startswith(f"{a.run_id}/artifacts/checkpoints/step-00000002/") for k in gone), gone
    assert {k for k in after if b.run_id in k} == {k for k in before if b.run_id in k}
    for where in ("notes", "checkpoints_old", "model"):
        assert f"{a.run_id}/artifacts/{where}/notes.txt" in after
    with pytest.raises(CheckpointNotFoundError):
        tracked_ckpt.load(a.run_id, model, which=2)
    assert tracked_ckpt.load(b.run_id, model)["step"] == 1
