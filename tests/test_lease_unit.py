"""The lease's rules as tables, and its waiting on a moved clock: no threads, no sleeps (real MLflow sqlite store).

The scenarios with real processes (SIGKILL, another host's live heartbeat, relaunches) are in test_lease.py.
"""

from __future__ import annotations

import json
import logging
import os
import socket
from collections.abc import Callable
from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

from tracked_ckpt.errors import RunLockedError
from tracked_ckpt.store.lease import JOB_ENV, TAG_LEASE, Holder, Lease, job_identity, verdict
from tracked_ckpt.store.run_store import RunStore

HERE, PID = "node-a", 1000
ME = Holder(host=HERE, pid=PID, save_dir="/ck", job="slurm:7")


@pytest.mark.parametrize(
    ("held", "age", "alive", "action", "why"),
    [
        # This host: what the OS says about the holder's process decides at once.
        (Holder(HERE, PID), 1, True, "take", "earlier manager of this process"),
        (Holder(HERE, 2000, save_dir="/ck"), 1, True, "take", "wrote through this save_dir"),
        (Holder(HERE, 2000, save_dir="/other"), 1, False, "take", "process is gone"),
        (Holder(HERE, 2000, save_dir="/other"), 1, True, "refuse", "live process on this host"),
        (Holder(HERE, 2000, save_dir="/other", job="slurm:7"), 1, True, "refuse", "live process"),  # job: no matter
        (Holder(HERE, 2000, save_dir="/other"), 60, True, "take", "heartbeat is 60 s old"),
        # Another host: its process cannot be seen; the job identity or the heartbeat's age decide.
        (Holder("node-b", PID, job="slurm:7"), 1, True, "take", "earlier incarnation of this job (slurm:7)"),
        (Holder("node-b", PID, job="slurm:8"), 1, True, "wait", ""),
        (Holder("node-b", PID), 1, True, "wait", ""),
        (Holder("node-b", PID), 59, True, "wait", ""),
        (Holder("node-b", PID), 60, True, "take", "heartbeat is 60 s old"),
        (Holder("node-b", PID, save_dir="/ck"), 1, True, "wait", ""),  # the same path on another disk says nothing
    ],
)
def test_verdict(held: Holder, age: float, alive: bool, action: str, why: str) -> None:
    held = Holder(held.host, held.pid, held.save_dir, held.job, heartbeat=1000.0)
    got = verdict(held, ME, now=1000.0 + age, timeout=60.0, alive=lambda pid: alive)
    assert got[0] == action and why in got[1]


@pytest.mark.parametrize(
    ("env", "job"),
    [
        ({}, None),
        ({"TORCHELASTIC_RUN_ID": "none"}, None),  # torchrun's default --rdzv-id names no job
        ({"TORCHELASTIC_RUN_ID": "abc"}, "torchelastic:abc"),
        ({"SLURM_JOB_ID": "42"}, "slurm:42"),  # the batch script itself
        ({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "0"}, "slurm:42.0"),  # srun torchrun ...
        ({"SLURM_JOB_ID": "42", "SLURM_STEP_ID": "1"}, "slurm:42.1"),  # another step: another job
        ({"TORCHELASTIC_RUN_ID": "abc", "SLURM_JOB_ID": "42"}, "torchelastic:abc"),
        ({JOB_ENV: "mine", "TORCHELASTIC_RUN_ID": "abc", "SLURM_JOB_ID": "42"}, "user:mine"),
        ({JOB_ENV: "", "SLURM_JOB_ID": "42"}, "slurm:42"),
    ],
)
def test_job_identity(env: dict[str, str], job: str | None) -> None:
    assert job_identity(env) == job


UNREADABLE = [None, "", "not json", "[]", '{"host": "h"}', '{"host": "h", "pid": "x", "heartbeat": 1}']


@pytest.mark.parametrize("raw", UNREADABLE)
def test_an_unreadable_lease_names_no_holder(raw: str | None) -> None:
    assert Holder.parse(raw) is None


class FakeClock:
    """Wall-clock seconds that move only when the lease sleeps; ``at(t, fn)`` runs fn once the clock passes t."""

    def __init__(self) -> None:
        self.t = 1_000_000.0
        self.slept = 0.0
        self._events: list[tuple[float, Callable[[], None]]] = []

    def time(self) -> float:
        return self.t

    def at(self, t: float, fn: Callable[[], None]) -> None:
        self._events.append((t, fn))

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.t += seconds
        self.slept += seconds
        for ev in [e for e in self._events if e[0] <= self.t]:
            self._events.remove(ev)
            ev[1]()


@pytest.fixture
def run(experiment: str) -> tuple[MlflowClient, str]:
    client = MlflowClient()
    return client, client.create_run(client.create_experiment(experiment)).info.run_id


def hold(client: MlflowClient, run_id: str, heartbeat: float, host: str = "node-b", **kw: object) -> None:
    """Write a lease as another host's manager would."""
    value = {"host": host, "pid": 4242, "save_dir": "/ck", "token": "t-b", "heartbeat": heartbeat, "interval": 15.0}
    client.set_tag(run_id, TAG_LEASE, json.dumps({**value, **kw}))


def lease_on(run_id: str, clock: FakeClock, tmp_path: Path, env: dict[str, str] | None = None) -> Lease:
    return Lease(RunStore(MlflowClient(), run_id), tmp_path, interval=15.0, timeout=60.0, clock=clock.time,
                 sleep=clock.sleep, env=env or {}, start=False)  # fmt: skip


def acquire(lease: Lease) -> dict[str, object]:
    lease.acquire(lease.store.tags())
    value: dict[str, object] = json.loads(lease.store.tags()[TAG_LEASE])
    return value


def test_a_dead_jobs_lease_is_waited_out_and_taken(
    run: tuple[MlflowClient, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client, run_id = run
    clock = FakeClock()
    hold(client, run_id, clock.t - 24)  # SIGKILLed 24 s ago on another host; nothing names its job
    with caplog.at_level(logging.INFO, logger="tracked_ckpt.store.lease"):
        value = acquire(lease_on(run_id, clock, tmp_path))
    assert clock.slept == pytest.approx(36)  # 60 s after the last heartbeat, not a poll later
    assert value["host"] == socket.gethostname() and value["heartbeat"] == clock.t
    assert "heartbeat 24 s ago: waiting up to 36 s" in caplog.text and "beats every 15 s" in caplog.text
    assert "s left" in caplog.text  # a note while waiting
    assert "taking over the lease" in caplog.text and "no heartbeat for 60 s" in caplog.text


def test_a_live_holder_on_another_host_is_refused_at_its_next_heartbeat(
    run: tuple[MlflowClient, str], tmp_path: Path
) -> None:
    client, run_id = run
    clock = FakeClock()
    hold(client, run_id, clock.t - 3)
    clock.at(clock.t + 12, lambda: hold(client, run_id, clock.t))  # its next beat, 15 s after the last
    with pytest.raises(RunLockedError, match=r"host node-b pid 4242 \(heartbeat \d s ago: its heartbeat advanced"):
        acquire(lease_on(run_id, clock, tmp_path))
    assert 12 <= clock.slept <= 14  # refused within one poll of the beat
    assert json.loads(client.get_run(run_id).data.tags[TAG_LEASE])["token"] == "t-b"  # untouched


def test_a_lease_released_or_taken_while_waiting(run: tuple[MlflowClient, str], tmp_path: Path) -> None:
    client, run_id = run
    clock = FakeClock()
    hold(client, run_id, clock.t - 3)
    clock.at(clock.t + 5, lambda: client.delete_tag(run_id, TAG_LEASE))  # the holder closed
    acquire(lease_on(run_id, clock, tmp_path))
    assert clock.slept == pytest.approx(6)

    hold(client, run_id, clock.t - 3)
    clock.at(clock.t + 5, lambda: hold(client, run_id, clock.t, host="node-c", token="t-c"))
    with pytest.raises(RunLockedError, match="node-c .*it took the lease meanwhile"):
        acquire(lease_on(run_id, clock, tmp_path))


def test_the_same_job_takes_over_at_once(run: tuple[MlflowClient, str], tmp_path: Path) -> None:
    client, run_id = run
    clock = FakeClock()
    hold(client, run_id, clock.t - 2, job="torchelastic:r1")  # the earlier incarnation, 2 s before the kill
    value = acquire(lease_on(run_id, clock, tmp_path, env={"TORCHELASTIC_RUN_ID": "r1"}))
    assert clock.slept == 0 and value["job"] == "torchelastic:r1"

    hold(client, run_id, clock.t - 2, job="torchelastic:r1")  # another job: waited for
    clock.at(clock.t + 13, lambda: hold(client, run_id, clock.t, job="torchelastic:r1"))
    with pytest.raises(RunLockedError, match=r"\(job torchelastic:r1\)"):
        acquire(lease_on(run_id, clock, tmp_path, env={"TORCHELASTIC_RUN_ID": "r2"}))


def test_a_holder_whose_clock_runs_ahead_is_waited_for_at_most_the_timeout(
    run: tuple[MlflowClient, str], tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    client, run_id = run
    clock = FakeClock()
    hold(client, run_id, clock.t + 3600)
    with caplog.at_level(logging.WARNING, logger="tracked_ckpt.store.lease"):
        acquire(lease_on(run_id, clock, tmp_path))
    assert clock.slept == pytest.approx(60)
    assert "its heartbeat did not advance in 60 s" in caplog.text


def test_heartbeat_and_release(run: tuple[MlflowClient, str], tmp_path: Path) -> None:
    _, run_id = run
    clock = FakeClock()
    lease = lease_on(run_id, clock, tmp_path)
    lease.release()  # never acquired: nothing to delete, nothing raised
    first = acquire(lease)
    assert first["pid"] == os.getpid() and first["interval"] == 15.0 and first["job"] is None
    clock.t += 15
    lease.beat()
    later = json.loads(lease.store.tags()[TAG_LEASE])
    assert later["heartbeat"] == first["heartbeat"] + 15 and later["token"] == first["token"]
    lease.release()
    assert TAG_LEASE not in lease.store.tags()
