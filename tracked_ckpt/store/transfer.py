"""Artifact transfers in parallel parts, retried part by part, verified while they stream.

MLflow's client moves a file as one stream where tracked_ckpt needs more, so the large transfers go here:

**Downloads** (``download``): the file comes as byte ranges taken in file order by ``PARTS`` workers (``plan``: at
least one range per worker, 16 MB to 100 MB each). Each piece is written in place (``pwrite``) and handed to one
BLAKE3 hasher in file order, so the digest is known when the last byte lands: pieces within ``WINDOW`` of the hashed
position wait in memory, pieces further ahead are read back from the page cache when their turn comes. Memory
stays bounded, no worker waits, and the file is read again only where ranges run far apart. A range that fails is
fetched again from the byte where it stopped (``PART_ATTEMPTS`` tries), not the whole file. Every byte count is
checked (truncated downloads were reported, mlflow#7360). Where the bytes come from:

- S3 reached directly (MLflow's S3 repository): a presigned URL to the object, from MLflow's own
  ``get_download_presigned_url``.
- A tracking server proxying artifacts to S3: the server's presigned URL (MLflow 3 advertises it in
  ``/server-info``; ``MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD`` overrides, as for MLflow's client), straight from
  the bucket. Its artifact endpoint would fetch the whole object from the bucket for every request, so when no
  usable URL comes (the bucket unreachable from here) the file comes through the server as one stream.
- A tracking server storing artifacts on its own disk: parallel ``Range`` requests to its artifact endpoint,
  which serves the file in place (206 with ``Content-Range``); a server that ignores Range gets one stream.
- Any other store: ``None``, and the caller uses MLflow's ``download_artifacts`` and hashes the file after.

**Uploads** (``upload``): to a tracking server that offers multipart uploads (its destination is S3), a large file
goes in parallel parts straight to the bucket through the server's presigned part URLs (MLflow's ``mpu`` endpoints),
each part with a timeout and its own retries; a failed upload is aborted, so nothing half-written is left in the
bucket. MLflow's own path for this has no timeout on a part and fails the file on one failed part. S3 reached
directly needs nothing here: MLflow's S3 repository uploads with boto3's multipart ``upload_file`` (parallel parts,
retried per part by botocore, any size). Everything else: ``False``, and the caller uses ``log_artifact``.

Requests to the tracking server go through MLflow's ``http_request`` (its credentials, auth plugins, TLS settings,
and tracked_ckpt's call budget from ``_http``); presigned URLs go through ``requests`` with the same timeouts and
``MLFLOW_S3_IGNORE_TLS``. Errors are OSError (``requests``' exceptions are) or MlflowException; RunStore turns
them into StoreError.
"""

from __future__ import annotations

import contextlib
import functools
import importlib
import logging
import os
import threading
import time
from collections.abc import Callable
from concurrent.futures import FIRST_EXCEPTION, ThreadPoolExecutor, wait
from pathlib import Path
from typing import Any

import blake3

from . import http as _http

log = logging.getLogger(__name__)

PARTS = 4  # parallel ranges: 4 was the fastest of 1/2/4/8 against a loopback server on 2 cores
MIN_CHUNK = 16 << 20  # bytes per ranged GET at least (and the first request's size when the size is unknown)
WINDOW = 256 << 20  # pieces this far ahead of the hashed position are read back from the file instead of held
PART_ATTEMPTS = 3
_PIECE = 1 << 20  # bytes per read from a response
UPLOAD_MIN = 64 << 20  # smaller files take one request: parts would not pay for their extra calls
UPLOAD_PART = 16 << 20  # at least; more when the file needs it (S3 allows 10,000 parts of at most 5 GiB)
_S3_MAX_PARTS = 10_000

Getter = Callable[[str | None], Any]  # a Range header value (or None) -> a streamed ``requests.Response``


def is_http(repo: Any) -> bool:
    """True for MLflow's HTTP artifact repositories (a tracking server proxying artifacts)."""
    from mlflow.store.artifact.http_artifact_repo import HttpArtifactRepository

    return isinstance(repo, HttpArtifactRepository)


# ---------------------------------------------------------------------------------------------------- downloads


def download(repo: Any, path: str, dst: Path) -> str | None:
    """Download artifact ``path`` of ``repo`` into ``dst``; its BLAKE3 digest, or None if ``repo`` is not ours to do."""
    from requests import HTTPError

    if isinstance(repo, _mlflow("mlflow.store.artifact.artifact_repo").MultipartDownloadMixin):  # S3, directly
        try:
            return download_presigned(lambda: repo.get_download_presigned_url(path, expiration=3600), dst, path)
        except HTTPError as e:  # an S3-compatible store that takes the client's calls but not presigned URLs
            if e.response is None or e.response.status_code not in (400, 403, 501):
                raise
            log.warning("the object store refused a presigned URL for %s (HTTP %d); downloading it with MLflow's "
                        "client instead (hashed after)", path, e.response.status_code)  # fmt: skip
            return None
    if not is_http(repo):
        return None
    offers_presigned = getattr(repo, "_is_multipart_download_enabled", None)
    if offers_presigned is None or not offers_presigned():
        return download_proxied(repo.artifact_uri, path, dst)
    try:
        return download_presigned(lambda: repo._get_presigned_download_url(path), dst, path)
    except HTTPError as e:  # the server advertised presigned downloads, then refused one (404: maybe no such file)
        if e.response is None or e.response.status_code not in (404, 501):
            raise
        why = f"the server refused a presigned URL (HTTP {e.response.status_code})"
    except _Unreachable as e:
        why = f"its presigned URL is not reachable from here ({e})"
        log.warning(
            "downloading %s through the tracking server as one stream (slower): %s. "
            "MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false skips the attempt", path, why,
        )  # fmt: skip
    # The server fetches the whole object from its bucket for each request: one stream, not parallel ranges.
    log.debug("downloading %s through the tracking server: %s", path, why)
    return download_proxied(repo.artifact_uri, path, dst, parallel=False)


def download_proxied(artifact_uri: str, path: str, dst: Path, parallel: bool = True) -> str:
    """Download ``path`` from a tracking server's artifact endpoint (``artifact_uri``); its BLAKE3 digest."""
    creds = _mlflow("mlflow.utils.credentials").get_default_host_creds(artifact_uri)
    endpoint = "/" + path
    http_request = _mlflow("mlflow.utils.rest_utils").http_request

    def get(byte_range: str | None) -> Any:
        headers = {"Range": byte_range} if byte_range else {}
        return http_request(creds, endpoint, "GET", stream=True, extra_headers=headers)

    return _fetch(get, dst, path, PARTS if parallel else 1)


def read_range(repo: Any, path: str, offset: int, length: int) -> bytes | None:
    """Bytes [offset, offset + length) of artifact ``path`` through a tracking server's artifact endpoint; None
    where the store offers no ranged read here (the caller downloads the whole file instead)."""
    if not is_http(repo) or length <= 0:
        return None if length > 0 else b""
    creds = _mlflow("mlflow.utils.credentials").get_default_host_creds(repo.artifact_uri)
    resp = _mlflow("mlflow.utils.rest_utils").http_request(
        creds, "/" + path, "GET", stream=True, extra_headers={"Range": f"bytes={offset}-{offset + length - 1}"}
    )
    try:
        _check_status(resp, path)
        if resp.status_code != 206:
            return None  # the server ignores Range: the whole file would come; let the caller fetch it once
        data = bytes(resp.content)
    finally:
        resp.close()
    if len(data) != length:
        raise OSError(f"ranged read of {path} returned {len(data)} bytes, asked {length} at offset {offset}")
    return data


class _Unreachable(OSError):
    """The first request to a presigned URL could not connect: nothing was written yet."""


def download_presigned(presign: Callable[[], Any], dst: Path, path: str) -> str:
    """Download through the presigned URL ``presign()`` gives (asked again if it expires); its BLAKE3 digest."""
    import requests

    verify = not _env("MLFLOW_S3_IGNORE_TLS").get()
    policy = _http.current()
    lock = threading.Lock()
    url = [presign()]
    size = url[0].file_size
    sessions = threading.local()
    first = [True]

    def get(byte_range: str | None) -> Any:
        session = getattr(sessions, "s", None) or requests.Session()
        sessions.s = session
        for renewed in (False, True):
            signed = url[0]
            headers = {**signed.headers, **({"Range": byte_range} if byte_range else {})}
            try:
                resp = session.get(signed.url, headers=headers, stream=True, verify=verify,
                                   timeout=(policy.timeout, policy.transfer_timeout))  # fmt: skip
            except requests.ConnectionError as e:
                if first[0]:
                    raise _Unreachable(str(e)) from e
                raise
            first[0] = False
            if resp.status_code != 403 or renewed:
                return resp
            resp.close()  # an expired URL: ask for a fresh one (once per request), then try again
            with lock:
                if url[0] is signed:
                    url[0] = presign()
        raise AssertionError("unreachable")

    return _fetch(get, dst, path, PARTS, int(size) if size is not None else None)


def plan(start: int, total: int, parts: int = PARTS) -> list[tuple[int, int]]:
    """The byte ranges [a, b) that cover [start, total): one per worker at least, each ``MIN_CHUNK`` or more, and
    at most ``MLFLOW_MULTIPART_DOWNLOAD_CHUNK_SIZE`` (MLflow's own size for presigned downloads, 100 MB)."""
    most = max(MIN_CHUNK, int(_env("MLFLOW_MULTIPART_DOWNLOAD_CHUNK_SIZE").get()))
    chunk = min(most, max(MIN_CHUNK, -(-(total - start) // parts)))
    return [(a, min(a + chunk, total)) for a in range(start, total, chunk)]


def _fetch(get: Getter, dst: Path, path: str, parts: int, size: int | None = None) -> str:
    """Fetch the whole file into ``dst``; ``size``: known up front (no first request to learn it)."""
    t0 = time.perf_counter()
    dst.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(dst, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o600)
    digest = _InOrderHash(fd)
    copy = _Copier(get, fd, digest, path)
    try:
        if size is not None and parts > 1:
            total, jobs = size, [functools.partial(copy.range, a, b) for a, b in plan(0, size, parts)]
        else:  # a first request tells the size (and whether Range is honored); its body is the first range
            resp = _first(get, f"bytes=0-{MIN_CHUNK - 1}" if parts > 1 else None, path)
            if resp.status_code == 206:
                total = int(resp.headers["Content-Range"].rpartition("/")[2])
                head = min(MIN_CHUNK, total)
                rest = plan(head, total, parts)
            else:  # 200: the server ignores Range (or the file is empty): the whole body, streamed
                length = resp.headers.get("Content-Length")
                total = head = int(length) if length is not None else -1
                rest = []
            jobs = [functools.partial(copy.range, 0, head, resp)]
            jobs += [functools.partial(copy.range, a, b) for a, b in rest]
        os.ftruncate(fd, max(total, 0))
        if len(jobs) == 1:
            jobs[0]()
        elif jobs:
            with ThreadPoolExecutor(max_workers=min(parts, len(jobs)), thread_name_prefix="tracked_ckpt-fetch") as pool:
                futures = [pool.submit(_http.in_context(job)) for job in jobs]  # taken in file order
                wait(futures, return_when=FIRST_EXCEPTION)
                errors = [e for f in futures if f.done() and (e := f.exception()) is not None]
                if errors:  # the other ranges stop at their next piece; the first real failure is the error
                    digest.cancel()
                    for f in futures:
                        f.cancel()
                    raise next((e for e in errors if not isinstance(e, _Cancelled)), errors[0])
        if total < 0:  # no Content-Length: as long as the stream was
            total = digest.done
        if digest.done != total:
            raise OSError(f"download of {path} was cut short: {digest.done} of {total} bytes")
    finally:
        os.close(fd)
    log.debug("downloaded %s (%.1f MB, %.1f MB hashed from the page cache) in %.2f s",
              path, total / 1e6, digest.reread / 1e6, time.perf_counter() - t0)  # fmt: skip
    return digest.hexdigest()


def _first(get: Getter, byte_range: str | None, path: str) -> Any:
    resp = get(byte_range)
    if resp.status_code == 416:  # an empty file has no byte 0
        resp.close()
        resp = get(None)
    _check_status(resp, path)
    return resp


def _check_status(resp: Any, path: str) -> None:
    if resp.status_code == 404:
        resp.close()
        raise FileNotFoundError(f"artifact {path} does not exist in the artifact store")
    if resp.status_code >= 400:
        resp.close()
        resp.raise_for_status()


class _Copier:
    """Fetches byte ranges into ``fd``, feeding the hash in order; resumes a failed range where it stopped."""

    def __init__(self, get: Getter, fd: int, digest: _InOrderHash, path: str) -> None:
        self.get, self.fd, self.digest, self.path = get, fd, digest, path

    def range(self, a: int, b: int, resp: Any = None) -> None:
        """Bytes [a, b) (b < 0: to the end of ``resp``); ``resp``: an answer already started for them."""
        pos = a
        for attempt in range(PART_ATTEMPTS):
            try:
                if resp is None and a < b:
                    resp = self.get(f"bytes={pos}-{b - 1}")
                    _check_status(resp, self.path)
                    if resp.status_code != 206:
                        resp.close()
                        raise OSError(f"the server stopped honoring Range for {self.path} (status {resp.status_code})")
                if resp is not None:
                    pos = self._copy(resp, pos, b)
                if b < 0 or pos == b:
                    return
                raise OSError(f"download of {self.path} was cut short: {pos - a} of {b - a} bytes at offset {a}")
            except (FileNotFoundError, _Cancelled):
                raise
            except Exception as e:  # OSError, or MLflow's wrapping of a dropped connection or a 5xx
                if attempt == PART_ATTEMPTS - 1 or b < 0:  # a stream of unknown length cannot be resumed
                    raise
                log.debug("range %d-%d of %s failed at %d (%s); fetching the rest again", a, b, self.path, pos, e)
                time.sleep(0.2 * 2**attempt)
            finally:
                if resp is not None:
                    resp.close()
                resp = None

    def _copy(self, resp: Any, pos: int, end: int) -> int:
        for chunk in resp.iter_content(_PIECE):
            if self.digest.cancelled:
                raise _Cancelled()
            if 0 <= end < pos + len(chunk):
                raise OSError(f"the server sent more than the {end - pos} bytes asked at offset {pos} of {self.path}")
            view = memoryview(chunk)
            at = pos
            while view:
                n = os.pwrite(self.fd, view, at)
                view, at = view[n:], at + n
            self.digest.feed(pos, chunk)
            pos += len(chunk)
        return pos


class _Cancelled(Exception):
    pass


class _InOrderHash:
    """BLAKE3 of pieces that arrive out of order from parallel ranges, hashed in file order as soon as they can be.

    Whoever hands in the piece at the hashed position hashes every piece that is ready (``update`` releases the GIL),
    one thread at a time. A piece within ``WINDOW`` bytes of the hashed position is kept in memory until its turn;
    one further ahead is only written, and read back from the file (the page cache) when its turn comes. So memory
    stays bounded and nothing waits, and the file is read again only where ranges run that far apart.
    """

    def __init__(self, fd: int) -> None:
        self._h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self._fd = fd
        self.done = 0
        self.reread = 0  # bytes hashed from the file rather than from memory
        self.cancelled = False
        self._pending: dict[int, bytes | int] = {}  # offset -> the bytes, or their length when only on disk
        self._busy = False
        self._lock = threading.Lock()

    def feed(self, offset: int, data: bytes) -> None:
        with self._lock:
            self._pending[offset] = data if offset - self.done < WINDOW else len(data)
            if self._busy:
                return  # the thread hashing now takes this piece too when it is next
            self._busy = True
        try:
            while True:
                with self._lock:
                    piece = self._pending.pop(self.done, None)
                    if piece is None:
                        self._busy = False
                        return
                if isinstance(piece, int):
                    piece = self._read(self.done, piece)
                    self.reread += len(piece)
                self._h.update(piece)
                with self._lock:
                    self.done += len(piece)
        except BaseException:
            with self._lock:
                self._busy = False
            raise

    def _read(self, offset: int, n: int) -> bytes:
        parts = []
        while n:
            got = os.pread(self._fd, n, offset)
            if not got:
                raise OSError(f"the downloaded file ends at {offset}, before bytes already written there")
            parts.append(got)
            offset, n = offset + len(got), n - len(got)
        return b"".join(parts)

    def cancel(self) -> None:
        with self._lock:
            self.cancelled = True
            self._pending.clear()

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())


# ------------------------------------------------------------------------------------------------------ uploads


def upload(repo: Any, local_file: Path, artifact_dir: str) -> bool:
    """Upload ``local_file`` into ``artifact_dir`` in parallel parts if ``repo`` is a server offering them.

    False: not done here (a small file, another store, a server without multipart uploads); use ``log_artifact``.
    """
    from requests import HTTPError

    min_size, chunk_size = _env("MLFLOW_MULTIPART_UPLOAD_MINIMUM_FILE_SIZE"), _env("MLFLOW_MULTIPART_UPLOAD_CHUNK_SIZE")
    size = local_file.stat().st_size
    if size < (min_size.get() if min_size.is_set() else UPLOAD_MIN) or not is_http(repo):
        return False
    offers = getattr(repo, "_is_multipart_upload_enabled", None)
    if offers is None or not offers():
        return False
    part = part_size(size, chunk_size.get() if chunk_size.is_set() else UPLOAD_PART)
    count = -(-size // part)
    try:
        created = repo.create_multipart_upload(str(local_file), count, artifact_dir)
    except HTTPError as e:  # a server whose destination cannot: MLflow's own client falls back the same way
        unsupported = _mlflow("mlflow.exceptions")._UnsupportedMultipartUploadException.MESSAGE
        message = _json(e.response).get("message", "")
        if isinstance(message, str) and message.startswith(unsupported):
            return False
        raise
    t0 = time.perf_counter()
    try:
        with open(local_file, "rb") as f, ThreadPoolExecutor(PARTS, thread_name_prefix="tracked_ckpt-put") as pool:
            put = _http.in_context(lambda c: _put_part(c, f.fileno(), (c.part_number - 1) * part, part, size))
            done = list(pool.map(put, created.credentials))
        with _http.bounded(_http.FINISH):
            repo.complete_multipart_upload(str(local_file), created.upload_id, done, artifact_dir)
    except BaseException:
        with contextlib.suppress(Exception):  # what was sent is discarded by the bucket, not left half-written
            repo.abort_multipart_upload(str(local_file), created.upload_id, artifact_dir)
        raise
    log.debug("uploaded %s (%.1f MB, %d parts) in %.2f s", local_file.name, size / 1e6, count, time.perf_counter() - t0)
    return True


def part_size(size: int, wanted: int = UPLOAD_PART) -> int:
    """Bytes per upload part: ``wanted``, or more (whole MiB) for a file that would need over 10,000 parts."""
    need = -(-size // _S3_MAX_PARTS)
    return max(wanted, -(-need // (1 << 20)) << 20)


def _put_part(credential: Any, fd: int, offset: int, part: int, size: int) -> Any:
    import requests
    from mlflow.entities.multipart_upload import MultipartUploadPart

    policy = _http.current()
    data = os.pread(fd, min(part, size - offset), offset)  # one part in memory per worker: PARTS x part at most
    for attempt in range(PART_ATTEMPTS):
        try:
            resp = requests.put(credential.url, data=data, headers=credential.headers,
                                verify=not _env("MLFLOW_S3_IGNORE_TLS").get(),
                                timeout=(policy.timeout, policy.transfer_timeout))  # fmt: skip
            resp.raise_for_status()
            return MultipartUploadPart(credential.part_number, resp.headers.get("ETag", ""), credential.url)
        except requests.RequestException as e:
            status = getattr(e.response, "status_code", None)
            if attempt == PART_ATTEMPTS - 1 or (status is not None and status < 500 and status != 429):
                raise
            log.debug("part %d failed (%s); sending it again", credential.part_number, e)
            time.sleep(0.2 * 2**attempt)
    raise AssertionError("unreachable")


def _json(resp: Any) -> dict[str, Any]:
    try:
        data = resp.json()
    except Exception:
        return {}
    return data if isinstance(data, dict) else {}


def _env(name: str) -> Any:
    """One of MLflow's environment variables (its defaults and parsing)."""
    return getattr(_mlflow("mlflow.environment_variables"), name)


def _mlflow(module: str) -> Any:
    # Imported lazily and untyped: MLflow's helpers carry no annotations (mypy --strict refuses the calls).
    return importlib.import_module(module)
