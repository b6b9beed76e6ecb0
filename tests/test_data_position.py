"""The data position as training state: a job SIGKILLed mid-epoch resumes at the exact next sample.

The killed job and its resume are real separate processes, in two different working directories (the resume has
no local copy: it downloads the checkpoint from the real MLflow store); the uninterrupted reference runs the same
job in this process. Each job logs the sample indices of every step.
"""

from __future__ import annotations

import contextlib
import random
from pathlib import Path

import data_job
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, run_job

from tracked_ckpt import list_checkpoints
from tracked_ckpt.cli import cli

JOB = ROOT / "tests" / "data_job.py"


def steps_of(log: Path) -> dict[int, str]:
    return {int(s): idx for s, idx in (line.split() for line in log.read_text().splitlines())}


def uninterrupted(root: Path, experiment: str, *args: str) -> tuple[dict[int, str], dict[str, torch.Tensor]]:
    """The reference: the same job, never killed, in this process: (samples by step, final weights)."""
    root.mkdir()
    log, out = root / "log", root / "final.pt"
    argv = ["--save-dir", str(root / "ckpt"), "--experiment", experiment, "--log", str(log), "--out", str(out)]
    data_job.main([*argv, *args])
    return steps_of(log), torch.load(out)


@pytest.mark.parametrize(
    "loader, workers", [("torchdata", 0), ("torchdata", 2), pytest.param("hf", 0, marks=pytest.mark.slow)]
)
def test_a_job_killed_mid_epoch_resumes_at_the_exact_next_sample(
    tmp_path: Path, experiment: str, loader: str, workers: int
) -> None:
    source = ["--loader", loader, "--workers", str(workers)]
    want, want_weights = uninterrupted(tmp_path / "ref", f"{experiment}-ref", *source)
    assert len(want) == data_job.EPOCHS * data_job.SAMPLES // data_job.BATCH
    kill = random.choice([s for s in range(data_job.SAVE_EVERY + 1, len(want)) if s % 10])  # mid-epoch, past a save
    a, b = tmp_path / "a", tmp_path / "b"
    common = ["--save-dir", "ckpt", "--experiment", experiment, "--log", "log", "--out", "final.pt", *source]
    rc, out = run_job(JOB, a, *common, "--die-after-step", str(kill), check=False)
    assert rc == -9, f"the job was to be SIGKILLed after step {kill}: rc {rc}\n{out}"
    run_id = out.split()[1]
    _, out = run_job(JOB, b, *common, "--run-id", run_id)  # another folder: the checkpoint comes from MLflow
    resumed_at = int(out.split()[3])
    assert resumed_at == kill - kill % data_job.SAVE_EVERY and resumed_at % 10, (kill, resumed_at)
    before = {s: idx for s, idx in steps_of(a / "log").items() if s <= resumed_at}
    assert len(steps_of(a / "log")) == kill
    got = {**before, **steps_of(b / "log")}
    assert min(steps_of(b / "log")) == resumed_at + 1
    assert got == want, f"killed after step {kill}, resumed at {resumed_at}: the sample sequence differs"
    final = torch.load(b / "final.pt")
    for k, v in want_weights.items():
        assert torch.equal(final[k], v), f"{k} differs after the resume (killed after step {kill})"


def readme_example() -> str:
    text = (ROOT / "README.md").read_text().split("## A complete example", 1)[1]
    return text.split("```python", 1)[1].split("```", 1)[0]


def run_readme_example(experiment: str, stop_after: int | None = None) -> list[list[int]]:
    """The README's complete example, run as written but smaller; the sample indices of every batch."""
    code = readme_example()
    for old, new in [("torch.randn(32_000, 10)", "torch.arange(320.0).unsqueeze(1).repeat(1, 10)"),
                     ('"my-experiment"', "EXPERIMENT"), ("EveryNSteps(500)", "EveryNSteps(4)"),
                     ("range(meta.get(\"epoch\", 0), 10)", "range(meta.get(\"epoch\", 0), 2)")]:  # fmt: skip
        assert old in code, old
        code = code.replace(old, new)
    seen: list[list[int]] = []

    def train_one_step(model: object, optimizer: object, scheduler: object, batch: list[torch.Tensor]) -> float:
        seen.append([int(i) for i in batch[0][:, 0]])
        if len(seen) == stop_after:
            raise KeyboardInterrupt  # the job dies mid-epoch
        return float(len(seen))

    with contextlib.suppress(KeyboardInterrupt):
        exec(compile(code, "README.md", "exec"), {"train_one_step": train_one_step, "EXPERIMENT": experiment})
    return seen


def test_the_readme_example_resumes_mid_epoch_and_records_the_samples_seen(
    tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    torch.manual_seed(0)
    first = run_readme_example(experiment, stop_after=7)  # saved at step 4, died in step 7
    rest = run_readme_example(experiment)
    (tmp_path / "ref").mkdir()
    monkeypatch.chdir(tmp_path / "ref")  # the uninterrupted reference, in its own folder and experiment
    torch.manual_seed(0)
    want = run_readme_example(f"{experiment}-ref")
    assert len(want) == 20 and first[:4] + rest == want
    df = list_checkpoints(experiment=experiment)
    assert df["step"].tolist()[-1] == 20  # the rest went to the example's retention
    assert (df["samples"] == df["step"] * 32).all()
    result = CliRunner().invoke(cli, ["ls", "--experiment", experiment])
    header = result.output.splitlines()[0].split()
    assert header[:4] == ["run", "step", "epoch", "samples"], result.output
    result = CliRunner().invoke(cli, ["show", df["run_id"][0]])
    assert "samples=640" in result.output, result.output
