"""The writing side of the recorder (recording/writing.py): folder names, and the one local commit, queued first.

No MLflow: a Writer only needs ``save_dir``, its outbox and the ledger. Disk failures are real ``OSError``s raised at
a named fault point (``TRACKED_CKPT_FAULT=<stage>!``).
"""

from __future__ import annotations

import time
import uuid
from pathlib import Path

import pytest

from tracked_ckpt import _faults
from tracked_ckpt.errors import SaveError
from tracked_ckpt.local import STAGING, LocalDir
from tracked_ckpt.manifest import MANIFEST_NAME, Manifest, write_file
from tracked_ckpt.outbox import Outbox
from tracked_ckpt.recording.ledger import Ledger
from tracked_ckpt.recording.writing import Writer
from tracked_ckpt.runtags import METRIC_BYTES, METRIC_COMMIT_S
from tracked_ckpt.state import split_metadata

RUN = "0123456789abcdef0123456789abcdef"


def writer(tmp_path: Path) -> Writer:
    return Writer(RUN, LocalDir(tmp_path), Outbox(tmp_path), Ledger())


def staged(w: Writer, step: int) -> tuple[Path, str, Manifest]:
    name, fields = w.plan(split_metadata({"step": step, "reward": 1.0}), None)
    staging = w.local.root / STAGING / uuid.uuid4().hex
    staging.mkdir(parents=True)
    entry = write_file(staging / "state.pt", b"x" * 10)
    return staging, name, Manifest(run_id=RUN, files=(entry,), **fields)


def test_a_folder_name_is_never_reused_and_names_a_step_below_the_top(tmp_path: Path) -> None:
    w = writer(tmp_path)
    names = [w.plan(split_metadata({"step": s}), None)[0] for s in (1, 2, 2, 1)]
    assert names == ["step-00000001", "step-00000002", "step-00000002.3", "step-00000001.4"]
    assert w.plan(split_metadata({}), 7)[0] == "step-00000007"  # step= wins over the metadata's
    assert w.plan(split_metadata({}), None)[1]["step"] == 6  # no step anywhere: its seq
    w.ledger.taken = {"step-00000050"}  # recovery replaces the names in use: the cached top follows
    assert w.plan(split_metadata({"step": 9}), None)[0] == "step-00000009.7"


@pytest.mark.parametrize("record", [True, False])
def test_commit_queues_then_commits_and_tells_the_ledger(tmp_path: Path, record: bool) -> None:
    w = writer(tmp_path)
    staging, name, manifest = staged(w, 3)
    folder = w.commit(staging, name, manifest, held=["state.pt"], record=record, since=time.perf_counter())
    assert folder == tmp_path / RUN / name and not staging.exists()
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_NAME, "state.pt"]
    assert Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), "test") == manifest
    [entry] = w.outbox.pending(RUN)
    assert (entry.name, entry.step, entry.seq, entry.upload_only) == (name, 3, manifest.seq, not record)
    assert not w.ledger.is_committing(manifest.seq) and w.ledger.is_mine(manifest.seq)
    # Save policies see a checkpoint that is only queued; a node's share is not one (another node records it).
    assert [c.path for c in w.ledger.known()] == ([f"checkpoints/{name}"] if record else [])
    assert set(w.ledger.costs(manifest.seq)) == ({METRIC_COMMIT_S, METRIC_BYTES} if record else set())


def test_a_failed_commit_leaves_nothing_queued_or_committed(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    w = writer(tmp_path)
    staging, name, manifest = staged(w, 4)
    monkeypatch.setattr(_faults, "_hits", {})
    monkeypatch.setenv("TRACKED_CKPT_FAULT", "manifest!")  # the disk fails as the manifest is written
    with pytest.raises(SaveError, match=r"could not write the checkpoint of step 4 .*injected I/O error"):
        w.commit(staging, name, manifest, held=None, record=True, since=time.perf_counter())
    assert not staging.exists() and not (tmp_path / RUN / name).exists()
    assert w.outbox.pending(RUN) == [] and w.ledger.known() == []
    assert not w.ledger.is_committing(manifest.seq)
