"""A small training job for resume tests, run as a real separate process.

    python tests/resume_job.py --save-dir D --experiment E --out final.pt [--die-after-step K]

Data, dropout and an extra Python/NumPy noise term all draw from RNG, so a bitwise-equal result after a
mid-epoch kill proves that model, optimizer, scheduler and every RNG were restored.
"""

from __future__ import annotations

import argparse
import os
import random

import numpy as np
import torch

from tracked_ckpt import CheckpointManager, EveryNSteps

EPOCHS, BATCHES_PER_EPOCH = 2, 6


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--save-dir", required=True)
    p.add_argument("--experiment", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--die-after-step", type=int, default=None)
    p.add_argument("--save-every", type=int, default=4)
    args = p.parse_args()

    torch.manual_seed(1234)
    random.seed(1234)
    np.random.seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    total = EPOCHS * BATCHES_PER_EPOCH
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=0.05, total_steps=total)
    mgr = CheckpointManager(args.save_dir, experiment=args.experiment, save_policy=EveryNSteps(args.save_every))
    meta = mgr.load(model, opt, scheduler=sched)
    step = meta.get("step", 0)
    print(f"run_id={mgr.run_id} resumed_at={step}", flush=True)
    while step < total:
        step += 1
        x = torch.randn(32, 6)
        y = x.sum(1, keepdim=True) + random.gauss(0, 0.1) + float(np.random.normal(0, 0.1))
        loss = (model(x) - y).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
        if mgr.should_save(step):
            epoch = (step - 1) // BATCHES_PER_EPOCH
            mgr.save(model, opt, {"step": step, "epoch": epoch, "loss": loss}, scheduler=sched)
        if step == args.die_after_step:
            os._exit(17)  # an abrupt death: no close(), no atexit, mid-epoch
    torch.save({"model": model.state_dict(), "opt": opt.state_dict()}, args.out)
    mgr.close()


if __name__ == "__main__":
    main()
