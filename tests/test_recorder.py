"""The recording pipeline against the real sqlite store; the server's outages come from a subclass of RunStore.

``FlakyStore`` is the real store whose calls fail (transiently, as a refused connection does) while ``down``, or
whose uploads alone fail while ``uploads_down``: injected through ``CheckpointManager(store_factory=...)``.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import pytest
from conftest import assert_same_state, make_training, train_steps
from mlflow.tracking import MlflowClient

from tracked_ckpt import CheckpointManager
from tracked_ckpt.errors import StoreError
from tracked_ckpt.runtags import COST_METRICS
from tracked_ckpt.store.run_store import RunStore


class FlakyStore(RunStore):
    down = False
    uploads_down = False

    def _call(self, fn: Any, action: str) -> Any:
        if FlakyStore.down:
            raise StoreError(f"injected: connection refused ({action})")
        return super()._call(fn, action)

    def upload(self, local_file: Path, artifact_dir: str) -> None:
        if FlakyStore.down or FlakyStore.uploads_down:
            raise StoreError(f"injected: connection refused (upload {local_file.name})")
        super().upload(local_file, artifact_dir)


@pytest.fixture(autouse=True)
def server_up() -> Any:
    FlakyStore.down = FlakyStore.uploads_down = False
    yield
    FlakyStore.down = FlakyStore.uploads_down = False


def reward_steps(run_id: str) -> list[int]:
    return sorted(m.step for m in MlflowClient().get_metric_history(run_id, "reward"))


def test_an_offline_start_resumes_from_save_dir_and_attaches_when_the_server_answers(
    tmp_path: Path, experiment: str
) -> None:
    model, opt, sched = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        for step in (1, 2):
            train_steps(model, opt, sched, 1)
            mgr.save(model, opt, {"step": step, "reward": float(step)}, scheduler=sched)
        run_id = mgr.run_id
    FlakyStore.down = True
    fresh, fresh_opt, fresh_sched = make_training(seed=3)
    mgr = CheckpointManager(tmp_path / "ck", run_id=run_id, store_factory=FlakyStore, publish_timeout=5)
    assert not mgr.recorder.attached and "offline" in mgr._session.how
    assert mgr.load(fresh, fresh_opt, scheduler=fresh_sched)["step"] == 2
    assert_same_state(fresh, model)
    assert mgr.get_best_checkpoint() == f"runs:/{run_id}/checkpoints/step-00000002"
    t0 = time.monotonic()
    mgr.save(fresh, fresh_opt, {"step": 3, "reward": 3.0}, scheduler=fresh_sched)
    assert time.monotonic() - t0 < 3  # the pipeline knows the server is down: no wait
    assert mgr.get_latest_checkpoint() == f"runs:/{run_id}/checkpoints/step-00000003"
    assert list(mgr.checkpoints()["step"]) == [1, 2, 3]
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"  # nothing reached the store yet
    FlakyStore.down = False
    assert mgr.sync(timeout=20) and mgr.recorder.attached
    run = MlflowClient().get_run(run_id)
    assert run.info.status == "RUNNING" and "tracked_ckpt.lease" in run.data.tags
    assert run.data.tags["tracked_ckpt.latest_step"] == "3" and run.data.tags["tracked_ckpt.count"] == "3"
    mgr.close()
    assert reward_steps(run_id) == [1, 2, 3]
    assert MlflowClient().get_run(run_id).info.status == "FINISHED"


def test_latest_is_never_older_than_a_checkpoint_committed_locally(tmp_path: Path, experiment: str) -> None:
    model, opt, sched = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, store_factory=FlakyStore,
                           publish_timeout=2) as mgr:  # fmt: skip
        mgr.save(model, opt, {"step": 1, "reward": 1.0})
        FlakyStore.uploads_down = True  # the tags still read: MLflow's latest is step 1, the queue holds step 2
        train_steps(model, opt, sched, 2)
        mgr.save(model, opt, {"step": 2, "reward": 2.0})
        assert MlflowClient().get_run(mgr.run_id).data.tags["tracked_ckpt.latest_step"] == "1"
        assert mgr.get_latest_checkpoint() == f"runs:/{mgr.run_id}/checkpoints/step-00000002"
        fresh, fresh_opt, _ = make_training(seed=4)
        assert mgr.load(fresh, fresh_opt)["step"] == 2
        assert_same_state(fresh, model)
        FlakyStore.uploads_down = False
        assert mgr.sync(timeout=20)
    assert reward_steps(mgr.run_id) == [1, 2]


def test_a_relaunch_without_a_local_record_fails_naming_the_server(tmp_path: Path) -> None:
    FlakyStore.down = True
    # The run lookup itself talks to the store through MlflowClient: an unreachable URI plays the outage there.
    with pytest.raises(StoreError, match=r"a new run cannot be created offline"):
        CheckpointManager(tmp_path / "none", tracking_uri="http://127.0.0.1:9", store_factory=FlakyStore)


class CountingStore(FlakyStore):
    uploaded: list[tuple[str, int]] = []  # (artifact folder, bytes) of every upload, in order

    def upload(self, local_file: Path, artifact_dir: str) -> None:
        super().upload(local_file, artifact_dir)
        CountingStore.uploaded.append((artifact_dir, local_file.stat().st_size))


def test_a_backlog_uploads_only_what_retention_keeps_and_records_every_metric(tmp_path: Path, experiment: str) -> None:
    from tracked_ckpt import KeepLast

    CountingStore.uploaded = []
    model, opt, _ = make_training(hidden=64)
    with CheckpointManager(tmp_path / "ck", experiment=experiment, store_factory=CountingStore, publish_timeout=2,
                           retention=KeepLast(2)) as mgr:  # fmt: skip
        mgr.save(model, opt, {"step": 1, "reward": 1.0})
        size = sum(b for _, b in CountingStore.uploaded)
        FlakyStore.uploads_down = True  # the artifact store is out; the tracking server still answers
        for step in range(2, 12):
            mgr.save(model, opt, {"step": step, "reward": float(step)})
        FlakyStore.uploads_down = False
        assert mgr.sync(timeout=30)
        run_id = mgr.run_id
    after = [(d, b) for d, b in CountingStore.uploaded if not d.endswith("step-00000001")]
    uploaded_bytes = sum(b for _, b in after)
    assert uploaded_bytes <= 3 * size, (uploaded_bytes, size, sorted({d for d, _ in after}))
    assert {d.rpartition("/")[2] for d, _ in after} == {"step-00000010", "step-00000011"}
    assert reward_steps(run_id) == list(range(1, 12))  # every metric point, skipped checkpoints' too
    run = MlflowClient().get_run(run_id)
    assert run.data.tags["tracked_ckpt.count"] == "2" and run.data.tags["tracked_ckpt.latest_step"] == "11"
    assert "retention would have deleted them" in run.data.tags["tracked_ckpt.skipped"]
    assert sorted(p.name for p in (tmp_path / "ck" / run_id).iterdir()) == ["step-00000010", "step-00000011"]


def test_each_save_logs_what_it_cost(tmp_path: Path, experiment: str) -> None:
    import tracked_ckpt

    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, async_save=True) as mgr:
        mgr.save(model, opt, {"step": 1, "reward": 1.0})
        mgr.wait()
        run_id = mgr.run_id
    with CheckpointManager(tmp_path / "ck", run_id=run_id) as mgr:  # a sync save: blocked is logged at close
        mgr.save(model, opt, {"step": 2, "reward": 2.0})
    client = MlflowClient()
    for key in COST_METRICS:
        points = {m.step: m.value for m in client.get_metric_history(run_id, key)}
        assert set(points) == {1, 2} and all(v >= 0 for v in points.values()), (key, points)
    df = tracked_ckpt.list_checkpoints(run_id)
    assert df[["blocked_s", "commit_s", "record_s"]].notna().all().all()
    assert (df["blocked_s"] > 0).all() and str(df["record_s"].dtype) == "float64"


def test_save_policies_see_checkpoints_that_are_only_queued(tmp_path: Path, experiment: str) -> None:
    from tracked_ckpt import EveryNSteps, OnImprovement

    model, opt, _ = make_training()
    policy = EveryNSteps(2) | OnImprovement()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, store_factory=FlakyStore, publish_timeout=1,
                           save_policy=policy) as mgr:  # fmt: skip
        mgr.save(model, opt, {"step": 1, "reward": 1.0})
        FlakyStore.uploads_down = True
        mgr.save(model, opt, {"step": 2, "reward": 5.0})  # queued: MLflow's record still says step 1, reward 1
        assert [p.step for p in mgr.outbox.pending(mgr.run_id)] == [2]
        assert not mgr.should_save(2, {"reward": 3.0})  # step 2 is saved, and 3 does not beat the queued 5
        assert mgr.should_save(3, {"reward": 6.0})  # 6 beats the queued best
        FlakyStore.uploads_down = False
        assert mgr.sync(timeout=30)
