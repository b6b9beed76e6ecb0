"""Recording a folder another library wrote, and fetching it back verified (tracked_ckpt/frameworks/folders.py)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT, run_python
from mlflow.tracking import MlflowClient

from tracked_ckpt import CheckpointManager
from tracked_ckpt.errors import (
    CheckpointCorruptError,
    CheckpointMismatchError,
    CheckpointNotFoundError,
    SaveError,
    StoreError,
)
from tracked_ckpt.frameworks import fetch_folder, record_folder
from tracked_ckpt.frameworks.folders import delete_removed
from tracked_ckpt.manifest import MANIFEST_NAME, Manifest
from tracked_ckpt.refs import parse_ref
from tracked_ckpt.store.run_store import RunStore


def make_folder(root: Path, name: str, seed: int) -> Path:
    folder = root / name
    (folder / "sub" / "deeper").mkdir(parents=True)
    (folder / "model.safetensors").write_bytes(os.urandom(1000) + bytes([seed]))
    (folder / "trainer_state.json").write_text(json.dumps({"global_step": seed}))
    (folder / "sub" / "deeper" / "shard-0.bin").write_bytes(bytes(range(seed % 256)) * 10)
    return folder


def tree(folder: Path) -> dict[str, bytes]:
    return {p.relative_to(folder).as_posix(): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def test_record_nested_folder_then_fetch_latest_best_step(tmp_path: Path, experiment: str) -> None:
    out = tmp_path / "out"
    with CheckpointManager(tmp_path / "ckpt", experiment=experiment, monitor="eval_loss", mode="min") as mgr:
        expected = {}
        for step, loss in [(10, 0.5), (20, 0.2), (30, 0.4)]:
            src = make_folder(out, f"checkpoint-{step}", step)
            expected[step] = tree(src)
            record_folder(mgr, src, {"eval_loss": loss, "epoch": step // 10}, format="hf-trainer", step=step)
        run_id = mgr.run_id
    m = Manifest.from_json(
        (tmp_path / "ckpt" / run_id / "step-00000030" / MANIFEST_NAME).read_bytes(), "local manifest"
    )
    assert m.format == "hf-trainer" and m.metadata["source"] == "checkpoint-30" and m.epoch == 3
    assert "sub/deeper/shard-0.bin" in {f.name for f in m.files}
    history = MlflowClient().get_metric_history(run_id, "eval_loss")
    assert [(h.step, h.value) for h in history] == [(10, 0.5), (20, 0.2), (30, 0.4)]

    # A fresh, empty folder: everything comes from MLflow, verified.
    dest = tmp_path / "fresh"
    got = fetch_folder(run_id, dest)
    assert got == dest / "checkpoint-30" and tree(got) == expected[30]
    assert tree(fetch_folder(run_id, dest, which="best")) == expected[20]
    assert tree(fetch_folder(run_id, dest, which=10)) == expected[10]
    assert fetch_folder(run_id, dest) == got  # fetched already: verified and reused


def test_fetch_refuses_a_tampered_file_and_falls_back(tmp_path: Path, experiment: str) -> None:
    with CheckpointManager(tmp_path / "ckpt", experiment=experiment) as mgr:
        first = tree(make_folder(tmp_path, "a", 1))
        record_folder(mgr, tmp_path / "a", {"step": 1})
        record_folder(mgr, make_folder(tmp_path, "b", 2), {"step": 2})
        run_id = mgr.run_id
    art = Path(MlflowClient().get_run(run_id).info.artifact_uri.removeprefix("file://"))
    target = art / "checkpoints" / "step-00000002" / "sub" / "deeper" / "shard-0.bin"
    os.chmod(target, 0o644)  # hard-linked with the local copy: rewrite the bytes of both
    target.write_bytes(b"x" * target.stat().st_size)
    with pytest.raises(CheckpointCorruptError, match="BLAKE3"):
        fetch_folder(run_id, tmp_path / "dest", which=2)
    assert tree(fetch_folder(run_id, tmp_path / "dest")) == first  # latest falls back past it, with a warning


def test_folders_are_not_tracked_ckpt_states_and_bad_folders_are_refused(tmp_path: Path, experiment: str) -> None:
    with CheckpointManager(tmp_path / "ckpt", experiment=experiment) as mgr:
        with pytest.raises(SaveError, match="not a folder"):
            record_folder(mgr, tmp_path / "missing", {"step": 1})
        bad = make_folder(tmp_path, "bad", 3)
        (bad / MANIFEST_NAME).write_text("{}")
        with pytest.raises(SaveError, match="commit marker"):
            record_folder(mgr, bad, {"step": 1})
        record_folder(mgr, make_folder(tmp_path, "good", 4), {"step": 4}, format="accelerate")
        with pytest.raises(CheckpointMismatchError, match="fetch_folder"):
            mgr.load()
        run_id = mgr.run_id
    with pytest.raises(CheckpointNotFoundError, match="format 'lightning'"):
        fetch_folder(run_id, tmp_path / "dest", format="lightning")


def test_no_framework_is_imported_unless_its_adapter_is(tmp_path: Path) -> None:
    code = (
        "import sys, tracked_ckpt, tracked_ckpt.frameworks, tracked_ckpt.frameworks.accelerate\n"
        "print(sorted(m for m in ('lightning', 'pytorch_lightning', 'transformers', 'accelerate') if m in sys.modules))"
    )
    assert run_python(code, tmp_path).strip() == "[]"


@pytest.mark.server
def test_nested_folder_through_a_server_fetch_and_cli(tmp_path: Path, experiment: str, mlflow_server: str) -> None:
    from click.testing import CliRunner

    from tracked_ckpt.cli import cli

    with CheckpointManager(tmp_path / "ckpt", experiment=experiment, tracking_uri=mlflow_server) as mgr:
        src = make_folder(tmp_path / "out", "checkpoint-7", 7)
        record_folder(mgr, src, {"step": 7, "loss": 0.5}, format="hf-trainer")
        run_id = mgr.run_id
    assert tree(fetch_folder(run_id, tmp_path / "fresh", tracking_uri=mlflow_server)) == tree(src)
    runner = CliRunner()
    verified = runner.invoke(cli, ["verify", run_id, "--tracking-uri", mlflow_server])
    assert verified.exit_code == 0, verified.output
    pulled = runner.invoke(cli, ["pull", run_id, "-o", str(tmp_path / "pulled"), "--tracking-uri", mlflow_server])
    assert pulled.exit_code == 0, pulled.output
    assert tree(tmp_path / "pulled") == {**tree(src), MANIFEST_NAME: (tmp_path / "pulled" / MANIFEST_NAME).read_bytes()}


class NoDeleteStore(RunStore):
    down = False

    def delete(self, path: str) -> None:
        if NoDeleteStore.down:
            raise StoreError(f"injected: connection refused (delete {path})")
        super().delete(path)


def test_a_removal_mirrored_during_an_outage_waits_for_the_next_save(tmp_path: Path, experiment: str) -> None:
    with CheckpointManager(tmp_path / "ckpt", experiment=experiment, store_factory=NoDeleteStore) as mgr:
        sources = {}
        for step in (1, 2):
            ref = record_folder(mgr, make_folder(tmp_path, f"c{step}", step), {"step": step})
            sources[f"c{step}"] = parse_ref(ref)[1]
        NoDeleteStore.down = True
        try:
            delete_removed(mgr, sources, lambda s: s == "c1")  # warns, never raises into the training loop
            mgr.wait()  # deletions run on the recording thread, behind the save in flight
        finally:
            NoDeleteStore.down = False
        assert "c1" in sources and [r.manifest.step for r in mgr.recorder.committed()] == [1, 2]
        delete_removed(mgr, sources, lambda s: s == "c1")
        mgr.wait()
        assert list(sources) == ["c2"] and [r.manifest.step for r in mgr.recorder.committed()] == [2]
        assert not (tmp_path / "ckpt" / mgr.run_id / "step-00000001").exists()


KILLED_IN_THE_BACKGROUND = """
import sys, time
from pathlib import Path
from test_folders import make_folder
from tracked_ckpt import CheckpointManager
from tracked_ckpt.frameworks import record_folder
root = Path(sys.argv[1])
mgr = CheckpointManager(root / "ckpt", experiment=sys.argv[2])
print("RUN_ID", mgr.run_id, flush=True)
record_folder(mgr, make_folder(root, "a", 1), {"step": 1})
mgr.wait()
record_folder(mgr, make_folder(root, "b", 2), {"step": 2})
print("RETURNED", flush=True)  # the files are linked; fsync, hash and manifest run on the recording thread
time.sleep(60)
"""


def test_a_kill_before_the_background_commit_leaves_nothing_that_resolves(tmp_path: Path, experiment: str) -> None:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}", "TRACKED_CKPT_FAULT": "manifest@2"}
    p = subprocess.run([sys.executable, "-c", KILLED_IN_THE_BACKGROUND, str(tmp_path), experiment], env=env,
                       capture_output=True, text=True, timeout=180)  # fmt: skip
    assert p.returncode == -9 and "RETURNED" in p.stdout, p.stderr[-3000:]
    run_id = p.stdout.split()[1]
    assert len(list((tmp_path / "ckpt" / ".staging").iterdir())) == 1  # linked, never committed
    assert fetch_folder(run_id, tmp_path / "dest") == tmp_path / "dest" / "a"
    with CheckpointManager(tmp_path / "ckpt", run_id=run_id) as mgr:  # the next process sweeps the leftovers
        assert [r.manifest.step for r in mgr.recorder.committed()] == [1]
    assert not list((tmp_path / "ckpt" / ".staging").iterdir())
