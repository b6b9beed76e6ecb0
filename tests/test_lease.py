"""One writer per run (a heartbeat lease, a save_dir lock) and opt-in save on SIGTERM, with real processes."""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from conftest import ROOT, make_training
from mlflow.tracking import MlflowClient

from tracked_ckpt import CheckpointManager
from tracked_ckpt.errors import RunLockedError
from tracked_ckpt.store.lease import JOB_ENV, TAG_LEASE

HOLDER = """
import socket, sys, time
if len(sys.argv) > 4:  # stands in for another node: the lease names this host, so its pid cannot be checked here
    socket.gethostname = lambda: sys.argv[4]
from tracked_ckpt import CheckpointManager
mgr = CheckpointManager(sys.argv[1], experiment=sys.argv[2], lease_timeout=float(sys.argv[3]))
print(mgr.run_id, flush=True)
time.sleep(120)
"""


def spawn(code: str, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": f"{ROOT / 'tests'}{os.pathsep}{ROOT}", **(env or {})}
    return subprocess.Popen([sys.executable, "-c", code, *args], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env=env)  # fmt: skip


def test_second_writer_fails_fast_naming_the_holder(tmp_path: Path, experiment: str) -> None:
    holder = spawn(HOLDER, str(tmp_path / "a"), experiment, "60")
    try:
        run_id = holder.stdout.readline().strip()  # type: ignore[union-attr]
        assert run_id, holder.stderr.read()  # type: ignore[union-attr]
        t0 = time.monotonic()
        with pytest.raises(RunLockedError, match=rf"run {run_id} is being written by host \S+ pid {holder.pid} "):
            CheckpointManager(tmp_path / "b", run_id=run_id)
        assert time.monotonic() - t0 < 10
        with pytest.raises(RunLockedError, match=rf"save_dir {tmp_path / 'a'} is in use .*pid {holder.pid}"):
            CheckpointManager(tmp_path / "a", experiment=experiment)
    finally:
        holder.kill()
        holder.wait()
    # The holder died without closing: its lease names a dead process on this host, so it is taken over.
    with CheckpointManager(tmp_path / "b", run_id=run_id) as mgr:
        lease = json.loads(MlflowClient().get_run(run_id).data.tags[TAG_LEASE])
        assert lease["pid"] == os.getpid()
        mgr.save(make_training()[0], metadata={"step": 1})
    assert TAG_LEASE not in MlflowClient().get_run(run_id).data.tags  # released on close


def test_expired_lease_of_another_host_is_taken_over_at_once(tmp_path: Path, experiment: str) -> None:
    client = MlflowClient()
    run = client.create_run(client.create_experiment(experiment))
    stale = {"host": "some-other-node", "pid": 1, "token": "x", "heartbeat": time.time() - 10}
    client.set_tag(run.info.run_id, TAG_LEASE, json.dumps(stale))
    t0 = time.monotonic()
    with CheckpointManager(tmp_path / "a", run_id=run.info.run_id, lease_timeout=5) as mgr:  # 10 s > 5 s: expired
        assert mgr.run_id == run.info.run_id
    assert time.monotonic() - t0 < 10


def start_holder(tmp_path: Path, experiment: str, host: str, env: dict[str, str] | None = None) -> tuple[
    subprocess.Popen[str], str
]:  # fmt: skip
    holder = spawn(HOLDER, str(tmp_path / host), experiment, "6", host, env=env)  # beats every 1.5 s
    run_id = holder.stdout.readline().strip()  # type: ignore[union-attr]
    assert run_id, holder.stderr.read()  # type: ignore[union-attr]
    return holder, run_id


def test_a_relaunch_on_another_host_waits_out_a_killed_jobs_lease(
    tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    holder, run_id = start_holder(tmp_path, experiment, "node-a")
    try:
        t0 = time.monotonic()  # a live holder on another host: refused at its next heartbeat
        with pytest.raises(RunLockedError, match=rf"host node-a pid {holder.pid} .*its heartbeat advanced"):
            CheckpointManager(tmp_path / "b", run_id=run_id, lease_timeout=6)
        assert time.monotonic() - t0 < 6  # within its interval (1.5 s) and a poll, before its lease could expire
    finally:
        holder.kill()
        holder.wait()
    killed = time.monotonic()
    with caplog.at_level(logging.INFO, logger="tracked_ckpt.store.lease"), CheckpointManager(
        tmp_path / "c", run_id=run_id, lease_timeout=6
    ) as mgr:  # fmt: skip
        waited = time.monotonic() - killed
        mgr.save(make_training()[0], metadata={"step": 1})
    assert 2 < waited < 6 + 30, waited  # it waited, and resumed within lease_timeout + 30 s: no human needed
    assert re.search(r"waiting up to \d s for its lease to expire", caplog.text), caplog.text
    assert "no heartbeat for 6 s" in caplog.text


def test_a_relaunch_of_the_same_job_takes_over_at_once(
    tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    holder, run_id = start_holder(tmp_path, experiment, "node-a", env={JOB_ENV: "job-1"})
    holder.kill()
    holder.wait()
    monkeypatch.setenv(JOB_ENV, "job-1")  # the scheduler's relaunch names the job alike
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="tracked_ckpt.store.lease"), CheckpointManager(
        tmp_path / "b", run_id=run_id, lease_timeout=6
    ):  # fmt: skip
        assert time.monotonic() - t0 < 6  # less than the lease it would otherwise wait out
    assert "earlier incarnation of this job (user:job-1)" in caplog.text


def test_heartbeat_keeps_a_live_lease_fresh(tmp_path: Path, experiment: str) -> None:
    with CheckpointManager(tmp_path / "a", experiment=experiment, lease_timeout=4) as mgr:  # beats every 1 s
        first = json.loads(MlflowClient().get_run(mgr.run_id).data.tags[TAG_LEASE])["heartbeat"]
        time.sleep(2.5)
        later = json.loads(MlflowClient().get_run(mgr.run_id).data.tags[TAG_LEASE])["heartbeat"]
        assert later > first


TRAINER = """
import sys, time, torch
from tracked_ckpt import CheckpointManager, EveryNSteps
model = torch.nn.Linear(4, 4)
mgr = CheckpointManager(sys.argv[1], experiment=sys.argv[2], save_policy=EveryNSteps(1000), save_on_sigterm=True)
step = mgr.load(model).get("step", 0)
print("start", step, flush=True)
while True:
    step += 1
    with torch.no_grad():
        model.weight.fill_(step)
    print("step", step, flush=True)
    if mgr.should_save(step):
        mgr.save(model, metadata={"step": step})
    time.sleep(0.05)
"""


def test_sigterm_saves_a_final_checkpoint_and_exits(tmp_path: Path, experiment: str) -> None:
    p = spawn(TRAINER, str(tmp_path / "ck"), experiment)
    assert p.stdout.readline().split() == ["start", "0"]  # type: ignore[union-attr]
    last = 0
    while last < 5:
        last = int(p.stdout.readline().split()[1])  # type: ignore[union-attr]
    p.send_signal(signal.SIGTERM)
    out, err = p.communicate(timeout=60)
    assert p.returncode == 143, err
    last = int(out.split()[-1]) if out.split() else last  # SIGTERM may land before the next step is printed
    assert "final checkpoint of step" in err
    # EveryNSteps(1000) never fired: the only checkpoint is the one SIGTERM asked for, at the last step.
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        df = mgr.checkpoints()
        assert list(df["step"]) == [last]
        assert MlflowClient().get_run(mgr.run_id).data.tags.get("tracked_ckpt.latest_step") == str(last)
    p2 = spawn(TRAINER, str(tmp_path / "ck"), experiment)
    try:
        assert p2.stdout.readline().split() == ["start", str(last)]  # type: ignore[union-attr]
    finally:
        p2.kill()
        p2.wait()
