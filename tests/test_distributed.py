"""torchrun with 2 ranks on CPU (gloo): FSDP2/DDP saves through DCP, kill and resume, resharding, safe loading.

Each launch costs ~12-20 s here, so a module fixture trains the runs once and the tests read them:
A: 6 steps, async saves (uninterrupted); B: the same, rank 1 SIGKILLed in the middle of the step-6 save (its
shard uploaded, the manifest not); C: B resumed at 2 ranks.
"""

from __future__ import annotations

import io
import json
import os
import pickle
import re
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT
from mlflow.tracking import MlflowClient
from torch.distributed.checkpoint.state_dict import get_state_dict

from tracked_ckpt import CheckpointManager
from tracked_ckpt.catalog import RunCatalog
from tracked_ckpt.errors import CheckpointCorruptError, CheckpointMismatchError, UnsafeCheckpointError
from tracked_ckpt.formats.dcp import load_bytes_safely
from tracked_ckpt.fsdp_demo import build
from tracked_ckpt.manifest import MANIFEST_NAME, FileEntry, Manifest, hash_file
from tracked_ckpt.store.run_store import RunStore

LAUNCH_TIMEOUT_S = 120


def launch(
    nproc: int,
    *args: str,
    cwd: Path,
    env: dict[str, str] | None = None,
    expect_rc: int = 0,
    target: tuple[str, ...] = ("-m", "tracked_ckpt.fsdp_demo"),
) -> str:
    """``torchrun --standalone`` the demo with a hard timeout; kill its whole process group on timeout."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"]
    cmd += [*target, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    proc = subprocess.Popen(
        cmd, cwd=cwd, env=full_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        out, _ = proc.communicate(timeout=LAUNCH_TIMEOUT_S)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"torchrun {args} hung for {LAUNCH_TIMEOUT_S} s:\n{out.decode()[-4000:]}") from None
    text = out.decode()
    if (proc.returncode == 0) != (expect_rc == 0):
        raise AssertionError(f"torchrun {args} exited {proc.returncode}, expected {expect_rc}:\n{text[-4000:]}")
    return text


def run_id_of(output: str) -> str:
    return next(line.split()[1] for line in output.splitlines() if line.startswith("run_id "))


def summary_of(output: str) -> dict[str, Any]:
    return dict(json.loads(next(line for line in output.splitlines() if line.startswith('{"step"'))))


def assert_same(a: Any, b: Any, where: str = "") -> None:
    if isinstance(a, torch.Tensor):
        assert isinstance(b, torch.Tensor) and torch.equal(a, b), where
    elif isinstance(a, dict):
        assert set(a) == set(b), where
        for k in a:
            assert_same(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, list | tuple):
        assert len(a) == len(b), where
        for i, (x, y) in enumerate(zip(a, b, strict=True)):
            assert_same(x, y, f"{where}[{i}]")
    else:
        assert a == b, where


@dataclass
class Runs:
    root: Path
    experiment: str
    uninterrupted: str  # run A
    killed: str  # run B, resumed by C
    a_summary: dict[str, Any]


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Runs:
    root = tmp_path_factory.mktemp("torchrun")
    (root / "saves").mkdir()
    (root / "saves-a").mkdir()
    exp = f"dist-{uuid.uuid4().hex[:8]}"
    common = ["--steps", "6", "--save-every", "2", "--experiment", exp]
    out_a = launch(2, *common, "--save-dir", "a", "--async-save", "--dump", "a.pt", "--dump-saves", "saves-a", cwd=root)
    crash = {"TRACKED_CKPT_FAULT": "dcp_written:1@3"}  # rank 1, third save: its shard written, nothing committed
    out_b = launch(2, *common, "--save-dir", "b", "--dump-saves", "saves", cwd=root, env=crash, expect_rc=1)
    killed = run_id_of(out_b)
    assert re.search(r"exitcode\s*:\s*-9", out_b), out_b[-3000:]  # rank 1 died by SIGKILL, inside save()
    assert sorted(p.name for p in (root / "saves").iterdir()) == ["step-2.pt", "step-4.pt"]
    out_c = launch(2, *common, "--save-dir", "b", "--run-id", killed, "--dump", "c.pt", cwd=root)
    assert run_id_of(out_c) == killed
    return Runs(root, exp, run_id_of(out_a), killed, summary_of(out_a))


def plain_training() -> tuple[torch.nn.Module, torch.optim.Optimizer, Any]:
    model = build(256, seed=99)  # different weights from the saved ones: the load must overwrite them
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    return model, opt, torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)


def test_killed_fsdp_run_resumed_at_2_ranks_equals_the_uninterrupted_run(runs: Runs) -> None:
    a, c = torch.load(runs.root / "a.pt"), torch.load(runs.root / "c.pt")
    assert a["step"] == c["step"] == 6
    assert_same(a["model"], c["model"], "model")
    assert_same(a["optimizer"], c["optimizer"], "optimizer")
    catalog = RunCatalog(RunStore(MlflowClient(), runs.killed))
    found = catalog.scan()
    assert [r.path for r in found] == [
        f"checkpoints/{n}" for n in ("step-00000002", "step-00000004", "step-00000006")
    ]  # B's killed step-6 save never committed (no manifest, no outbox entry): nothing of it reached MLflow
    assert {r.manifest.format for r in found} == {"dcp"} and {r.manifest.world_size for r in found} == {2}
    assert found[-1].manifest.resumed_from == found[1].path  # C restarted from step 4, the last one B committed
    # B's interrupted step-6 save was never resolved; C's own step 6 is the one recorded.
    names = {f.name for f in found[0].manifest.files}
    assert names == {".metadata", "__0_0.distcp", "__1_0.distcp", "rng-0.json", "rng-1.json"}


def test_async_saves_commit_while_training_continues(runs: Runs, tmp_path: Path) -> None:
    assert runs.a_summary["in_flight_steps"] > 0, "no training step ran while a save was in flight"
    catalog = RunCatalog(RunStore(MlflowClient(), runs.uninterrupted))
    found = catalog.scan()
    assert [r.manifest.step for r in found] == [2, 4, 6]
    for r in found:
        catalog.fetch_verified(r, tmp_path)  # every file of every async save is there and matches its digest
    assert catalog.latest() == found[-1]
    # Training went on during the write: the checkpoint still holds the state as of save(), not a later one.
    model, opt, sched = plain_training()
    mgr = CheckpointManager(runs.root / "a", run_id=runs.uninterrupted)
    mgr.load(model, opt, which=2, scheduler=sched)
    msd, osd = get_state_dict(model, opt)
    saved = torch.load(runs.root / "saves-a" / "step-2.pt")
    assert_same(saved["model"], msd, "model")
    assert_same(saved["optimizer"], osd, "optimizer")
    mgr.close()


def test_resume_at_world_size_1_restores_the_saved_state(runs: Runs) -> None:
    saved = torch.load(runs.root / "saves" / "step-4.pt")
    model, opt, sched = plain_training()
    mgr = CheckpointManager(runs.root / "b", run_id=runs.killed)
    assert type(mgr) is CheckpointManager  # no process group here: the single-process manager
    meta = mgr.load(model, opt, which=4, scheduler=sched)
    assert meta["step"] == 4
    msd, osd = get_state_dict(model, opt)
    assert_same(saved["model"], msd, "model")
    assert_same(saved["optimizer"], osd, "optimizer")
    assert sched.state_dict()["last_epoch"] == 4
    rng0 = json.loads((mgr.local.folder(runs.killed, "step-00000004") / "rng-0.json").read_text())
    assert torch.get_rng_state().tolist() == rng0["torch"]  # rank 0's RNG, restored last
    mgr.close()


def test_ddp_at_1_rank_resumes_as_fsdp2_at_2_ranks(runs: Runs) -> None:
    root = runs.root
    (root / "ddp-saves").mkdir()
    common = ["--steps", "3", "--save-every", "3", "--experiment", runs.experiment, "--save-dir", "d"]
    out = launch(1, *common, "--mode", "ddp", "--dump-saves", "ddp-saves", cwd=root)
    run_id = run_id_of(out)
    launch(2, *common, "--mode", "fsdp", "--run-id", run_id, "--dump-loaded", "loaded.pt", cwd=root)
    saved, loaded = torch.load(root / "ddp-saves" / "step-3.pt"), torch.load(root / "loaded.pt")
    assert loaded["step"] == 3
    assert_same(saved["model"], loaded["model"], "model")
    assert_same(saved["optimizer"], loaded["optimizer"], "optimizer")


# --------------------------------------------------------------------------------- tampered checkpoints


class _Evil:
    def __reduce__(self) -> tuple[Any, ...]:
        return (os.system, (f"touch {_MARKER}",))


_MARKER = f"/tmp/tracked_ckpt-pwned-{uuid.uuid4().hex[:8]}"


def plant(runs: Runs, tmp_path: Path, experiment: str, **replace: bytes) -> tuple[CheckpointManager, str]:
    """Copy B's step-2 checkpoint into a new run, replace some files, re-sign the manifest as an attacker would."""
    client = MlflowClient()
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    src = RunCatalog(RunStore(client, runs.killed)).at_step(2)
    assert src is not None
    src_dir = RunStore(client, runs.killed).local_dir / src.path  # type: ignore[operator]
    store = RunStore(client, run_id)
    staged = tmp_path / "planted"
    staged.mkdir()
    entries = []
    for f in src.manifest.files:
        (staged / f.name).write_bytes(replace.get(f.name, (src_dir / f.name).read_bytes()))
        entries.append(FileEntry(f.name, *hash_file(staged / f.name)))
    fields = {k: v for k, v in vars(src.manifest).items() if k not in ("run_id", "files")}
    manifest = Manifest(**{**fields, "run_id": run_id, "files": tuple(entries)})
    (staged / MANIFEST_NAME).write_text(manifest.to_json())
    for f in [*entries, FileEntry(MANIFEST_NAME, 0, "")]:
        store.upload(staged / f.name, src.path)
    return CheckpointManager(tmp_path / "victim", run_id=run_id), f"runs:/{run_id}/{src.path}"


def test_planted_metadata_is_refused_naming_the_global(runs: Runs, tmp_path: Path, experiment: str) -> None:
    mgr, ref = plant(runs, tmp_path, experiment, **{".metadata": pickle.dumps(_Evil())})
    model, opt, _ = plain_training()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(UnsafeCheckpointError, match=r"(posix|os)\.system"):
        mgr.load(model, opt, checkpoint_path=ref)
    assert not Path(_MARKER).exists()
    assert_same(before, model.state_dict(), "model untouched")
    mgr.close()


def test_metadata_pointing_outside_the_checkpoint_is_refused(runs: Runs, tmp_path: Path, experiment: str) -> None:
    src = RunStore(MlflowClient(), runs.killed).local_dir / "checkpoints/step-00000002/.metadata"  # type: ignore[operator]
    md = pickle.loads(src.read_bytes())
    for info in md.storage_data.values():
        info.relative_path = "../../../etc/passwd"
    mgr, ref = plant(runs, tmp_path, experiment, **{".metadata": pickle.dumps(md)})
    with pytest.raises(CheckpointCorruptError, match="not a data file of the manifest"):
        mgr.load(*plain_training()[:2], checkpoint_path=ref)
    mgr.close()


def test_a_dcp_run_is_followed_and_loaded_by_one_process(runs: Runs, tmp_path: Path) -> None:
    """A torchrun run's DCP checkpoints, followed by a single-process evaluator: consolidated weights, verified.

    Before the next test damages step 2 of this run (a damaged checkpoint is never yielded)."""
    import tracked_ckpt

    seen = []
    for ckpt in tracked_ckpt.follow(runs.uninterrupted, weights_only=True, cache_dir=tmp_path / "cache"):
        model, _, _ = plain_training()
        assert ckpt.load(model)["step"] == ckpt.step
        saved = torch.load(runs.root / "saves-a" / f"step-{ckpt.step}.pt")
        msd, _ = get_state_dict(model, torch.optim.AdamW(model.parameters()))
        assert_same(saved["model"], msd, "model")
        assert_same(saved["model"], ckpt.model_state(), "consolidated")
        seen.append(ckpt.step)
    assert seen == [2, 4, 6]


def test_a_flipped_byte_in_a_shard_is_caught_before_dcp_reads_it(runs: Runs, tmp_path: Path) -> None:
    client = MlflowClient()
    r = RunCatalog(RunStore(client, runs.uninterrupted)).at_step(2)
    assert r is not None
    shard = RunStore(client, runs.uninterrupted).local_dir / r.path / "__1_0.distcp"  # type: ignore[operator]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0xFF
    shard.unlink()  # a hard link shared with the local copy: replace, never modify in place
    shard.write_bytes(bytes(data))
    mgr = CheckpointManager(tmp_path / "elsewhere", run_id=runs.uninterrupted)
    with pytest.raises(CheckpointCorruptError, match=r"__1_0\.distcp.*BLAKE3"):
        mgr.load(*plain_training()[:2], which=2)
    mgr.close()


def test_non_tensor_values_are_unpickled_weights_only() -> None:
    buf = io.BytesIO()
    torch.save({"lr": 0.1, "evil": _Evil()}, buf)
    buf.seek(0)
    with pytest.raises(UnsafeCheckpointError, match=r"value 'scheduler.x'.*system"):
        load_bytes_safely(buf, "scheduler.x", "test")
    assert not Path(_MARKER).exists()
    ok = io.BytesIO()
    torch.save({"lr": 0.1, "milestones": [1, 2], "name": "x"}, ok)
    ok.seek(0)
    assert load_bytes_safely(ok, "scheduler", "test") == {"lr": 0.1, "milestones": [1, 2], "name": "x"}


def test_manifests_without_format_read_as_single_process_torch() -> None:
    m = Manifest(run_id="r", step=1, seq=1, created=0.0, files=())
    data = json.loads(m.to_json())
    assert data["format"] == "torch" and data["world_size"] == 1
    del data["format"], data["world_size"]  # a manifest written before these fields existed
    old = Manifest.from_json(json.dumps(data), "old")
    assert (old.format, old.world_size) == ("torch", 1)
    data["format"] = "pickle"
    with pytest.raises(CheckpointCorruptError, match="format 'pickle'"):
        Manifest.from_json(json.dumps(data), "odd")


# ----------------------------------------------------------------------------------- failures mid-save

FAULTY_JOB = """
import json, sys
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from tracked_ckpt import CheckpointManager
from tracked_ckpt.errors import SaveError, StoreError
from tracked_ckpt.store.run_store import RunStore

class FlakyStore(RunStore):
    mode = "ok"  # "reset": uploads fail as a dropped connection does (transient); "refuse": a 403 (for good)

    def upload(self, local_file, artifact_dir):
        if FlakyStore.mode != "ok":
            e = StoreError("injected: " + ("403 permission denied" if FlakyStore.mode == "refuse" else "reset"))
            e.transient = FlakyStore.mode == "reset"
            raise e
        super().upload(local_file, artifact_dir)

dist.init_process_group("gloo")
rank = dist.get_rank()
model = fully_shard(torch.nn.Linear(32, 32))
mgr = CheckpointManager("ckpt", experiment=sys.argv[1], store_factory=FlakyStore, publish_timeout=5)
outcomes = []
# 1: rank 1's disk fails while writing (TRACKED_CKPT_FAULT); 2: uploads fail transiently; 3: all well;
# 4: the server refuses for good (403).
for step, mode in ((1, "ok"), (2, "reset"), (3, "ok"), (4, "refuse")):
    if step == 4:
        assert mgr.sync(timeout=60)  # a collective: the outage of step 2 is over on every rank
    FlakyStore.mode = mode
    try:
        outcomes.append(mgr.save(model, None, {"step": step}))
    except SaveError as e:
        outcomes.append("SaveError: " + str(e))
FlakyStore.mode = "ok"
drained = mgr.sync(timeout=60)
# One file per rank: two ranks printing to one pipe can interleave within a line.
with open(f"outcome-{rank}.json", "w") as f:
    json.dump({"run_id": mgr.run_id, "outcomes": outcomes, "drained": drained}, f)
mgr.close()
"""


def test_a_failing_rank_fails_the_save_everywhere_and_a_failing_server_loses_nothing(
    tmp_path: Path, experiment: str
) -> None:
    (tmp_path / "job.py").write_text(FAULTY_JOB)
    launch(2, experiment, cwd=tmp_path, target=("job.py",), env={"TRACKED_CKPT_FAULT": "dcp_written:1@1!"})
    results = {rank: json.loads((tmp_path / f"outcome-{rank}.json").read_text()) for rank in (0, 1)}
    for rank in (0, 1):
        first, second, third, fourth = results[rank]["outcomes"]
        assert first.startswith("SaveError") and "rank 1" in first and "injected I/O error" in first
        assert second.startswith("runs:/") and third.startswith("runs:/")  # committed locally, queued, recorded
        assert fourth.startswith("SaveError") and "403" in fourth and "committed locally" in fourth
    assert results[0]["drained"]
    catalog = RunCatalog(RunStore(MlflowClient(), results[0]["run_id"]))
    # The failed write never became a checkpoint; the transient failure and the refusal lost nothing.
    assert [r.manifest.step for r in catalog.scan()] == [2, 3, 4]
    latest = catalog.latest()
    assert latest is not None and latest.manifest.step == 4


def test_a_checkpoint_that_does_not_fit_is_refused_and_changes_nothing(runs: Runs, tmp_path: Path) -> None:
    model = build(128)  # saved with width 256
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    mgr = CheckpointManager(tmp_path / "other", run_id=runs.uninterrupted)
    with pytest.raises(CheckpointMismatchError, match=r"does not fit.*0\.weight"):
        mgr.load(model, opt, which=4)  # step 2 of this run is the one the flipped-byte test damaged
    assert_same(before, model.state_dict(), "model untouched")
    mgr.close()


# ------------------------------------------------------------------------ outage and preemption under torchrun

OUTAGE_JOB = """
import json, os, pathlib, sys, time
import torch, torch.distributed as dist
from torch.distributed.fsdp import fully_shard
from tracked_ckpt import CheckpointManager, EveryNSteps

def wait_for(name):
    while not pathlib.Path(name).exists():
        time.sleep(0.05)

dist.init_process_group("gloo")
rank = dist.get_rank()
torch.manual_seed(0)
model = fully_shard(torch.nn.Linear(64, 64))
opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
mgr = CheckpointManager("ck", experiment=sys.argv[1], publish_timeout=float(sys.argv[2]), save_on_sigterm=True,
                        save_policy=EveryNSteps(1))
timings = {}

def train_and_save(step):
    loss = model(torch.randn(8, 64)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    t0 = time.monotonic()
    mgr.save(model, opt, {"step": step, "loss": float(loss)})
    timings[step] = time.monotonic() - t0

train_and_save(1)
if rank == 0:
    pathlib.Path("phase-up").touch()
wait_for("outage-on")
for step in (2, 3, 4):
    train_and_save(step)
dist.barrier()
if rank == 0:
    pathlib.Path("phase-outage").touch()
wait_for("outage-off")
t0 = time.monotonic()
while rank == 0 and mgr.outbox.pending(mgr.run_id) and time.monotonic() - t0 < 60:
    time.sleep(0.05)
drained = time.monotonic() - t0
with open(f"outcome-{rank}.json", "w") as f:
    json.dump({"run_id": mgr.run_id, "timings": timings, "drained": drained}, f)
dist.barrier()
if rank == 0:
    pathlib.Path("phase-drained").touch()
step = 4
while True:  # train until preempted: SIGTERM makes every rank save once more and exit 143
    step += 1
    time.sleep(0.05)
    loss = model(torch.randn(8, 64)).pow(2).mean()
    opt.zero_grad(); loss.backward(); opt.step()
    if mgr.should_save(step):
        pathlib.Path(f"final-{rank}").write_text(str(step))
        try:
            mgr.save(model, opt, {"step": step, "loss": float(loss)})
        except SystemExit as e:
            pathlib.Path(f"exit-{rank}").write_text(str(e.code))
            raise
"""


@pytest.mark.slow  # the default run has the two-node story (tests/test_nodes.py): an outage on every rank, SIGTERM
def test_torchrun_outage_blocks_no_rank_and_sigterm_on_every_rank_saves_once(
    mlflow_server: str, tmp_path: Path, experiment: str
) -> None:
    from fault_proxy import FaultProxy

    proxy = FaultProxy(mlflow_server)
    (tmp_path / "job.py").write_text(OUTAGE_JOB.replace("EveryNSteps(1)", "EveryNSteps(1000)"))
    budget = 4.0
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "job.py",
           experiment, str(budget)]  # fmt: skip
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}  # MLflow's defaults
    env.update({"OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": proxy.url})
    job = subprocess.Popen(cmd, cwd=tmp_path, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)

    def until(name: str, timeout: float = LAUNCH_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while not (tmp_path / name).exists():
            if job.poll() is not None or time.monotonic() > deadline:
                job.kill()
                raise AssertionError(f"job never reached {name}:\n{job.communicate()[0][-4000:]}")
            time.sleep(0.05)

    try:
        until("phase-up")
        proxy.set_mode("hang")
        (tmp_path / "outage-on").touch()
        until("phase-outage")
        proxy.set_mode("pass")
        (tmp_path / "outage-off").touch()
        until("phase-drained")
        job.send_signal(signal.SIGTERM)  # the torchrun agent forwards it to every rank, as on preemption
        out, _ = job.communicate(timeout=LAUNCH_TIMEOUT_S)
    finally:
        if job.poll() is None:
            job.kill()
        proxy.close()
    results = {rank: json.loads((tmp_path / f"outcome-{rank}.json").read_text()) for rank in (0, 1)}
    for rank in (0, 1):
        t = {int(k): v for k, v in results[rank]["timings"].items()}
        assert t[2] < budget + 2, (rank, t)  # the first save of the outage waits the budget at most
        assert t[3] < t[1] + 1.5 and t[4] < t[1] + 1.5, (rank, t)  # later ones: their local commit only
    assert results[0]["drained"] < 12, results[0]
    run_id = results[0]["run_id"]
    finals = {(tmp_path / f"final-{rank}").read_text() for rank in (0, 1)}
    assert len(finals) == 1, finals  # both ranks agreed on the step of the final save
    final = int(finals.pop())
    assert {(tmp_path / f"exit-{rank}").read_text() for rank in (0, 1)} == {"143"}, out[-3000:]
    catalog = RunCatalog(RunStore(MlflowClient(mlflow_server), run_id))
    found = catalog.scan()
    assert [r.manifest.step for r in found] == [1, 2, 3, 4, final]
    assert MlflowClient(mlflow_server).get_run(run_id).info.status == "KILLED"
    # A relaunch at another world size (1) resumes from the final sharded checkpoint.
    model = torch.nn.Linear(64, 64)
    mgr = CheckpointManager(tmp_path / "ck", run_id=run_id, tracking_uri=mlflow_server)
    assert mgr.load(model, torch.optim.AdamW(model.parameters(), lr=1e-3))["step"] == final
    mgr.close()
