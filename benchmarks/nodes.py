"""Many nodes, node-local disks: what an outage and a resume cost each node of a two-node torchrun job.

    python benchmarks/nodes.py                        # width 1024 (~50 MB checkpoint), 3 repeats (~10 min)
    python benchmarks/nodes.py --width 512 --repeats 1

Two torchrun agents stand in for two nodes (tests/nodes.py: own working directory and save_dir, own host name
through ``unshare --uts`` where allowed, own TCP proxy to one loopback ``mlflow server``; gloo on CPU). Each repeat:

1. the job (tests/nodes_job.py, FSDP2) saves every step; three saves with the server up are the baseline; then
   both proxies refuse (the server gone, as the clients see it) for ``--outage-saves`` saves; then they pass
   again and the seconds until every node's outbox is empty are timed from outside (no save, no sync needed);
   then every node is SIGKILLed;
2. the job is relaunched on two fresh nodes (empty directories, ``MLFLOW_RUN_ID``) and only loads: each node's
   proxy counts the bytes it downloads, divided by that node's share of the checkpoint (its ranks' shards and
   RNG files, the DCP metadata and the manifest);
3. the same again on the same two nodes: what a relaunch on a node that already holds the checkpoint downloads.

Printed: medians over repeats (and over nodes) of the ratios docs/performance.md tracks — bytes per node on resume
÷ its share (target <= 1.1x at the same world size, ~0 on the same node), a save during an outage ÷ a save with the
server up (target <= 1.1x after the first), server back -> every node's queue empty (target <= 10 s). A save that
raises ends that repeat's outage part; it is printed, as is any phase that failed.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from nodes import Launch, Node, launch, make_nodes, uts_namespaces, wait_until  # noqa: E402
from run import mlflow_server  # noqa: E402


def recorded(url: str, run_id: str) -> list[Any]:
    from mlflow.tracking import MlflowClient

    from tracked_ckpt.catalog import RunCatalog
    from tracked_ckpt.store.run_store import RunStore

    return RunCatalog(RunStore(MlflowClient(url), run_id)).scan()


def share(files: dict[str, int], ranks: list[int]) -> int:
    mine = {f"__{r}_0.distcp" for r in ranks} | {f"rng-{r}.json" for r in ranks} | {".metadata"}
    return sum(size for name, size in files.items() if name in mine) + 4096  # + MANIFEST.json


def outage(url: str, nodes: list[Node], args: list[str], saves: int) -> tuple[dict[str, float], str]:
    """Phase 1; returns the timings and the run ID (every node SIGKILLed at the end)."""
    job = launch(nodes, *args, "--save-every", "1", "--experiment", "nodes-bench")
    out: dict[str, float] = {}
    try:
        job.wait_for(lambda e: e["event"] == "save" and e["rank"] == 0 and e["step"] >= 3, 300, "3 saves")
        run_id = job.of("start", rank=0)[0]["run_id"]
        out["up"] = statistics.median(e["blocked"] for e in job.of("save", rank=0)[1:3])
        last = job.of("save", rank=0)[-1]["step"]
        for n in nodes:
            n.proxy.set_mode("refuse")
        try:
            job.wait_for(lambda e: e["event"] == "save" and e["rank"] == 0 and e["step"] >= last + saves, 300,
                         f"{saves} saves during the outage")  # fmt: skip
        except AssertionError:
            errors = [e["error"] for e in job.of("save") if e["error"]]
            print(f"  outage: no {saves} saves ({errors[0] if errors else 'no error printed'})", flush=True)
            return out, run_id
        finally:
            for n in nodes:
                n.proxy.set_mode("pass")
        back = time.perf_counter()
        during = [e["blocked"] for e in job.of("save", rank=0) if e["step"] > last]
        out["first"], out["later"] = during[0], statistics.median(during[1:])
        wait_until(lambda: all(n.pending(run_id) == 0 for n in nodes), 120, step=0.05)
        out["drain"] = time.perf_counter() - back
        return out, run_id
    finally:
        job.kill_all()


def resume_bytes(url: str, nodes: list[Node], args: list[str], run_id: str) -> list[float]:
    """One relaunch that only loads; each node's downloaded bytes ÷ its share."""
    files = {f.name: f.size for f in recorded(url, run_id)[-1].manifest.files}
    for n in nodes:
        n.proxy.up = n.proxy.down = 0
    job: Launch = launch(nodes, *args, "--steps", "0", env={"MLFLOW_RUN_ID": run_id})
    try:
        loaded = [job.wait_for(lambda e, r=r: e["event"] == "loaded" and e["rank"] == r, 300, "loaded")
                  for r in (0, 1)]  # fmt: skip
        job.wait(120)
    finally:
        job.kill_all()
    return [e["down"] / share(files, [e["rank"]]) for e in loaded]


def repeat(url: str, work: Path, args: list[str], saves: int) -> dict[str, Any]:
    first = make_nodes(work / "first", url, ["node-a", "node-b"])
    fresh = make_nodes(work / "fresh", url, ["node-c", "node-d"])
    try:
        row: dict[str, Any] = {}
        timings, run_id = outage(url, first, args, saves)
        row.update(timings)
        row["fresh"] = resume_bytes(url, fresh, args, run_id)
        row["same"] = resume_bytes(url, fresh, args, run_id)
        return row
    finally:
        for n in first + fresh:
            n.proxy.close()


def median(rows: list[dict[str, Any]], key: str) -> float | None:
    values = [v for r in rows if key in r for v in (r[key] if isinstance(r[key], list) else [r[key]])]
    return statistics.median(values) if values else None


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--width", type=int, default=1024, help="model width (1024: ~50 MB of model + AdamW state)")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--outage-saves", type=int, default=4)
    p.add_argument("--publish-timeout", type=float, default=10.0)
    a = p.parse_args(argv)
    for name in ("MAX_RETRIES", "TIMEOUT", "BACKOFF_FACTOR"):
        os.environ.pop(f"MLFLOW_HTTP_REQUEST_{name}", None)  # MLflow's defaults, as users have them
    # lease_timeout=5: the relaunch here measures bytes, not the lease; startup alone outlasts a 5 s lease.
    args = ["--width", str(a.width), "--step-sleep", "0.2", "--publish-timeout", str(a.publish_timeout),
            "--lease-timeout", "5"]  # fmt: skip
    print(f"2 nodes x 1 rank, FSDP2 width {a.width}, {a.repeats} repeats, distinct host names: {uts_namespaces()}",
          flush=True)  # fmt: skip
    rows = []
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-nodes-") as tmp, mlflow_server(Path(tmp)) as url:
        for i in range(a.repeats):
            work = Path(tmp) / f"r{i}"
            rows.append(repeat(url, work, args, a.outage_saves))
            print(f"  repeat {i + 1}: {rows[-1]}", flush=True)
            shutil.rmtree(work, ignore_errors=True)
    fmt = {k: median(rows, k) for k in ("up", "first", "later", "drain", "fresh", "same")}

    def show(v: float | None, unit: str = "") -> str:
        return "n/a" if v is None else f"{v:.2f}{unit}"

    ratio = None if fmt["later"] is None or fmt["up"] is None else fmt["later"] / fmt["up"]
    print("| measure | median | target |\n|---|---|---|")
    print(f"| bytes per node on resume, fresh nodes ÷ its share | {show(fmt['fresh'], 'x')} | <= 1.1x |")
    print(f"| bytes per node on resume, same nodes ÷ its share | {show(fmt['same'], 'x')} | ~0 |")
    print(f"| save blocked, server up (s) | {show(fmt['up'])} | |")
    print(f"| 1st save of the outage (s) | {show(fmt['first'])} | <= publish_timeout |")
    print(f"| later saves of the outage ÷ server up | {show(ratio, 'x')} | <= 1.1x |")
    print(f"| server back -> every node's outbox empty (s) | {show(fmt['drain'])} | <= 10 s |")


if __name__ == "__main__":
    main()
