"""Tracking server down, hung or failing: the local checkpoint commits, the upload waits in the outbox.

Faults come from a TCP proxy between the real MLflow client and a real `mlflow server`: in "refuse" mode it
drops every connection, in "hang" mode it accepts and never answers, in "503" mode it answers HTTP 503.
Every test runs with MLflow's default HTTP settings (7 retries, 120 s timeouts) — what users have — except
the one that shows a user's own lower settings are respected.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from conftest import make_training, run_python, train_steps
from fault_proxy import FaultProxy
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager
from tracked_ckpt.api import sync
from tracked_ckpt.errors import StoreError

pytestmark = pytest.mark.server


@pytest.fixture
def proxy(mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> Iterator[FaultProxy]:
    for name in ("MAX_RETRIES", "TIMEOUT", "BACKOFF_FACTOR"):
        monkeypatch.delenv(f"MLFLOW_HTTP_REQUEST_{name}", raising=False)  # MLflow's defaults, as users have them
    p = FaultProxy(mlflow_server)
    yield p
    p.close()


def reward_steps(url: str, run_id: str) -> list[int]:
    return [m.step for m in sorted(MlflowClient(url).get_metric_history(run_id, "reward"), key=lambda m: m.step)]


def wait_until(predicate: Any, timeout: float) -> float:
    """Seconds until ``predicate()`` holds (polled every 0.1 s); AssertionError after ``timeout``."""
    t0 = time.monotonic()
    while not predicate():
        if time.monotonic() - t0 > timeout:
            raise AssertionError(f"not within {timeout} s")
        time.sleep(0.1)
    return time.monotonic() - t0


@pytest.mark.parametrize("mode", ["refuse", "hang", "503"])
def test_outage_costs_one_wait_then_nothing_and_drains_by_itself(
    proxy: FaultProxy, mlflow_server: str, tmp_path: Path, experiment: str, mode: str,
    caplog: pytest.LogCaptureFixture,
) -> None:  # fmt: skip
    model, opt, _ = make_training()
    budget = 6.0
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=proxy.url,
                           publish_timeout=budget) as mgr:  # fmt: skip
        t0 = time.monotonic()
        mgr.save(model, opt, {"step": 1, "reward": 1.0})
        up = time.monotonic() - t0
        proxy.set_mode(mode)
        blocked = []
        with caplog.at_level(logging.WARNING, logger="tracked_ckpt"):
            for step in (2, 3, 4, 5):
                t0 = time.monotonic()
                mgr.save(model, opt, {"step": step, "reward": float(step)})
                blocked.append(time.monotonic() - t0)
        first, later = blocked[0], blocked[1:]
        # The first save of an outage: the budget when the server hangs, a few seconds when it answers at once.
        assert first < (budget + 2 if mode == "hang" else 4), (mode, blocked)
        # Every later save of the same outage: its local commit, plus at most ~1 s.
        assert max(later) < up + 1.5, (mode, up, blocked)
        outage_warnings = [r for r in caplog.records if "once per outage" in r.getMessage()]
        assert len(outage_warnings) == 1 and proxy.url in outage_warnings[0].getMessage()
        assert [p.step for p in mgr.outbox.pending(mgr.run_id)] == [2, 3, 4, 5]
        assert (tmp_path / "ck" / mgr.run_id / "step-00000005" / "MANIFEST.json").exists()  # committed locally
        assert mgr.get_latest_checkpoint() == f"runs:/{mgr.run_id}/checkpoints/step-00000005"  # never older
        assert reward_steps(mlflow_server, mgr.run_id) == [1]
        proxy.set_mode("pass")
        # No save, no sync: the publisher finds the server back by itself and records the backlog in order.
        drained_in = wait_until(lambda: not mgr.outbox.pending(mgr.run_id), timeout=20)
        assert drained_in < 12, drained_in
        assert reward_steps(mlflow_server, mgr.run_id) == [1, 2, 3, 4, 5]  # in order, no duplicate points
        assert list(mgr.checkpoints()["step"]) == [1, 2, 3, 4, 5]
        t0 = time.monotonic()
        mgr.save(model, opt, {"step": 6, "reward": 6.0})
        assert time.monotonic() - t0 < budget and not mgr.outbox.pending(mgr.run_id)  # recorded before returning
    tags = MlflowClient(mlflow_server).get_run(mgr.run_id).data.tags
    assert tags["tracked_ckpt.latest_step"] == "6" and tags["tracked_ckpt.count"] == "6"


def test_a_users_lower_http_settings_are_respected(
    proxy: FaultProxy, mlflow_server: str, tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=proxy.url, publish_timeout=30) as mgr:
        mgr.save(model, opt, {"step": 1, "reward": 1.0})
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "1")  # the user's own: lower than tracked_ckpt's 15/60 s
        monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
        proxy.set_mode("hang")
        t0 = time.monotonic()
        mgr.save(model, opt, {"step": 2, "reward": 2.0})
        blocked = time.monotonic() - t0
        assert blocked < 5, f"a 1 s timeout without retries should end the wait long before publish_timeout: {blocked}"
        assert [p.step for p in mgr.outbox.pending(mgr.run_id)] == [2]
        proxy.set_mode("pass")
        assert mgr.sync(timeout=30)
    assert reward_steps(mlflow_server, mgr.run_id) == [1, 2]


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
with CheckpointManager({str(tmp_path / "ck")!r}, tracking_uri={proxy.url!r}) as mgr:
    print("RESULT", mgr.run_id, mgr.get_latest_checkpoint(), len(mgr.outbox.pending()))
""",
        tmp_path,
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
    t0 = time.monotonic()
    assert sync(tmp_path / "ck", timeout=1) == {mgr.run_id: 1}  # still failing: still queued
    assert time.monotonic() - t0 < 10  # with MLflow's defaults, sync too gives up within its own budget
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


# ------------------------------------------------------------------------------- start during an outage

RELAUNCH = """
import logging, sys, time, json, pathlib
logging.basicConfig(level=logging.WARNING, stream=sys.stdout, format="LOG %(levelname)s %(message)s")
from conftest import make_training, train_steps
from tracked_ckpt import CheckpointManager
model, opt, sched = make_training(seed=5)
t0 = time.monotonic()
mgr = CheckpointManager("ck", tracking_uri=sys.argv[1], publish_timeout=5)
started = time.monotonic() - t0
meta = mgr.load(model, opt, scheduler=sched)
print("RESUMED", json.dumps({"meta": meta, "started": started, "run_id": mgr.run_id}), flush=True)
step = meta["step"]
for _ in range(2):
    step += 1
    train_steps(model, opt, sched, 1)
    t0 = time.monotonic()
    mgr.save(model, opt, {"step": step, "reward": float(step)}, scheduler=sched)
    print("SAVED", step, time.monotonic() - t0, flush=True)
pathlib.Path("offline-done").touch()
while not pathlib.Path("server-back").exists():
    time.sleep(0.1)
t0 = time.monotonic()
while mgr.outbox.pending(mgr.run_id) and time.monotonic() - t0 < 30:
    time.sleep(0.1)
print("DRAINED", time.monotonic() - t0, len(mgr.outbox.pending(mgr.run_id)), flush=True)
mgr.close()
"""


def test_a_relaunch_during_an_outage_resumes_from_save_dir_and_records_later(
    proxy: FaultProxy, mlflow_server: str, tmp_path: Path, experiment: str
) -> None:
    model, opt, sched = make_training(seed=5)
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=proxy.url) as mgr:
        for step in (1, 2):
            train_steps(model, opt, sched, 1)
            mgr.save(model, opt, {"step": step, "reward": float(step)}, scheduler=sched)
        run_id = mgr.run_id
    proxy.set_mode("refuse")
    (tmp_path / "job.py").write_text(RELAUNCH)
    env = {**os.environ, "PYTHONPATH": f"{Path(__file__).parent}{os.pathsep}{Path(__file__).parent.parent}"}
    job = subprocess.Popen([sys.executable, "job.py", proxy.url], cwd=tmp_path, env=env, stdout=subprocess.PIPE,
                           stderr=subprocess.STDOUT, text=True)  # fmt: skip
    try:
        wait_until(lambda: (tmp_path / "offline-done").exists() or job.poll() is not None, timeout=120)
        assert job.poll() is None, job.communicate()[0]
        assert MlflowClient(mlflow_server).get_run(run_id).info.status == "FINISHED"  # nothing recorded yet
        proxy.set_mode("pass")
        (tmp_path / "server-back").touch()
        out, _ = job.communicate(timeout=120)
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode == 0, out
    resumed = json.loads(next(x for x in out.splitlines() if x.startswith("RESUMED")).split(" ", 1)[1])
    assert resumed["run_id"] == run_id and resumed["meta"]["step"] == 2  # the newest local commit
    assert resumed["started"] < 15, resumed  # MLflow's defaults would retry for minutes
    warnings = [x for x in out.splitlines() if x.startswith("LOG WARNING") and "unreachable" in x]
    assert len(warnings) == 1 and proxy.url in warnings[0] and run_id in warnings[0], out
    saves = [float(x.split()[2]) for x in out.splitlines() if x.startswith("SAVED")]
    assert len(saves) == 2 and max(saves) < 3, out
    drained = next(x for x in out.splitlines() if x.startswith("DRAINED")).split()
    assert float(drained[1]) < 12 and drained[2] == "0", out
    run = MlflowClient(mlflow_server).get_run(run_id)
    assert reward_steps(mlflow_server, run_id) == [1, 2, 3, 4]
    assert run.info.status == "FINISHED" and run.data.tags["tracked_ckpt.latest_step"] == "4"
    assert run.data.tags["mlflow.note.content"].startswith("<!-- tracked_ckpt -->")
    assert "tracked_ckpt.lease" not in run.data.tags  # taken when the server answered, released at close


def test_a_new_run_cannot_start_offline_and_the_error_says_so(proxy: FaultProxy, tmp_path: Path) -> None:
    proxy.set_mode("refuse")
    t0 = time.monotonic()
    with pytest.raises(StoreError, match=r"unreachable.*a new run cannot be created offline") as err:
        CheckpointManager(tmp_path / "empty", tracking_uri=proxy.url)
    assert time.monotonic() - t0 < 10
    assert proxy.url in str(err.value)
    assert not (tmp_path / "empty" / "tracked_ckpt.json").exists()
