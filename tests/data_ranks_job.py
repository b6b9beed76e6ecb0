"""A torchrun job whose ranks read their own shards through their own shuffled loaders, at different positions.

    torchrun --nproc-per-node 2 tests/data_ranks_job.py --save-dir D --experiment E [--run-id R]
             [--die-after-step K] [--reference EXPERIMENT]

Rank r reads every world_size-th sample, shuffled in its own order (its own seed), ``2 + r`` samples a step:
after any step the ranks are at different positions, with epochs of different lengths. Each rank appends its
batches' sample indices to ``log-<rank>`` in the working directory (``step i,j``); --die-after-step K SIGKILLs
every rank right after step K; --reference then runs the same job from scratch, never killed (``ref-log-<rank>``,
``ref-final.pt``). The loader goes in ``extra=`` as in a single process. DDP averages the gradients, so the final
weights depend on every rank's samples and dropout.
"""

from __future__ import annotations

import argparse
import os
import signal
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

from tracked_ckpt import CheckpointManager, EveryNSteps

SAMPLES, STEPS, SAVE_EVERY = 48, 20, 4
warnings.filterwarnings("ignore", "'set_vital' is deprecated")  # torchdata 0.11 on torch 2.13


def features(i: int) -> torch.Tensor:
    return torch.cos(torch.arange(6, dtype=torch.float32) * (i + 1))


class Shard(torch.utils.data.Dataset[tuple[int, torch.Tensor]]):
    def __init__(self, rank: int, world: int) -> None:
        self.indices = list(range(rank, SAMPLES, world))

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return self.indices[i], features(self.indices[i])


def endless(loader: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:  # epoch after epoch; a restored loader first finishes its interrupted epoch
        yield from loader


def train(save_dir: str, experiment: str, log: Path, out: str, run_id: str | None, die_after: int | None) -> None:
    """Train (or resume) to STEPS; every rank logs its samples to ``log`` with its rank appended."""
    from torchdata.stateful_dataloader import StatefulDataLoader

    rank, world = dist.get_rank(), dist.get_world_size()
    torch.manual_seed(0)  # the same initial weights on every rank
    model = DistributedDataParallel(
        torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    )
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    torch.manual_seed(100 + rank)  # each rank: its own shuffle order and dropout
    loader = StatefulDataLoader(Shard(rank, world), batch_size=2 + rank, shuffle=True)
    mgr = CheckpointManager(save_dir, experiment=experiment, run_id=run_id, save_policy=EveryNSteps(SAVE_EVERY))
    meta = mgr.load(model, opt, extra={"loader": loader})
    step = meta.get("step", 0)
    if rank == 0:
        print(f"run_id {mgr.run_id} resumed_at {step}", flush=True)
    with open(f"{log}-{rank}", "a") as f:
        for idx, x in endless(loader):
            if step == STEPS:
                break
            step += 1
            f.write(f"{step} {','.join(str(int(i)) for i in idx)}\n")
            f.flush()
            loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            if mgr.should_save(step):
                mgr.save(model, opt, {"step": step, "samples": step * (2 + 3)}, extra={"loader": loader})
            if step == die_after:
                os.kill(os.getpid(), signal.SIGKILL)
    if rank == 0:
        torch.save(model.module.state_dict(), out)
    mgr.close()


def main() -> None:
    p = argparse.ArgumentParser()
    for flag in ("--save-dir", "--experiment"):
        p.add_argument(flag, required=True)
    p.add_argument("--run-id", default=None)
    p.add_argument("--die-after-step", type=int, default=None)
    p.add_argument("--reference", default=None, help="then train an uninterrupted run in this experiment")
    args = p.parse_args()
    dist.init_process_group("gloo")
    train(args.save_dir, args.experiment, Path("log"), "final.pt", args.run_id, args.die_after_step)
    if args.reference:  # the same job from scratch, never killed, in a run of its own
        train("ref-ckpt", args.reference, Path("ref-log"), "ref-final.pt", None, None)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
