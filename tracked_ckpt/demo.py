"""The main job: REINFORCE on a pure-torch cart-pole, checkpointed into MLflow, resumable.

Each launch trains ``--iterations`` more policy-gradient iterations, continuing the same MLflow run from
its latest checkpoint when there is one::

    python -m tracked_ckpt.demo          # first launch: a new run (or: tracked-ckpt demo, the same)
    python -m tracked_ckpt.demo          # second launch: resumes that run where it stopped
    mlflow ui                            # browse it (http://127.0.0.1:5000)

It prints one INFO line per save, restore and deletion (step, size, seconds) on stderr.
"""

from __future__ import annotations

import argparse
import logging
import math
import sys
import time

import torch

from . import CheckpointManager, EveryNSteps, KeepBest, KeepLast
from .runs import ui_link

# Classic cart-pole (Barto, Sutton & Anderson 1983), the constants gym uses.
GRAVITY, CART_MASS, POLE_MASS, HALF_POLE, FORCE, DT = 9.8, 1.0, 0.1, 0.5, 10.0, 0.02
TOTAL_MASS, POLE_MOMENT = CART_MASS + POLE_MASS, POLE_MASS * HALF_POLE
MAX_STEPS, X_LIMIT, THETA_LIMIT = 200, 2.4, 12 * 2 * math.pi / 360


def cartpole_step(s: torch.Tensor, action: torch.Tensor) -> torch.Tensor:
    """One Euler step for a batch of states (x, x_dot, theta, theta_dot) and actions in {0, 1}."""
    x, x_dot, theta, theta_dot = s.unbind(-1)
    force = (action.float() * 2 - 1) * FORCE
    cos, sin = torch.cos(theta), torch.sin(theta)
    temp = (force + POLE_MOMENT * theta_dot**2 * sin) / TOTAL_MASS
    theta_acc = (GRAVITY * sin - cos * temp) / (HALF_POLE * (4.0 / 3.0 - POLE_MASS * cos**2 / TOTAL_MASS))
    x_acc = temp - POLE_MOMENT * theta_acc * cos / TOTAL_MASS
    return torch.stack([x + DT * x_dot, x_dot + DT * x_acc, theta + DT * theta_dot, theta_dot + DT * theta_acc], -1)


class Policy(torch.nn.Module):
    def __init__(self, hidden: int = 32) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(4, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 2))

    def forward(self, s: torch.Tensor) -> torch.distributions.Categorical:
        return torch.distributions.Categorical(logits=self.net(s))


def rollout(policy: Policy, episodes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Play a batch of episodes; return (sum of log-probs weighted by reward-to-go, episode lengths)."""
    s = (torch.rand(episodes, 4) - 0.5) * 0.1
    alive = torch.ones(episodes, dtype=torch.bool)
    logps, masks = [], []
    for _ in range(MAX_STEPS):
        dist = policy(s)
        a = dist.sample()
        logps.append(dist.log_prob(a))
        masks.append(alive.float())
        s = cartpole_step(s, a)
        alive = alive & (s[:, 0].abs() < X_LIMIT) & (s[:, 2].abs() < THETA_LIMIT)
        if not alive.any():
            break
    mask = torch.stack(masks, 1)
    lengths = mask.sum(1)
    to_go = mask.flip(1).cumsum(1).flip(1)  # reward-to-go: +1 per step still alive
    advantage = (to_go - to_go.mean()) / (to_go.std() + 1e-8)
    objective = (torch.stack(logps, 1) * advantage * mask).sum(1).mean()
    return objective, lengths


def show_log_lines() -> None:
    """The demo's own output, the same from both entry points: tracked_ckpt's INFO lines on stderr, with the time.

    `tracked-ckpt` has configured logging already (warnings only, for its reading commands), which would make
    ``logging.basicConfig`` a no-op; so the demo gives the library's logger a handler of its own.
    """
    lib = logging.getLogger("tracked_ckpt")
    if not any(getattr(h, "_tracked_ckpt_demo", False) for h in lib.handlers):
        handler = logging.StreamHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s", "%H:%M:%S"))
        handler._tracked_ckpt_demo = True  # type: ignore[attr-defined]
        lib.addHandler(handler)
        lib.propagate = False
    lib.setLevel(min(logging.INFO, lib.getEffectiveLevel()))  # `tracked-ckpt -vv demo` keeps its DEBUG lines


def main(argv: list[str] | None = None, prog: str = "python -m tracked_ckpt.demo") -> int:
    p = argparse.ArgumentParser(prog=prog, description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--iterations", type=int, default=40, help="iterations to train in this launch (default 40)")
    p.add_argument("--episodes", type=int, default=16, help="episodes per iteration (default 16)")
    p.add_argument("--save-every", type=int, default=5, help="save a checkpoint every N iterations (default 5)")
    p.add_argument("--save-dir", default="./training_checkpoints", help="local copies (default ./training_checkpoints)")
    p.add_argument("--experiment", default="tracked-ckpt-demo", help="MLflow experiment (default tracked-ckpt-demo)")
    p.add_argument("--run-id", default=None, help="resume this MLflow run (default: this save_dir's run)")
    p.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI or sqlite:///mlflow.db")
    p.add_argument("--seed", type=int, default=0, help="torch seed of a new run (default 0)")
    p.add_argument("--fork-from", default=None, metavar="REF", help="fork: a new run from this checkpoint (RUN_ID@10)")
    args = p.parse_args(argv)
    show_log_lines()
    logging.getLogger("mlflow").setLevel(logging.WARNING)

    torch.manual_seed(args.seed)
    torch.set_num_threads(1)
    policy = Policy()
    optimizer = torch.optim.Adam(policy.parameters(), lr=0.02)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=50, gamma=0.7)
    t0 = time.perf_counter()
    with CheckpointManager(
        args.save_dir,
        experiment=args.experiment,
        run_id=args.run_id,
        tracking_uri=args.tracking_uri,
        run_name="cartpole-reinforce",
        save_policy=EveryNSteps(args.save_every),
        retention=KeepLast(3) | KeepBest(1),
        monitor="reward",
        mode="max",
        fork_from=args.fork_from,
    ) as mgr:
        meta = mgr.load(policy, optimizer, scheduler=scheduler)
        start = int(meta.get("step", 0))
        forked = not mgr.get_latest_checkpoint() and args.fork_from is not None
        said = f"resumed run {mgr.run_id} at iteration {start}" if meta else f"new run {mgr.run_id}"
        print(f"new run {mgr.run_id}, forked from {args.fork_from} at iteration {start}" if forked else said)
        reward = float(meta.get("reward", 0.0))
        for step in range(start + 1, start + args.iterations + 1):
            objective, lengths = rollout(policy, args.episodes)
            optimizer.zero_grad()
            (-objective).backward()  # type: ignore[no-untyped-call]
            optimizer.step()
            scheduler.step()
            reward = float(lengths.mean())
            if mgr.should_save(step):
                mgr.save(
                    policy,
                    optimizer,
                    {"step": step, "epoch": step // 10, "reward": reward, "loss": float(-objective.detach())},
                    scheduler=scheduler,
                )
        elapsed = time.perf_counter() - t0
        print(
            f"\ntrained iterations {start + 1}..{start + args.iterations} in {elapsed:.1f} s; "
            f"mean episode length (reward) {reward:.1f} of {MAX_STEPS}"
        )
        print(f"latest checkpoint: {mgr.get_latest_checkpoint()}\nbest checkpoint:   {mgr.get_best_checkpoint()}")
        print(
            mgr.checkpoints()[["step", "epoch", "reward", "size_bytes", "is_latest", "is_best"]].to_string(index=False)
        )
        print("\nRun this command again to resume the same run from its latest checkpoint.")
        print(f"Browse it:  mlflow ui --backend-store-uri {mgr.client.tracking_uri}   then open")
        print(f"            {ui_link('http://127.0.0.1:5000', mgr.store.experiment_id, mgr.run_id)}")
        print(f"From the shell:  tracked-ckpt ls {mgr.run_id}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
