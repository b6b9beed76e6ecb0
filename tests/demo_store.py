"""One store populated by the demo job, and one `mlflow server` over it, shared by the CLI, notebook and UI tests.

Both are made once per pytest session (cached on ``config.stash``, stopped by ``config.add_cleanup``), so a
module-scoped fixture in each test module costs nothing after the first: the demo takes ~10 s, the server
~25 s to answer. The demo runs through the real ``python -m tracked_ckpt demo`` entry point into
``<root>/server.db`` (local artifacts under ``<root>/mlruns``), which is the database the server then serves.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass, field
from pathlib import Path

import pytest
from conftest import start_mlflow_server, stop_server

DEMO_EXPERIMENT = "tracked-ckpt-demo"
DEMO_ITERATIONS = 15  # saves at 5, 10, 15 (the demo saves every 5)


@dataclass(frozen=True)
class DemoStore:
    root: Path
    uri: str
    run_id: str
    experiment_id: str
    stdout: str
    env: dict[str, str] = field(default_factory=dict)  # os.environ with MLFLOW_TRACKING_URI = uri


@dataclass(frozen=True)
class DemoServer:
    url: str
    log: Path
    store: DemoStore


_STORE = pytest.StashKey[DemoStore]()
_SERVER = pytest.StashKey[DemoServer]()


def demo_store(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> DemoStore:
    if _STORE in config.stash:
        return config.stash[_STORE]
    root = tmp_path_factory.mktemp("demo-store")
    uri = f"sqlite:///{root / 'server.db'}"
    env = {**os.environ, "MLFLOW_TRACKING_URI": uri}
    cmd = [sys.executable, "-m", "tracked_ckpt", "demo", "--iterations", str(DEMO_ITERATIONS)]
    p = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    if p.returncode != 0:
        raise AssertionError(f"the demo failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    from mlflow.tracking import MlflowClient

    client = MlflowClient(uri)
    exp = client.get_experiment_by_name(DEMO_EXPERIMENT)
    assert exp is not None, p.stdout
    (run,) = client.search_runs([exp.experiment_id])
    store = DemoStore(root, uri, run.info.run_id, str(exp.experiment_id), p.stdout, env)
    config.stash[_STORE] = store
    return store


def demo_server(config: pytest.Config, tmp_path_factory: pytest.TempPathFactory) -> DemoServer:
    if _SERVER in config.stash:
        return config.stash[_SERVER]
    store = demo_store(config, tmp_path_factory)
    url, proc = start_mlflow_server(store.root)
    config.add_cleanup(lambda: stop_server(proc))
    server = DemoServer(url, store.root / "server.log", store)
    config.stash[_SERVER] = server
    return server
