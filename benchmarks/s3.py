"""tracked_ckpt against an S3 bucket, side by side with boto3 and MLflow's own calls, and what a background save
costs a GIL-bound training loop.

    python benchmarks/s3.py                    # 200 MB state, 3 repeats (~3 min on 2 cores)
    python benchmarks/s3.py --size 1GB --repeats 3     # ~13 min
    python benchmarks/s3.py --size 1GB --local-interference   # the interference rows' local store alone, ~1 min

The bucket is `moto`'s S3 server on loopback (an in-memory Python server on the same 2 cores; it copies a whole
object for every GET, ranged or not, so the number of requests weighs more than on S3). Printed, as medians with
the ratio of medians:

- direct record: the upload part of a ``save()`` into an experiment whose artifact root is ``s3://`` (its
  ``system/checkpoint_record_s``) and the whole ``save()``, ÷ boto3's ``upload_file`` of the same bytes (the floor;
  target ≤ 1.1x);
- direct resume: ``tracked_ckpt.load(run_id)`` with nothing local (download, verify, load) ÷ MLflow's
  ``download_artifacts`` + ``torch.load`` + ``load_state_dict`` (which verify nothing; target ≤ 1.0x);
- proxied record and resume: the same through a ``mlflow server --artifacts-destination s3://...``, against
  MLflow's ``log_artifact`` / ``download_artifacts`` with its defaults (3.17: presigned URLs, parallel parts) and
  with one stream through the server (``MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD=false``; target ≤ 0.5x);
- interference: a training loop of many tiny ops on one thread (as the host thread of GPU training is), its step
  rate for as long as an async save (upload included) runs ÷ its rate while a plain thread writes the same bytes to
  a new file with the GIL released (the floor; target ≥ 0.95x), and for S3 also ÷ its rate while another process
  uploads the same file to the bucket (the same CPU work without the training process's GIL).
"""

from __future__ import annotations

import argparse
import os
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from run import make_state, mlflow_server, parse_size, restore  # noqa: E402

BUCKET = "bench"


def moto() -> tuple[str, subprocess.Popen[bytes]]:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)  # fmt: skip
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return f"http://127.0.0.1:{port}", proc
        except OSError:
            time.sleep(0.2)
    raise RuntimeError("moto's S3 server did not start")


def timed(fn: Callable[[], object]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def steps_while(busy: Callable[[], bool]) -> float:
    """Steps per second of a GIL-bound loop of tiny tensor ops, for as long as ``busy()`` (at least 0.5 s)."""
    x = torch.ones(8)
    n, t0 = 0, time.perf_counter()
    while busy() or time.perf_counter() - t0 < 0.5:
        for _ in range(50):
            x = (x * 1.0001 + 0.5).relu()
        n += 1
    return n / (time.perf_counter() - t0)


def during(work: Callable[[], object]) -> float:
    """The loop's step rate while ``work`` runs on another thread."""
    t = threading.Thread(target=work)
    t.start()
    rate = steps_while(t.is_alive)
    t.join()
    return rate


def uploader(endpoint: str) -> subprocess.Popen[str]:
    """Another process that uploads a file to the bucket with boto3 when given its path on stdin."""
    code = (
        "import sys, boto3\n"
        f"s3 = boto3.client('s3', endpoint_url={endpoint!r})\n"
        "print('ready', flush=True)\n"
        "for line in sys.stdin:\n"
        "    path, key = line.split()\n"
        f"    s3.upload_file(path, {BUCKET!r}, key)\n"
        "    print('done', flush=True)\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", code], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    assert proc.stdout is not None and proc.stdout.readline().strip() == "ready"
    return proc


def interference(mgr: object, model: torch.nn.Module, opt: torch.optim.Optimizer, work: Path, repeats: int,
                 endpoint: str | None = None) -> dict[str, float]:  # fmt: skip
    """Median step rates of the loop during a background save, during a raw write of as many bytes (the floor), and
    (``endpoint``) during another process's boto3 upload of the checkpoint to the bucket (a floor holding the object
    store's and the upload's CPU work, without sharing the training process's GIL)."""
    from tracked_ckpt import CheckpointManager

    assert isinstance(mgr, CheckpointManager)
    rates: dict[str, list[float]] = {"save": [], "write": [], "other process uploads": []}
    up = uploader(endpoint) if endpoint else None
    with mgr:
        mgr.save(model, opt, {"step": 0})
        mgr.wait()  # staging buffers allocated
        folder = mgr.save_dir / mgr.run_id / "step-00000000"
        blob = bytes(sum((folder / n).stat().st_size for n in ("model.pt", "state.pt")))
        state = work / f"whole-{mgr.run_id}.bin"  # the checkpoint's bytes in one file, for the other process
        state.write_bytes(blob)
        for i in range(1, repeats + 1):
            rates["save"].append(during(partial(save_and_wait, mgr, model, opt, i)))

            def write(i: int = i) -> None:
                with open(work / f"raw-{mgr.run_id}-{i}.bin", "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())

            rates["write"].append(during(write))
            if up is not None:
                rates["other process uploads"].append(during(partial(tell, up, f"{state} floor/{mgr.run_id}-{i}.pt")))
    if up is not None:
        up.kill()
    return {k: statistics.median(v) for k, v in rates.items() if v}


def save_and_wait(mgr: Any, model: torch.nn.Module, opt: torch.optim.Optimizer, step: int) -> None:
    mgr.save(model, opt, {"step": step})
    mgr.wait()


def tell(proc: subprocess.Popen[str], line: str) -> None:
    """Hand ``proc`` (an ``uploader``) one line of work and wait until it is done."""
    assert proc.stdin is not None and proc.stdout is not None
    proc.stdin.write(line + "\n")
    proc.stdin.flush()
    assert proc.stdout.readline().strip() == "done"


def resume_rows(run_id: str, size: str, repeats: int, work: Path, tracking_uri: str | None = None,
                mlflow_env: dict[str, dict[str, str]] | None = None) -> dict[str, float]:  # fmt: skip
    """Median seconds of ``tracked_ckpt.load(run_id)`` with nothing local, and of MLflow's ``download_artifacts`` +
    ``torch.load`` + ``load_state_dict`` of the same file, once per environment in ``mlflow_env``."""
    from mlflow.tracking import MlflowClient

    import tracked_ckpt

    client, uri = MlflowClient(tracking_uri), tracking_uri
    fresh, fresh_opt = make_state(parse_size(size))
    path = f"checkpoints/step-{repeats:08d}"  # the folder: model.pt and state.pt, as tracked_ckpt.load fetches
    rows: dict[str, list[float]] = {"tracked_ckpt": []}
    for i in range(repeats):
        rows["tracked_ckpt"].append(timed(lambda: tracked_ckpt.load(run_id, fresh, fresh_opt, tracking_uri=uri)))
        for name, env in (mlflow_env or {"MLflow": {}}).items():
            dst = work / f"dl-{run_id}-{name.replace(' ', '_')}-{i}"
            dst.mkdir()
            saved = {k: os.environ.get(k) for k in env}
            os.environ.update(env)
            try:
                t0 = time.perf_counter()
                restore(Path(client.download_artifacts(run_id, path, str(dst))) / "state.pt", fresh, fresh_opt)
                rows.setdefault(name, []).append(time.perf_counter() - t0)
            finally:
                for k, v in saved.items():
                    if v is None:
                        os.environ.pop(k, None)
                    else:
                        os.environ[k] = v
    return {k: statistics.median(v) for k, v in rows.items()}


def local_interference(size: str, repeats: int) -> None:
    from mlflow.tracking import MlflowClient

    from tracked_ckpt import CheckpointManager

    work = Path(tempfile.mkdtemp(prefix="tracked_ckpt-interference-"))
    try:
        os.environ["MLFLOW_TRACKING_URI"] = f"sqlite:///{work / 'mlflow.db'}"
        MlflowClient().create_experiment("local-bench", artifact_location=str(work / "local-artifacts"))
        model, opt = make_state(parse_size(size))
        mgr = CheckpointManager(work / "ck", experiment="local-bench", async_save=True)
        r = interference(mgr, model, opt, work, repeats)
        print(f"interference (local store, {size}, {repeats} repeats): loop rate during a background save "
              f"{r['save']:.0f}/s vs during a raw write {r['write']:.0f}/s: {r['save'] / r['write']:.2f}x "
              "(target >= 0.95x)")
    finally:
        shutil.rmtree(work, ignore_errors=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="200MB")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--local-interference", action="store_true",
                   help="only the interference of a background save on the local store (no moto, ~1 min)")
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    if a.local_interference:
        local_interference(a.size, a.repeats)
        return
    import boto3
    from mlflow.tracking import MlflowClient

    from tracked_ckpt import CheckpointManager

    endpoint, proc = moto()
    work = Path(tempfile.mkdtemp(prefix="tracked_ckpt-s3-"))
    os.environ.update({"AWS_ACCESS_KEY_ID": "b", "AWS_SECRET_ACCESS_KEY": "b", "AWS_DEFAULT_REGION": "us-east-1",
                       "MLFLOW_S3_ENDPOINT_URL": endpoint, "MLFLOW_TRACKING_URI": f"sqlite:///{work / 'mlflow.db'}"})
    s3 = boto3.client("s3", endpoint_url=endpoint)
    s3.create_bucket(Bucket=BUCKET)
    client = MlflowClient()
    client.create_experiment("s3-bench", artifact_location=f"s3://{BUCKET}/exp")
    model, opt = make_state(parse_size(a.size))
    up: dict[str, list[float]] = {k: [] for k in ("save", "upload_file", "proxied save", "proxied log_artifact")}
    try:
        with CheckpointManager(work / "ck", experiment="s3-bench") as mgr:
            run_id = mgr.run_id
            for i in range(1, a.repeats + 1):
                up["save"].append(timed(partial(mgr.save, model, opt, {"step": i})))
                folder = work / "ck" / run_id / f"step-{i:08d}"
                up["upload_file"].append(sum(timed(partial(s3.upload_file, str(folder / n), BUCKET, f"raw/{i}/{n}"))
                                             for n in ("model.pt", "state.pt")))  # fmt: skip
        record = statistics.median(m.value for m in client.get_metric_history(run_id, "system/checkpoint_record_s"))
        direct = resume_rows(run_id, a.size, a.repeats, work)

        (work / "server").mkdir()
        with mlflow_server(work / "server", f"s3://{BUCKET}/proxied") as url:
            pclient = MlflowClient(url)
            with CheckpointManager(work / "ck-proxied", experiment="s3-proxied", tracking_uri=url) as mgr:
                prun = mgr.run_id
                for i in range(1, a.repeats + 1):
                    up["proxied save"].append(timed(partial(mgr.save, model, opt, {"step": i})))
                    folder = work / "ck-proxied" / prun / f"step-{i:08d}"
                    names = ("model.pt", "state.pt")
                    log = [partial(pclient.log_artifact, prun, str(folder / n), f"raw{i}") for n in names]
                    up["proxied log_artifact"].append(sum(timed(f) for f in log))
            precord = statistics.median(m.value for m in pclient.get_metric_history(prun, "system/checkpoint_record_s"))
            single = {"MLFLOW_ENABLE_PROXY_MULTIPART_DOWNLOAD": "false"}
            proxied = resume_rows(prun, a.size, a.repeats, work, url,
                                  {"MLflow (its default: presigned, parallel)": {}, "MLflow, one stream": single})

        client.create_experiment("local-bench", artifact_location=str(work / "local-artifacts"))
        rates = {
            "local": interference(CheckpointManager(work / "ck-local", experiment="local-bench", async_save=True),
                                  model, opt, work, a.repeats),
            "S3": interference(CheckpointManager(work / "ck-s3", experiment="s3-bench", async_save=True),
                               model, opt, work, a.repeats, endpoint),
        }  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
        shutil.rmtree(work, ignore_errors=True)  # gigabytes of checkpoints and downloads
    med = {k: statistics.median(v) for k, v in up.items()}
    print(f"S3 (moto on loopback), state {a.size}, {a.repeats} repeats, medians")
    print(f"direct  record:  the upload part of a save (its record_s) {record:.2f} s vs boto3 upload_file "
          f"{med['upload_file']:.2f} s: {record / med['upload_file']:.2f}x (target <= 1.1x); save() end to end "
          f"(serialize, fsync, hash, upload, record) {med['save']:.2f} s: {med['save'] / med['upload_file']:.2f}x")
    print(f"direct  resume:  tracked_ckpt.load {direct['tracked_ckpt']:.2f} s vs download_artifacts+torch.load "
          f"{direct['MLflow']:.2f} s: {direct['tracked_ckpt'] / direct['MLflow']:.2f}x (target <= 1.0x)")
    print(f"proxied record:  the upload part of a save {precord:.2f} s vs MLflow's log_artifact "
          f"{med['proxied log_artifact']:.2f} s: {precord / med['proxied log_artifact']:.2f}x; save() end to end "
          f"{med['proxied save']:.2f} s")
    for name, secs in proxied.items():
        if name != "tracked_ckpt":
            print(f"proxied resume:  tracked_ckpt.load {proxied['tracked_ckpt']:.2f} s vs {name} download_artifacts+"
                  f"torch.load {secs:.2f} s: {proxied['tracked_ckpt'] / secs:.2f}x")
    for store, r in rates.items():
        for floor, rate in r.items():
            if floor != "save":
                print(f"interference ({store} store): loop rate during a background save {r['save']:.0f}/s vs during "
                      f"{'a raw write' if floor == 'write' else 'another process uploading it'} {rate:.0f}/s: "
                      f"{r['save'] / rate:.2f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
