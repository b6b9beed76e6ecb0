"""tracked_ckpt benchmarks: tracked_ckpt and the usual alternatives side by side, in one process.

    python benchmarks/run.py                      # 100 MB and 1 GB states, 10 / 1,000 / 10,000 checkpoints
    python benchmarks/run.py --sizes 100MB        # one size
    python benchmarks/run.py --smoke              # seconds: tiny state, 10 / 100 checkpoints (what CI runs)
    python benchmarks/run.py --server http://...  # use a running `mlflow server` instead of starting one

Every figure is the median of ``--repeats`` runs (>= 5 by default) with min-max. The table is printed and
saved under ``benchmarks/results/`` (git-ignored); docs/performance.md carries the latest figures.
The training state is a stack of Linear layers plus its Adam state (exp_avg, exp_avg_sq): 1/3 model, 2/3 optimizer.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import dataclasses
import json
import os
import platform
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

RESULTS = Path(__file__).resolve().parent / "results"


@dataclasses.dataclass
class Row:
    group: str
    case: str
    size: str
    times: list[float]

    @property
    def median(self) -> float:
        return statistics.median(self.times)

    def cells(self) -> list[str]:
        return [
            self.group,
            self.size,
            self.case,
            _fmt(self.median),
            f"{_fmt(min(self.times))} - {_fmt(max(self.times))}",
        ]


def _fmt(s: float) -> str:
    return f"{s * 1000:.1f} ms" if s < 1 else f"{s:.2f} s"


def parse_size(text: str) -> int:
    text = text.strip().upper()
    for unit, mult in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if text.endswith(unit):
            return int(float(text[: -len(unit)]) * mult)
    return int(text)


# ------------------------------------------------------------------------------------------ the state


def make_state(nbytes: int) -> tuple[torch.nn.Module, torch.optim.Optimizer]:
    """A model + Adam with state, about ``nbytes`` in all (float32: weights, exp_avg, exp_avg_sq)."""
    params = max(nbytes // 12, 1024)
    width = 1024 if params >= 4 * 1024 * 1024 else 256
    layers = max(1, round(params / (width * width + width)))
    torch.manual_seed(0)
    model = torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(layers)])
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for p in model.parameters():
        p.grad = torch.randn_like(p)
    opt.step()
    opt.zero_grad(set_to_none=True)
    return model, opt


def state_bytes(model: torch.nn.Module, opt: torch.optim.Optimizer) -> int:
    return sum(t.numel() * t.element_size() for t in _tensors(model, opt))


def _tensors(model: torch.nn.Module, opt: torch.optim.Optimizer) -> list[torch.Tensor]:
    out = list(model.state_dict().values())
    for st in opt.state_dict()["state"].values():
        out += [v for v in st.values() if isinstance(v, torch.Tensor)]
    return out


def restore(path: Path, model: torch.nn.Module, opt: torch.optim.Optimizer, **load_kw: Any) -> None:
    """Load a torch.save'd state (a checkpoint's state.pt: its weights are in model.pt beside it)."""
    payload = torch.load(path, map_location="cpu", weights_only=True, **load_kw)
    if "model" not in payload:
        payload.update(torch.load(path.with_name("model.pt"), map_location="cpu", weights_only=True, **load_kw))
    model.load_state_dict(payload["model"])
    opt.load_state_dict(payload["optimizer"])


def fsync_save(obj: Any, path: Path) -> None:
    with open(path, "wb") as f:
        torch.save(obj, f)
        f.flush()
        os.fsync(f.fileno())


# ------------------------------------------------------------------------------------------ measuring


class Bench:
    def __init__(self, repeats: int) -> None:
        self.repeats = repeats
        self.rows: list[Row] = []

    def measure(
        self,
        group: str,
        case: str,
        size: str,
        fn: Callable[[int], Any],
        setup: Callable[[int], Any] | None = None,
        teardown: Callable[[int], Any] | None = None,
        repeats: int | None = None,
        warmup: bool = True,
    ) -> Row:
        times = []
        for i in range(-1 if warmup else 0, repeats or self.repeats):
            if setup:
                setup(i)
            t0 = time.perf_counter()
            fn(i)
            dt = time.perf_counter() - t0
            if teardown:
                teardown(i)
            if i >= 0:
                times.append(dt)
        row = Row(group, case, size, times)
        self.rows.append(row)
        print(f"  {group:<8} {size:>6}  {case:<58} {_fmt(row.median):>10}", flush=True)
        return row

    def get(self, group: str, case: str, size: str) -> Row | None:
        return next((r for r in self.rows if (r.group, r.case, r.size) == (group, case, size)), None)


# ------------------------------------------------------------------------------------------ the cases


def bench_size(b: Bench, label: str, nbytes: int, work: Path, uri: str, server: str | None) -> None:
    import mlflow
    import mlflow.pytorch
    from mlflow.tracking import MlflowClient

    import tracked_ckpt
    from tracked_ckpt import CheckpointManager, KeepLast

    model, opt = make_state(nbytes)
    print(f"state {label}: {state_bytes(model, opt) / 1e6:.0f} MB in {len(_tensors(model, opt))} tensors")
    client = MlflowClient(uri)
    exp = f"bench-{label}-{os.getpid()}-{time.time_ns()}"
    keep = KeepLast(2)

    # ---- blocked time of an async save vs copying into preallocated buffers
    tensors = _tensors(model, opt)
    buffers = [torch.empty_like(t) for t in tensors]

    def copy_into(_: int) -> None:
        for buf, t in zip(buffers, tensors, strict=True):
            buf.copy_(t)

    b.measure("blocked", "copy_ into preallocated buffers (baseline)", label, copy_into)
    b.measure("blocked", "clone() into fresh memory (reference)", label, lambda _: [t.clone() for t in tensors])

    def memmove_into(_: int) -> None:
        for buf, t in zip(buffers, tensors, strict=True):
            ctypes.memmove(buf.data_ptr(), t.data_ptr(), t.numel() * t.element_size())

    b.measure("blocked", "ctypes.memmove into preallocated buffers (reference)", label, memmove_into)
    amgr = CheckpointManager(work / f"async-{label}", experiment=exp, tracking_uri=uri, async_save=True, retention=keep)
    b.measure(
        "blocked",
        "tracked_ckpt save(async_save=True) returns",
        label,
        lambda i: amgr.save(model, opt, {"step": i + 1, "reward": float(i)}, step=i + 1),
        setup=lambda _: amgr.wait(),
    )
    amgr.close()
    buffers.clear()

    # ---- sync save end to end, local store
    plain = work / f"plain-{label}.pt"
    payload = {"model": model.state_dict(), "optimizer": opt.state_dict()}
    b.measure("save", "torch.save + fsync (baseline)", label, lambda _: fsync_save(payload, plain))
    smgr = CheckpointManager(work / f"sync-{label}", experiment=exp, tracking_uri=uri, retention=keep)
    b.measure(
        "save",
        "tracked_ckpt save() end to end (local store)",
        label,
        lambda i: smgr.save(model, opt, {"step": i + 1, "reward": float(i)}, step=i + 1),
    )
    run_id = client.create_run(client.get_experiment_by_name(exp).experiment_id).info.run_id
    art = Path(client.get_run(run_id).info.artifact_uri.removeprefix("file://"))

    def log_artifact(i: int) -> None:
        torch.save(payload, plain)
        client.log_artifact(run_id, str(plain), f"plain/{i}")

    b.measure(
        "save",
        "torch.save + MlflowClient.log_artifact",
        label,
        log_artifact,
        teardown=lambda i: shutil.rmtree(art / "plain", ignore_errors=True),
    )

    def log_model(i: int) -> None:
        with mlflow.start_run(run_id=run_id):
            mlflow.pytorch.log_model(
                model, name=f"m{i + 1}", step=i + 1, serialization_format="pickle", pip_requirements=["torch"]
            )

    b.measure("save", "mlflow.pytorch.log_model(step=) [model only, 1/3 of the bytes]", label, log_model)
    client.set_terminated(run_id)

    # ---- load latest: local store
    latest = smgr.get_latest_checkpoint()
    assert latest is not None
    state_file = smgr.store.local_dir / latest.split("/", 2)[2] / "state.pt"  # type: ignore[operator]
    b.measure("load", "torch.load(weights_only=True) + load_state_dict (baseline)", label,
              lambda _: restore(state_file, model, opt))  # fmt: skip
    b.measure("load", "tracked_ckpt load() latest, verified (local store)", label, lambda _: smgr.load(model, opt))

    def download_then_load(_: int, tracking_uri: str = uri, run: str = smgr.run_id, ref: str = latest) -> None:
        with tempfile.TemporaryDirectory(dir=work) as d:
            f = mlflow.artifacts.download_artifacts(  # the checkpoint's folder: model.pt, state.pt, ...
                run_id=run, artifact_path=ref.split("/", 2)[2], dst_path=d, tracking_uri=tracking_uri
            )
            restore(Path(f) / "state.pt", model, opt)

    b.measure("load", "download_artifacts + torch.load + load_state_dict", label, download_then_load)
    smgr.close()

    # ---- resume through a loopback mlflow server
    if server is not None:
        rmgr = CheckpointManager(work / f"remote-{label}", experiment=exp, tracking_uri=server)
        t0 = time.perf_counter()
        ref = rmgr.save(model, opt, {"step": 1, "reward": 0.0})
        print(f"  (one sync save through the server: {time.perf_counter() - t0:.2f} s)")
        rmgr.close()
        b.measure(
            "remote",
            "tracked_ckpt.load(run_id) latest, verified, via server",
            label,
            lambda _: tracked_ckpt.load(rmgr.run_id, model, opt, tracking_uri=server),
        )
        b.measure("remote", "download_artifacts + torch.load + load_state_dict", label,
                  lambda i: download_then_load(i, server, rmgr.run_id, ref))  # fmt: skip
    if plain.exists():
        plain.unlink()


def build_run(uri: str, work: Path, n: int) -> str:
    """A run with ``n`` committed checkpoints, exactly as ``save()`` leaves them, built in seconds.

    One real save; then its files are hard-linked into n-1 more folders with the manifests save() would
    write for those steps, their metrics logged in batches, and the summary tags repaired by the manager's
    own recovery (what a relaunch does after a save that died before its tags).
    """
    from mlflow.entities import Metric
    from mlflow.tracking import MlflowClient

    from tracked_ckpt import CheckpointManager
    from tracked_ckpt.manifest import MANIFEST_NAME, Manifest

    exp = f"bench-scale-{n}-{time.time_ns()}"
    model = torch.nn.Linear(4, 2)
    with CheckpointManager(work / f"scale-{n}", experiment=exp, tracking_uri=uri) as mgr:
        mgr.save(model, None, {"step": 1, "reward": 0.0})
        run_id, root = mgr.run_id, mgr.store.local_dir
    assert root is not None
    first = root / "checkpoints" / "step-00000001"
    m0 = Manifest.from_json((first / MANIFEST_NAME).read_bytes(), str(first))
    client = MlflowClient(uri)
    metrics = []
    now = time.time()
    for i in range(2, n + 1):
        folder = root / "checkpoints" / f"step-{i:08d}"
        folder.mkdir()
        for f in m0.files:
            os.link(first / f.name, folder / f.name)
        reward = float((i * 7919) % 1000)  # the best is not the latest
        m = dataclasses.replace(m0, step=i, seq=i, created=now + i, metrics={"reward": reward, "step": float(i)},
                                metadata={"step": i, "reward": reward})  # fmt: skip
        (folder / MANIFEST_NAME).write_text(m.to_json())
        metrics += [Metric("reward", reward, int((now + i) * 1000), i), Metric("step", float(i), int(now * 1000), i)]
    for k in range(0, len(metrics), 1000):
        client.log_batch(run_id, metrics=metrics[k : k + 1000])
    CheckpointManager(work / f"scale-{n}", experiment=exp, tracking_uri=uri, run_id=run_id).close()  # repairs tags
    return run_id


def bench_scale(b: Bench, counts: list[int], work: Path, uri: str) -> None:
    """Resolution and listing at each count; measured round-robin across counts, so drift hits them alike."""
    from mlflow.tracking import MlflowClient

    from tracked_ckpt import list_checkpoints
    from tracked_ckpt.catalog import RunCatalog
    from tracked_ckpt.store.run_store import RunStore

    catalogs = {}
    for n in counts:
        t0 = time.perf_counter()
        run_id = build_run(uri, work, n)
        print(f"  (built a run with {n} checkpoints in {time.perf_counter() - t0:.1f} s)")
        catalogs[n] = RunCatalog(RunStore(MlflowClient(uri), run_id))
        assert catalogs[n].resolve("latest").manifest.step == n

    def listing(n: int) -> None:
        df = list_checkpoints(catalogs[n].run_id, tracking_uri=uri)
        assert len(df) == n, len(df)

    cases: list[tuple[str, Callable[[int], Any]]] = [
        ("resolve latest (tags + one manifest)", lambda n: catalogs[n].resolve("latest")),
        ("resolve best (tags + one manifest)", lambda n: catalogs[n].resolve("best")),
        ("list_checkpoints() DataFrame (local store)", listing),
    ]
    for case, fn in cases:
        times: dict[int, list[float]] = {n: [] for n in counts}
        for i in range(-1, max(b.repeats, 7)):
            for n in counts:
                t0 = time.perf_counter()
                fn(n)
                if i >= 0:
                    times[n].append(time.perf_counter() - t0)
        for n in counts:
            row = Row("scale", case, f"n={n}", times[n])
            b.rows.append(row)
            print(f"  {'scale':<8} {row.size:>6}  {case:<58} {_fmt(row.median):>10}", flush=True)


# ------------------------------------------------------------------------------------------ the report

TARGETS: list[tuple[str, tuple[str, str], tuple[str, str], float]] = [
    # (what, numerator (group, case), denominator (group, case), at most this ratio)
    ("async blocked ≤ 1.3x copy_", ("blocked", "tracked_ckpt save(async_save=True) returns"),
     ("blocked", "copy_ into preallocated buffers (baseline)"), 1.3),
    ("sync save ≤ 1.5x torch.save+fsync", ("save", "tracked_ckpt save() end to end (local store)"),
     ("save", "torch.save + fsync (baseline)"), 1.5),
    ("sync save < torch.save+log_artifact", ("save", "tracked_ckpt save() end to end (local store)"),
     ("save", "torch.save + MlflowClient.log_artifact"), 1.0),
    ("sync save < log_model", ("save", "tracked_ckpt save() end to end (local store)"),
     ("save", "mlflow.pytorch.log_model(step=) [model only, 1/3 of the bytes]"), 1.0),
    ("load latest ≤ 1.5x torch.load", ("load", "tracked_ckpt load() latest, verified (local store)"),
     ("load", "torch.load(weights_only=True) + load_state_dict (baseline)"), 1.5),
    ("server resume < download+load", ("remote", "tracked_ckpt.load(run_id) latest, verified, via server"),
     ("remote", "download_artifacts + torch.load + load_state_dict"), 1.0),
]  # fmt: skip


def ratios(b: Bench, sizes: list[str], counts: list[int]) -> list[tuple[str, str, float, float, bool]]:
    out = []
    for what, num, den, limit in TARGETS:
        for size in sizes:
            n, d = b.get(*num, size), b.get(*den, size)
            if n and d:
                r = n.median / d.median
                out.append((what, size, r, limit, r <= limit if limit != 1.0 else r < 1.0))
    if len(counts) > 1:
        lo, hi = f"n={counts[0]}", f"n={counts[-1]}"
        for case in ("resolve latest (tags + one manifest)", "resolve best (tags + one manifest)"):
            n, d = b.get("scale", case, hi), b.get("scale", case, lo)
            if n and d:
                r = n.median / d.median
                out.append((f"{case.split(' (')[0]} at {hi} ≤ 1.5x at {lo}", "", r, 1.5, r <= 1.5))
        listing = b.get("scale", "list_checkpoints() DataFrame (local store)", hi)
        if listing:
            out.append((f"list_checkpoints at {hi} < 2 s (seconds)", "", listing.median, 2.0, listing.median < 2.0))
    return out


def report(b: Bench, sizes: list[str], counts: list[int], argv: list[str]) -> str:
    head = ["group", "size", "case", "median", "min - max"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(r.cells()) + " |" for r in b.rows]
    lines += ["", "| target | size | ratio (medians) | limit | met |", "|---|---|---|---|---|"]
    for what, size, r, limit, ok in ratios(b, sizes, counts):
        lines.append(f"| {what} | {size} | {r:.2f} | {limit:g} | {'yes' if ok else 'NO'} |")
    machine = f"{platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__}"
    machine += f", Python {platform.python_version()}"
    lines += ["", f"`python benchmarks/run.py {' '.join(argv)}` — {machine}, repeats={b.repeats}"]
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ the server


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@contextlib.contextmanager
def mlflow_server(work: Path, destination: str | None = None) -> Iterator[str]:
    """A loopback `mlflow server` proxying artifacts (to a local folder, or ``destination``), stopped on exit."""
    port = _free_port()
    cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(port),
           "--backend-store-uri", f"sqlite:///{work / 'server.db'}", "--artifacts-destination",
           destination or str(work / "server-artifacts"), "--workers", "1"]  # fmt: skip
    env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
    env.pop("MLFLOW_TRACKING_URI", None)
    with open(work / "server.log", "wb") as log:
        proc = subprocess.Popen(cmd, cwd=work, stdout=log, stderr=subprocess.STDOUT, env=env, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            with contextlib.suppress(OSError), urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    break
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"mlflow server did not start; see {work / 'server.log'}")
            time.sleep(0.5)
        yield url
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()


# ------------------------------------------------------------------------------------------ main


def main(argv: list[str] | None = None) -> Bench:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="seconds-long: 4 MB state, 10/100 checkpoints, 3 repeats")
    p.add_argument("--sizes", default=None, help="training state sizes (default 100MB,1GB; smoke: 4MB)")
    p.add_argument("--counts", default=None, help="checkpoint counts (default 10,1000,10000; smoke: 10,100)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--tracking-uri", default=None, help="default: a fresh sqlite store in the work folder")
    p.add_argument("--server", default=None, help="URL of a running `mlflow server` (default: start one)")
    p.add_argument("--no-server", action="store_true", help="skip the loopback-server measurements")
    p.add_argument("--workdir", default=None, help="scratch folder (default: a temporary one, removed after)")
    p.add_argument("--no-save", action="store_true", help="print only; write nothing under benchmarks/results")
    args = p.parse_args(argv)
    if args.smoke:
        args.repeats = min(args.repeats, 3)
    args.sizes = args.sizes or ("4MB" if args.smoke else "100MB,1GB")
    args.counts = args.counts or ("10,100" if args.smoke else "10,1000,10000")
    sizes = [s.strip() for s in args.sizes.split(",") if s.strip()]
    counts = [int(c) for c in args.counts.split(",") if c.strip()]

    work = Path(args.workdir or tempfile.mkdtemp(prefix="tracked_ckpt-bench-")).resolve()
    work.mkdir(parents=True, exist_ok=True)
    old_cwd = os.getcwd()
    os.chdir(work)  # a sqlite store puts new experiments' artifacts under ./mlruns
    b = Bench(args.repeats)
    uri = args.tracking_uri or f"sqlite:///{work / 'mlflow.db'}"
    old_uri = os.environ.get("MLFLOW_TRACKING_URI")
    os.environ["MLFLOW_TRACKING_URI"] = uri  # for mlflow.pytorch.log_model, which needs MLflow's fluent API
    try:
        with contextlib.ExitStack() as stack:
            server = None if args.no_server else args.server or stack.enter_context(mlflow_server(work))
            for size in sizes:
                bench_size(b, size, parse_size(size), work, uri, server)
            bench_scale(b, counts, work, uri)
    finally:
        os.chdir(old_cwd)
        if old_uri is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_uri
        if args.workdir is None:
            shutil.rmtree(work, ignore_errors=True)
    text = report(b, sizes, counts, argv)
    print("\n" + text)
    if not args.no_save:
        RESULTS.mkdir(exist_ok=True)
        stamp = time.strftime("%Y%m%d-%H%M%S")
        (RESULTS / f"bench-{stamp}.md").write_text(text + "\n")
        rows = [dataclasses.asdict(r) | {"median": r.median} for r in b.rows]
        (RESULTS / f"bench-{stamp}.json").write_text(json.dumps({"argv": argv, "rows": rows}, indent=1))
        print(f"saved {RESULTS / f'bench-{stamp}.md'}")
    return b


if __name__ == "__main__":
    main()
