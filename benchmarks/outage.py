"""What an outage of the tracking server costs a training loop, with MLflow's default HTTP settings.

    python benchmarks/outage.py                 # 40 MB state, 5 outage cycles per fault (~3 min)
    python benchmarks/outage.py --size 4MB --cycles 2

A loopback `mlflow server` sits behind a TCP proxy (tests/fault_proxy.py) that refuses, hangs or answers 503. Each
cycle: a save with the server up (the baseline: commit + record), then the proxy fails and the first save of the
outage is timed, then three more saves of the same outage, then the proxy passes again and the seconds until the
outbox is empty are timed (no save, no sync: the publisher finds the server by itself). Printed: medians over the
cycles, and the two ratios docs/performance.md tracks — a save during a known outage ÷ the same save with the
server up (target ≤ 1.1x), and seconds from the server's return to an empty outbox (target ≤ 10 s).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "tests"), str(ROOT / "benchmarks")]

from fault_proxy import FaultProxy  # noqa: E402
from run import make_state, mlflow_server, parse_size  # noqa: E402

from tracked_ckpt import CheckpointManager  # noqa: E402


def cycle(
    mgr: CheckpointManager, proxy: FaultProxy, model: object, opt: object, mode: str, step: int
) -> dict[str, float]:
    t0 = time.perf_counter()
    mgr.save(model, opt, {"step": step, "reward": 0.0})  # type: ignore[arg-type]
    up = time.perf_counter() - t0
    proxy.set_mode(mode)
    t0 = time.perf_counter()
    mgr.save(model, opt, {"step": step + 1, "reward": 0.0})  # type: ignore[arg-type]
    first = time.perf_counter() - t0
    later = []
    for k in range(2, 5):
        t0 = time.perf_counter()
        mgr.save(model, opt, {"step": step + k, "reward": 0.0})  # type: ignore[arg-type]
        later.append(time.perf_counter() - t0)
    proxy.set_mode("pass")
    t0 = time.perf_counter()
    while mgr.outbox.pending(mgr.run_id):
        time.sleep(0.02)
        if time.perf_counter() - t0 > 120:
            raise RuntimeError("the outbox did not drain within 120 s")
    return {"up": up, "first": first, "later": statistics.median(later), "drain": time.perf_counter() - t0}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="40MB")
    p.add_argument("--cycles", type=int, default=5)
    p.add_argument("--publish-timeout", type=float, default=10.0)
    p.add_argument("--modes", default="refuse,hang,503")
    a = p.parse_args(argv)
    for name in ("MAX_RETRIES", "TIMEOUT", "BACKOFF_FACTOR"):
        os.environ.pop(f"MLFLOW_HTTP_REQUEST_{name}", None)  # MLflow's defaults, as users have them
    model, opt = make_state(parse_size(a.size))
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-outage-") as tmp, mlflow_server(Path(tmp)) as url:
        proxy = FaultProxy(url)
        print(f"state {a.size}, {a.cycles} cycles per fault, publish_timeout {a.publish_timeout:.0f} s, "
              "MLflow's default HTTP settings", flush=True)  # fmt: skip
        print(f"{'fault':8} {'up (s)':>8} {'1st (s)':>8} {'later (s)':>9} {'later/up':>9} {'drain (s)':>9}")
        for mode in a.modes.split(","):
            with CheckpointManager(Path(tmp) / f"ck-{mode}", experiment="outage-bench", tracking_uri=proxy.url,
                                   publish_timeout=a.publish_timeout) as mgr:  # fmt: skip
                rows = [cycle(mgr, proxy, model, opt, mode, 10 * i) for i in range(1, a.cycles + 1)]
            med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
            ratio = med["later"] / med["up"]
            print(f"{mode:8} {med['up']:8.3f} {med['first']:8.3f} {med['later']:9.3f} {ratio:8.2f}x "
                  f"{med['drain']:9.2f}   (target: later/up <= 1.1x {'met' if ratio <= 1.1 else 'MISSED'}, "
                  f"drain <= 10 s {'met' if med['drain'] <= 10 else 'MISSED'})", flush=True)  # fmt: skip
        proxy.close()


if __name__ == "__main__":
    main()
