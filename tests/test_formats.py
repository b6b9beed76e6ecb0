"""The formats, each on its own: stage a folder, describe it, read the manifest back, restore, read the weights.

No MLflow here: a format reads a folder that the catalog fetched and verified; these tests hand it one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import warnings
from pathlib import Path

import blake3
import pytest
import torch
from conftest import ROOT, assert_same_state, make_training, train_steps
from torch.distributed.checkpoint.state_dict_saver import save as dcp_save

from tracked_ckpt.errors import CheckpointCorruptError, CheckpointMismatchError
from tracked_ckpt.formats import dcp, foreign, format_named, format_of, torch_file
from tracked_ckpt.manifest import FOREIGN_FORMATS, MANIFEST_NAME, FileEntry, Manifest, build_manifest, verify_file
from tracked_ckpt.state import MODEL_FILE, RNG_FILE, STATE_FILE, TrainingState, gather

FIELDS = {"step": 7, "seq": 3, "created": 1.5, "metrics": {"loss": 0.25}, "metadata": {"note": "x"}, "epoch": 1}
WHERE = "checkpoint under test"


def reread(m: Manifest, folder: Path) -> Manifest:
    """The manifest as a reader gets it: written, parsed and validated, every file verified against it."""
    (folder / MANIFEST_NAME).write_text(m.to_json())
    back = Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), "test")
    assert back == m
    for f in back.files:
        verify_file(folder / f.name, f, WHERE)
    return back


def perturbed(state: TrainingState) -> None:
    train_steps(state.model, state.optimizer, state.scheduler, 2)  # type: ignore[arg-type]


def trained_state(seed: int = 0) -> TrainingState:
    model, opt, sched = make_training(seed=seed)
    train_steps(model, opt, sched, 3)
    return TrainingState(model, opt, sched)  # type: ignore[arg-type]


def test_format_of_every_manifest_name() -> None:
    assert format_named("torch") is torch_file.TORCH_FILE
    assert format_named("dcp") is dcp.DCP_FOLDER
    for name in FOREIGN_FORMATS:
        fmt = format_named(name)
        assert isinstance(fmt, foreign.LibraryFolder) and fmt.name == name and not fmt.own
    assert torch_file.TORCH_FILE.own and dcp.DCP_FOLDER.own and dcp.DCP_FOLDER.sharded
    assert not torch_file.TORCH_FILE.sharded
    with pytest.raises(CheckpointCorruptError, match="'zip'.*Upgrade tracked_ckpt"):
        format_named("zip")


def test_build_manifest_is_the_one_builder(tmp_path: Path) -> None:
    files = [FileEntry("b", 1, "0" * 64), FileEntry("a", 2, "1" * 64)]
    m = build_manifest("RUN", files, FIELDS, format="dcp", world_size=4)
    assert (m.run_id, m.format, m.world_size, m.step, m.seq, m.epoch) == ("RUN", "dcp", 4, 7, 3, 1)
    assert [f.name for f in m.files] == ["b", "a"]  # as staged: the builder does not reorder
    assert m.torch_version == torch.__version__ and m.library_version
    assert dict(m.metrics) == {"loss": 0.25} and dict(m.metadata) == {"note": "x"}
    with pytest.raises(CheckpointCorruptError, match="'zip'"):
        build_manifest("RUN", files, FIELDS, format="zip")


def test_torch_file_round_trip(tmp_path: Path) -> None:
    state = trained_state()
    payload, rng_json = gather(state, rng=True)
    fmt = torch_file.TORCH_FILE
    m = reread(fmt.describe("RUN", torch_file.stage(tmp_path, payload, rng_json), FIELDS), tmp_path)
    assert format_of(m) is fmt and m.format == "torch" and m.world_size == 1
    assert {f.name for f in m.files} == {MODEL_FILE, STATE_FILE, RNG_FILE}
    assert fmt.digest(m) == f"blake3:{m.file(STATE_FILE).blake3}"

    fresh = trained_state(seed=1)
    perturbed(fresh)
    assert fmt.restore_files(m, WHERE) is None  # a full restore reads every file
    fmt.restore(tmp_path, m, fresh, WHERE)
    assert_same_state(fresh.model, state.model)  # type: ignore[arg-type]
    assert fresh.optimizer.state_dict()["state"].keys() == state.optimizer.state_dict()["state"].keys()  # type: ignore[union-attr]
    assert fresh.scheduler.state_dict() == state.scheduler.state_dict()  # type: ignore[union-attr]

    weights = fmt.model_weights(tmp_path, m, WHERE)
    assert weights.keys() == state.model.state_dict().keys()  # type: ignore[union-attr]


def test_torch_file_weights_only_reads_model_pt_alone(tmp_path: Path) -> None:
    state = trained_state()
    payload, rng_json = gather(state, rng=True)
    fmt = torch_file.TORCH_FILE
    m = fmt.describe("RUN", torch_file.stage(tmp_path, payload, rng_json), FIELDS)
    only = fmt.restore_files(m, WHERE, weights_only=True)
    assert only == fmt.weight_files(m) == {MODEL_FILE}
    (tmp_path / STATE_FILE).unlink()  # what a weights-only fetch leaves out
    (tmp_path / RNG_FILE).unlink()
    model, _, _ = make_training(seed=1)
    fmt.restore(tmp_path, m, TrainingState(model), WHERE, only=only)
    assert_same_state(model, state.model)  # type: ignore[arg-type]
    assert fmt.model_weights(tmp_path, m, WHERE).keys() == model.state_dict().keys()


def test_torch_file_of_a_model_alone_keeps_one_file(tmp_path: Path) -> None:
    """Before 0.3 (and for a model alone) everything is in state.pt: both restore and weights read it there."""
    model, _, _ = make_training()
    fmt = torch_file.TORCH_FILE
    m = fmt.describe("RUN", torch_file.stage(tmp_path, {"model": model.state_dict()}, {}), FIELDS)
    assert [f.name for f in m.files] == [STATE_FILE] and fmt.weight_files(m) is None
    assert fmt.model_weights(tmp_path, m, WHERE).keys() == model.state_dict().keys()


def test_torch_file_refuses_a_manifest_without_state_pt(tmp_path: Path) -> None:
    m = build_manifest("RUN", [FileEntry(MODEL_FILE, 1, "0" * 64)], FIELDS)
    with pytest.raises(CheckpointCorruptError, match="lists no state.pt"):
        torch_file.TORCH_FILE.restore_files(m, WHERE)


def test_torch_file_mismatch_leaves_live_objects_alone(tmp_path: Path) -> None:
    state = trained_state()
    fmt = torch_file.TORCH_FILE
    m = fmt.describe("RUN", torch_file.stage(tmp_path, *gather(state, rng=False)), FIELDS)
    other, opt, sched = make_training(hidden=16)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(CheckpointMismatchError):
        fmt.restore(tmp_path, m, TrainingState(other, opt, sched), WHERE)  # type: ignore[arg-type]
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def _dcp_checkpoint(folder: Path, state: TrainingState) -> Manifest:
    """A one-process DCP save, staged and described as rank 0 of a sharded save does it."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "torch.distributed is disabled", UserWarning)
        dcp_save(dcp.dcp_state(state), checkpoint_id=folder)
    files = dcp.stage_rank(folder, 0, dcp.rng_json(), None)
    return dcp.DCP_FOLDER.describe("RUN", sorted(files, key=lambda f: f.name), FIELDS, world_size=1)


def test_dcp_folder_round_trip(tmp_path: Path) -> None:
    state = trained_state()
    fmt = dcp.DCP_FOLDER
    m = reread(_dcp_checkpoint(tmp_path, state), tmp_path)
    assert format_of(m) is fmt and m.format == "dcp"
    names = {f.name for f in m.files}
    assert dcp.METADATA_NAME in names and dcp.rng_file(0) in names and any(n.endswith(".distcp") for n in names)
    assert fmt.restore_files(m, WHERE, weights_only=True) is None and fmt.weight_files(m) is None
    # What promoted model versions are pinned to (tags in MLflow): the value must never change for a checkpoint.
    joined = "\n".join(f"{f.name} {f.blake3}" for f in sorted(m.files, key=lambda f: f.name))
    assert fmt.digest(m) == f"blake3-files:{blake3.blake3(joined.encode()).hexdigest()}"

    fresh = trained_state(seed=1)
    perturbed(fresh)
    fmt.restore(tmp_path, m, fresh, WHERE)
    assert_same_state(fresh.model, state.model)  # type: ignore[arg-type]
    assert fresh.scheduler.state_dict() == state.scheduler.state_dict()  # type: ignore[union-attr]

    weights = fmt.model_weights(tmp_path, m, WHERE)
    for k, v in state.model.state_dict().items():  # type: ignore[union-attr]
        assert torch.equal(weights[k], v), k


def test_dcp_folder_reads_only_the_manifest_files(tmp_path: Path) -> None:
    """A shard the manifest does not list is never read (the restricted reader), whatever .metadata says."""
    m = _dcp_checkpoint(tmp_path, trained_state())
    unlisted = Manifest(**{**m.__dict__, "files": tuple(f for f in m.files if not f.name.endswith(".distcp"))})
    with pytest.raises(CheckpointCorruptError, match="not a data file of the manifest"):
        dcp.DCP_FOLDER.model_weights(tmp_path, unlisted, WHERE)


def test_library_folder_round_trip(tmp_path: Path) -> None:
    src, staging = tmp_path / "src", tmp_path / "staging"
    (src / "sub").mkdir(parents=True)
    (src / "trainer_state.json").write_text(json.dumps({"global_step": 7}))
    (src / "sub" / "weights.bin").write_bytes(os.urandom(1000))
    names = ["sub/weights.bin", "trainer_state.json"]
    for rel in names:
        (staging / rel).parent.mkdir(parents=True, exist_ok=True)
        os.link(src / rel, staging / rel)
    fmt = format_named("hf-trainer")
    m = reread(fmt.describe("RUN", foreign.stage(staging, names), FIELDS), staging)
    assert m.format == "hf-trainer" and [f.name for f in m.files] == names  # nested names kept
    assert fmt.digest(m).startswith("blake3-files:") and fmt.weight_files(m) is None
    one = fmt.describe("RUN", m.files[:1], FIELDS)
    assert fmt.digest(one) == f"blake3:{m.files[0].blake3}"  # a single file: its own digest
    for call in (
        lambda: fmt.restore_files(m, WHERE),
        lambda: fmt.restore(staging, m, trained_state(), WHERE),
        lambda: fmt.model_weights(staging, m, WHERE),
    ):
        with pytest.raises(CheckpointMismatchError, match=r"'hf-trainer' folder.*fetch_folder\('RUN', dest\)"):
            call()


def test_formats_import_no_higher_layer() -> None:
    """formats sits below loading, the catalog, the recorder and the store: importing it loads none of them."""
    code = (
        "import sys; import tracked_ckpt.formats.dcp, tracked_ckpt.formats.torch_file, tracked_ckpt.formats.foreign;"
        "print(sorted(m for m in sys.modules if m.startswith('tracked_ckpt.')))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True,
                         env={**os.environ, "PYTHONPATH": str(ROOT)}).stdout  # fmt: skip
    loaded = set(eval(out))
    # policies: among the package's own public names (tracked_ckpt/__init__.py)
    allowed = {"_faults", "_version", "data", "errors", "manifest", "policies", "safe_load", "state"}
    assert {m.removeprefix("tracked_ckpt.") for m in loaded if not m.startswith("tracked_ckpt.formats")} <= allowed
