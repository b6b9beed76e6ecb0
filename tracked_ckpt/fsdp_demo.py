"""A short FSDP2 (or DDP) training script with checkpoints recorded in MLflow; resumable by run ID.

    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m tracked_ckpt.fsdp_demo --steps 40 --save-every 10
    OMP_NUM_THREADS=1 torchrun --nproc-per-node 2 -m tracked_ckpt.fsdp_demo --steps 80 --run-id <RUN_ID>  # 41-80

Rank 0 prints the run ID and whether it resumed. Relaunching with ``--run-id`` (or ``MLFLOW_RUN_ID``) resumes
from the latest checkpoint, at any world size; ``--steps`` counts from the start of the run, so a resume trains
further only with a larger one. Uses gloo on CPU and NCCL when CUDA is available. The test-only flags
(``--dump``, ``--dump-loaded``, ``--dump-saves``) let tests compare runs.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict
from torch.distributed.fsdp import fully_shard
from torch.nn.parallel import DistributedDataParallel

from . import CheckpointManager, EveryNSteps


def build(width: int, seed: int = 0) -> torch.nn.Module:
    torch.manual_seed(seed)  # the same initial weights on every rank
    return torch.nn.Sequential(
        torch.nn.Linear(width, 2 * width),
        torch.nn.ReLU(),
        torch.nn.Dropout(0.1),
        torch.nn.Linear(2 * width, width),
    )


def wrap(model: torch.nn.Module, mode: str, device: torch.device) -> torch.nn.Module:
    model.to(device)
    if mode == "ddp":
        return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)
    for layer in model.children():
        if isinstance(layer, torch.nn.Linear):
            fully_shard(layer)
    fully_shard(model)
    return model


def batch(step: int, rank: int, width: int, device: torch.device) -> torch.Tensor:
    g = torch.Generator().manual_seed(step * 1000 + rank)  # data depends on (step, rank) only: resumable
    return torch.randn(32, width, generator=g).to(device)


def full_state(model: torch.nn.Module, opt: torch.optim.Optimizer) -> dict[str, Any]:
    """Unsharded model and optimizer state (collective), for tests to compare runs."""
    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {"model": msd, "optimizer": osd}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--steps", type=int, default=40, help="train up to this step, counting the run's earlier steps")
    p.add_argument("--save-every", type=int, default=10)
    p.add_argument("--width", type=int, default=256, help="model width (256: ~1 MB of weights)")
    p.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--save-dir", default="./fsdp_demo_checkpoints")
    p.add_argument("--experiment", default=None)
    p.add_argument("--run-id", default=None, help="resume this MLflow run (default: MLFLOW_RUN_ID, else new)")
    p.add_argument("--async-save", action="store_true", help="write checkpoints while training goes on")
    p.add_argument("--dump", default=None, help="(tests) rank 0 writes the final full state here")
    p.add_argument("--dump-loaded", default=None, help="(tests) rank 0 writes the state right after load here")
    p.add_argument("--dump-saves", default=None, help="(tests) rank 0 writes the full state of each save here")
    a = p.parse_args(argv)

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    rank = dist.get_rank()
    device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0))) if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)
    model = wrap(build(a.width), a.mode, device)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=5, gamma=0.9)
    torch.manual_seed(1234 + rank)  # dropout differs per rank; checkpoints carry each rank's RNG
    mgr = CheckpointManager(
        a.save_dir,
        experiment=a.experiment,
        run_id=a.run_id,
        save_policy=EveryNSteps(a.save_every),
        monitor="loss",
        mode="min",
        async_save=a.async_save,
    )
    if rank == 0:
        print(f"run_id {mgr.run_id}", flush=True)
    meta = mgr.load(model, opt, scheduler=sched)
    step = int(meta.get("step", 0))
    if rank == 0:
        said = f"resumed run {mgr.run_id} from its checkpoint at step {step}" if meta else "no checkpoint: step 0"
        print(f"{said}; training to step {a.steps} on {dist.get_world_size()} rank(s), {a.mode}", flush=True)
    if a.dump_loaded:
        state = full_state(model, opt)
        if rank == 0:
            torch.save({"step": step, **state}, a.dump_loaded)
    in_flight_steps = 0
    while step < a.steps:
        step += 1
        loss = (model(batch(step, rank, a.width, device)) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        in_flight_steps += bool(getattr(mgr, "saving", False))  # a step trained while a save was in flight
        if mgr.should_save(step):
            mgr.save(model, opt, {"step": step, "loss": float(loss.detach())}, scheduler=sched)
            if a.dump_saves:
                state = full_state(model, opt)
                if rank == 0:
                    torch.save({"step": step, **state}, os.path.join(a.dump_saves, f"step-{step}.pt"))
    mgr.wait()
    if a.dump:
        state = full_state(model, opt)
        if rank == 0:
            torch.save({"step": step, **state}, a.dump)
    if rank == 0:
        print(json.dumps({"step": step, "in_flight_steps": in_flight_steps, "time": time.time()}), flush=True)
    mgr.close()
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
