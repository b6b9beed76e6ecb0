"""How long the read commands take, next to MLflow's own CLI on the same store (a fresh process each time).

    python benchmarks/cli.py                 # a fresh sqlite store with 3 runs of 5 checkpoints, 7 rounds
    python benchmarks/cli.py --rounds 3

Each round runs, in turn, ``mlflow runs list --experiment-id N`` and ``tracked-ckpt ls RUN``, ``show RUN``,
``runs --experiment NAME`` (as ``python -m``, so both pay the same interpreter start); round-robin, so a burst of
load on this shared machine hits every command alike. Prints medians and the ratio of each to MLflow's (target
≤ 1.1x), and whether each command imported torch (``python -X importtime``; none should).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_store(folder: Path, env: dict[str, str]) -> tuple[str, str, str]:
    """(experiment name, experiment id, a run id) of a store with 3 runs of 5 small checkpoints."""
    code = (
        "import torch, mlflow\nfrom tracked_ckpt import CheckpointManager\nm = torch.nn.Linear(64, 64)\n"
        "for r in range(3):\n"
        "    with CheckpointManager(f'ck{r}', experiment='cli-bench', resume='never') as mgr:\n"
        "        for s in range(1, 6):\n"
        "            mgr.save(m, metadata={'step': s * 10, 'reward': float(s)})\n"
        "print(mgr.run_id, mlflow.get_experiment_by_name('cli-bench').experiment_id)\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=folder, env=env, capture_output=True, text=True,
                         check=True).stdout.split()  # fmt: skip
    return "cli-bench", out[-1], out[-2]


def timed(cmd: list[str], cwd: Path, env: dict[str, str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, check=True)
    return time.perf_counter() - t0


def imports_torch(cmd: list[str], cwd: Path, env: dict[str, str]) -> bool:
    p = subprocess.run([cmd[0], "-X", "importtime", *cmd[1:]], cwd=cwd, env=env, capture_output=True, text=True)
    return any(line.rpartition("|")[2].strip() == "torch" for line in p.stderr.splitlines())


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-cli-bench-") as tmp:
        folder = Path(tmp)
        env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{folder}/mlflow.db",
               "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}  # fmt: skip
        name, exp_id, run_id = make_store(folder, env)
        py = [sys.executable, "-m"]
        commands = {
            "mlflow runs list --experiment-id N": [*py, "mlflow", "runs", "list", "--experiment-id", exp_id],
            "tracked-ckpt ls RUN": [*py, "tracked_ckpt", "ls", run_id],
            "tracked-ckpt show RUN": [*py, "tracked_ckpt", "show", run_id],
            "tracked-ckpt runs --experiment NAME": [*py, "tracked_ckpt", "runs", "--experiment", name],
        }
        times: dict[str, list[float]] = {k: [] for k in commands}
        for cmd in commands.values():  # warm the page cache and sqlite once
            timed(cmd, folder, env)
        for _ in range(a.rounds):
            for label, cmd in commands.items():
                times[label].append(timed(cmd, folder, env))
        torch_loaded = {label: imports_torch(cmd, folder, env) for label, cmd in commands.items()}
    medians = {label: statistics.median(t) for label, t in times.items()}
    base = medians["mlflow runs list --experiment-id N"]
    print(f"\n| command ({a.rounds} rounds) | median | ratio to `mlflow runs list` (target ≤ 1.1x) | imports torch |")
    print("|---|---|---|---|")
    for label, m in medians.items():
        print(f"| `{label}` | {m * 1000:.0f} ms | {m / base:.2f}x | {'yes' if torch_loaded[label] else 'no'} |")
    return medians


if __name__ == "__main__":
    main()
