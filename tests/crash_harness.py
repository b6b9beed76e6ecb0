"""Kill a saving process with SIGKILL at every named stage of a save and at random moments; after each kill,
a fresh process resumes and checks that nothing committed was lost and nothing half-written is visible.

    python tests/crash_harness.py WORKDIR [--seeds 50] [--stages all|none|write,fsync,...]

This process imports torch and tracked_ckpt once, then forks a worker per scenario (so each scenario costs
milliseconds, not an interpreter start) and a verifier after each kill. It never opens the MLflow store
itself: every store connection is made inside a forked child. Prints one JSON line per scenario, then a
summary line; exits 1 if any scenario failed.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import signal
import sys
import time
import traceback
from pathlib import Path
from typing import Any

import mlflow.store.artifact.local_artifact_repo
import mlflow.store.tracking.sqlalchemy_store  # noqa: F401
import torch

# The faults are armed only in forked workers; make sure nothing inherited from the caller arms them here.
os.environ.pop("TRACKED_CKPT_FAULT", None)

from tracked_ckpt import CheckpointManager, KeepLast
from tracked_ckpt.formats.torch_file import read_payload
from tracked_ckpt.local import STAGING
from tracked_ckpt.manifest import ARTIFACT_PREFIX, MANIFEST_NAME
from tracked_ckpt.runtags import TAG_LATEST

# stage -> which hit to kill at; every stage is reached during the third save (the first with retention).
# A save writes two files (model.pt, then state.pt): two fsyncs, and ~85 write() calls of torch.save per save here.
STAGES = {
    "write": 210, "fsync": 5, "manifest": 3, "outbox": 3, "rename": 3, "upload:state.pt": 3, "upload:rng.json": 3,
    "upload:MANIFEST.json": 3, "tags": 3, "retention": 1, "retention_mid": 1,
}  # fmt: skip


def fill(model: torch.nn.Module, step: int) -> None:
    """Weights that name their step, so a checkpoint mixing files of two saves is caught."""
    with torch.no_grad():
        for p in model.parameters():
            p.fill_(float(step))


def new_model() -> torch.nn.Module:
    return torch.nn.Linear(128, 128)


def open_manager(save_dir: Path, experiment: str) -> CheckpointManager:
    return CheckpointManager(save_dir, experiment=experiment, retention=KeepLast(2), publish_timeout=60)


def worker(save_dir: Path, experiment: str, saves: int, ack: Path) -> None:
    torch.set_num_threads(1)
    model = new_model()
    mgr = open_manager(save_dir, experiment)
    step = int(mgr.load(model).get("step", 0))
    for _ in range(saves):
        step += 1
        fill(model, step)
        mgr.save(model, metadata={"step": step, "reward": float(step % 3)})
        with open(ack, "a") as f:  # acknowledged: save() returned, so this checkpoint must survive
            f.write(f"{step}\n")
            f.flush()
            os.fsync(f.fileno())
    mgr.close()


def verify(save_dir: Path, experiment: str, ack: Path) -> dict[str, Any]:
    torch.set_num_threads(1)
    acked = [int(x) for x in ack.read_text().split()] if ack.exists() else []
    model = new_model()
    mgr = open_manager(save_dir, experiment)
    problems: list[str] = []
    staging = save_dir / STAGING
    if staging.is_dir() and any(staging.iterdir()):
        problems.append(f"staging leftovers after attach: {sorted(p.name for p in staging.iterdir())}")
    meta = mgr.load(model)
    step = int(meta.get("step", 0))
    if acked and step < max(acked):
        problems.append(f"resumed at step {step}, but step {max(acked)} had been acknowledged")
    if meta and not all(bool((p == step).all()) for p in model.parameters()):
        problems.append(f"restored weights do not match step {step}")
    found = mgr.catalog.scan()
    listed = sorted(e.path for e in mgr.store.list(ARTIFACT_PREFIX))
    if listed != sorted(r.path for r in found):
        problems.append(f"artifact folders without a valid manifest remain: {listed} vs {[r.path for r in found]}")
    import tempfile

    for r in found:
        with tempfile.TemporaryDirectory() as tmp:
            folder = mgr.catalog.fetch_verified(r, Path(tmp))  # raises on any size/digest mismatch
            state = read_payload(folder, {f.name for f in r.manifest.files}, r.path)  # model.pt and state.pt
            if not bool((state["model"]["weight"] == r.manifest.step).all()):
                problems.append(f"{r.path} holds weights of another step")
    tags = mgr.store.tags()
    if found and tags.get(TAG_LATEST) != found[-1].path:
        problems.append(f"latest tag {tags.get(TAG_LATEST)} is not the newest committed {found[-1].path}")
    if TAG_LATEST in tags and not mgr.store.exists(f"{tags[TAG_LATEST]}/{MANIFEST_NAME}"):
        problems.append("the latest tag points ahead of the commit marker")
    if mgr.outbox.pending(mgr.run_id):
        problems.append(f"outbox not drained: {mgr.outbox.pending(mgr.run_id)}")
    fill(model, step + 1)
    mgr.save(model, metadata={"step": step + 1, "reward": 0.0})  # and the next save succeeds
    with open(ack, "a") as f:
        f.write(f"{step + 1}\n")
    mgr.close()
    return {"resumed_step": step, "acked": max(acked, default=0), "checkpoints": len(found) + 1, "problems": problems}


def fork(fn: Any, *args: Any, fault: str | None = None) -> int:
    pid = os.fork()
    if pid == 0:  # child
        code = 0
        try:
            if fault:
                os.environ["TRACKED_CKPT_FAULT"] = fault
            fn(*args)
        except BaseException:
            traceback.print_exc()
            code = 1
        finally:
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(code)
    return pid


def run_verifier(save_dir: Path, experiment: str, ack: Path, out: Path) -> dict[str, Any]:
    def job() -> None:
        out.write_text(json.dumps(verify(save_dir, experiment, ack)))

    pid = fork(job)
    _, status = os.waitpid(pid, 0)
    if not out.exists() or os.waitstatus_to_exitcode(status) != 0:
        return {"problems": [f"verifier failed with status {os.waitstatus_to_exitcode(status)}"]}
    result: dict[str, Any] = json.loads(out.read_text())
    out.unlink()
    return result


def stage_scenario(workdir: Path, stage: str) -> dict[str, Any]:
    save_dir, ack = workdir / f"stage-{stage.replace(':', '_')}", workdir / f"ack-{stage.replace(':', '_')}"
    experiment = f"crash-stage-{stage}"
    pid = fork(worker, save_dir, experiment, 4, ack, fault=f"{stage}@{STAGES[stage]}")
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status) and os.WTERMSIG(status) == signal.SIGKILL
    result = run_verifier(save_dir, experiment, ack, workdir / "verify.json")
    if not killed:
        result["problems"].append(f"stage {stage} was never reached (worker exit status {status})")
    return {"scenario": f"stage:{stage}", "killed": killed, **result}


def random_scenario(workdir: Path, seed: int) -> dict[str, Any]:
    """Seeds share one save_dir: each kill lands on whatever the previous recovery left (chains of crashes)."""
    rng = random.Random(seed)
    save_dir, ack, experiment = workdir / "random", workdir / "ack-random", "crash-random"
    pid = fork(worker, save_dir, experiment, 1_000_000, ack)  # saves until killed, however fast the machine
    time.sleep(rng.uniform(0.0, 1.2))
    os.kill(pid, signal.SIGKILL)
    _, status = os.waitpid(pid, 0)
    killed = os.WIFSIGNALED(status)
    result = run_verifier(save_dir, experiment, ack, workdir / "verify.json")
    return {"scenario": f"random:{seed}", "killed": killed, **result}


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("workdir", type=Path)
    p.add_argument("--seeds", type=int, default=50)
    p.add_argument("--stages", default="all")
    args = p.parse_args()
    args.workdir.mkdir(parents=True, exist_ok=True)
    os.chdir(args.workdir)
    stages = list(STAGES) if args.stages == "all" else [] if args.stages == "none" else args.stages.split(",")
    results = [stage_scenario(args.workdir, s) for s in stages]
    results += [random_scenario(args.workdir, seed) for seed in range(args.seeds)]
    for r in results:
        print(json.dumps(r), flush=True)
    failed = [r for r in results if r["problems"]]
    summary = {
        "summary": True, "scenarios": len(results), "kills": sum(bool(r.get("killed")) for r in results),
        "survived": len(results) - len(failed), "failed": [r["scenario"] for r in failed],
    }  # fmt: skip
    print(json.dumps(summary), flush=True)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
