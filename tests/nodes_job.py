"""The training job that tests/nodes.py starts on every node: FSDP2 (or DDP) on CPU/gloo, a checkpoint every N steps.

Under torchrun it trains a sharded model; started as a plain process (no ``RANK``) it is the world-size-1 resume
of the same model. What it saw is printed as one ``NODES {json}`` line per event, for the harness to read live:

- ``open_failed``: the error ``CheckpointManager(...)`` raised and the seconds it took to raise it;
- ``start``: rank, world size, host name, resolved save_dir, run ID (after the manager opened the run);
- ``loaded``: the step resumed from (0: none), seconds from process start, hash of the full model + optimizer state;
- ``saving``: step and the hash of the full state about to be saved (``--hash-saves``), before ``save()``;
- ``save``: step, seconds ``save()`` blocked, the same hash, and the error ``save()`` raised, or None (the job then
  re-raises it: a loop written as the docs show dies there);
- ``end``: last step, hash of the full state, the entries left in this rank's node outbox.

The run: ``--run-id`` or ``MLFLOW_RUN_ID`` (what a scheduler relaunch passes); the server: ``MLFLOW_TRACKING_URI``
(each node's own proxy).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import socket
import sys
import time
from typing import Any

import torch

STARTED = time.monotonic()


def say(event: str, **fields: Any) -> None:
    print("NODES " + json.dumps({"event": event, "t": time.time(), **fields}), flush=True)


def build(width: int) -> torch.nn.Module:
    torch.manual_seed(0)  # the same initial weights on every rank
    return torch.nn.Sequential(torch.nn.Linear(width, 2 * width), torch.nn.ReLU(), torch.nn.Linear(2 * width, width))


def digest(obj: Any, h: Any) -> None:
    """Feed a nested state dict into ``h`` in a fixed order (keys sorted; tensors by dtype, shape and bytes)."""
    if isinstance(obj, torch.Tensor):
        t = obj.detach().cpu().contiguous()
        h.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    elif isinstance(obj, dict):
        for k in sorted(obj, key=str):
            h.update(f"K{k}".encode())
            digest(obj[k], h)
    elif isinstance(obj, list | tuple):
        h.update(f"L{len(obj)}".encode())
        for x in obj:
            digest(x, h)
    else:
        h.update(f"V{obj!r}".encode())


def state_hash(model: torch.nn.Module, opt: torch.optim.Optimizer, rank: int) -> str | None:
    """sha256 of the full (unsharded) model and optimizer state on rank 0 (a collective under torchrun)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    msd, osd = get_state_dict(model, opt, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if rank != 0:
        return None  # the full state is gathered on rank 0 only
    h = hashlib.sha256()
    digest({"model": msd, "optimizer": osd}, h)
    return h.hexdigest()[:16]


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--steps", type=int, default=10**6, help="train up to this step (default: until killed)")
    p.add_argument("--save-every", type=int, default=2)
    p.add_argument("--width", type=int, default=256)
    p.add_argument("--mode", choices=["fsdp", "ddp"], default="fsdp")
    p.add_argument("--save-dir", default="ckpt")
    p.add_argument("--experiment", default=None)
    p.add_argument("--run-id", default=None)
    p.add_argument("--publish-timeout", type=float, default=30.0)
    p.add_argument("--lease-timeout", type=float, default=60.0)
    p.add_argument("--step-sleep", type=float, default=0.0, help="seconds per step beside the compute")
    p.add_argument("--hash-saves", action="store_true")
    p.add_argument("--sigterm", action="store_true", help="save_on_sigterm=True")
    a = p.parse_args()

    import torch.distributed as dist

    from tracked_ckpt import CheckpointManager, EveryNSteps

    ranked = "RANK" in os.environ
    if ranked:
        dist.init_process_group("gloo")
    rank, world = (dist.get_rank(), dist.get_world_size()) if ranked else (0, 1)
    model = build(a.width)
    if ranked and a.mode == "ddp":
        from torch.nn.parallel import DistributedDataParallel

        model = DistributedDataParallel(model)
    elif ranked:
        from torch.distributed.fsdp import fully_shard

        for layer in model.children():
            if isinstance(layer, torch.nn.Linear):
                fully_shard(layer)
        fully_shard(model)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    t_open = time.monotonic()
    try:
        mgr = CheckpointManager(a.save_dir, experiment=a.experiment, run_id=a.run_id, monitor="loss", mode="min",
                                save_policy=EveryNSteps(a.save_every), publish_timeout=a.publish_timeout,
                                lease_timeout=a.lease_timeout, save_on_sigterm=a.sigterm)  # fmt: skip
    except Exception as e:  # e.g. RunLockedError: said with the seconds it took, then re-raised
        say("open_failed", rank=rank, seconds=time.monotonic() - t_open, error=f"{type(e).__name__}: {e}")
        raise
    say("start", rank=rank, world=world, host=socket.gethostname(), save_dir=str(mgr.save_dir), run_id=mgr.run_id,
        pid=os.getpid())  # fmt: skip
    meta = mgr.load(model, opt)
    step = int(meta.get("step", 0))
    say("loaded", rank=rank, step=step, seconds=time.monotonic() - STARTED, hash=state_hash(model, opt, rank))
    while step < a.steps:
        step += 1
        g = torch.Generator().manual_seed(step * 1000 + rank)  # data depends on (step, rank) only: resumable
        x = torch.randn(16, a.width, generator=g)
        loss = (model(x) - 1.0).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        time.sleep(a.step_sleep)
        if mgr.should_save(step):
            saved_hash = state_hash(model, opt, rank) if a.hash_saves else None
            say("saving", rank=rank, step=step, hash=saved_hash)  # before save(): a kill may come before it returns
            t0 = time.monotonic()
            try:
                mgr.save(model, opt, {"step": step, "loss": float(loss.detach())})
            except BaseException as e:  # SystemExit(143) after a SIGTERM save included: said, then re-raised
                say("save", rank=rank, step=step, blocked=time.monotonic() - t0, hash=saved_hash,
                    error=f"{type(e).__name__}: {e}")  # fmt: skip
                raise
            say("save", rank=rank, step=step, blocked=time.monotonic() - t0, hash=saved_hash, error=None)
    mgr.wait()
    final = state_hash(model, opt, rank)
    mgr.close()
    from tracked_ckpt.outbox import Outbox

    say("end", rank=rank, step=step, hash=final, outbox=len(Outbox(mgr.save_dir).pending(mgr.run_id)))
    if ranked:
        dist.destroy_process_group()


if __name__ == "__main__":
    sys.exit(main())
