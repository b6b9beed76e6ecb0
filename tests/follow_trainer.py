"""A trainer for the follow tests, run as a real process: saves a checkpoint every ``--every`` seconds.

    python tests/follow_trainer.py --experiment E --saves N --every S [--wait-for FILE]

Prints ``RUN_ID <id>`` first, then ``RECORDED <step> <unix time>`` once each checkpoint is recorded in MLflow.
"""

from __future__ import annotations

import argparse
import os
import time

import torch

from tracked_ckpt import CheckpointManager


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--experiment", required=True)
    p.add_argument("--saves", type=int, default=10)
    p.add_argument("--every", type=float, default=1.5)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--wait-for", default=None, help="start training once this file exists (followers are ready)")
    args = p.parse_args()
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(args.width, args.width), torch.nn.Linear(args.width, 4))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    with CheckpointManager("ck", experiment=args.experiment) as mgr:
        print("RUN_ID", mgr.run_id, flush=True)
        while args.wait_for and not os.path.exists(args.wait_for):
            time.sleep(0.05)
        for i in range(1, args.saves + 1):
            t0 = time.monotonic()
            loss = model(torch.randn(8, args.width)).pow(2).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            step = 10 * i
            mgr.save(model, opt, {"step": step, "reward": float(i)})
            mgr.sync()
            print("RECORDED", step, time.time(), flush=True)
            time.sleep(max(0.0, args.every - (time.monotonic() - t0)))


if __name__ == "__main__":
    main()
