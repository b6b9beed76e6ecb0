"""Shared fixtures: one real sqlite MLflow store per session, one real `mlflow server` per session.

No MLflow mocks: the store is MLflow's own SQLAlchemy store on sqlite; the server is the `mlflow server`
CLI in a subprocess on 127.0.0.1, stopped by its PID.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parent.parent


def pytest_addoption(parser: pytest.Parser) -> None:
    parser.addoption("--run-slow", action="store_true", help="also run the long variants (many kill seeds, ...)")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if config.getoption("--run-slow"):
        return
    skip = pytest.mark.skip(reason="long variant: pass --run-slow")
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def session_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("mlflow-session")


@pytest.fixture(scope="session", autouse=True)
def local_store(session_dir: Path) -> Iterator[str]:
    """MLflow's local default layout (sqlite mlflow.db + ./mlruns) in a session folder, made the cwd.

    Created once: a new sqlite store costs ~4 s of migrations. Every test uses its own experiment.
    """
    old_cwd = os.getcwd()
    os.chdir(session_dir)
    uri = f"sqlite:///{session_dir / 'mlflow.db'}"
    old = {k: os.environ.get(k) for k in ("MLFLOW_TRACKING_URI", "MLFLOW_RUN_ID", "MLFLOW_EXPERIMENT_NAME")}
    os.environ["MLFLOW_TRACKING_URI"] = uri
    os.environ.pop("MLFLOW_RUN_ID", None)
    os.environ.pop("MLFLOW_EXPERIMENT_NAME", None)
    from mlflow.tracking import MlflowClient

    MlflowClient(uri).search_experiments()  # run the migrations now, once
    yield uri
    os.chdir(old_cwd)
    for k, v in old.items():
        if v is None:
            os.environ.pop(k, None)
        else:
            os.environ[k] = v


@pytest.fixture(autouse=True)
def no_process_wide_tracking_uri() -> Iterator[None]:
    """Undo ``mlflow.set_tracking_uri`` made by a framework run in this process (Lightning's MLFlowLogger, HF's
    callback): it outlives the test and would answer later tests' "no tracking URI" reads, as no fresh process sees."""
    yield
    import mlflow.tracking._tracking_service.utils as tracking  # the process-wide URI has no public reset

    if tracking._tracking_uri is not None:
        env = os.environ.get("MLFLOW_TRACKING_URI")
        tracking.set_tracking_uri(None)  # type: ignore[arg-type]  # also unsets the environment variable
        if env is not None:
            os.environ["MLFLOW_TRACKING_URI"] = env


@pytest.fixture
def experiment() -> str:
    """A fresh experiment name per test, so tests never see each other's runs."""
    return f"test-{uuid.uuid4().hex[:10]}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_healthy(url: str, proc: subprocess.Popen[bytes], log: Path, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"mlflow server exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=2) as r:
                if r.status == 200:
                    return
        except OSError:
            pass
        time.sleep(0.5)
    raise RuntimeError(f"mlflow server at {url} not healthy after {timeout} s:\n{log.read_text()[-3000:]}")


def start_mlflow_server(
    workdir: Path, *extra: str, env: dict[str, str] | None = None
) -> tuple[str, subprocess.Popen[bytes]]:
    workdir.mkdir(parents=True, exist_ok=True)
    port = free_port()
    log = workdir / "server.log"
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{workdir / 'server.db'}",
        "--artifacts-destination",
        str(workdir / "artifacts"),
        "--workers",
        "1",
        *extra,
    ]
    full_env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false", **(env or {})}
    full_env.pop("MLFLOW_TRACKING_URI", None)
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            cmd, cwd=workdir, stdout=out, stderr=subprocess.STDOUT, env=full_env, start_new_session=True
        )
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, proc, log)
    except BaseException:
        stop_server(proc)
        raise
    return url, proc


def stop_server(proc: subprocess.Popen[bytes]) -> None:
    """Stop the server and its workers by PID (its own process group)."""
    if proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1 with proxied artifacts (mlflow-artifacts:), once per session."""
    url, proc = start_mlflow_server(tmp_path_factory.mktemp("mlflow-server"))
    yield url
    stop_server(proc)


class TinyNet(torch.nn.Module):
    def __init__(self, hidden: int = 8) -> None:
        super().__init__()
        self.fc1 = torch.nn.Linear(4, hidden)
        self.drop = torch.nn.Dropout(0.1)
        self.fc2 = torch.nn.Linear(hidden, 2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.drop(torch.relu(self.fc1(x))))


def make_training(hidden: int = 8, seed: int = 0) -> tuple[TinyNet, torch.optim.Optimizer, object]:
    torch.manual_seed(seed)
    model = TinyNet(hidden)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    sched = torch.optim.lr_scheduler.StepLR(opt, step_size=3, gamma=0.5)
    return model, opt, sched


def train_steps(model: TinyNet, opt: torch.optim.Optimizer, sched: object, n: int) -> float:
    loss = torch.tensor(0.0)
    for _ in range(n):
        x = torch.randn(16, 4)
        loss = (model(x) - x[:, :2]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()  # type: ignore[attr-defined]
    return float(loss.detach())


def assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    for (ka, va), (kb, vb) in zip(a.state_dict().items(), b.state_dict().items(), strict=True):
        assert ka == kb
        assert torch.equal(va, vb), ka


def run_python(code: str, cwd: Path, env: dict[str, str] | None = None, timeout: float = 180) -> str:
    """Run ``code`` in a fresh interpreter (a real second process); return stdout, fail with stderr."""
    full_env = {**os.environ, "PYTHONPATH": str(ROOT / "tests") + os.pathsep + str(ROOT), **(env or {})}
    p = subprocess.run(
        [sys.executable, "-c", code], cwd=cwd, env=full_env, capture_output=True, text=True, timeout=timeout
    )
    if p.returncode != 0:
        raise AssertionError(f"subprocess failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return p.stdout


def run_job(
    script: Path, cwd: Path, *args: str, env: dict[str, str] | None = None, check: bool = True
) -> tuple[int, str]:
    """Run a job script in a fresh interpreter in ``cwd``: (return code, stdout); fails with stderr if ``check``."""
    cwd.mkdir(parents=True, exist_ok=True)
    full_env = {**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}
    p = subprocess.run([sys.executable, str(script), *args], cwd=cwd, env=full_env, capture_output=True, text=True,
                       timeout=300)  # fmt: skip
    if check and p.returncode != 0:
        raise AssertionError(f"{script.name} {args} failed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}")
    return p.returncode, p.stdout


def checkpoint_steps(run_id: str) -> list[int]:
    """The steps of the run's committed checkpoints, as MLflow records them, in commit order."""
    from mlflow.tracking import MlflowClient

    from tracked_ckpt.catalog import RunCatalog
    from tracked_ckpt.store.run_store import RunStore

    return [r.manifest.step for r in RunCatalog(RunStore(MlflowClient(), run_id)).scan()]


def printed_run_id(stdout: str) -> str:
    """The run ID a job printed on its ``RUN_ID <id>`` line."""
    return next(line.split()[1] for line in stdout.splitlines() if line.startswith("RUN_ID "))


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """In-process CLI invocations (CliRunner) configure logging like the real command; undo it afterwards."""
    root, ours = logging.getLogger(), logging.getLogger("tracked_ckpt")
    saved = (list(root.handlers), root.level, ours.level, os.environ.get("MLFLOW_LOGGING_LEVEL"))
    yield
    root.handlers[:], root.level, ours.level = saved[0], saved[1], saved[2]
    if saved[3] is None:
        os.environ.pop("MLFLOW_LOGGING_LEVEL", None)
    else:
        os.environ["MLFLOW_LOGGING_LEVEL"] = saved[3]
