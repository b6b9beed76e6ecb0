"""The data position as training state: a job SIGKILLed mid-epoch resumes at the exact next sample.

The killed job and its resume are real separate processes, in two different working directories (the resume has
no local copy: it downloads the checkpoint from the real MLflow store); the uninterrupted reference runs the same
job in this process. Each job logs the sample indices of every step.
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import pickle
import random
import uuid
from dataclasses import dataclass
from pathlib import Path

import data_job
import data_ranks_job
import pytest
import torch
from click.testing import CliRunner
from conftest import ROOT, run_job
from mlflow.tracking import MlflowClient
from test_distributed import assert_same, launch

import tracked_ckpt
from tracked_ckpt import (
    CheckpointManager,
    CheckpointMismatchError,
    DataPositionMismatchError,
    InvalidMetadataError,
    list_checkpoints,
)
from tracked_ckpt.catalog import RunCatalog
from tracked_ckpt.cli import cli
from tracked_ckpt.state import split_metadata
from tracked_ckpt.store.run_store import RunStore

JOB = ROOT / "tests" / "data_job.py"
RANKS_JOB = ROOT / "tests" / "data_ranks_job.py"


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
    "loader, workers",  # 0 workers in the default suite: the README example's test
    [
        pytest.param("torchdata", 0, marks=pytest.mark.slow),
        ("torchdata", 2),
        pytest.param("hf", 0, marks=pytest.mark.slow),
    ],
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
                     ("int(sys.argv[1]) if len(sys.argv) > 1 else 1000", "20"),  # two epochs of 10 batches
                     ("def train_one_step(", "def _printed_train_one_step(")]:  # fmt: skip
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
    from torchdata.stateful_dataloader import StatefulDataLoader

    rows = torch.utils.data.TensorDataset(torch.arange(320.0).unsqueeze(1))
    with pytest.raises(CheckpointMismatchError, match="the loader 'data' does not take the position"):
        tracked_ckpt.load(df["run_id"][0], which=12, data=StatefulDataLoader(rows, batch_size=32))  # not shuffled
    fresh = StatefulDataLoader(rows, batch_size=32, shuffle=True)
    assert tracked_ckpt.load(df["run_id"][0], which=12, data=fresh)["samples"] == 384  # read-only, by run ID
    assert [int(i) for i in next(iter(fresh))[0][:, 0]] == want[12]  # the batch of step 13


# ---------------------------------------------------------------------------------------- torchrun, 2 ranks


@dataclass
class Ranks:
    root: Path
    run_id: str
    kill: int
    resumed_at: int


@pytest.fixture(scope="module")
def ranks(tmp_path_factory: pytest.TempPathFactory) -> Ranks:
    """2 ranks SIGKILLed after a random step; resumed at 2 ranks in another folder, then the uninterrupted run."""
    root = tmp_path_factory.mktemp("ranks")
    (root / "a").mkdir()
    (root / "b").mkdir()
    exp = f"ranks-{uuid.uuid4().hex[:8]}"
    steps, every = data_ranks_job.STEPS, data_ranks_job.SAVE_EVERY
    kill = random.choice([s for s in range(every + 1, steps) if s % every])  # past a save, not on one
    common = ("--save-dir", "ckpt", "--experiment", exp)
    out = launch(2, *common, "--die-after-step", str(kill), cwd=root / "a", target=(str(RANKS_JOB),), expect_rc=1)
    run_id = out.split("run_id ")[1].split()[0]
    out = launch(2, *common, "--run-id", run_id, "--reference", f"{exp}-ref", cwd=root / "b", target=(str(RANKS_JOB),))
    resumed_at = int(out.split("resumed_at ")[1].split()[0])
    assert resumed_at == kill - kill % every, (kill, out)
    return Ranks(root, run_id, kill, resumed_at)


def test_each_rank_resumes_at_its_own_next_sample_after_a_kill(ranks: Ranks) -> None:
    a, b = ranks.root / "a", ranks.root / "b"
    at = ranks.resumed_at
    for rank in (0, 1):
        killed = steps_of(a / f"log-{rank}")
        assert max(killed) == ranks.kill
        got = {**{s: idx for s, idx in killed.items() if s <= at}, **steps_of(b / f"log-{rank}")}
        want = steps_of(b / f"ref-log-{rank}")
        assert got == want, f"rank {rank}: killed after step {ranks.kill}, resumed at {at}"
    final, want_weights = torch.load(b / "final.pt"), torch.load(b / "ref-final.pt")
    for k, v in want_weights.items():
        assert torch.equal(final[k], v), f"{k} differs (killed after step {ranks.kill}, resumed at {at})"


def test_each_rank_saves_its_own_position(ranks: Ranks, tmp_path: Path) -> None:
    catalog = RunCatalog(RunStore(MlflowClient(), ranks.run_id))
    r = next(r for r in catalog.scan() if r.manifest.step == ranks.resumed_at)
    assert {"data-0.pt", "data-1.pt"} <= {f.name for f in r.manifest.files} and r.manifest.world_size == 2
    folder = catalog.fetch_verified(r, tmp_path)
    positions = [torch.load(folder / f"data-{rank}.pt", weights_only=True)["extra.loader"] for rank in (0, 1)]
    yielded = [p["_sampler_iter_state"]["samples_yielded"] for p in positions]
    shard = data_ranks_job.SAMPLES // 2  # rank r reads 2 + r of its 24 samples a step
    assert yielded == [r.manifest.step * (2 + rank) % shard or shard for rank in (0, 1)]
    assert yielded[0] != yielded[1]


def test_another_world_size_is_refused_naming_both_and_changes_nothing(ranks: Ranks) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.manual_seed(7)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    loader = StatefulDataLoader(data_ranks_job.Shard(0, 1), batch_size=2, shuffle=True)
    before = copy.deepcopy((model.state_dict(), opt.state_dict(), loader.state_dict()))
    mgr = CheckpointManager(ranks.root / "one", run_id=ranks.run_id)  # one process: world size 1
    with pytest.raises(DataPositionMismatchError, match=r"of 2 data-parallel rank\(s\), and this job has 1") as e:
        mgr.load(model, opt, extra={"loader": loader})
    assert (e.value.saved_world_size, e.value.world_size) == (2, 1) and "skip_data=True" in str(e.value)
    assert "resume with 2 rank(s)" in str(e.value)
    assert_same((model.state_dict(), opt.state_dict(), loader.state_dict()), before)  # nothing was touched
    meta = mgr.load(model, opt, extra={"loader": loader}, skip_data=True)  # everything but the position
    assert meta["step"] == data_ranks_job.STEPS
    for k, v in torch.load(ranks.root / "b" / "final.pt").items():
        assert torch.equal(model.state_dict()[f"{k}"], v), k
    assert_same(loader.state_dict(), before[2])  # the loader stays at its start: the epoch restarts
    mgr.close()


def test_the_resume_benchmark_runs_and_resumes_at_the_next_batch(local_store: str) -> None:
    """benchmarks/data_position.py, small: its figures are not asserted, its resumed batches are (inside it)."""
    spec = importlib.util.spec_from_file_location("bench_data", ROOT / "benchmarks" / "data_position.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(bench)
    argv = ["--samples", "20000", "--position", "6400", "--repeats", "1", "--tracking-uri", local_store]
    figures = bench.main(argv)
    assert {"shuffle ratio", "offset ratio", "shuffle alone deep"} <= set(figures)


def test_seen_counts_must_be_whole_numbers_and_the_error_survives_torchrun() -> None:
    assert split_metadata({"step": 3, "samples": 96, "tokens": 1536}).metrics == {
        "step": 3.0, "samples": 96.0, "tokens": 1536.0
    }  # fmt: skip
    for bad in (1.5, -4):
        with pytest.raises(InvalidMetadataError, match=r"metadata\['samples'\]"):
            split_metadata({"samples": bad})
    e = DataPositionMismatchError("at 2, now 3", 2, 3)
    again = pickle.loads(pickle.dumps(e))  # ranks hand errors to each other by pickle
    assert (type(again), str(again), again.saved_world_size, again.world_size) == (type(e), str(e), 2, 3)
    assert isinstance(e, CheckpointMismatchError)


@pytest.mark.slow
def test_torchrun_at_another_world_size_refuses_on_every_rank(ranks: Ranks, tmp_path: Path, experiment: str) -> None:
    from torchdata.stateful_dataloader import StatefulDataLoader

    out = launch(1, "--save-dir", "ckpt", "--experiment", "x", "--run-id", ranks.run_id, cwd=ranks.root / "a",
                 target=(str(RANKS_JOB),), expect_rc=1)  # fmt: skip
    assert "DataPositionMismatchError" in out and "of 2 data-parallel rank(s), and this job has 1" in out, out[-3000:]
    # A single process's checkpoint (one state.pt) holding a loader, resumed by torchrun at 2 ranks.
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    loader = StatefulDataLoader(data_ranks_job.Shard(0, 1), batch_size=2, shuffle=True)
    next(iter(loader))
    with CheckpointManager(tmp_path / "one", experiment=experiment) as mgr:
        mgr.save(model, torch.optim.AdamW(model.parameters()), {"step": 1}, extra={"loader": loader})
    out = launch(2, "--save-dir", "ckpt", "--experiment", "x", "--run-id", mgr.run_id, cwd=tmp_path,
                 target=(str(RANKS_JOB),), expect_rc=1)  # fmt: skip
    assert "DataPositionMismatchError" in out and "of 1 data-parallel rank(s), and this job has 2" in out, out[-3000:]
