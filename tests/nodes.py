"""Two torchrun agents as two nodes on one machine, for tests/test_nodes.py and benchmarks/nodes.py.

Each node is what a cluster node is to the job: its own working directory (so its own relative ``save_dir``,
a node-local disk), its own host name (``unshare --uts``: a UTS namespace, no network namespace), and its own
path to the one real ``mlflow server`` — a FaultProxy (tests/fault_proxy.py) that counts the bytes the node
downloads and refuses, hangs or passes on demand. The agents rendezvous with ``--rdzv-backend=c10d`` on
127.0.0.1, as ``torchrun --nnodes=2`` does across machines; gloo is pinned to loopback because the host names
given here resolve nowhere.

Where ``unshare --uts`` is not allowed (no CAP_SYS_ADMIN, e.g. an unprivileged container), a user namespace is
tried (``unshare --user --map-root-user --uts``); where neither is, the nodes keep the machine's host name and
differ by working directory only; ``uts_namespaces()`` says which, and the tests print it.

Workers run in their own sessions (torchrun starts them so), so killing a node kills the agent and every process
below it by PID, as a node's preemption does.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path
from typing import Any

from fault_proxy import FaultProxy

ROOT = Path(__file__).resolve().parent.parent
JOB = Path(__file__).resolve().parent / "nodes_job.py"
Event = dict[str, Any]


@cache
def unshare_prefix() -> tuple[str, ...] | None:
    """How this process may give a child its own host name: ``unshare --uts`` as root, else inside a user
    namespace (unprivileged, where the kernel allows them); None where neither works."""
    for prefix in (("unshare", "--uts"), ("unshare", "--user", "--map-root-user", "--uts")):
        try:
            p = subprocess.run([*prefix, "sh", "-c", "hostname tracked-ckpt-probe && hostname"],
                               capture_output=True, text=True, timeout=10)  # fmt: skip
        except (OSError, subprocess.TimeoutExpired):
            continue
        if p.returncode == 0 and p.stdout.strip() == "tracked-ckpt-probe":
            return prefix
    return None


def uts_namespaces() -> bool:
    """Whether the nodes get distinct host names here."""
    return unshare_prefix() is not None


@dataclass
class Node:
    """One node: a host name, a working directory (its local disk) and its own proxy to the server."""

    host: str
    workdir: Path
    proxy: FaultProxy
    save_dir_name: str = "ckpt"

    @property
    def save_dir(self) -> Path:
        return self.workdir / self.save_dir_name

    def pending(self, run_id: str) -> int:
        """Entries left in this node's outbox, read from its disk (as `tracked-ckpt sync` would)."""
        from tracked_ckpt.outbox import Outbox

        return len(Outbox(self.save_dir).pending(run_id))

    def downloaded(self) -> int:
        return self.proxy.down


def make_nodes(root: Path, server: str, names: list[str]) -> list[Node]:
    nodes = []
    for name in names:
        (root / name).mkdir(parents=True, exist_ok=True)
        nodes.append(Node(name, root / name, FaultProxy(server)))
    return nodes


def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (children first found through /proc), deepest last."""
    found: list[int] = []
    todo = [pid]
    while todo:
        p = todo.pop()
        with contextlib.suppress(OSError):
            for task in os.listdir(f"/proc/{p}/task"):
                with contextlib.suppress(OSError), open(f"/proc/{p}/task/{task}/children") as f:
                    kids = [int(k) for k in f.read().split()]
                    found += kids
                    todo += kids
    return found


@dataclass
class Launch:
    """The agents of one torchrun job, one per node, with their output read live."""

    nodes: list[Node]
    procs: list[subprocess.Popen[bytes]]
    started: float = field(default_factory=time.monotonic)
    events: list[Event] = field(default_factory=list)
    lines: list[list[str]] = field(default_factory=list)
    _cond: threading.Condition = field(default_factory=threading.Condition)

    def __post_init__(self) -> None:
        self.lines = [[] for _ in self.procs]
        self._readers = [threading.Thread(target=self._read, args=(i,), daemon=True) for i in range(len(self.procs))]
        for t in self._readers:
            t.start()

    def _read(self, i: int) -> None:
        out = self.procs[i].stdout
        assert out is not None
        for raw in out:
            line = raw.decode(errors="replace").rstrip("\n")
            with self._cond:
                self.lines[i].append(line)
                if line.startswith("NODES "):
                    e = json.loads(line[6:])
                    e.update(node=i, at=time.monotonic() - self.started, down=self.nodes[i].proxy.down)
                    self.events.append(e)
                self._cond.notify_all()

    def wait_for(self, pred: Callable[[Event], bool], timeout: float, what: str = "") -> Event:
        """The first event (seen so far or to come) that satisfies ``pred``; AssertionError after ``timeout``."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                hit = next((e for e in self.events if pred(e)), None)
                if hit is not None:
                    return hit
                left = deadline - time.monotonic()
                if left <= 0 or (all(p.poll() is not None for p in self.procs) and not self._reading()):
                    raise AssertionError(f"no event {what or pred} within {timeout} s:\n{self.tail()}")
                self._cond.wait(min(left, 0.5))

    def _reading(self) -> bool:
        return any(t.is_alive() for t in self._readers)

    def of(self, kind: str, **match: Any) -> list[Event]:
        with self._cond:
            return [e for e in self.events if e["event"] == kind and all(e.get(k) == v for k, v in match.items())]

    def rank0_node(self) -> int:
        return int(self.wait_for(lambda e: e["event"] == "start" and e["rank"] == 0, 120, "rank 0 start")["node"])

    def signal_agents(self, sig: int) -> None:
        for p in self.procs:
            with contextlib.suppress(ProcessLookupError):
                os.kill(p.pid, sig)

    def kill_node(self, i: int) -> None:
        """SIGKILL node ``i``: its agent and everything below it, as when the machine is taken away."""
        pids = [self.procs[i].pid, *descendants(self.procs[i].pid)]
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)

    def wait(self, timeout: float) -> list[int]:
        """The agents' exit statuses; on timeout every node is killed and AssertionError says so."""
        deadline = time.monotonic() + timeout
        try:
            for p in self.procs:
                p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"the agents did not exit within {timeout} s:\n{self.tail()}") from None
        for t in self._readers:
            t.join(timeout=5)
        return [p.returncode for p in self.procs]

    def kill_all(self) -> None:
        for i, p in enumerate(self.procs):
            if p.poll() is None or descendants(p.pid):
                self.kill_node(i)
        for p in self.procs:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=10)

    def output(self, i: int) -> str:
        with self._cond:
            return "\n".join(self.lines[i])

    def tail(self, n: int = 60) -> str:
        return "\n".join(f"--- node {i} ({node.host})\n" + "\n".join(self.lines[i][-n:])
                         for i, node in enumerate(self.nodes))  # fmt: skip


def launch(
    nodes: list[Node], *job_args: str, nproc: int = 1, env: dict[str, str] | None = None, job: Path = JOB
) -> Launch:
    """Start one torchrun agent per node (c10d rendezvous on 127.0.0.1), each in its node's directory."""
    from conftest import free_port

    port = free_port()
    procs = []
    for node in nodes:
        cmd = [sys.executable, "-m", "torch.distributed.run", f"--nnodes={len(nodes)}", f"--nproc-per-node={nproc}",
               "--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{port}", "--local-addr=127.0.0.1",
               "--max-restarts=0", str(job), *job_args]  # fmt: skip
        prefix = unshare_prefix()
        if prefix is not None:
            cmd = [*prefix, "sh", "-c", f'hostname {node.host} && exec "$@"', "sh", *cmd]
        full_env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
                    "GLOO_SOCKET_IFNAME": "lo", "MLFLOW_TRACKING_URI": node.proxy.url, **(env or {})}  # fmt: skip
        for name in ("MAX_RETRIES", "TIMEOUT", "BACKOFF_FACTOR"):
            full_env.pop(f"MLFLOW_HTTP_REQUEST_{name}", None)  # MLflow's defaults, as users have them
        procs.append(subprocess.Popen(cmd, cwd=node.workdir, env=full_env, stdout=subprocess.PIPE,
                                      stderr=subprocess.STDOUT, start_new_session=True))  # fmt: skip
    return Launch(nodes, procs)


def run_single(workdir: Path, server: str, *job_args: str, timeout: float = 180) -> Launch:
    """The same job as one plain process (world size 1, no torchrun), straight to the server; waited for."""
    workdir.mkdir(parents=True, exist_ok=True)
    node = Node("single", workdir, FaultProxy(server))
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}", "OMP_NUM_THREADS": "1",
           "MLFLOW_TRACKING_URI": node.proxy.url}  # fmt: skip
    for name in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(name, None)
    proc = subprocess.Popen([sys.executable, str(JOB), *job_args], cwd=workdir, env=env, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, start_new_session=True)  # fmt: skip
    single = Launch([node], [proc])
    single.wait(timeout)
    node.proxy.close()
    return single


@contextlib.contextmanager
def running(nodes: list[Node], *job_args: str, **kw: Any) -> Iterator[Launch]:
    """A launch that is always cleaned up (every node killed) when the block leaves."""
    job = launch(nodes, *job_args, **kw)
    try:
        yield job
    finally:
        job.kill_all()


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.1) -> float:
    """Seconds until ``predicate()`` holds; AssertionError after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(step)
    return time.monotonic() - t0


class Server:
    """A real `mlflow server` on a fixed port that a test can SIGKILL and start again (same store, same URL)."""

    def __init__(self, workdir: Path) -> None:
        from conftest import free_port

        self.workdir, self.port = workdir, free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        from conftest import wait_healthy

        self.workdir.mkdir(parents=True, exist_ok=True)
        cmd = [sys.executable, "-m", "mlflow", "server", "--host", "127.0.0.1", "--port", str(self.port),
               "--backend-store-uri", f"sqlite:///{self.workdir / 'server.db'}",
               "--artifacts-destination", str(self.workdir / "artifacts"), "--workers", "1"]  # fmt: skip
        env = {**os.environ, "MLFLOW_SERVER_ENABLE_JOB_EXECUTION": "false"}
        env.pop("MLFLOW_TRACKING_URI", None)
        with open(self.workdir / "server.log", "ab") as log:
            self.proc = subprocess.Popen(cmd, cwd=self.workdir, stdout=log, stderr=subprocess.STDOUT, env=env,
                                         start_new_session=True)  # fmt: skip
        wait_healthy(self.url, self.proc, self.workdir / "server.log")

    def kill(self) -> None:
        """SIGKILL the server and its workers (its own process group), as a crash does."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
