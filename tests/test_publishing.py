"""Publishing a checkpoint whose files several nodes hold (recording/publishing.py), against the real sqlite store.

Two recorders stand in for two node leaders, each with its own ``save_dir`` and outbox, their publishers driven
inline (``start=False`` + ``drain_once()``): node 1's *upload-only* entry lands its share of the files and nothing
else; node 0's *recording* entry uploads its share, waits while a file of the manifest is not in the store at its
size, and records the checkpoint (manifest last, tags, metrics, LoggedModel) once it is.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tracked_ckpt.errors import SaveError
from tracked_ckpt.local import STAGING, LocalDir
from tracked_ckpt.manifest import MANIFEST_NAME, Manifest, write_file
from tracked_ckpt.outbox import WAIT_INTERVALS
from tracked_ckpt.recording import RunRecorder
from tracked_ckpt.runtags import TAG_LATEST
from tracked_ckpt.state import split_metadata
from tracked_ckpt.store.run_store import RunStore

SHARES = {"a.bin": b"node zero's bytes" * 100, "b.bin": b"node one's bytes" * 300}  # node 0 holds a, node 1 b


class CountingStore(RunStore):
    """The real store, counting uploads by file name (a share is uploaded once, however long its record waits)."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.uploads: dict[str, int] = {}

    def upload(self, local_file: Path, artifact_dir: str) -> None:
        super().upload(local_file, artifact_dir)
        self.uploads[local_file.name] = self.uploads.get(local_file.name, 0) + 1


@pytest.fixture
def run_id(experiment: str) -> str:
    client = MlflowClient()
    return client.create_run(client.create_experiment(experiment)).info.run_id


@pytest.fixture
def nodes(tmp_path: Path, run_id: str) -> Iterator[list[RunRecorder]]:
    def node(i: int) -> RunRecorder:
        store, local = CountingStore(MlflowClient(), run_id), LocalDir(tmp_path / f"node{i}")
        return RunRecorder(store, local, monitor="loss", mode="min", retention=None, publish_timeout=0, start=False)

    recorders = [node(0), node(1)]
    yield recorders
    for r in recorders:
        r.stop()


def stage(rec: RunRecorder, names: list[str]) -> Path:
    staging = rec.local.root / STAGING / uuid.uuid4().hex
    staging.mkdir(parents=True)
    for n in names:
        write_file(staging / n, SHARES[n])
    return staging


def plan(rec: RunRecorder) -> tuple[str, Manifest]:
    """Rank 0's plan and the full manifest, as every node gets them."""
    name, fields = rec.plan(split_metadata({"step": 5, "loss": 0.25}), None)
    scratch = rec.local.root / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    files = tuple(write_file(scratch / n, data) for n, data in sorted(SHARES.items()))
    return name, Manifest(run_id=rec.run_id, files=files, format="dcp", world_size=2, **fields)


def listed(store: RunStore, name: str) -> dict[str, int | None]:
    return {e.path.rpartition("/")[2]: e.size for e in store.list(f"checkpoints/{name}")}


def test_an_upload_only_entry_lands_its_files_and_nothing_else(nodes: list[RunRecorder], run_id: str) -> None:
    node0, node1 = nodes
    name, manifest = plan(node0)
    folder = node1.commit(stage(node1, ["b.bin"]), name, manifest, time.perf_counter(), held=["b.bin"], record=False)
    assert sorted(p.name for p in folder.iterdir()) == [MANIFEST_NAME, "b.bin"]  # a verified local copy, durable
    assert [p.upload_only for p in node1.outbox.pending(run_id)] == [True]
    assert node1.publisher.drain_once()
    assert listed(node1.store, name) == {"b.bin": len(SHARES["b.bin"])}  # no manifest: nothing resolves yet
    assert node1.outbox.pending(run_id) == []
    run = MlflowClient().get_run(run_id)
    assert run.data.metrics == {} and not any(k.startswith("tracked_ckpt.") for k in run.data.tags)
    assert node1.models is not None and node1.models.search() == []
    assert node1.index == {} and node1.catalog.scan() == []


def test_a_recording_entry_waits_for_the_other_nodes_files_then_records(
    nodes: list[RunRecorder], run_id: str
) -> None:
    node0, node1 = nodes
    name, manifest = plan(node0)
    node0.commit(stage(node0, ["a.bin"]), name, manifest, time.perf_counter(), held=["a.bin"])
    assert not node0.publisher.drain_once()  # Waiting: b.bin is not in the store
    assert listed(node0.store, name) == {"a.bin": len(SHARES["a.bin"])}
    # A b.bin of the wrong size (a torn upload) is not b.bin: still waiting.
    torn = node0.local.root / "torn" / "b.bin"
    torn.parent.mkdir()
    torn.write_bytes(b"torn")
    node0.store.upload(torn, f"checkpoints/{name}")
    assert not node0.publisher.drain_once()
    assert node0.publisher._interval() == WAIT_INTERVALS[1]  # retried on the back-off, not at once, not never
    assert MANIFEST_NAME not in listed(node0.store, name) and node0.catalog.scan() == []

    node1.commit(stage(node1, ["b.bin"]), name, manifest, time.perf_counter(), held=["b.bin"], record=False)
    assert node1.publisher.drain_once()
    assert node0.publisher.drain_once()  # every file is there: the manifest goes last, then tags and metrics
    assert node0.store.uploads == {"a.bin": 1, "b.bin": 1, MANIFEST_NAME: 1}  # its own share once, not per pass
    assert node0.publisher._interval() is None and node0.outbox.pending(run_id) == []
    assert set(listed(node0.store, name)) == {"a.bin", "b.bin", MANIFEST_NAME}
    [found] = node0.catalog.scan()
    assert found.path == f"checkpoints/{name}" and found.manifest == manifest
    run = MlflowClient().get_run(run_id)
    assert run.data.tags[TAG_LATEST] == found.path and run.data.metrics["loss"] == 0.25
    assert node0.models is not None and len(node0.models.search()) == 1


def test_held_files_must_be_in_staging_and_in_the_manifest(nodes: list[RunRecorder], run_id: str) -> None:
    node0, _ = nodes
    name, manifest = plan(node0)
    staging = stage(node0, ["a.bin"])
    with pytest.raises(SaveError, match=r"b\.bin should be in .* nothing was committed"):
        node0.commit(staging, name, manifest, time.perf_counter(), held=["a.bin", "b.bin"])
    assert not staging.exists() and node0.outbox.pending(run_id) == []
    assert not node0.local.folder(run_id, name).exists()


def test_another_node_drops_what_rank_0_no_longer_keeps(nodes: list[RunRecorder], run_id: str) -> None:
    """Rank 0 skipped a backlogged checkpoint (or retention deleted it): node 1 neither uploads its queued share nor
    keeps its copy; a share rank 0 still keeps stays queued and on disk (distributed/sharded.prune_node)."""
    from tracked_ckpt.distributed.sharded import kept_names, prune_node

    zero, one = nodes
    kept_name, kept_manifest = plan(zero)
    zero.commit(stage(zero, ["a.bin"]), kept_name, kept_manifest, time.perf_counter(), held=["a.bin"], wait=False)
    one.commit(stage(one, ["b.bin"]), kept_name, kept_manifest, time.perf_counter(), held=["b.bin"], record=False,
               wait=False)  # fmt: skip
    dropped_name, dropped_manifest = plan(zero)
    one.commit(stage(one, ["b.bin"]), dropped_name, dropped_manifest, time.perf_counter(), held=["b.bin"],
               record=False, wait=False)  # fmt: skip  # rank 0 never queued this one: it skipped or lost it
    stale = one.local.folder(run_id, "step-00000001")
    stale.mkdir(parents=True)  # a copy from an earlier launch that retention dropped since
    kept = kept_names(zero)
    assert kept == {kept_name}
    prune_node(one, kept)
    assert not stale.exists()
    one.publisher.drain_once()
    assert [p.name for p in one.outbox.pending(run_id)] == []  # both entries done: one uploaded, one dropped
    assert listed(one.store, kept_name) == {"b.bin": len(SHARES["b.bin"])}
    assert listed(one.store, dropped_name) == {}  # nothing uploaded for the dropped share
    assert not one.local.folder(run_id, dropped_name).exists() and one.local.folder(run_id, kept_name).exists()
