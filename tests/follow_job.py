"""A follower for the follow tests, run as a real process in an empty folder.

    python tests/follow_job.py RUN_ID --mode eval|latest [--slow S] [--cache DIR] [--wait-for FILE]

``eval``: every checkpoint, weights only, resumed after the last step scored (``eval/score`` = 2 * step).
``latest``: the newest each time, ``--slow`` seconds per checkpoint (an inference server swapping weights).
Prints ``READY`` once imported, ``LOADED <step> <unix time>`` once the weights are in the model, ``SCORED <step>``
after log_eval.
"""

from __future__ import annotations

import argparse
import logging
import os
import time

import torch

import tracked_ckpt


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("run")
    p.add_argument("--mode", choices=["eval", "latest"], default="eval")
    p.add_argument("--slow", type=float, default=0.0)
    p.add_argument("--cache", default=None)
    p.add_argument("--width", type=int, default=64)
    p.add_argument("--wait-for", default=None, help="start following once this file exists")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(name)s %(levelname)s %(message)s")
    model = torch.nn.Sequential(torch.nn.Linear(args.width, args.width), torch.nn.Linear(args.width, 4))
    latest = args.mode == "latest"
    resume = None if latest else "eval/score"
    from tracked_ckpt import following, loading  # noqa: F401
    from tracked_ckpt.store import http, transfer  # noqa: F401 - imported before READY, not timed

    http.install()
    print("READY", flush=True)  # imports done (seconds on a busy machine): what follows is the following itself
    while args.wait_for and not os.path.exists(args.wait_for):
        time.sleep(0.05)
    for ckpt in tracked_ckpt.follow(args.run, latest_only=latest, resume=resume, weights_only=True,
                                    cache_dir=args.cache, timeout=240):  # fmt: skip
        ckpt.load(model)
        print("LOADED", ckpt.step, time.time(), flush=True)
        time.sleep(args.slow)
        if not latest:
            ckpt.log_eval({"eval/score": 2.0 * ckpt.step})
            print("SCORED", ckpt.step, flush=True)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
