"""What a LoggedModel per checkpoint costs a save against a real `mlflow server`: time and HTTP calls.

    python benchmarks/models.py                     # 1 MB and 100 MB states, 7 saves each way
    python benchmarks/models.py --sizes 1MB --saves 5
    python benchmarks/models.py --smoke             # seconds (what CI's smoke test runs)

Two runs save the same state in turn, one with ``logged_models=True`` (the default), one with ``False``, both with
``KeepLast(2)`` (so the steady state includes retention deleting a checkpoint, and its model). Each save is a
synchronous ``save()``: it returns once MLflow recorded the checkpoint, so its time is the time to record it. The
HTTP calls of each save are counted from the server's own access log (every request it served, artifacts
included). Prints the medians, min-max, the ratio and the extra calls per save.
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import tempfile
import time
from pathlib import Path

from run import make_state, mlflow_server, parse_size  # benchmarks/run.py, beside this file

_REQUEST = re.compile(r'"(GET|POST|PUT|PATCH|DELETE) /(?:ajax-)?api/2\.0/([a-z-]+/[a-z/-]+)')


def requests_since(log: Path, offset: int) -> list[str]:
    """The API requests the server logged after byte ``offset`` of its log (its access lines are written just
    after each response: wait until they settle)."""
    seen, calls = -1, []
    while len(calls) != seen:
        seen = len(calls)
        time.sleep(0.3)
        text = log.read_bytes()[offset:].decode(errors="replace")
        calls = [re.sub(r"m-[0-9a-f]*", "ID", f"{m[0]} {m[1]}") for m in _REQUEST.findall(text)]
    return calls


def bench(url: str, log: Path, work: Path, label: str, nbytes: int, saves: int) -> dict[str, dict[str, object]]:
    from tracked_ckpt import CheckpointManager, KeepLast

    model, opt = make_state(nbytes)
    results: dict[str, dict[str, object]] = {}
    managers = {
        on: CheckpointManager(work / f"{label}-{on}", experiment=f"models-bench-{label}", tracking_uri=url,
                              retention=KeepLast(2), logged_models=on)
        for on in (True, False)
    }
    times: dict[bool, list[float]] = {True: [], False: []}
    calls: dict[bool, list[list[str]]] = {True: [], False: []}
    try:
        for step in range(1, saves + 3):  # two warm-up saves each (retention starts deleting at the third)
            for on, mgr in managers.items():  # interleaved: both see the same machine and server state
                offset = log.stat().st_size
                t0 = time.perf_counter()
                mgr.save(model, opt, {"step": step, "reward": float(step % 3), "loss": 1.0 / step})
                took = time.perf_counter() - t0
                if step > 2:
                    times[on].append(took)
                    calls[on].append(requests_since(log, offset))
    finally:
        for mgr in managers.values():
            mgr.close()
    for on in (True, False):
        counts = [len(c) for c in calls[on]]
        results["with" if on else "without"] = {
            "median_s": statistics.median(times[on]), "min_s": min(times[on]), "max_s": max(times[on]),
            "calls": statistics.median(counts), "kinds": sorted(set(calls[on][-1])),
        }  # fmt: skip
    return results


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="1MB,100MB", help="training state sizes, e.g. 1MB,100MB")
    p.add_argument("--saves", type=int, default=7, help="measured saves per size and way (medians)")
    p.add_argument("--smoke", action="store_true", help="1 MB, 3 saves")
    args = p.parse_args(argv)
    sizes = ["1MB"] if args.smoke else args.sizes.split(",")
    saves = 3 if args.smoke else args.saves
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-models-bench-") as tmp:
        work = Path(tmp)
        with mlflow_server(work) as url:
            print("| state | LoggedModel | save() median (min - max) | ratio | extra | HTTP calls per save |")
            print("|---|---|---|---|---|---|")
            for label in sizes:
                r = bench(url, work / "server.log", work, label, parse_size(label), saves)
                on, off = r["with"], r["without"]
                ratio = float(on["median_s"]) / float(off["median_s"])  # type: ignore[arg-type]
                extra_ms = (float(on["median_s"]) - float(off["median_s"])) * 1000  # type: ignore[arg-type]
                for way, row in r.items():
                    cells = [label, way, f"{row['median_s']:.3f} s ({row['min_s']:.3f} - {row['max_s']:.3f})",
                             f"{ratio:.2f}x" if way == "with" else "1.00x",
                             f"{extra_ms:+.0f} ms" if way == "with" else "", f"{row['calls']:g}"]  # fmt: skip
                    print("| " + " | ".join(cells) + " |")
                extra = sorted(set(r["with"]["kinds"]) - set(r["without"]["kinds"]))  # type: ignore[call-overload]
                print(f"|  | calls only with it | {', '.join(extra)} |  |  |  |")
                sys.stdout.flush()
    print(f"\n{saves} measured saves per row (after 2 warm-up saves), interleaved; KeepLast(2); "
          "`python benchmarks/models.py " + " ".join(argv if argv is not None else sys.argv[1:]) + "`")  # fmt: skip


if __name__ == "__main__":
    main()
