"""The manifest module: path checks, the JSON round trip and its validation, digests and file verification."""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import pytest

from tracked_ckpt.errors import CheckpointCorruptError
from tracked_ckpt.manifest import (
    FORMAT_VERSION,
    MANIFEST_NAME,
    FileEntry,
    HashingWriter,
    Manifest,
    check_checkpoint_path,
    check_relpath,
    hash_file,
    verify_file,
    write_file,
)

DIGEST = "0" * 64


@pytest.mark.parametrize("path", ["state.pt", "sub/x.bin", "a.b-c_d/e", "checkpoint-10/model.safetensors"])
def test_a_plain_relative_path_passes(path: str) -> None:
    assert check_relpath(path) == path


@pytest.mark.parametrize(
    "path",
    ["", "/etc/passwd", "../x", "a/../b", "a/./b", "a//b", "a/", "a\\b", "c:x", "a\x00b", "%2e%2e/x", " a", "a "],
)
def test_anything_else_is_refused_naming_the_path(path: str) -> None:
    with pytest.raises(CheckpointCorruptError, match="refusing it"):
        check_relpath(path, "file name")


def test_a_path_that_is_not_a_string_is_refused() -> None:
    with pytest.raises(CheckpointCorruptError, match="empty or not a string"):
        check_relpath(3)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("path", "ok"),
    [
        ("checkpoints/step-00000010", True),
        ("checkpoints/a.b_c-1", True),
        ("checkpoints", False),
        ("checkpoints/a/b", False),
        ("models/step-1", False),
        ("checkpoints/a b", False),
    ],
)
def test_a_checkpoint_path_is_checkpoints_slash_name(path: str, ok: bool) -> None:
    if ok:
        assert check_checkpoint_path(path) == path
    else:
        with pytest.raises(CheckpointCorruptError, match=repr(path).replace("\\", "\\\\")):
            check_checkpoint_path(path)


def manifest(**kw: object) -> Manifest:
    fields: dict[str, object] = {
        "run_id": "r1",
        "step": 10,
        "seq": 2,
        "created": 1.5,
        "files": (FileEntry("state.pt", 3, DIGEST), FileEntry("rng.pt", 4, "1" * 64)),
    }
    return Manifest(**{**fields, **kw})  # type: ignore[arg-type]


def test_the_json_round_trip_keeps_every_field_and_non_finite_metrics() -> None:
    m = manifest(metrics={"loss": 0.5, "bad": math.inf, "worse": -math.inf}, metadata={"lr": 0.1}, epoch=3,
                 resumed_from="runs:/r0/checkpoints/step-5", format="dcp", world_size=4)  # fmt: skip
    text = m.to_json()
    json.loads(text)  # strict JSON: no bare Infinity
    assert "Infinity" not in text.replace('"inf"', "").replace('"-inf"', "")
    back = Manifest.from_json(text, "here")
    assert back == m
    nan = Manifest.from_json(manifest(metrics={"x": math.nan}).to_json(), "here")
    assert math.isnan(nan.metrics["x"])


def test_size_top_level_and_file() -> None:
    m = manifest(files=(FileEntry("a.bin", 3, DIGEST), FileEntry("sub/b.bin", 4, DIGEST)), format="folder")
    assert m.size == 7
    assert m.top_level == {"a.bin", "sub", MANIFEST_NAME}
    assert m.file("sub/b.bin").size == 4
    with pytest.raises(CheckpointCorruptError, match="step 10 lists no file 'c.bin'"):
        m.file("c.bin")


def edited(**changes: object) -> str:
    data = json.loads(manifest().to_json())
    data.update(changes)
    return json.dumps(data)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        (edited(format_version=FORMAT_VERSION + 1), "format_version 2; this tracked_ckpt reads version 1"),
        (edited(format="zarr"), "format 'zarr'; this tracked_ckpt reads 'torch', 'dcp'"),
        (edited(files=[{"name": "sub/x.pt", "size": 1, "blake3": DIGEST}]), "invalid file entry"),  # nested: foreign
        (edited(files=[{"name": "x.pt", "size": 1, "blake3": "abc"}]), "invalid file entry"),
        (edited(files=[{"name": "x.pt", "size": -1, "blake3": DIGEST}]), "invalid file entry"),
        (edited(files=[{"name": "../x.pt", "size": 1, "blake3": DIGEST}]), "not a plain relative path"),
        (edited(files=[{"name": "x.pt"}]), "unparsable \\(KeyError"),
        (edited(step="ten"), "unparsable \\(ValueError"),
        ("{not json", "unparsable"),
        ("[]", "unparsable"),
    ],
)
def test_a_bad_manifest_is_refused_naming_its_source(text: str, message: str) -> None:
    with pytest.raises(CheckpointCorruptError, match=f"manifest s3://b/MANIFEST.json.*{message}"):
        Manifest.from_json(text, "s3://b/MANIFEST.json")


def test_a_foreign_folder_may_nest_its_files() -> None:
    m = Manifest.from_json(edited(format="lightning", files=[{"name": "a/b.ckpt", "size": 1, "blake3": DIGEST}]), "x")
    assert m.files[0].name == "a/b.ckpt"


def test_written_files_carry_the_digest_verify_checks(tmp_path: Path) -> None:
    entry = write_file(tmp_path / "state.pt", b"weights")
    assert entry == FileEntry("state.pt", 7, hash_file(tmp_path / "state.pt")[1])
    assert hash_file(tmp_path / "state.pt")[0] == 7
    verify_file(tmp_path / "state.pt", entry, "step 1")
    verify_file(tmp_path / "state.pt", entry, "step 1", digest=entry.blake3)  # hashed while downloaded: no re-read
    (tmp_path / "empty").write_bytes(b"")
    assert hash_file(tmp_path / "empty") == (0, write_file(tmp_path / "empty2", b"").blake3)  # no mmap of 0 bytes


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("truncate", "is 3 bytes, the manifest says 7"),
        ("flip", "does not match its BLAKE3 digest"),
        ("missing", "is missing"),
        ("symlink", "is a symlink or special file"),
    ],
)
def test_a_damaged_file_is_refused(tmp_path: Path, damage: str, message: str) -> None:
    path = tmp_path / "state.pt"
    entry = write_file(path, b"weights")
    if damage == "truncate":
        path.write_bytes(b"wei")
    elif damage == "flip":
        path.write_bytes(b"weightS")
    elif damage == "missing":
        path.unlink()
    else:
        real = tmp_path / "real.pt"
        path.rename(real)
        os.symlink(real, path)
    with pytest.raises(CheckpointCorruptError, match=f"step 1: file 'state.pt' {message}"):
        verify_file(path, entry, "step 1")


def test_the_hashing_writer_counts_and_hashes_what_passes_through(tmp_path: Path) -> None:
    with open(tmp_path / "f", "wb") as f:
        w = HashingWriter(f)
        w.write(b"abc")
        w.write(memoryview(b"def"))
        w.flush()
    assert w.size == 6 and w.error is None
    assert (6, w.hexdigest()) == hash_file(tmp_path / "f")
