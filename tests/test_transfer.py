"""Downloads from a tracking server: parallel ranged GETs, the streamed fallback, short bodies, credentials."""

from __future__ import annotations

import base64
import http.server
import logging
import re
import socket
import threading
from collections.abc import Iterator
from pathlib import Path

import blake3
import pytest
import torch
from conftest import assert_same_state, free_port
from mlflow.entities.presigned_download import PresignedDownloadUrlResponse
from mlflow.store.artifact.mlflow_artifacts_repo import MlflowArtifactsRepository
from mlflow.store.artifact.s3_artifact_repo import S3ArtifactRepository
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager
from tracked_ckpt.errors import CheckpointCorruptError
from tracked_ckpt.manifest import FileEntry, hash_file, verify_file
from tracked_ckpt.store import transfer
from tracked_ckpt.store.run_store import RunStore

BIG = 40 << 20  # over two ranges of transfer.CHUNK: the rest comes in parallel


class FileHandler(http.server.BaseHTTPRequestHandler):
    """Serves one folder like the proxied artifact endpoint; the server's flags make it misbehave."""

    def do_GET(self) -> None:
        srv = self.server
        assert isinstance(srv, FileServer)
        srv.ranges.append(self.headers.get("Range"))
        if srv.status is not None:  # e.g. 403: an object store refusing presigned URLs
            self.send_response(srv.status)
            self.send_header("Content-Length", "0")
            self.end_headers()
            return
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
        self.status: int | None = None

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


def served(files: FileServer, name: str = "big.bin") -> tuple[int, str]:
    return hash_file(files.root / "artifacts" / "ck" / name)


def ranges_for(size: int) -> int:
    return 1 + len(transfer.plan(transfer.MIN_CHUNK, size))  # the first request, then the plan


def test_large_file_comes_in_parallel_ranges_hashed_on_the_way(files: FileServer, tmp_path: Path) -> None:
    dst = tmp_path / "out" / "big.bin"
    digest = transfer.download_proxied(files.url, "ck/big.bin", dst)
    size, expected = served(files)
    assert digest == expected and hash_file(dst) == (size, expected)
    assert files.ranges[0] == f"bytes=0-{transfer.MIN_CHUNK - 1}"
    assert len(files.ranges) == ranges_for(size) > 2


def test_a_server_ignoring_range_gets_one_streamed_get(files: FileServer, tmp_path: Path) -> None:
    files.ignore_range = True
    digest = transfer.download_proxied(files.url, "ck/big.bin", tmp_path / "big.bin")
    assert (digest, len(files.ranges)) == (served(files)[1], 1)
    assert transfer.download_proxied(files.url, "ck/empty.bin", tmp_path / "empty.bin") == served(files, "empty.bin")[1]
    assert (tmp_path / "empty.bin").read_bytes() == b""


def test_a_failed_part_is_fetched_again_not_the_whole_file(files: FileServer, tmp_path: Path) -> None:
    files.drop_parts = 2
    digest = transfer.download_proxied(files.url, "ck/big.bin", tmp_path / "big.bin")
    size, expected = served(files)
    assert digest == expected and hash_file(tmp_path / "big.bin") == (size, expected)
    assert files.drop_parts == 0 and len(files.ranges) == ranges_for(size) + 2  # only the two parts, again


def test_a_short_part_is_an_error_not_a_file(files: FileServer, tmp_path: Path) -> None:
    files.truncate = True  # every part but the first comes one byte short, every time it is asked again
    with pytest.raises(OSError, match="cut short"):
        transfer.download_proxied(files.url, "ck/big.bin", tmp_path / "big.bin")


def test_missing_file_and_credentials(files: FileServer, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError):
        transfer.download_proxied(files.url, "ck/nope.bin", tmp_path / "nope.bin")
    files.password = "s3cret"
    with pytest.raises(OSError, match="401"):
        transfer.download_proxied(files.url, "ck/big.bin", tmp_path / "big.bin")
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", "alice")
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", "s3cret")  # MLflow's own variables, as MLflow reads them
    assert transfer.download_proxied(files.url, "ck/big.bin", tmp_path / "big.bin") == served(files)[1]


def test_pieces_are_hashed_in_file_order_far_ahead_ones_from_the_file(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The in-order hasher: pieces handed in out of order by threads give the file's digest. Those within WINDOW of
    the hashed position are hashed from memory; those further ahead are read back from the file (bounded memory)."""
    data = bytes(range(256)) * 64
    pieces = [(i, data[i : i + 1024]) for i in range(0, len(data), 1024)]
    for window, reread in ((len(data), 0), (4096, len(data) - 4096)):  # 4 pieces of 1 KiB in the window
        monkeypatch.setattr(transfer, "WINDOW", window)
        f = tmp_path / f"w{window}.bin"
        f.write_bytes(data)  # as the workers' pwrite left it
        with open(f, "rb") as fh:
            h = transfer._InOrderHash(fh.fileno())
            threads = [threading.Thread(target=h.feed, args=p) for p in reversed(pieces[1:])]
            for t in threads:
                t.start()
                t.join()  # last piece first: the worst order
            assert h.done == 0  # nothing hashed while the first piece is missing
            h.feed(*pieces[0])
        assert (h.done, h.hexdigest(), h.reread) == (len(data), hash_bytes(data), reread)


def test_ranges_fit_the_file_and_mlflows_chunk_size(monkeypatch: pytest.MonkeyPatch) -> None:
    mb = 1 << 20
    assert transfer.plan(0, 40 * mb) == [(0, 16 * mb), (16 * mb, 32 * mb), (32 * mb, 40 * mb)]  # 16 MB at least
    assert len(transfer.plan(0, 200 * mb)) == transfer.PARTS  # one range per worker
    assert {b - a for a, b in transfer.plan(0, 1000 * mb)} == {100 * mb}  # MLflow's 100 MB at most
    monkeypatch.setenv("MLFLOW_MULTIPART_DOWNLOAD_CHUNK_SIZE", str(32 * mb))
    assert len(transfer.plan(0, 1000 * mb)) == 32


def test_a_streamed_digest_is_trusted_the_file_is_not_read_again(tmp_path: Path) -> None:
    f = tmp_path / "x.bin"
    f.write_bytes(b"abc")
    entry = FileEntry("x.bin", 3, hash_bytes(b"xyz"))
    verify_file(f, entry, "here", digest=entry.blake3)  # the digest the download computed stands for the bytes
    with pytest.raises(CheckpointCorruptError, match="BLAKE3"):
        verify_file(f, entry, "here")  # without one, the file is hashed
    with pytest.raises(CheckpointCorruptError, match="BLAKE3"):
        verify_file(f, entry, "here", digest=hash_bytes(b"abc"))


def test_upload_part_size_fits_s3s_limits() -> None:
    assert transfer.part_size(100 << 20) == transfer.UPLOAD_PART
    big = 6 << 40  # 6 TiB: 16 MiB parts would be 393,216 of them
    part = transfer.part_size(big)
    assert -(-big // part) <= 10_000 and part % (1 << 20) == 0 and part <= 5 << 30


def hash_bytes(data: bytes) -> str:
    return str(blake3.blake3(data).hexdigest())


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
    assert hash_file(got.path) == (entry.size, entry.blake3) and got.blake3 == entry.blake3


class UnreachableBucket(MlflowArtifactsRepository):
    """A tracking server whose presigned URLs point at an object store this machine cannot reach."""

    def _is_multipart_download_enabled(self) -> bool:
        return True

    def _get_presigned_download_url(self, remote_file_path: str) -> PresignedDownloadUrlResponse:
        return PresignedDownloadUrlResponse(f"http://127.0.0.1:{free_port()}/bucket/{remote_file_path}", {}, None)


@pytest.mark.server
def test_an_unreachable_presigned_url_falls_back_to_the_server(
    tmp_path: Path, experiment: str, mlflow_server: str, caplog: pytest.LogCaptureFixture
) -> None:
    torch.manual_seed(0)
    model = torch.nn.Linear(2300, 2300)
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=mlflow_server) as mgr:
        ref = mgr.save(model, None, {"step": 1})
    folder = ref.split("/", 2)[2]
    entry = mgr.catalog.manifest(folder).file("state.pt")
    artifact_uri = MlflowClient(mlflow_server).get_run(mgr.run_id).info.artifact_uri
    repo = UnreachableBucket(artifact_uri, tracking_uri=mlflow_server)
    with caplog.at_level(logging.WARNING, logger="tracked_ckpt"):
        digest = transfer.download(repo, f"{folder}/state.pt", tmp_path / "dl" / "state.pt")
    assert digest == entry.blake3 and hash_file(tmp_path / "dl" / "state.pt") == (entry.size, entry.blake3)
    assert "not reachable from here" in caplog.text and "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD" in caplog.text


class PresigningS3(S3ArtifactRepository):
    """MLflow's S3 repository, its presigned URLs pointing at ``url`` (the test's file server)."""

    def __init__(self, url: str) -> None:
        super().__init__("s3://bucket/prefix")
        self.url = url

    def get_download_presigned_url(self, artifact_path: str, expiration: int = 300) -> PresignedDownloadUrlResponse:
        return PresignedDownloadUrlResponse(f"{self.url}/{artifact_path}", {"x-amz-test": "1"}, None)


def test_direct_s3_downloads_through_presigned_urls_and_falls_back_when_refused(
    files: FileServer, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    repo = PresigningS3(files.url)
    assert transfer.download(repo, "ck/big.bin", tmp_path / "big.bin") == served(files)[1]
    assert len(files.ranges) == ranges_for(served(files)[0])
    files.status = 403
    with caplog.at_level(logging.WARNING, logger="tracked_ckpt"):
        assert transfer.download(repo, "ck/big.bin", tmp_path / "again.bin") is None  # the caller uses MLflow's client
    assert "refused a presigned URL" in caplog.text and "HTTP 403" in caplog.text
