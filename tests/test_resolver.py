"""resolver.py: every form of the grammar names the same committed checkpoint, "best" is the run's own monitor,
and a store given as ``store_factory=`` sees every call of a module-level read and of a CLI command.

One real run in the session's sqlite store, saved with ``monitor="loss", mode="min"``; faults are injected by
subclassing the real RunStore (no mocks).
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
from click.testing import CliRunner
from conftest import make_training, train_steps

import tracked_ckpt
from tracked_ckpt import CheckpointManager, RunStore, StoreError
from tracked_ckpt.cli import cli
from tracked_ckpt.errors import CheckpointNotFoundError
from tracked_ckpt.resolver import open_catalog, resolve

EXPERIMENT = f"resolver-{uuid.uuid4().hex[:8]}"
pytestmark = pytest.mark.usefixtures("restore_logging")  # the CLI commands run in-process
LOSSES = {10: 0.9, 20: 0.2, 30: 0.5}  # by loss, min: the best is step 20; the latest is step 30


@pytest.fixture(scope="module")
def loss_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """(run_id, registered model name): a loss/min run whose best checkpoint is promoted as NAME@prod."""
    model, opt, sched = make_training()
    save_dir = tmp_path_factory.mktemp("resolver")
    with CheckpointManager(save_dir, experiment=EXPERIMENT, monitor="loss", mode="min", resume="never") as mgr:
        for step, loss in LOSSES.items():
            train_steps(model, opt, sched, 1)
            mgr.save(model, opt, {"step": step, "loss": loss})
        run_id = mgr.run_id
    name = f"resolver-{uuid.uuid4().hex[:8]}"
    tracked_ckpt.promote(f"{run_id}@best", name, alias="prod")
    return run_id, name


def test_every_form_of_a_reference_names_the_same_checkpoint(loss_run: tuple[str, str]) -> None:
    run_id, name = loss_run
    model_id = tracked_ckpt.list_checkpoints(run_id).set_index("step").loc[20, "model_id"]
    forms = [run_id, f"{run_id}@latest", f"{run_id}@best", f"{run_id}@10", f"runs:/{run_id}/checkpoints/step-00000030",
             f"models:/{model_id}", f"models:/{name}@prod", f"models:/{name}/1"]  # fmt: skip
    steps = {text: resolve(text)[1].manifest.step for text in forms}
    assert list(steps.values()) == [30, 30, 20, 10, 30, 20, 20, 20], steps
    assert resolve(run_id, which="best")[1].manifest.step == 20  # ``which`` for a bare run ID
    assert resolve(f"{run_id}@10", which="best")[1].manifest.step == 10  # the reference's own selector wins
    assert resolve(f"{run_id}@best", metric="loss", mode="max")[1].manifest.step == 10  # a named metric wins
    with pytest.raises(CheckpointNotFoundError, match="with metric 'reward'"):
        resolve(f"{run_id}@best", metric="reward")
    with pytest.raises(CheckpointNotFoundError, match="names no model version"):
        resolve(f"models:/{name}@staging")


class Recording(RunStore):
    """The real store, noting every MLflow call it makes (by its action)."""

    actions: list[str] = []

    def _call(self, fn: Any, action: str) -> Any:
        Recording.actions.append(action)
        return super()._call(fn, action)


class Down(RunStore):
    """A tracking server that refuses every call."""

    def _call(self, fn: Any, action: str) -> Any:
        raise StoreError(f"injected: MLflow refused to {action}")


def test_a_store_factory_sees_every_call_of_module_level_reads(loss_run: tuple[str, str]) -> None:
    run_id, name = loss_run
    fresh, _, _ = make_training()
    Recording.actions.clear()
    assert tracked_ckpt.load(f"models:/{name}@prod", fresh, store_factory=Recording)["step"] == 20
    assert f"look up {name}@prod" in Recording.actions and f"get run {run_id}" in Recording.actions
    Recording.actions.clear()
    assert len(tracked_ckpt.list_checkpoints(run_id, store_factory=Recording)) == len(LOSSES)
    assert any(a.startswith("read metric system/") for a in Recording.actions)  # the cost columns, too
    Recording.actions.clear()
    assert list(tracked_ckpt.list_runs(EXPERIMENT, store_factory=Recording).run_id) == [run_id]
    assert Recording.actions == [f"find experiment {EXPERIMENT!r}", "search runs"]
    with pytest.raises(StoreError, match=f"injected: MLflow refused to get run {run_id}"):
        tracked_ckpt.load(run_id, fresh, which="best", store_factory=Down)
    with pytest.raises(StoreError, match="injected"):
        tracked_ckpt.list_checkpoints(run_id, store_factory=Down)
    with pytest.raises(StoreError, match=f"injected: MLflow refused to look up {name}@prod"):
        tracked_ckpt.export_model(f"models:/{name}@prod", "unused.safetensors", store_factory=Down)
    assert open_catalog(run_id, store_factory=Recording).store.__class__ is Recording


def test_a_store_factory_reaches_cli_commands(loss_run: tuple[str, str], tmp_path: Path) -> None:
    run_id, name = loss_run
    runner = CliRunner()
    for args in (["ls", run_id], ["show", f"{run_id}@best"], ["show", f"models:/{name}@prod"], ["runs"]):
        result = runner.invoke(cli, args, obj={"store_factory": Down})
        assert result.exit_code == 6 and "injected: MLflow refused to" in result.stderr, (args, result.output)
    Recording.actions.clear()
    result = runner.invoke(cli, ["show", f"{run_id}@best"], obj={"store_factory": Recording})
    assert result.exit_code == 0 and "step       20" in result.stdout, result.output
    assert f"get run {run_id}" in Recording.actions
