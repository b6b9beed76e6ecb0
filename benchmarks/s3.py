"""tracked_ckpt against an S3 bucket, side by side with boto3 and MLflow's own calls, and what a background save
costs a GIL-bound training loop.

    python benchmarks/s3.py                    # 200 MB state, 3 repeats (~3 min on 2 cores)
    python benchmarks/s3.py --size 1GB --repeats 5

The bucket is `moto`'s S3 server on loopback (an in-memory Python server: ~40 MB/s each way here, so it is the
floor that matters, not the seconds). Printed, as medians with the ratio of medians:

- record: ``save()`` of a checkpoint into an experiment whose artifact root is ``s3://`` (serialize, commit, upload,
  record) ÷ boto3's ``upload_file`` of the same bytes (the floor; target ≤ 1.1x);
- resume: ``tracked_ckpt.load(run_id)`` with nothing local (download, verify, load) ÷ MLflow's
  ``download_artifacts`` + ``torch.load`` + ``load_state_dict`` (which verify nothing; target ≤ 1.0x);
- interference: a training loop of many tiny ops on one thread (as the host thread of GPU training is), its step
  rate while an async save (upload included) runs ÷ its rate while a plain thread writes the same bytes to a new
  file with the GIL released (the floor; target ≥ 0.95x).
"""

from __future__ import annotations

import argparse
import os
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from run import make_state, parse_size, restore  # noqa: E402

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


def tiny_steps(seconds: float) -> float:
    """Steps per second of a GIL-bound loop of tiny tensor ops, over ``seconds``."""
    x = torch.ones(8)
    n, t0 = 0, time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        for _ in range(50):
            x = (x * 1.0001 + 0.5).relu()
        n += 1
    return n / (time.perf_counter() - t0)


def interference(mgr: object, model: torch.nn.Module, opt: torch.optim.Optimizer, work: Path,
                 repeats: int) -> tuple[float, float]:  # fmt: skip
    """Median step rates of the tiny loop during a background save, and during a raw write of as many bytes."""
    from tracked_ckpt import CheckpointManager

    assert isinstance(mgr, CheckpointManager)
    with mgr:
        mgr.save(model, opt, {"step": 0})
        mgr.wait()  # staging buffers allocated
        blob = bytes((mgr.save_dir / mgr.run_id / "step-00000000" / "state.pt").stat().st_size)
        during_save, during_write = [], []
        for i in range(1, repeats + 1):
            mgr.save(model, opt, {"step": i})
            during_save.append(tiny_steps(1.5))
            mgr.wait()

            def write(i: int = i) -> None:
                with open(work / f"raw-{mgr.run_id}-{i}.bin", "wb") as f:
                    f.write(blob)
                    f.flush()
                    os.fsync(f.fileno())

            t = threading.Thread(target=write)
            t.start()
            during_write.append(tiny_steps(1.5))
            t.join()
    return statistics.median(during_save), statistics.median(during_write)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--size", default="200MB")
    p.add_argument("--repeats", type=int, default=3)
    a = p.parse_args(argv)
    torch.set_num_threads(1)
    import boto3
    from mlflow.tracking import MlflowClient

    import tracked_ckpt
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
    rows: dict[str, list[float]] = {k: [] for k in ("record", "upload_file", "resume", "download+load")}
    try:
        with CheckpointManager(work / "ck", experiment="s3-bench") as mgr:
            run_id = mgr.run_id
            for i in range(1, a.repeats + 1):
                rows["record"].append(timed(lambda i=i: mgr.save(model, opt, {"step": i})))
                state = work / "ck" / run_id / f"step-{i:08d}" / "state.pt"
                rows["upload_file"].append(timed(lambda s=state, i=i: s3.upload_file(str(s), BUCKET, f"raw/{i}.pt")))
        fresh, fresh_opt = make_state(parse_size(a.size))
        path = f"checkpoints/step-{a.repeats:08d}/state.pt"
        for i in range(a.repeats):
            rows["resume"].append(timed(lambda: tracked_ckpt.load(run_id, fresh, fresh_opt)))
            dst = work / f"dl{i}"
            dst.mkdir()

            def download_then_load(d: Path = dst, path: str = path) -> None:
                local = client.download_artifacts(run_id, path, str(d))
                restore(Path(local), fresh, fresh_opt)

            rows["download+load"].append(timed(download_then_load))
        record_s = [m.value for m in client.get_metric_history(run_id, "system/checkpoint_record_s")]
        # Interference: the loop's rate during a background save vs during a raw write of the same bytes. With S3
        # the (Python) moto server shares this machine's cores; the local store shows the client side alone.
        client.create_experiment("local-bench", artifact_location=str(work / "local-artifacts"))
        rates = {}
        for exp in ("local-bench", "s3-bench"):
            rates[exp] = interference(CheckpointManager(work / f"ck-{exp}", experiment=exp, async_save=True),
                                      model, opt, work, a.repeats)  # fmt: skip
    finally:
        os.killpg(proc.pid, signal.SIGTERM)
    med = {k: statistics.median(v) for k, v in rows.items()}
    upload = statistics.median(record_s)
    print(f"S3 (moto on loopback), state {a.size}, {a.repeats} repeats, medians")
    print(f"record in S3:  the upload part of a save (its record_s) {upload:.2f} s vs boto3 upload_file "
          f"{med['upload_file']:.2f} s: {upload / med['upload_file']:.2f}x (target <= 1.1x); save() end to end "
          f"(serialize, fsync, hash, upload, record) {med['record']:.2f} s: {med['record'] / med['upload_file']:.2f}x")
    print(f"resume:        tracked_ckpt.load {med['resume']:.2f} s vs download_artifacts+torch.load "
          f"{med['download+load']:.2f} s: {med['resume'] / med['download+load']:.2f}x (target <= 1.0x)")  # fmt: skip
    for exp, (rate_save, rate_write) in rates.items():
        print(f"interference ({exp.split('-')[0]} store): loop rate during a background save {rate_save:.0f}/s vs "
              f"during a raw write {rate_write:.0f}/s: {rate_save / rate_write:.2f}x (target >= 0.95x)")


if __name__ == "__main__":
    main()
