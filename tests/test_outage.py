"""Tracking server down, hung or failing: the local checkpoint commits, the upload waits in the outbox.

Faults come from a TCP proxy between the real MLflow client and a real `mlflow server`: in "refuse" mode it
drops every connection, in "hang" mode it accepts and never answers, in "503" mode it answers HTTP 503.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import make_training, run_python
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager
from tracked_ckpt.api import sync

pytestmark = pytest.mark.server


class FaultProxy:
    def __init__(self, target: str) -> None:
        host, port = target.rsplit("//", 1)[1].split(":")
        self.target = (host, int(port))
        self.mode = "pass"
        self._listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self._listener.getsockname()[1]}"
        self._conns: list[socket.socket] = []
        self._lock = threading.Lock()
        threading.Thread(target=self._accept, daemon=True).start()

    def set_mode(self, mode: str) -> None:
        with self._lock:
            self.mode = mode
            for c in self._conns:  # keep-alive connections must not outlive a mode change
                with contextlib.suppress(OSError):
                    c.shutdown(socket.SHUT_RDWR)  # unblocks a thread in recv(), unlike close()
                    c.close()
            self._conns.clear()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._listener.accept()
            except OSError:
                return
            with self._lock:
                mode = self.mode
                self._conns.append(client)
            threading.Thread(target=self._serve, args=(client, mode), daemon=True).start()

    def _serve(self, client: socket.socket, mode: str) -> None:
        try:
            if mode == "refuse":
                client.close()
            elif mode == "hang":
                while client.recv(65536):
                    pass
            elif mode == "503":
                client.recv(65536)
                client.sendall(b"HTTP/1.1 503 Service Unavailable\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                client.close()
            else:
                upstream = socket.create_connection(self.target)
                with self._lock:
                    self._conns.append(upstream)
                threading.Thread(target=self._pipe, args=(upstream, client), daemon=True).start()
                self._pipe(client, upstream)
        except OSError:
            pass

    @staticmethod
    def _pipe(src: socket.socket, dst: socket.socket) -> None:
        try:
            while data := src.recv(65536):
                dst.sendall(data)
        except OSError:
            pass
        finally:
            for s in (src, dst):
                with contextlib.suppress(OSError):
                    s.close()

    def close(self) -> None:
        self._listener.close()
        self.set_mode("refuse")


@pytest.fixture
def proxy(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "60")  # longer than any budget below: the budget must win
    p = FaultProxy(mlflow_server)
    yield p
    p.close()


def reward_steps(url: str, run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient(url).get_metric_history(run_id, "reward"))


@pytest.mark.parametrize("mode", ["refuse", "hang", "503"])
def test_outage_queues_then_drains_in_order_without_duplicates(
    proxy: FaultProxy, mlflow_server: str, tmp_path: Path, experiment: str, mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=proxy.url, publish_timeout=2) as mgr:
        mgr.save(model, opt, {"step": 1, "reward": 1.0})
        proxy.set_mode(mode)
        with caplog.at_level(logging.WARNING, logger="tracked_ckpt"):
            t0 = time.monotonic()
            mgr.save(model, opt, {"step": 2, "reward": 2.0})
            mgr.save(model, opt, {"step": 3, "reward": 3.0})
            blocked = time.monotonic() - t0
        assert blocked < 15, f"two saves during a {mode} outage blocked training {blocked:.1f} s"  # budget 2 s each
        outage_warnings = [r for r in caplog.records if "once per outage" in r.getMessage()]
        assert len(outage_warnings) == 1 and proxy.url in outage_warnings[0].getMessage()
        assert [p.step for p in mgr.outbox.pending(mgr.run_id)] == [2, 3]
        assert (tmp_path / "ck" / mgr.run_id / "step-00000003" / "MANIFEST.json").exists()  # committed locally
        assert reward_steps(mlflow_server, mgr.run_id) == [1]
        proxy.set_mode("pass")
        mgr.save(model, opt, {"step": 4, "reward": 4.0})  # the next save wakes the publisher: in order
        assert mgr.sync(timeout=60) and mgr.outbox.pending(mgr.run_id) == []
        assert reward_steps(mlflow_server, mgr.run_id) == [1, 2, 3, 4]
        assert mgr.get_latest_checkpoint() is not None and mgr.get_latest_checkpoint().endswith("step-00000004")  # type: ignore[union-attr]
        assert list(mgr.checkpoints()["step"]) == [1, 2, 3, 4]


def test_close_returns_on_time_and_the_next_process_drains(
    proxy: FaultProxy, mlflow_server: str, tmp_path: Path, experiment: str
) -> None:
    model, opt, _ = make_training()
    mgr = CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=proxy.url, publish_timeout=2)
    mgr.save(model, opt, {"step": 1, "reward": 1.0})
    proxy.set_mode("hang")
    mgr.save(model, opt, {"step": 2, "reward": 2.0})
    t0 = time.monotonic()
    mgr.close()
    assert time.monotonic() - t0 < 10
    assert [p.step for p in mgr.outbox.pending()] == [2]  # left on disk
    proxy.set_mode("pass")
    out = run_python(
        f"""
from tracked_ckpt import CheckpointManager
from tracked_ckpt.api import sync
with CheckpointManager({str(tmp_path / "ck")!r}, tracking_uri={proxy.url!r}) as mgr:
    print("RESULT", mgr.run_id, mgr.get_latest_checkpoint(), len(mgr.outbox.pending()))
""",
        tmp_path,
        {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0"},
    )
    run_id, latest, left = next(x for x in out.splitlines() if x.startswith("RESULT")).split()[1:]
    assert run_id == mgr.run_id and latest.endswith("step-00000002") and left == "0"
    assert reward_steps(mlflow_server, run_id) == [1, 2]


def test_sync_uploads_what_an_outage_left(
    proxy: FaultProxy, mlflow_server: str, tmp_path: Path, experiment: str
) -> None:
    model, opt, _ = make_training()
    mgr = CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=proxy.url, publish_timeout=1,
                            monitor="loss", mode="min")  # fmt: skip
    proxy.set_mode("503")
    mgr.save(model, opt, {"step": 7, "reward": 1.0, "loss": 0.5})
    mgr.close()
    assert sync(tmp_path / "ck", timeout=1) == {mgr.run_id: 1}  # still failing: still queued
    status = MlflowClient(mlflow_server).get_run(mgr.run_id).info.status
    proxy.set_mode("pass")
    cli = subprocess.run([sys.executable, "-m", "tracked_ckpt", "sync", str(tmp_path / "ck")], capture_output=True,
                         text=True, timeout=120, env={**os.environ, "MLFLOW_TRACKING_URI": proxy.url})  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    assert f"run {mgr.run_id}: all recorded" in cli.stdout
    assert reward_steps(mlflow_server, mgr.run_id) == [7]
    assert tracked_ckpt.load(mgr.run_id, model, tracking_uri=mlflow_server)["step"] == 7
    run = MlflowClient(mlflow_server).get_run(mgr.run_id)
    assert run.info.status == status  # sync records checkpoints; it does not end or restart the run
    assert run.data.tags["tracked_ckpt.monitor"] == "loss:min" and run.data.tags["tracked_ckpt.best_step"] == "7"
