"""async_save: the state captured at save() time, one save in flight, failures re-raised on wait()/close()."""

from __future__ import annotations

import copy
import os
import signal
import subprocess
import sys
import textwrap
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import pytest
import torch
from conftest import ROOT, TinyNet, assert_same_state, make_training, run_python, train_steps
from mlflow.tracking import MlflowClient

from tracked_ckpt import CheckpointManager, EveryNSteps, KeepLast
from tracked_ckpt.errors import SaveError, StoreError
from tracked_ckpt.snapshot import BackgroundSaver, StagingBuffers
from tracked_ckpt.store.run_store import RunStore


class GatedStore(RunStore):
    """A real RunStore whose uploads wait for a gate (to hold a save in flight) or fail on demand."""

    def __init__(self, client: MlflowClient, run_id: str, **kwargs: Any) -> None:
        super().__init__(client, run_id, **kwargs)
        self.gate = threading.Event()
        self.gate.set()
        self.entered = threading.Event()
        self.fail_uploads = 0

    def upload(self, local_file: Path, artifact_dir: str) -> None:
        self.entered.set()
        self.gate.wait()
        if self.fail_uploads:
            self.fail_uploads -= 1
            error = StoreError(f"injected upload failure of {local_file.name}")
            error.transient = False  # refused for good: reported to the save, not retried in the background
            raise error
        super().upload(local_file, artifact_dir)


class GatedManager(CheckpointManager):
    """The real manager with the store injected through its seam."""

    store: GatedStore

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, store_factory=GatedStore, **kwargs)


def test_saved_content_is_the_state_at_save_time(tmp_path: Path, experiment: str) -> None:
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 3)
    with GatedManager(tmp_path / "ck", experiment=experiment, async_save=True) as mgr:
        expected = copy.deepcopy((model.state_dict(), opt.state_dict()))
        mgr.store.gate.clear()  # hold the save in flight while training changes every tensor in place
        ref = mgr.save(model, opt, {"step": 3, "reward": 1.0})
        with torch.no_grad():
            for p in model.parameters():
                p.add_(1.0)
        train_steps(model, opt, sched, 2)
        mgr.store.gate.set()
        mgr.wait()
        assert mgr.get_latest_checkpoint() == ref

        fresh, fresh_opt, _ = make_training(seed=1)
        assert mgr.load(fresh, fresh_opt, ref) == {"step": 3, "reward": 1.0}
    saved_model, saved_opt = expected
    restored = TinyNet()
    restored.load_state_dict(saved_model)
    assert_same_state(fresh, restored)
    for pid, st in saved_opt["state"].items():
        for key, value in st.items():
            assert torch.equal(fresh_opt.state_dict()["state"][pid][key], value), (pid, key)


def test_async_and_sync_saves_restore_the_same_state(tmp_path: Path, experiment: str) -> None:
    model, opt, sched = make_training()
    train_steps(model, opt, sched, 4)
    with CheckpointManager(tmp_path / "a", experiment=experiment, async_save=True, save_rng=False) as a:
        a.save(model, opt, {"step": 4}, scheduler=sched)
    with CheckpointManager(tmp_path / "s", experiment=experiment, save_rng=False) as s:
        s.save(model, opt, {"step": 4}, scheduler=sched)
    restored = []
    for run_dir in ("a", "s"):
        m, o, sc = make_training(seed=7)
        with CheckpointManager(tmp_path / run_dir, experiment=experiment, resume="must") as mgr:
            mgr.load(m, o, scheduler=sc)
        restored.append((m, o, sc))
    assert_same_state(restored[0][0], restored[1][0])
    assert restored[0][2].state_dict() == restored[1][2].state_dict()


def test_index_policy_and_retention_stay_consistent(tmp_path: Path, experiment: str) -> None:
    model, opt, sched = make_training()
    policy = EveryNSteps(2)
    with GatedManager(
        tmp_path / "ck", experiment=experiment, async_save=True, save_policy=policy, retention=KeepLast(2)
    ) as mgr:
        refs = []
        for step in range(1, 9):
            train_steps(model, opt, sched, 1)
            if mgr.should_save(step):
                mgr.store.gate.clear()
                refs.append(mgr.save(model, opt, {"step": step, "reward": float(step)}))
                assert not mgr.should_save(step), "the save in flight counts as the last save"
                mgr.store.gate.set()
                mgr.wait()
        assert len(refs) == 4
        assert mgr.get_latest_checkpoint() == refs[-1]
        assert mgr.get_best_checkpoint() == refs[-1]
        frame = mgr.checkpoints()
        assert list(frame["step"]) == [6, 8]
        assert list(frame["seq"]) == [3, 4]


def test_a_second_save_waits_for_the_one_in_flight(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with GatedManager(tmp_path / "ck", experiment=experiment, async_save=True) as mgr:
        mgr.store.gate.clear()
        first = mgr.save(model, opt, {"step": 1})
        assert mgr.store.entered.wait(30)
        refs: list[str] = []
        second = threading.Thread(target=lambda: refs.append(mgr.save(model, opt, {"step": 2})))
        second.start()
        second.join(timeout=0.3)
        assert second.is_alive() and refs == [], "save() must wait while the previous save is in flight"
        mgr.store.gate.set()
        second.join(timeout=60)
        mgr.wait()
        assert [first, refs[0]] == [c for c in mgr.checkpoints()["ref"]]


def test_background_failure_is_raised_by_wait_naming_the_step(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with GatedManager(tmp_path / "ck", experiment=experiment, async_save=True) as mgr:
        mgr.store.fail_uploads = 1
        mgr.save(model, opt, {"step": 5})
        with pytest.raises(SaveError, match="step 5.*injected upload failure"):
            mgr.wait()
        mgr.wait()  # reported once
        ref = mgr.save(model, opt, {"step": 6})
        assert mgr.get_latest_checkpoint() == ref


def test_a_failure_surfaces_on_the_next_save(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    with GatedManager(tmp_path / "ck", experiment=experiment, async_save=True) as mgr:
        mgr.store.fail_uploads = 1
        mgr.save(model, opt, {"step": 5})
        with pytest.raises(SaveError, match="step 5"):
            mgr.save(model, opt, {"step": 6})
        ref = mgr.save(model, opt, {"step": 6})  # the retry records both
        assert list(mgr.checkpoints()["step"]) == [5, 6]
        assert mgr.get_latest_checkpoint() == ref


def test_close_drains_then_raises_and_marks_the_run_failed(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    mgr = GatedManager(tmp_path / "ck", experiment=experiment, async_save=True)
    mgr.store.fail_uploads = 1
    mgr.save(model, opt, {"step": 9})
    with pytest.raises(SaveError, match="step 9"):
        mgr.close()
    assert mgr.client.get_run(mgr.run_id).info.status == "FAILED"
    mgr.close()  # idempotent, nothing left to report


def test_close_finishes_the_save_in_flight(tmp_path: Path, experiment: str) -> None:
    model, opt, _ = make_training()
    mgr = GatedManager(tmp_path / "ck", experiment=experiment, async_save=True)
    mgr.store.gate.clear()
    ref = mgr.save(model, opt, {"step": 1})
    threading.Timer(0.2, mgr.store.gate.set).start()
    mgr.close()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, resume="must") as again:
        assert again.get_latest_checkpoint() == ref


def test_a_script_that_never_closes_still_commits_its_last_save(tmp_path: Path, experiment: str) -> None:
    code = textwrap.dedent(f"""
        from conftest import make_training
        from tracked_ckpt import CheckpointManager
        model, opt, _ = make_training()
        mgr = CheckpointManager("ck", experiment={experiment!r}, async_save=True)
        print(mgr.save(model, opt, {{"step": 1}}))
    """)
    ref = run_python(code, tmp_path).strip().splitlines()[-1]
    with CheckpointManager(tmp_path / "ck", experiment=experiment, resume="must") as mgr:
        assert mgr.get_latest_checkpoint() == ref


# ------------------------------------------------------------------------------------------ staging buffers


def test_staging_buffers_are_reused_and_keep_structure() -> None:
    shared = torch.arange(6.0)
    sd: OrderedDict[str, torch.Tensor] = OrderedDict(w=torch.ones(2, 3), tied=shared, also=shared)
    sd._metadata = OrderedDict({"": {"version": 1}})  # type: ignore[attr-defined]
    payload = {"model": sd, "opt": {"groups": [{"lr": 0.1, "params": [0, 1]}], "step": (1, "x")}}
    bufs = StagingBuffers()
    first = bufs.copy(payload)
    assert first["model"]._metadata == {"": {"version": 1}}
    assert first["model"]["tied"] is first["model"]["also"]
    assert first["opt"] == {"groups": [{"lr": 0.1, "params": [0, 1]}], "step": (1, "x")}
    assert first["opt"]["groups"] is not payload["opt"]["groups"]
    ptr = first["model"]["w"].data_ptr()
    sd["w"].add_(1)
    second = bufs.copy(payload)
    assert second["model"]["w"].data_ptr() == ptr, "the buffer is reused"
    assert torch.equal(second["model"]["w"], torch.full((2, 3), 2.0))
    assert bufs.nbytes == (6 + 6) * 4

    sd["w"] = torch.ones(4)  # a new shape gets a new buffer; keys gone are dropped
    del sd["also"]
    third = bufs.copy({"model": sd})
    assert third["model"]["w"].shape == (4,)
    assert bufs.nbytes == (4 + 6) * 4


def test_background_saver_runs_jobs_in_order_on_one_thread() -> None:
    saver = BackgroundSaver()
    seen: list[tuple[int, str]] = []
    for step in range(3):
        saver.submit(step, lambda step=step: seen.append((step, threading.current_thread().name)))  # type: ignore[misc]
    saver.wait()
    assert [s for s, _ in seen] == [0, 1, 2]
    assert {name for _, name in seen} == {"tracked_ckpt-save"}

    def boom() -> None:
        raise ValueError("disk on fire")

    saver.submit(7, boom)
    error = saver.close()
    assert isinstance(error, SaveError) and "step 7" in str(error) and isinstance(error.__cause__, ValueError)
    assert saver.close() is None


ASYNC_TRAINER = """
import sys, time, torch
from tracked_ckpt import CheckpointManager, EveryNSteps
model = torch.nn.Linear(4, 4)
mgr = CheckpointManager(sys.argv[1], experiment=sys.argv[2], save_policy=EveryNSteps(3), save_on_sigterm=True,
                        async_save=True)
step = 0
print("start", flush=True)
while True:
    step += 1
    with torch.no_grad():
        model.weight.fill_(step)
    print("step", step, flush=True)
    if mgr.should_save(step):
        mgr.save(model, metadata={"step": step})
    time.sleep(0.05)
"""


def test_sigterm_with_async_save_finishes_the_final_save_then_exits(tmp_path: Path, experiment: str) -> None:
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    p = subprocess.Popen([sys.executable, "-c", ASYNC_TRAINER, str(tmp_path / "ck"), experiment], cwd=tmp_path,
                         env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert p.stdout is not None
        seen = 0
        while seen < 7:
            line = p.stdout.readline()
            assert line, "the trainer died before step 7"
            seen = int(line.split()[1]) if line.startswith("step") else seen
        p.send_signal(signal.SIGTERM)
        out, err = p.communicate(timeout=120)
    finally:
        if p.poll() is None:
            p.kill()
            p.wait()
    assert p.returncode == 143, err
    last = max([seen] + [int(line.split()[1]) for line in out.splitlines() if line.startswith("step")])
    with CheckpointManager(tmp_path / "ck", experiment=experiment, resume="must") as mgr:
        steps = list(mgr.checkpoints()["step"])
        model = torch.nn.Linear(4, 4)
        assert mgr.load(model)["step"] == last
    assert steps[-1] == last and steps[:2] == [3, 6]
    assert torch.equal(model.weight, torch.full((4, 4), float(last)))
