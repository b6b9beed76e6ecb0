"""Downloads from a tracking server: parallel ranged GETs, the streamed fallback, short bodies, credentials."""

from __future__ import annotations

import base64
import http.server
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import assert_same_state
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager, transfer
from tracked_ckpt.manifest import hash_file
from tracked_ckpt.store import RunStore

BIG = 20 << 20  # above the 8 MB probe: the rest comes in parallel ranges


class FileHandler(http.server.BaseHTTPRequestHandler):
    """Serves one folder like the proxied artifact endpoint; the server's flags make it misbehave."""

    def do_GET(self) -> None:
        srv = self.server
        assert isinstance(srv, FileServer)
        srv.ranges.append(self.headers.get("Range"))
        if srv.password is not None:
            expected = "Basic " + base64.b64encode(f"alice:{srv.password}".encode()).decode()
            if self.headers.get("Authorization") != expected:
                self.send_response(401)
                self.send_header("Content-Length", "0")
                self.end_headers()
                return
        path = srv.root / self.path.lstrip("/")
        if not path.is_file():
            self.send_response(404)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
        data = path.read_bytes()
        m = re.fullmatch(r"bytes=(\d+)-(\d+)", self.headers.get("Range") or "")
        if m and int(m.group(1)) > 0 and srv.drop_parts > 0:  # a part's connection dies before any answer
            srv.drop_parts -= 1
            self.close_connection = True
            self.connection.shutdown(socket.SHUT_RDWR)
            return
        if m and not srv.ignore_range and data:
            a, b = int(m.group(1)), min(int(m.group(2)), len(data) - 1)
            body = data[a : b + 1]
            if srv.truncate and a > 0:
                body = body[:-1]
            self.send_response(206)
            self.send_header("Content-Range", f"bytes {a}-{b}/{len(data)}")
        else:
            body = data
            self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass


class FileServer(http.server.ThreadingHTTPServer):
    def __init__(self, root: Path) -> None:
        super().__init__(("127.0.0.1", 0), FileHandler)
        self.root = root
        self.ranges: list[str | None] = []
        self.ignore_range = False
        self.truncate = False
        self.drop_parts = 0
        self.password: str | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server_address[1]}/artifacts"


@pytest.fixture
def files(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[FileServer]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    root = tmp_path / "served" / "artifacts"
    (root / "ck").mkdir(parents=True)
    (root / "ck" / "big.bin").write_bytes(torch.randint(0, 256, (BIG + 12345,), dtype=torch.uint8).numpy().tobytes())
    (root / "ck" / "empty.bin").write_bytes(b"")
    srv = FileServer(tmp_path / "served")
    thread = threading.Thread(target=srv.serve_forever, daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def test_large_file_comes_in_parallel_ranges(files: FileServer, tmp_path: Path) -> None:
    dst = transfer.download(files.url, "ck/big.bin", tmp_path / "out" / "big.bin")
    assert hash_file(dst) == hash_file(files.root / "artifacts" / "ck" / "big.bin")
    assert files.ranges[0] == f"bytes=0-{(8 << 20) - 1}"
    assert len(files.ranges) == 1 + transfer.PARTS


def test_a_server_ignoring_range_gets_one_streamed_get(files: FileServer, tmp_path: Path) -> None:
    files.ignore_range = True
    dst = transfer.download(files.url, "ck/big.bin", tmp_path / "big.bin")
    assert hash_file(dst) == hash_file(files.root / "artifacts" / "ck" / "big.bin")
    assert len(files.ranges) == 1
    assert transfer.download(files.url, "ck/empty.bin", tmp_path / "empty.bin").read_bytes() == b""


def test_a_failed_part_is_fetched_again_not_the_whole_file(files: FileServer, tmp_path: Path) -> None:
    files.drop_parts = 2
    dst = transfer.download(files.url, "ck/big.bin", tmp_path / "big.bin")
    assert hash_file(dst) == hash_file(files.root / "artifacts" / "ck" / "big.bin")
    assert files.drop_parts == 0 and len(files.ranges) == 1 + transfer.PARTS + 2  # only the two parts, again


def test_a_short_part_is_an_error_not_a_file(files: FileServer, tmp_path: Path) -> None:
    files.truncate = True
    with pytest.raises(OSError, match="cut short"):
        transfer.download(files.url, "ck/big.bin", tmp_path / "big.bin")


def test_missing_file_and_credentials(files: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError):
        transfer.download(files.url, "ck/nope.bin", tmp_path / "nope.bin")
    files.password = "s3cret"
    with pytest.raises(OSError, match="401"):
        transfer.download(files.url, "ck/big.bin", tmp_path / "big.bin")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")  # MLflow's own variables, as MLflow reads them
    dst = transfer.download(files.url, "ck/big.bin", tmp_path / "big.bin")
    assert hash_file(dst) == hash_file(files.root / "artifacts" / "ck" / "big.bin")


@pytest.mark.server
def test_resume_through_a_real_server_uses_ranged_downloads(
    tmp_path: Path, experiment: str, mlflow_server: str
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2300, 2300)  # ~21 MB: the parallel path
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=mlflow_server) as mgr:
        ref = mgr.save(model, None, {"step": 1})
        store = mgr.store
        assert transfer.is_http(store.repo)
    fresh = torch.nn.Linear(2300, 2300)
    assert tracked_ckpt.load(mgr.run_id, fresh, tracking_uri=mlflow_server) == {"step": 1}
    assert_same_state(fresh, model)

    path = ref.split("/", 2)[2] + "/state.pt"
    entry = mgr.catalog.manifest(ref.split("/", 2)[2]).file("state.pt")
    got = RunStore(MlflowClient(mlflow_server), mgr.run_id).fetch(path, tmp_path / "dl")
    assert hash_file(got) == (entry.size, entry.blake3)
