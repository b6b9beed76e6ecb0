"""A save that hits a full disk (ENOSPC), on a real 2 MB tmpfs mounted as ``save_dir``.

The fault is real: the kernel refuses the write. tmpfs needs root (as in CI); RLIMIT_FSIZE would give
EFBIG/SIGXFSZ rather than ENOSPC, and a loop-mounted image needs root too.
"""

from __future__ import annotations

import copy
import os
import shutil
import subprocess
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from mlflow.tracking import MlflowClient

from tracked_ckpt import CheckpointManager
from tracked_ckpt.errors import SaveError
from tracked_ckpt.local import STAGING
from tracked_ckpt.manifest import MANIFEST_NAME, Manifest, verify_file
from tracked_ckpt.runtags import TAG_LATEST_STEP


@pytest.fixture
def small_fs(tmp_path: Path) -> Iterator[Path]:
    """A real 2 MB filesystem (tmpfs), unmounted afterwards."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root); this test then runs for real")
    mnt = tmp_path / f"small-{uuid.uuid4().hex[:6]}"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mnt)], check=True, capture_output=True)
    try:
        yield mnt
    finally:
        if subprocess.run(["umount", str(mnt)], capture_output=True).returncode != 0:
            subprocess.run(["umount", "-l", str(mnt)], check=True)  # a handle still open: detach it anyway


def wide_training() -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """~0.26 MB of weights, ~0.8 MB of state once AdamW has its moments."""
    torch.manual_seed(0)
    model = torch.nn.Linear(256, 256)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model(torch.randn(2, 256)).sum().backward()
    opt.step()
    return model, opt


def test_disk_full_save_is_clear_keeps_earlier_and_next_save_succeeds(
    small_fs: Path, experiment: str, tmp_path: Path
) -> None:
    model, opt = wide_training()
    save_dir = small_fs / "ck"
    with CheckpointManager(save_dir, experiment=experiment, save_rng=False) as mgr:
        first = mgr.save(model, opt, {"step": 1})
        saved = copy.deepcopy(model.state_dict())
        # Fill the disk so that less than the next checkpoint fits.
        ballast = small_fs / "ballast"
        free = shutil.disk_usage(small_fs).free
        with open(ballast, "wb") as f:
            f.write(b"\0" * (free - 100_000))
        with torch.no_grad():
            model.weight.add_(1.0)  # a different state for step 2
        with pytest.raises(SaveError) as err:
            mgr.save(model, opt, {"step": 2})
        msg = str(err.value)
        assert "disk full" in msg and "step 2" in msg and str(save_dir) in msg, msg
        assert "needs about 0.8 MB" in msg and "MB are free" in msg, msg  # weights + two AdamW moments
        assert "unexpected pos" not in msg  # torch's own message for a failed write says nothing useful

        # Nothing of step 2 anywhere; step 1 intact, still the latest, locally and in MLflow.
        assert list((save_dir / STAGING).iterdir()) == []
        assert sorted(p.name for p in (save_dir / mgr.run_id).iterdir()) == ["step-00000001"]
        assert sorted(e.path for e in mgr.store.list("checkpoints")) == ["checkpoints/step-00000001"]
        assert mgr.get_latest_checkpoint() == first
        assert MlflowClient().get_run(mgr.run_id).data.tags[TAG_LATEST_STEP] == "1"
        local = save_dir / mgr.run_id / "step-00000001"
        manifest = Manifest.from_json((local / MANIFEST_NAME).read_bytes(), str(local))
        for entry in manifest.files:
            verify_file(local / entry.name, entry, str(local))
        fresh, fresh_opt = wide_training()
        assert mgr.load(fresh, fresh_opt)["step"] == 1
        assert all(torch.equal(fresh.state_dict()[k], v) for k, v in saved.items())

        # Space is back: the same save now goes through.
        ballast.unlink()
        second = mgr.save(model, opt, {"step": 2})
        assert mgr.get_latest_checkpoint() == second
        assert mgr.load(fresh, fresh_opt)["step"] == 2
        assert torch.equal(fresh.weight, model.weight)
