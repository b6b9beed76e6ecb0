"""A team server: `mlflow server` on a real PostgreSQL, proxied artifacts; concurrent writers; DCP over HTTP.

PostgreSQL is Debian's (``apt-get install postgresql``; tests/run.sh installs it). initdb refuses root, so
as root the cluster runs as the ``postgres`` user in a temp dir it owns. Everything is stopped by PID.
"""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from conftest import ROOT, free_port, start_mlflow_server, stop_server
from mlflow.tracking import MlflowClient
from test_distributed import assert_same, launch, run_id_of

from tracked_ckpt import CheckpointManager
from tracked_ckpt.catalog import RunCatalog
from tracked_ckpt.fsdp_demo import build
from tracked_ckpt.safe_load import torch_load_safe
from tracked_ckpt.store.run_store import RunStore

# Fail fast against a dead server instead of MLflow's default ~4 minutes of retries.
CLIENT_ENV = {
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "30",
}


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        pytest.fail("PostgreSQL is not installed: `apt-get install -y postgresql` (tests/run.sh does it as root)")
    return found[-1].parent


def _as_postgres(*cmd: str) -> list[str]:
    return ["runuser", "-u", "postgres", "--", *cmd] if os.geteuid() == 0 else list(cmd)


@pytest.fixture(scope="module")
def postgres() -> Iterator[str]:
    """A throwaway PostgreSQL cluster on a free loopback port; yields its SQLAlchemy URI."""
    bin_dir, port = _pg_bin(), free_port()
    base = Path(tempfile.mkdtemp(prefix="tracked_ckpt-pg-"))
    data, sock = base / "data", base / "sock"
    sock.mkdir()
    if os.geteuid() == 0:
        shutil.chown(base, "postgres")
        shutil.chown(sock, "postgres")
    run = lambda *cmd: subprocess.run(_as_postgres(*cmd), check=True, capture_output=True, timeout=60)  # noqa: E731
    run(str(bin_dir / "initdb"), "-D", str(data), "-A", "trust", "-U", "postgres", "--no-sync")
    opts = f"-p {port} -k {sock} -h 127.0.0.1 -c fsync=off -c full_page_writes=off"
    run(str(bin_dir / "pg_ctl"), "-D", str(data), "-o", opts, "-l", str(base / "pg.log"), "-w", "start")
    pid = int((data / "postmaster.pid").read_text().split()[0])
    try:
        run(str(bin_dir / "createdb"), "-h", "127.0.0.1", "-p", str(port), "-U", "postgres", "mlflow")
        yield f"postgresql+psycopg2://postgres@127.0.0.1:{port}/mlflow"
    finally:
        os.kill(pid, signal.SIGINT)  # "fast" shutdown of the postmaster and its children
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and Path(f"/proc/{pid}").exists():
            time.sleep(0.1)
        if Path(f"/proc/{pid}").exists():
            os.kill(pid, signal.SIGKILL)
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def pg_server(postgres: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """`mlflow server` on that PostgreSQL with proxied artifacts (mlflow-artifacts:), one worker."""
    # conftest passes a sqlite --backend-store-uri; the later option wins.
    url, proc = start_mlflow_server(tmp_path_factory.mktemp("pg-server"), "--backend-store-uri", postgres)
    old = {k: os.environ.get(k) for k in CLIENT_ENV}
    os.environ.update(CLIENT_ENV)
    yield url
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v
    stop_server(proc)


WRITER = """
import sys, time, torch
from tracked_ckpt import CheckpointManager
from tracked_ckpt.errors import RunLockedError
url, run_id, save_dir, first = sys.argv[1], sys.argv[2], sys.argv[3], int(sys.argv[4])
deadline = time.monotonic() + 90
while True:  # the run's lease admits one writer at a time: wait for the other one to finish
    try:
        mgr = CheckpointManager(save_dir, run_id=run_id, tracking_uri=url)
        break
    except RunLockedError:
        print("locked out", flush=True)
        assert time.monotonic() < deadline
        time.sleep(0.5)
model = torch.nn.Linear(64, 64)
for step in range(first, first + 10, 2):
    with torch.no_grad():
        model.weight.fill_(step)
    mgr.save(model, None, {"step": step, "loss": 1.0 / step})
    print("saved", step, flush=True)
mgr.close()
"""


def test_two_processes_writing_one_run_lose_nothing(pg_server: str, tmp_path: Path, experiment: str) -> None:
    """Two writers started together on one run (different save_dirs, distinct steps): every save lands.

    The run lease normally admits one and makes the other wait (it retries here); two starting within the
    same instant can both pass the tag check (tags have no compare-and-set) and then write side by side.
    Either way, every step a writer reported saved must resolve and verify afterwards.
    """
    client = MlflowClient(pg_server)
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    env = {**os.environ, **CLIENT_ENV, "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_TRACKING_URI", None)
    writers = [
        subprocess.Popen(
            [sys.executable, "-c", WRITER, pg_server, run_id, str(tmp_path / name), first],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for name, first in (("odd", "1"), ("even", "2"))
    ]
    outputs = []
    for w in writers:
        out, _ = w.communicate(timeout=150)
        assert w.returncode == 0, out.decode()[-3000:]
        outputs.append(out.decode())
    saved = sorted(int(line.split()[1]) for out in outputs for line in out.splitlines() if line.startswith("saved "))
    assert saved == list(range(1, 11))
    catalog = RunCatalog(RunStore(client, run_id))
    found = catalog.scan()
    assert sorted(r.manifest.step for r in found) == saved
    for r in found:
        tmp = tmp_path / "fetched" / r.path.rpartition("/")[2]
        tmp.mkdir(parents=True)
        folder = catalog.fetch_verified(r, tmp)
        weight = torch_load_safe(folder / "model.pt", r.path)["model"]["weight"]
        assert torch.equal(weight, torch.full((64, 64), float(r.manifest.step)))
    latest = catalog.latest()
    assert latest is not None and latest.manifest.step in (9, 10)  # the last save of one writer or the other


def test_dcp_checkpoint_round_trips_through_the_proxied_server(pg_server: str, tmp_path: Path) -> None:
    """``.metadata`` (a dot file) and the shards go up over HTTP and come back verified, at another world size."""
    (tmp_path / "saves").mkdir()
    env = {"MLFLOW_TRACKING_URI": pg_server, **CLIENT_ENV}
    args = ["--steps", "2", "--save-every", "2", "--save-dir", "s", "--dump-saves", "saves", "--width", "64"]
    run_id = run_id_of(launch(2, *args, cwd=tmp_path, env=env))
    model = build(64, seed=5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    mgr = CheckpointManager(tmp_path / "elsewhere", run_id=run_id, tracking_uri=pg_server)
    assert mgr.load(model, opt)["step"] == 2
    saved = torch.load(tmp_path / "saves" / "step-2.pt")
    assert_same(saved["model"], model.state_dict(), "model")
    mgr.close()
