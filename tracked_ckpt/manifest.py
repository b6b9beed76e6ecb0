"""The manifest: the commit marker of a checkpoint, and the digests that make loads verifiable.

A checkpoint folder holds its data files and ``MANIFEST.json``. The manifest is written (and uploaded)
last; a folder without a valid manifest is not a checkpoint and is never resolved or loaded.
"""

from __future__ import annotations

import json
import math
import os
import re
import stat
import urllib.parse
from collections.abc import Iterable, Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import IO, Any

import blake3

from ._faults import fault_point
from .errors import CheckpointCorruptError

FORMAT_VERSION = 1
# Folders another library wrote, recorded as they are (tracked_ckpt.frameworks): their files may sit in
# subfolders, so their manifest names are relative POSIX paths ("sub/x.bin"), each checked by check_relpath.
FOREIGN_FORMATS = ("folder", "lightning", "hf-trainer", "accelerate")
MANIFEST_NAME = "MANIFEST.json"
# Every artifact tracked_ckpt writes lives under this prefix of the run; retention deletes nothing else.
ARTIFACT_PREFIX = "checkpoints"
_CHUNK = 8 << 20


_BAD_CHAR = re.compile("[\\\\\x00:]")  # backslash, NUL, colon (a regex: scan() checks 10k+ paths)


def _bad_component(part: str) -> bool:
    return part in ("", ".", "..") or _BAD_CHAR.search(part) is not None or part != part.strip()


def check_relpath(path: str, what: str = "path") -> str:
    """Refuse anything but a plain relative POSIX path: no '..', absolute, backslash, NUL or %-encoding."""
    if not isinstance(path, str) or not path:
        raise CheckpointCorruptError(f"{what} {path!r} is empty or not a string; refusing it")
    decoded = urllib.parse.unquote(path)
    if decoded != path or path.startswith("/") or any(_bad_component(p) for p in path.split("/")):
        raise CheckpointCorruptError(
            f"{what} {path!r} is not a plain relative path (it contains '..', an absolute or encoded part, "
            "a backslash, a colon or NUL); refusing it before any I/O"
        )
    return path


def check_checkpoint_path(path: str) -> str:
    """A checkpoint folder path must be exactly ``checkpoints/<name>`` inside the run."""
    check_relpath(path, "checkpoint path")
    parts = path.split("/")
    if len(parts) != 2 or parts[0] != ARTIFACT_PREFIX or not re.fullmatch(r"[A-Za-z0-9._-]+", parts[1]):
        raise CheckpointCorruptError(
            f"checkpoint path {path!r} is not of the form '{ARTIFACT_PREFIX}/<name>'; tracked_ckpt only "
            "reads and deletes its own folders"
        )
    return path


@dataclass(frozen=True)
class FileEntry:
    name: str
    size: int
    blake3: str


@dataclass(frozen=True)
class Manifest:
    run_id: str
    step: int
    seq: int
    created: float
    files: tuple[FileEntry, ...]
    metrics: Mapping[str, float] = field(default_factory=dict)
    metadata: Mapping[str, Any] = field(default_factory=dict)
    epoch: int | None = None
    resumed_from: str | None = None
    library_version: str = ""
    torch_version: str = ""
    format_version: int = FORMAT_VERSION
    # "torch": one state.pt (single process); "dcp": a torch.distributed.checkpoint folder of shards;
    # one of FOREIGN_FORMATS: a folder another library wrote (a Lightning .ckpt, an HF checkpoint-N/, ...).
    format: str = "torch"
    world_size: int = 1

    @property
    def top_level(self) -> set[str]:
        """The names directly inside the checkpoint folder: its files, the first folder of nested ones."""
        return {f.name.split("/")[0] for f in self.files} | {MANIFEST_NAME}

    @property
    def size(self) -> int:
        return sum(f.size for f in self.files)

    def file(self, name: str) -> FileEntry:
        for f in self.files:
            if f.name == name:
                return f
        raise CheckpointCorruptError(f"the manifest of step {self.step} lists no file {name!r}")

    def to_json(self) -> str:
        data = asdict(self)
        data["metrics"] = {k: _json_float(v) for k, v in self.metrics.items()}
        return json.dumps(data, indent=1, sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes, source: str) -> Manifest:
        """Parse and validate; ``source`` names where it came from in errors."""
        try:
            data = json.loads(text)
            version = data.get("format_version")
            if version != FORMAT_VERSION:
                raise CheckpointCorruptError(
                    f"manifest {source} has format_version {version!r}; this tracked_ckpt reads version "
                    f"{FORMAT_VERSION}. Upgrade tracked_ckpt or load it with the version that wrote it"
                )
            fmt = _checked_format(data.get("format", "torch"), source)
            files = tuple(FileEntry(str(f["name"]), int(f["size"]), str(f["blake3"])) for f in data["files"])
            for f in files:
                check_relpath(f.name, f"file name in manifest {source}")
                nested = "/" in f.name and fmt not in FOREIGN_FORMATS  # only a foreign folder has subfolders
                if nested or not re.fullmatch(r"[0-9a-f]{64}", f.blake3) or f.size < 0:
                    raise CheckpointCorruptError(f"manifest {source} has an invalid file entry {f!r}")
            return cls(
                run_id=str(data["run_id"]),
                step=int(data["step"]),
                seq=int(data["seq"]),
                created=float(data["created"]),
                files=files,
                metrics={str(k): float(v) for k, v in data.get("metrics", {}).items()},
                metadata=dict(data.get("metadata", {})),
                epoch=None if data.get("epoch") is None else int(data["epoch"]),
                resumed_from=data.get("resumed_from"),
                library_version=str(data.get("library_version", "")),
                torch_version=str(data.get("torch_version", "")),
                format=fmt,
                world_size=int(data.get("world_size", 1)),
            )
        except CheckpointCorruptError:
            raise
        except (ValueError, KeyError, TypeError, AttributeError) as e:
            raise CheckpointCorruptError(
                f"manifest {source} is unparsable ({type(e).__name__}: {e}); the checkpoint is not usable"
            ) from e


def build_manifest(
    run_id: str, files: Iterable[FileEntry], fields: Mapping[str, Any], *, format: str = "torch", world_size: int = 1
) -> Manifest:
    """The manifest of a checkpoint whose ``files`` are staged: the one place a manifest is made.

    ``fields``: what the recorder planned (step, seq, created, metrics, metadata, epoch, resumed_from).
    """
    import torch  # loaded already by whoever staged the files; a manifest read alone does not need it

    from ._version import __version__

    return Manifest(
        run_id=run_id,
        files=tuple(files),
        library_version=__version__,
        torch_version=torch.__version__,
        format=_checked_format(format, f"of run {run_id}"),
        world_size=world_size,
        **fields,
    )


def _checked_format(value: Any, source: str) -> str:
    if value not in ("torch", "dcp", *FOREIGN_FORMATS):
        raise CheckpointCorruptError(
            f"manifest {source} has format {value!r}; this tracked_ckpt reads 'torch', 'dcp' and "
            f"{', '.join(map(repr, FOREIGN_FORMATS))}. Upgrade tracked_ckpt to read it"
        )
    return str(value)


def _json_float(v: float) -> float | str:
    # JSON has no NaN/inf; keep them readable and round-trippable through float().
    return v if math.isfinite(v) else str(v)


class HashingWriter:
    """A write-only file wrapper that hashes and counts bytes as they are written (no second read)."""

    def __init__(self, f: IO[bytes]) -> None:
        self._f = f
        # torch.save writes each storage in one call: hash those on every core (1 GB: ~0.2 s, not ~0.9 s).
        self._h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        self.size = 0
        self.error: OSError | None = None

    def write(self, data: bytes | memoryview) -> int:
        try:
            fault_point("write")
            self._h.update(data)
            self.size += len(data)
            return self._f.write(data)
        except OSError as e:
            self.error = e  # torch.save turns it into an opaque "unexpected pos" RuntimeError; keep the cause
            raise

    def flush(self) -> None:
        self._f.flush()

    def hexdigest(self) -> str:
        return str(self._h.hexdigest())


def write_file(path: Path, data: bytes) -> FileEntry:
    """Write ``data`` to ``path`` durably (fsync) and return its entry."""
    with open(path, "wb") as f:
        w = HashingWriter(f)
        w.write(data)
        f.flush()
        os.fsync(f.fileno())
    return FileEntry(path.name, w.size, w.hexdigest())


def hash_file(path: Path) -> tuple[int, str]:
    """Size and BLAKE3 digest of a file (memory-mapped, multithreaded for large files)."""
    size = path.stat().st_size
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if size > 64 << 20 else 1)
    if size:
        h.update_mmap(str(path))
    return size, str(h.hexdigest())


def verify_file(path: Path, entry: FileEntry, where: str, digest: str | None = None) -> None:
    """Raise CheckpointCorruptError unless ``path`` has exactly the size and digest the manifest says.

    ``digest``: the file's BLAKE3, already computed while it was written (a download); else the file is hashed.
    """
    try:
        st = path.lstat()
    except FileNotFoundError as e:
        raise CheckpointCorruptError(f"{where}: file {entry.name!r} is missing") from e
    if not stat.S_ISREG(st.st_mode):  # a symlink could point anywhere; a FIFO or device could hang the read
        raise CheckpointCorruptError(f"{where}: file {entry.name!r} is a symlink or special file; refusing it")
    size = st.st_size
    if size != entry.size:
        raise CheckpointCorruptError(
            f"{where}: file {entry.name!r} is {size} bytes, the manifest says {entry.size} "
            "(truncated or replaced); refusing to load it"
        )
    if (digest if digest is not None else hash_file(path)[1]) != entry.blake3:
        raise CheckpointCorruptError(
            f"{where}: file {entry.name!r} does not match its BLAKE3 digest (bit rot or tampering); refusing to load it"
        )


def fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
