"""Following a live run: seconds from "recorded" to "loaded in the follower", and the bytes a follower moves.

    python benchmarks/follow.py                       # 100 MB Adam state, 8 saves 3 s apart (~2 min)
    python benchmarks/follow.py --size 20MB --saves 5 --every 2
    python benchmarks/follow.py --server http://host:5000

A trainer process saves a model + Adam state every ``--every`` seconds through a loopback `mlflow server` and prints
when each checkpoint is recorded (after ``sync()``); this process follows the run with ``follow(weights_only=True)``
and loads each checkpoint into a model. Printed: the median lag recorded -> loaded, against the floor measured in the
same run (MLflow's ``download_artifacts`` of the same model.pt + ``torch.load`` + ``load_state_dict``, the work a
follower cannot avoid once it knows the checkpoint exists); then, through a byte-counting proxy
(tests/fault_proxy.py), the bytes one checkpoint costs a follower with and without ``weights_only``; last, what the
model.pt + state.pt layout costs a save on a local store next to the single state.pt written before.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

import torch  # noqa: E402
from fault_proxy import FaultProxy  # noqa: E402
from run import make_state, mlflow_server, parse_size  # noqa: E402

import tracked_ckpt  # noqa: E402

TRAINER = """
import os, sys, time
sys.path[:0] = [{root!r}, {bench!r}]
from run import make_state
from tracked_ckpt import CheckpointManager
model, opt = make_state({nbytes})
with CheckpointManager("ck", experiment="follow-bench", tracking_uri={url!r}) as mgr:
    print("RUN_ID", mgr.run_id, flush=True)
    while not os.path.exists("go"):
        time.sleep(0.05)
    for i in range(1, {saves} + 1):
        t0 = time.monotonic()
        mgr.save(model, opt, {{"step": i, "reward": float(i)}})
        mgr.sync()
        print("RECORDED", i, time.time(), flush=True)
        time.sleep(max(0.0, {every} - (time.monotonic() - t0)))
"""


@contextlib.contextmanager
def server(url: str | None, work: Path) -> Iterator[str]:
    if url:
        yield url
        return
    with mlflow_server(work) as started:
        yield started


def follow_live(url: str, work: Path, nbytes: int, saves: int, every: float) -> tuple[str, list[float]]:
    """(run ID, lag in seconds from recorded to loaded, per checkpoint)."""
    code = TRAINER.format(root=str(ROOT), bench=str(ROOT / "benchmarks"), nbytes=nbytes, url=url, saves=saves,
                          every=every)  # fmt: skip
    (work / "train").mkdir()
    trainer = subprocess.Popen([sys.executable, "-c", code], cwd=work / "train", stdout=subprocess.PIPE, text=True)
    assert trainer.stdout is not None
    run_id = trainer.stdout.readline().split()[1]
    model, _ = make_state(nbytes)
    loaded: dict[int, float] = {}
    (work / "train" / "go").touch()
    for ckpt in tracked_ckpt.follow(run_id, weights_only=True, tracking_uri=url, cache_dir=work / "cache"):
        ckpt.load(model)
        loaded[ckpt.step] = time.time()
    out, _ = trainer.communicate(timeout=600)
    recorded = {int(s): float(t) for s, t in (line.split()[1:] for line in out.splitlines() if line.startswith("REC"))}
    return run_id, [loaded[s] - recorded[s] for s in sorted(recorded) if s in loaded]


def floor(url: str, run_id: str, nbytes: int, work: Path) -> list[float]:
    """download_artifacts(model.pt) + torch.load + load_state_dict, per checkpoint of the run."""
    from mlflow.tracking import MlflowClient

    client = MlflowClient(url)
    model, _ = make_state(nbytes)
    times = []
    for i, entry in enumerate(client.list_artifacts(run_id, "checkpoints")):
        t0 = time.perf_counter()
        with contextlib.redirect_stderr(io.StringIO()):  # MLflow's progress bar
            local = client.download_artifacts(run_id, f"{entry.path}/model.pt", str(work / f"floor-{i}"))
        model.load_state_dict(torch.load(local, map_location="cpu", weights_only=True)["model"])
        times.append(time.perf_counter() - t0)
    return times


def bytes_moved(url: str, run_id: str, saves: int) -> dict[bool, float]:
    """Bytes per checkpoint a follower receives, weights only and whole."""
    proxy = FaultProxy(url)
    moved = {}
    try:
        for weights_only in (True, False):
            before = proxy.down
            for _ in tracked_ckpt.follow(run_id, weights_only=weights_only, tracking_uri=proxy.url):
                pass
            moved[weights_only] = (proxy.down - before) / saves
    finally:
        proxy.close()
    return moved


def layout_cost(work: Path, nbytes: int, repeats: int) -> dict[str, float]:
    """Median seconds of save() on a local store: model.pt + state.pt (now) vs everything in state.pt (before)."""
    from tracked_ckpt import CheckpointManager
    from tracked_ckpt.formats import torch_file
    from tracked_ckpt.state import STATE_FILE, split_files

    model, opt = make_state(nbytes)
    uri = f"sqlite:///{work / 'layout.db'}"
    times: dict[str, list[float]] = {"split": [], "one file": []}
    with CheckpointManager(work / "layout", experiment="layout", tracking_uri=uri) as mgr:
        for i in range(2 * repeats):
            name = "split" if i % 2 else "one file"  # alternated: the machine's drift hits both alike
            one_file = lambda p: [(STATE_FILE, dict(p))]  # noqa: E731 - what 0.2 wrote
            torch_file.split_files = split_files if name == "split" else one_file  # type: ignore[assignment]
            t0 = time.perf_counter()
            mgr.save(model, opt, {"step": i})
            times[name].append(time.perf_counter() - t0)
    torch_file.split_files = split_files  # type: ignore[assignment]
    return {k: statistics.median(v) for k, v in times.items()}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="100MB", help="model + Adam state")
    p.add_argument("--saves", type=int, default=8)
    p.add_argument("--every", type=float, default=3.0, help="seconds between saves")
    p.add_argument("--repeats", type=int, default=5, help="saves per layout for the layout cost")
    p.add_argument("--server", default=None, help="a running `mlflow server` (default: start one on loopback)")
    a = p.parse_args(argv)
    nbytes = parse_size(a.size)
    os.environ.pop("MLFLOW_TRACKING_URI", None)
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-follow-") as tmp, server(a.server, Path(tmp)) as url:
        work = Path(tmp)
        run_id, lag = follow_live(url, work, nbytes, a.saves, a.every)
        base = floor(url, run_id, nbytes, work)
        moved = bytes_moved(url, run_id, a.saves)
        layout = layout_cost(work, nbytes, a.repeats)
    med, fl = statistics.median(lag), statistics.median(base)
    print(f"state {a.size} (model + Adam), {a.saves} saves {a.every:g} s apart, follower polling every 1-2 s")
    print(f"recorded -> loaded (follow, weights_only): median {med:.2f} s (min {min(lag):.2f}, max {max(lag):.2f}) "
          f"over {len(lag)}; floor (download_artifacts model.pt + torch.load + load_state_dict): {fl:.2f} s; "
          f"ratio {med / fl:.2f}x  (target: median <= 2 s {'met' if med <= 2 else 'MISSED'})")  # fmt: skip
    share = moved[True] / moved[False]
    print(f"bytes per checkpoint: weights only {moved[True] / 1e6:.1f} MB, whole {moved[False] / 1e6:.1f} MB, "
          f"{share:.0%}  (target <= 40% {'met' if share <= 0.4 else 'MISSED'})")
    split, one = layout["split"], layout["one file"]
    print(f"save() on a local store, median of {a.repeats}: model.pt + state.pt {split:.3f} s, "
          f"everything in state.pt (before) {one:.3f} s, ratio {split / one:.2f}x")


if __name__ == "__main__":
    main()
