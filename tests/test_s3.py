"""S3 artifact stores, for real: `moto`'s S3 server on loopback (started and stopped by PID), reached directly by the
MLflow client (an experiment whose artifact root is ``s3://``) and through a `mlflow server` that proxies to the
bucket. A TCP proxy (fault_proxy.py) in front of the S3 endpoint plays the object store's outage.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import assert_same_state, free_port, make_training, start_mlflow_server, stop_server, train_steps
from fault_proxy import FaultProxy
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager, KeepLast
from tracked_ckpt.errors import CheckpointCorruptError
from tracked_ckpt.store import transfer

BUCKET = "ckpt"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}


@dataclass
class S3:
    endpoint: str  # moto itself
    proxy: FaultProxy  # what the MLflow client is pointed at (MLFLOW_S3_ENDPOINT_URL)
    client: Any  # boto3, straight to moto: to inspect and tamper with the bucket

    def keys(self, prefix: str) -> list[str]:
        found = self.client.list_objects_v2(Bucket=BUCKET, Prefix=prefix).get("Contents", [])
        return sorted(o["Key"] for o in found)

    def folders(self, prefix: str) -> list[str]:
        return sorted({k.split("/checkpoints/")[1].split("/")[0] for k in self.keys(prefix) if "/checkpoints/" in k})


@contextlib.contextmanager
def moto_s3() -> Iterator[S3]:
    """moto's S3 server on a free loopback port (stopped by PID), a bucket, the client's variables pointing at it."""
    import boto3

    port = free_port()
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    deadline = time.monotonic() + 60
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("moto's S3 server did not start") from None
            time.sleep(0.2)
    endpoint = f"http://127.0.0.1:{port}"
    proxy = FaultProxy(endpoint)
    saved = {k: os.environ.get(k) for k in [*CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL"]}
    os.environ.update({**CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": proxy.url})
    client = boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1")
    client.create_bucket(Bucket=BUCKET)
    try:
        yield S3(endpoint, proxy, client)
    finally:
        proxy.close()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        os.killpg(proc.pid, signal.SIGTERM)
        proc.wait(timeout=15)


@pytest.fixture(scope="module")
def s3() -> Iterator[S3]:
    with moto_s3() as s:
        yield s


def test_direct_s3_save_resume_retention_integrity_and_outage(
    s3: S3, tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    MlflowClient().create_experiment(experiment, artifact_location=f"s3://{BUCKET}/{experiment}")
    model, opt, sched = make_training()
    states = {}
    with CheckpointManager(tmp_path / "ck", experiment=experiment, retention=KeepLast(2)) as mgr:
        for step in (1, 2, 3):
            train_steps(model, opt, sched, 1)
            mgr.save(model, opt, {"step": step, "reward": float(step)})
            states[step] = {k: v.clone() for k, v in model.state_dict().items()}
        run_id = mgr.run_id
    assert s3.folders(experiment) == ["step-00000002", "step-00000003"]  # retention deleted step 1 in the bucket

    # Resume on an empty machine: nothing local, everything from the bucket, verified.
    fresh, _, _ = make_training(seed=7)
    assert tracked_ckpt.load(run_id, fresh)["step"] == 3
    assert all(torch.equal(v, states[3][k]) for k, v in fresh.state_dict().items())

    # A flipped byte in the bucket: caught before unpickling; "latest" falls back, an explicit step raises.
    key = next(k for k in s3.keys(experiment) if k.endswith("step-00000003/state.pt"))
    data = bytearray(s3.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())
    data[len(data) // 2] ^= 0xFF
    s3.client.put_object(Bucket=BUCKET, Key=key, Body=bytes(data))
    with caplog.at_level(logging.WARNING, logger="tracked_ckpt"):
        assert tracked_ckpt.load(run_id, fresh)["step"] == 2
    assert "step 3" in caplog.text and "falling back" in caplog.text
    with pytest.raises(CheckpointCorruptError, match="state.pt"):
        tracked_ckpt.load(run_id, fresh, which=3)

    # The object store goes away: the save commits locally, queues, and is uploaded once it is back.
    with CheckpointManager(tmp_path / "ck", run_id=run_id, retention=KeepLast(2), publish_timeout=5) as mgr:
        s3.proxy.set_mode("refuse")
        t0 = time.monotonic()
        mgr.save(model, opt, {"step": 4, "reward": 4.0})
        blocked = time.monotonic() - t0
        assert blocked < 6, blocked
        assert [p.step for p in mgr.outbox.pending(run_id)] == [4]
        s3.proxy.set_mode("pass")
        assert mgr.sync(timeout=60)
    assert "step-00000004" in s3.folders(experiment)
    assert tracked_ckpt.load(run_id, fresh)["step"] == 4


def parts_of(s3: S3, key: str) -> int:
    """How many parts the object was uploaded in: S3's ETag of a multipart upload ends in "-<parts>"."""
    etag = s3.client.head_object(Bucket=BUCKET, Key=key)["ETag"].strip('"')
    return int(etag.rpartition("-")[2]) if "-" in etag else 1


def test_large_files_move_in_parallel_parts_and_a_cut_costs_one_part(s3: S3, tmp_path: Path, experiment: str) -> None:
    """Directly against S3: boto3's multipart upload; the download comes in ranges from a presigned URL, hashed as it
    streams; a connection cut mid-download costs the rest of that range, not the file (bytes counted on the wire)."""
    MlflowClient().create_experiment(experiment, artifact_location=f"s3://{BUCKET}/{experiment}")
    torch.manual_seed(0)
    model = torch.nn.Linear(3200, 3200)  # 41 MB: three ranges (transfer.plan)
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        mgr.save(model, None, {"step": 1})
        run_id = mgr.run_id
    key = next(k for k in s3.keys(experiment) if k.endswith("model.pt"))  # the weights: the large file
    size = s3.client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
    assert parts_of(s3, key) > 1  # boto3's upload_file, through MLflow's S3 repository

    s3.proxy.down = 0
    s3.proxy.cut_once("down", 8 << 20)  # mid-way through a range (one connection each)
    fresh = torch.nn.Linear(3200, 3200)
    assert tracked_ckpt.load(run_id, fresh) == {"step": 1}
    assert_same_state(fresh, model)
    assert not s3.proxy.cut_pending
    assert size < s3.proxy.down < size + transfer.MIN_CHUNK, (size, s3.proxy.down)


@pytest.mark.server
def test_a_tracking_server_proxying_to_s3(
    s3: S3, tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The server offers presigned URLs (its destination is S3): uploads go in parallel parts straight to the bucket,
    a cut part is sent again on its own, and downloads come from the bucket in ranges, not through the server (which
    would fetch the whole object from the bucket for every range). Counted on the wire between everyone and S3."""
    env = {**CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3.proxy.url}  # the server reaches S3 through the proxy too
    dest = f"s3://{BUCKET}/proxied-{experiment}"  # the last --artifacts-destination given wins
    url, proc = start_mlflow_server(tmp_path / "server", "--artifacts-destination", dest, env=env)
    monkeypatch.setenv("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE", str(1 << 20))  # 41 MB files go in parts
    try:
        torch.manual_seed(0)
        model = torch.nn.Linear(3200, 3200)
        with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=url, retention=KeepLast(1)) as mgr:
            mgr.save(model, None, {"step": 1})
            s3.proxy.up = 0
            s3.proxy.cut_once("up", 8 << 20)  # a part dies mid-way
            mgr.save(model, None, {"step": 2})
            assert not mgr.outbox.pending(mgr.run_id)  # recorded by that save: the part was retried, not the file
            run_id = mgr.run_id
        assert s3.folders(f"proxied-{experiment}") == ["step-00000002"]  # stored, and pruned, in the bucket
        key = next(k for k in s3.keys(f"proxied-{experiment}") if k.endswith("model.pt"))  # the large file
        size = s3.client.head_object(Bucket=BUCKET, Key=key)["ContentLength"]
        assert parts_of(s3, key) == -(-size // transfer.UPLOAD_PART)  # our parts (the server's boto3 uses 8 MB)
        assert not s3.proxy.cut_pending and size < s3.proxy.up < size + 2 * transfer.UPLOAD_PART, s3.proxy.up

        s3.proxy.down = 0
        fresh = torch.nn.Linear(3200, 3200)
        assert tracked_ckpt.load(run_id, fresh, tracking_uri=url)["step"] == 2
        assert_same_state(fresh, model)
        assert size < s3.proxy.down < 1.2 * size, (size, s3.proxy.down)  # once, from the bucket
    finally:
        stop_server(proc)


class Blob(torch.nn.Module):
    """One uint8 buffer of ``n`` bytes mapped from a sparse file: zero but for a byte at each of ``marks``, and no
    process memory (the pages are the file's). ``shared``: writes (a load) go to the file, not to memory."""

    def __init__(self, path: Path, n: int, marks: tuple[int, ...] = (), shared: bool = False) -> None:
        super().__init__()
        with open(path, "wb") as f:
            f.truncate(n)
        self.register_buffer("blob", torch.from_file(str(path), shared=shared, size=n, dtype=torch.uint8))
        for i, at in enumerate(marks):
            self.blob[at] = i + 1

    def marks(self) -> list[tuple[int, int]]:
        return [(int(i), int(self.blob[i])) for i in torch.nonzero(self.blob).flatten()]


@pytest.mark.slow
@pytest.mark.server
@pytest.mark.timeout(1500)
@pytest.mark.parametrize("where", ["direct", "proxied"])
def test_a_checkpoint_over_5_gib(where: str, tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """S3 takes at most 5 GiB in one PUT: a 5.1 GiB checkpoint is saved and resumed from an empty machine, directly
    (boto3's multipart upload, our ranged download) or through a server proxying to the bucket (our multipart upload
    over presigned part URLs). Each with a moto server of its own, downloading with one stream: moto holds objects in
    memory and copies a whole one for every GET (four parallel GETs ran this 23 GB machine out of memory). ~2 min
    each here."""
    n = (5 << 30) + (64 << 20)
    marks = (0, 1 << 30, (5 << 30) - 1, 5 << 30, n - 1)  # the edges of the 5 GiB boundary among them
    model = Blob(tmp_path / "model.bin", n, marks)
    monkeypatch.setattr(transfer, "PARTS", 1)  # moto reads a whole object into memory for every ranged GET
    with moto_s3() as s3:
        env = {**CREDENTIALS, "MLFLOW_S3_ENDPOINT_URL": s3.endpoint}
        url, proc = start_mlflow_server(tmp_path / "server", "--artifacts-destination", f"s3://{BUCKET}/big", env=env)
        try:
            tracking_uri = url if where == "proxied" else None
            kw = {"artifact_location": f"s3://{BUCKET}/{experiment}"} if where == "direct" else {}
            MlflowClient(tracking_uri).create_experiment(experiment, **kw)
            with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=tracking_uri) as mgr:
                mgr.save(model, None, {"step": 1})  # returns after publish_timeout; the upload goes on
                assert mgr.sync(timeout=1200)
                run_id = mgr.run_id
            shutil.rmtree(tmp_path / "ck")  # an empty machine, and the disk back
            fresh = Blob(tmp_path / "fresh.bin", n, shared=True)
            assert tracked_ckpt.load(run_id, fresh, tracking_uri=tracking_uri) == {"step": 1}
            assert fresh.marks() == [(at, i + 1) for i, at in enumerate(marks)]
        finally:
            stop_server(proc)
