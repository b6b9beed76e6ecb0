"""Crash consistency proven by killing real processes (see crash_harness.py for what is checked)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT


def run_harness(workdir: Path, seeds: int, stages: str = "all", timeout: float = 900) -> list[dict[str, object]]:
    workdir.mkdir()
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{workdir / 'mlflow.db'}", "PYTHONPATH": str(ROOT)}
    env.pop("MLFLOW_RUN_ID", None)
    p = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "crash_harness.py"), str(workdir), "--seeds", str(seeds),
         "--stages", stages],
        env=env, capture_output=True, text=True, timeout=timeout,
    )  # fmt: skip
    lines = [json.loads(x) for x in p.stdout.splitlines() if x.startswith("{")]
    assert lines and lines[-1].get("summary"), f"harness crashed ({p.returncode}):\n{p.stdout}\n{p.stderr[-4000:]}"
    failed = [r for r in lines[:-1] if r["problems"]]
    assert not failed, json.dumps(failed, indent=1) + "\n" + p.stderr[-4000:]
    assert p.returncode == 0
    return lines


def test_sigkill_at_every_stage_and_50_random_moments(tmp_path: Path) -> None:
    lines = run_harness(tmp_path / "crash", seeds=50)
    summary = lines[-1]
    assert summary["scenarios"] == 11 + 50 and summary["survived"] == summary["scenarios"]
    assert summary["kills"] == summary["scenarios"]  # every named stage was reached, every worker died
    stage_results = {r["scenario"]: r for r in lines[:-1] if str(r["scenario"]).startswith("stage:")}
    # Killed before the local commit: the third save is lost, the two acknowledged ones are not.
    for stage in ("fsync", "manifest", "outbox", "rename"):
        assert stage_results[f"stage:{stage}"]["resumed_step"] == 2
    # Killed after the local commit: the outbox records the third save in MLflow on the next attach.
    for stage in ("upload:state.pt", "upload:MANIFEST.json", "tags", "retention", "retention_mid"):
        assert stage_results[f"stage:{stage}"]["resumed_step"] == 3
    resumed = [r["resumed_step"] for r in lines[:-1] if str(r["scenario"]).startswith("random:")]
    assert resumed == sorted(resumed) and resumed[-1] > 50  # the chain of crashes kept making progress


@pytest.mark.slow
def test_sigkill_at_500_random_moments(tmp_path: Path) -> None:
    lines = run_harness(tmp_path / "crash", seeds=500, stages="none", timeout=3600)
    assert lines[-1]["survived"] == 500
