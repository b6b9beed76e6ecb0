"""Accelerate adapter: a real Accelerator on CPU, an MLP with dropout, synthetic batches, real processes.

Kill mid-run, resume by run ID in a fresh process on another working directory with an empty local folder, end
with the same weights as an uninterrupted run (Accelerate saves and restores the RNG states with the model).
"""

from __future__ import annotations

from pathlib import Path

import accelerate  # noqa: F401 - installed by the [test] extra; a missing one must fail, not skip
import pytest
import torch
from conftest import checkpoint_steps, printed_run_id, run_job
from mlflow.tracking import MlflowClient

from tracked_ckpt.runtags import TAG_BEST_STEP, TAG_LATEST_STEP, TAG_MONITOR

ROOT = Path(__file__).resolve().parents[1]
JOB = ROOT / "tests" / "accelerate_job.py"


def job(cwd: Path, *args: str, env: dict[str, str], check: bool = True) -> tuple[int, str]:
    return run_job(JOB, cwd, *args, env=env, check=check)


def test_killed_loop_resumes_by_run_id_with_the_same_weights(tmp_path: Path, experiment: str) -> None:
    env = {"MLFLOW_EXPERIMENT_NAME": experiment}
    job(tmp_path / "full", "w.pt", env=env)  # uninterrupted, untracked
    rc, out = job(tmp_path / "killed", "w.pt", "--tracked", "--kill-at", "17", env=env, check=False)
    assert rc == -9, out
    run_id = printed_run_id(out)
    # Saves at 5, 10, 15; total_limit=2: Accelerate removed the first folder, and so did the run.
    assert checkpoint_steps(run_id) == [10, 15]
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[TAG_LATEST_STEP] == "15" and tags[TAG_MONITOR] == "loss:min" and TAG_BEST_STEP in tags

    rc, out = job(tmp_path / "elsewhere", "w.pt", "--resume", run_id, env=env)
    assert "FINAL_STEP 20" in out and printed_run_id(out) == run_id
    assert checkpoint_steps(run_id) == [10, 15, 20]
    full = torch.load(tmp_path / "full" / "w.pt", weights_only=True)
    resumed = torch.load(tmp_path / "elsewhere" / "w.pt", weights_only=True)
    for k in full:
        assert torch.equal(full[k], resumed[k]), k
    assert [h.step for h in MlflowClient().get_metric_history(run_id, "loss")] == [5, 10, 15, 20]


def test_resumed_in_the_same_project_dir_numbering_continues_and_the_run_keeps_what_accelerate_keeps(
    tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    from accelerate import Accelerator
    from accelerate.utils import ProjectConfiguration

    from tracked_ckpt.frameworks.accelerate import TrackedState, load_state

    monkeypatch.chdir(tmp_path)

    def train(saves: int, run_id: str | None = None) -> str:
        config = ProjectConfiguration(project_dir=".", automatic_checkpoint_naming=True, total_limit=2)
        accelerator = Accelerator(cpu=True, project_config=config)
        accelerator.prepare(torch.nn.Linear(2, 1))
        tracked = TrackedState(accelerator, run_id=run_id, **({} if run_id else {"experiment": experiment}))
        start = load_state(accelerator, run_id)["step"] if run_id else 0
        for step in range(start + 1, start + saves + 1):
            tracked.save_state(metadata={"step": step})
        tracked.close()
        assert tracked.run_id is not None
        return tracked.run_id

    run_id = train(3)  # checkpoint_0..2; total_limit removed checkpoint_0, in the run too
    assert train(3, run_id) == run_id  # a new process, the same project_dir
    assert sorted(d.name for d in (tmp_path / "checkpoints").iterdir()) == ["checkpoint_4", "checkpoint_5"]
    assert checkpoint_steps(run_id) == [5, 6]
