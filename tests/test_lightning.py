"""Lightning adapter: a real Trainer with ModelCheckpoint and MLFlowLogger, an MLP on synthetic data, real processes.

Kill mid-epoch, resume by run ID in a fresh process on another working directory with an empty local folder,
end with the same weights as an uninterrupted run (no dropout, no shuffling: Lightning guarantees it on CPU).
"""

from __future__ import annotations

import random
from pathlib import Path
from typing import Any

import lightning  # noqa: F401 - installed by the [test] extra; a missing one must fail, not skip
import pytest
import torch
from conftest import checkpoint_steps, printed_run_id, run_job
from mlflow.tracking import MlflowClient

from tracked_ckpt.frameworks.lightning import resume_path
from tracked_ckpt.runtags import TAG_BEST_STEP, TAG_LATEST_STEP, TAG_MONITOR

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "lightning_job.py"


def job(cwd: Path, *args: str, env: dict[str, str], check: bool = True) -> tuple[int, str]:
    return run_job(JOB, cwd, *args, env=env, check=check)


def test_killed_fit_resumes_by_run_id_with_the_same_weights(tmp_path: Path, experiment: str) -> None:
    env = {"MLFLOW_EXPERIMENT_NAME": experiment}
    job(tmp_path / "full", "w.pt", env=env)  # uninterrupted, untracked
    rc, out = job(tmp_path / "killed", "w.pt", "--tracked", "--kill-at", "27", env=env, check=False)
    assert rc == -9, out
    run_id = printed_run_id(out)
    # Epoch ends at steps 8, 16, 24; save_top_k=2 by train_loss (falling): step 8 removed, in the run too.
    assert checkpoint_steps(run_id) == [16, 24]
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[TAG_LATEST_STEP] == "24" and tags[TAG_MONITOR] == "train_loss:min" and tags[TAG_BEST_STEP] == "24"
    assert [h.step for h in MlflowClient().get_metric_history(run_id, "epoch")][:1] == [8]

    rc, out = job(tmp_path / "elsewhere", "w.pt", "--resume", run_id, env=env)
    assert "FINAL_STEP 32" in out and printed_run_id(out) == run_id
    # In another dirpath ModelCheckpoint forgets its earlier top-k (Lightning warns): it never removes step 16.
    assert checkpoint_steps(run_id) == [16, 24, 32]
    full = torch.load(tmp_path / "full" / "w.pt", weights_only=True)
    resumed = torch.load(tmp_path / "elsewhere" / "w.pt", weights_only=True)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    best = resume_path(run_id, tmp_path / "best", which="best")
    assert Path(best).name == "epoch=3-step=32.ckpt" and torch.load(best, weights_only=False)["global_step"] == 32


def test_a_stateful_loader_resumes_mid_epoch_at_the_exact_sample(
    tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shuffled StatefulDataLoader: Lightning keeps its state in the .ckpt; resume_path brings it back mid-epoch."""
    import lightning_job

    (tmp_path / "ref").mkdir()
    monkeypatch.chdir(tmp_path / "ref")
    monkeypatch.delenv("PL_GLOBAL_SEED", raising=False)  # seed_everything sets it; undone after the test
    lightning_job.main(["w.pt", "--stateful", "log"])  # the uninterrupted reference, in this process
    want = (tmp_path / "ref" / "log").read_text().splitlines()
    # Mid-epoch, and so is the checkpoint resumed (every 3 steps): Lightning 2.6.6 itself ends a fit resumed from a
    # step checkpoint at an epoch's last batch at once (docs/lightning.md, Limits).
    kill = random.choice([s for s in range(4, len(want)) if s % 3 and (s - s % 3) % lightning_job.BATCHES])
    env = {"MLFLOW_EXPERIMENT_NAME": experiment}
    rc, out = job(tmp_path / "killed", "w.pt", "--tracked", "--stateful", "log", "--kill-at", str(kill), env=env,
                  check=False)  # fmt: skip
    assert rc == -9, out
    run_id = printed_run_id(out)
    (tmp_path / "elsewhere").mkdir()  # resumed in this process (a fresh one: the test above), another folder
    monkeypatch.chdir(tmp_path / "elsewhere")
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    lightning_job.main(["w.pt", "--resume", run_id, "--stateful", "log"])
    resumed_at = kill - kill % 3  # the last checkpoint (every 3 steps) before the kill
    before = (tmp_path / "killed" / "log").read_text().splitlines()[:resumed_at]
    after = (tmp_path / "elsewhere" / "log").read_text().splitlines()
    assert before + after == want, f"killed after step {kill}, resumed at {resumed_at}"
    full = torch.load(tmp_path / "ref" / "w.pt", weights_only=True)
    resumed = torch.load(tmp_path / "elsewhere" / "w.pt", weights_only=True)
    for k in full:
        assert torch.equal(full[k], resumed[k]), f"{k} (killed after step {kill})"


def test_pytorch_lightning_package_works_too(tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    import pytorch_lightning as pl  # installed with lightning (its dependency)
    from pytorch_lightning.callbacks import ModelCheckpoint

    from tracked_ckpt.frameworks.lightning import TrackedCheckpoints

    class M(pl.LightningModule):  # type: ignore[misc,name-defined]
        def __init__(self) -> None:
            super().__init__()
            self.net = torch.nn.Linear(4, 1)

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            loss = self.net(batch[0]).pow(2).mean()
            self.log("train_loss", loss, on_epoch=True)
            return loss

        def configure_optimizers(self) -> Any:
            return torch.optim.SGD(self.parameters(), lr=0.1)

    monkeypatch.chdir(tmp_path)
    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(16, 4)), batch_size=4)
    tracked = TrackedCheckpoints(experiment=experiment)
    trainer = pl.Trainer(max_epochs=3, logger=False, enable_progress_bar=False, enable_model_summary=False,
                         callbacks=[ModelCheckpoint(dirpath="c", monitor="train_loss", save_top_k=1), tracked])
    trainer.fit(M(), data)
    assert tracked.run_id is not None and len(checkpoint_steps(tracked.run_id)) == 1  # save_top_k=1, mirrored
    ckpt = resume_path(tracked.run_id, tmp_path / "restore")
    assert torch.load(ckpt, weights_only=False)["global_step"] == checkpoint_steps(tracked.run_id)[0]


def test_resumed_in_the_same_dirpath_the_run_keeps_what_model_checkpoint_keeps(
    tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    import lightning as L
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning_job import MLP, loader

    from tracked_ckpt.frameworks.lightning import TrackedCheckpoints

    monkeypatch.chdir(tmp_path)

    def fit(epochs: int, run_id: str | None = None) -> str:
        tracked = TrackedCheckpoints(run_id=run_id, **({} if run_id else {"experiment": experiment}))
        keep2 = ModelCheckpoint(dirpath="c", monitor="train_loss", save_top_k=2)
        trainer = L.Trainer(max_epochs=epochs, logger=False, enable_progress_bar=False, enable_model_summary=False,
                            callbacks=[keep2, tracked])  # fmt: skip
        trainer.fit(MLP(), loader(), ckpt_path=resume_path(run_id, "restore") if run_id else None)
        assert tracked.run_id is not None
        return tracked.run_id

    run_id = fit(2)
    assert fit(4, run_id) == run_id  # ModelCheckpoint restored its top 2 and removed them for better ones
    on_disk = sorted(torch.load(f, weights_only=False)["global_step"] for f in (tmp_path / "c").glob("*.ckpt"))
    assert len(on_disk) == 2 and sorted(checkpoint_steps(run_id)) == on_disk
