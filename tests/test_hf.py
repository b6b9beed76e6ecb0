"""Hugging Face Trainer adapter: real Trainer, a 1-layer GPT-2 from a config, synthetic tokens, real processes.

Kill mid-run, resume by run ID in a fresh process on another working directory with an empty local folder, end
with the same weights as an uninterrupted run (HF restores its RNG state; on CPU this is bitwise).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import transformers  # noqa: F401 - installed by the [test] extra; a missing one must fail, not skip
from conftest import checkpoint_steps, printed_run_id, run_job
from mlflow.tracking import MlflowClient

from tracked_ckpt.runtags import TAG_BEST_STEP, TAG_LATEST_STEP, TAG_MONITOR

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "hf_job.py"


def job(cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True) -> tuple[int, str]:
    return run_job(JOB, cwd, *args, env={"HF_HUB_OFFLINE": "1", **(env or {})}, check=check)


def test_killed_trainer_resumes_by_run_id_with_the_same_weights(tmp_path: Path, experiment: str) -> None:
    env = {"MLFLOW_EXPERIMENT_NAME": experiment}
    job(tmp_path / "full", "w.pt", "--log", "log")  # the uninterrupted run, no tracking at all
    rc, out = job(tmp_path / "killed", "w.pt", "--tracked", "--kill-at", "10", "--log", "log", env=env, check=False)
    assert rc == -9, out
    run_id = printed_run_id(out)
    # Saves at 3, 6, 9 with save_total_limit=2: HF removed checkpoint-3, and so did the run.
    assert checkpoint_steps(run_id) == [6, 9]
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[TAG_LATEST_STEP] == "9" and tags[TAG_MONITOR] == "loss:min"

    # A fresh process, another working directory, an empty local folder: everything comes from the run.
    rc, out = job(tmp_path / "elsewhere", "w.pt", "--resume", run_id, "--log", "log", env=env)
    assert "FINAL_STEP 12" in out and printed_run_id(out) == run_id
    # Mid-epoch (10 steps an epoch): HF skips the 9 batches already trained at the sampler, reading none of them,
    # and the resumed job reads the uninterrupted one's samples from the 10th batch on.
    batches = {d: (tmp_path / d / "log").read_text().splitlines() for d in ("full", "killed", "elsewhere")}
    assert batches["killed"][:9] + batches["elsewhere"] == batches["full"]
    assert checkpoint_steps(run_id) == [6, 9, 12]
    full = torch.load(tmp_path / "full" / "w.pt", weights_only=True)
    resumed = torch.load(tmp_path / "elsewhere" / "w.pt", weights_only=True)
    assert full.keys() == resumed.keys()
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    history = MlflowClient().get_metric_history(run_id, "loss")
    assert [h.step for h in history] == [3, 6, 9, 12]  # the loss at every save (a pruned one keeps its metrics)
    assert MlflowClient().get_run(run_id).data.tags[TAG_BEST_STEP] in {"6", "9", "12"}


@pytest.mark.server
def test_shares_the_run_of_hf_mlflow_callback(tmp_path: Path, experiment: str, mlflow_server: str) -> None:
    env = {"MLFLOW_TRACKING_URI": mlflow_server, "MLFLOW_EXPERIMENT_NAME": experiment}
    _, out = job(tmp_path / "a", "w.pt", "--tracked", "--report-mlflow", env=env)
    run_id = printed_run_id(out)
    client = MlflowClient(mlflow_server)
    run = client.get_run(run_id)
    assert "learning_rate" in run.data.params  # HF's MLflowCallback logged into this very run
    assert [h.step for h in client.get_metric_history(run_id, "loss")][:3] == [1, 2, 3]  # HF logs every step
    assert [a.path for a in client.list_artifacts(run_id)] == ["checkpoints"]  # no duplicate artifacts
    assert steps_from_server(client, run_id) == ["step-00000009", "step-00000012"]


def steps_from_server(client: MlflowClient, run_id: str) -> list[str]:
    return sorted(a.path.rpartition("/")[2] for a in client.list_artifacts(run_id, "checkpoints"))


@pytest.mark.slow
def test_killed_trainer_with_hf_mlflow_callback_resumes_through_mlflow_run_id(tmp_path: Path, experiment: str) -> None:
    env = {"MLFLOW_EXPERIMENT_NAME": experiment}
    job(tmp_path / "full", "w.pt")
    rc, out = job(tmp_path / "killed", "w.pt", "--tracked", "--report-mlflow", "--kill-at", "10", env=env, check=False)
    assert rc == -9, out
    run_id = printed_run_id(out)
    # MLflow's convention: both HF's MLflowCallback and TrackedCheckpoints attach to MLFLOW_RUN_ID.
    _, out = job(tmp_path / "elsewhere", "w.pt", "--resume", run_id, "--report-mlflow",
                 env={**env, "MLFLOW_RUN_ID": run_id})  # fmt: skip
    assert printed_run_id(out) == run_id and checkpoint_steps(run_id) == [6, 9, 12]
    full = torch.load(tmp_path / "full" / "w.pt", weights_only=True)
    resumed = torch.load(tmp_path / "elsewhere" / "w.pt", weights_only=True)
    assert all(torch.equal(full[k], resumed[k]) for k in full)
    client = MlflowClient()
    assert [h.step for h in client.get_metric_history(run_id, "loss")][-3:] == [11, 12, 12]  # HF's own logging
    assert [a.path for a in client.list_artifacts(run_id)] == ["checkpoints"]


def test_resumed_in_the_same_output_dir_the_run_keeps_what_the_trainer_keeps(
    tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from hf_job import dataset
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from tracked_ckpt.frameworks.hf import TrackedCheckpoints, resume_folder

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def train(max_steps: int, run_id: str | None = None) -> str:
        torch.manual_seed(0)
        model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
        args = TrainingArguments(output_dir="out", max_steps=max_steps, save_steps=3, save_total_limit=2,
                                 per_device_train_batch_size=4, use_cpu=True, report_to="none", disable_tqdm=True)
        tracked = TrackedCheckpoints(run_id=run_id, **({} if run_id else {"experiment": experiment}))
        trainer = Trainer(model=model, args=args, train_dataset=dataset(), callbacks=[tracked])
        trainer.train(resume_from_checkpoint=resume_folder(run_id, "out") if run_id else None)
        assert tracked.run_id is not None
        return tracked.run_id

    run_id = train(9)
    assert train(15, run_id) == run_id  # a new process, the same output_dir: HF rotates the earlier folders away
    on_disk = sorted(int(d.name.split("-")[1]) for d in (tmp_path / "out").glob("checkpoint-*"))
    assert on_disk == [12, 15] and checkpoint_steps(run_id) == on_disk
