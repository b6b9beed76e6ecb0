"""A tiny Accelerate job for tests/test_accelerate.py: an MLP, AdamW, a scheduler, synthetic batches per step.

    python accelerate_job.py OUT_WEIGHTS [--kill-at STEP] [--resume RUN_ID] [--tracked]

Saves every 5 steps with ProjectConfiguration(total_limit=2); prints ``RUN_ID <id>``; ``--kill-at`` SIGKILLs
the process after that step.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys

import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from tracked_ckpt.frameworks.accelerate import TrackedState, load_state

STEPS, EVERY = 20, 5


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_weights")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume")
    p.add_argument("--tracked", action="store_true")
    a = p.parse_args()
    torch.manual_seed(0)
    config = ProjectConfiguration(project_dir=".", automatic_checkpoint_naming=True, total_limit=2)
    accelerator = Accelerator(cpu=True, project_config=config)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Dropout(0.1), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=4, gamma=0.7)
    model, opt, sched = accelerator.prepare(model, opt, sched)
    tracked = TrackedState(accelerator, run_id=a.resume, monitor="loss", mode="min") if a.tracked or a.resume else None
    if tracked is not None:
        print("RUN_ID", tracked.run_id, flush=True)
    start = load_state(accelerator, a.resume)["step"] if a.resume else 0
    for step in range(start + 1, STEPS + 1):
        x = torch.randn(16, 8)  # from the global RNG, which Accelerate's save_state/load_state carry
        loss = torch.nn.functional.mse_loss(model(x), x.sum(dim=1, keepdim=True))
        opt.zero_grad()
        accelerator.backward(loss)
        opt.step()
        sched.step()
        if tracked is not None and step % EVERY == 0:
            tracked.save_state(metadata={"step": step, "loss": float(loss)})
        if step == a.kill_at:
            if tracked is not None and tracked.manager is not None:
                tracked.manager.wait()  # the saves so far are committed (their fsync and hash run in the background)
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)
    if tracked is not None:
        tracked.close()
    print("FINAL_STEP", step, flush=True)
    torch.save(accelerator.unwrap_model(model).state_dict(), a.out_weights)


if __name__ == "__main__":
    main()
