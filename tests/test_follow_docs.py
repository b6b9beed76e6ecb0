"""docs/follow.md's three programs, run as written: trainer, evaluator, inference worker."""

from __future__ import annotations

import contextlib
import io
import os
import re
import runpy
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import ROOT
from mlflow.tracking import MlflowClient


def blocks(doc: Path) -> dict[str, str]:
    """The ```python blocks of ``doc`` that start with a ``# name.py`` line, by name."""
    found = re.findall(r"```python\n# (\w+\.py)\n(.*?)```", doc.read_text(), flags=re.S)
    return {name: code for name, code in found}


def test_the_follow_guide_runs_as_written(tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """The evaluator and the worker are processes of their own in empty folders; the trainer runs in this one (it
    would cost a third interpreter start on a busy 2-core machine; tests/test_follow.py follows a trainer process)."""
    programs = blocks(ROOT / "docs" / "follow.md")
    assert sorted(programs) == ["evaluate.py", "serve.py", "train.py"]
    client = MlflowClient()
    # The trainer attaches to a run made here (MLFLOW_RUN_ID), so that the followers can start first.
    run_id = client.create_run(client.create_experiment(experiment)).info.run_id
    procs = {}
    for name in ("evaluate.py", "serve.py"):
        folder = tmp_path / name.removesuffix(".py")
        folder.mkdir()
        (folder / name).write_text(programs[name])
        env = {**os.environ, "PYTHONPATH": str(ROOT), "RUN_ID": run_id}
        procs[name] = subprocess.Popen([sys.executable, name], cwd=folder, env=env, text=True,
                                       stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip
    (tmp_path / "train").mkdir()
    (tmp_path / "train" / "train.py").write_text(programs["train.py"])
    monkeypatch.chdir(tmp_path / "train")
    monkeypatch.setenv("MLFLOW_RUN_ID", run_id)
    trained = io.StringIO()
    with contextlib.redirect_stdout(trained):
        runpy.run_path("train.py", run_name="__main__")
    assert f"RUN_ID {run_id}" in trained.getvalue()
    out = {}
    for name, p in procs.items():
        stdout, stderr = p.communicate(timeout=240)
        assert p.returncode == 0, f"{name} failed:\n{stdout}\n{stderr[-3000:]}"
        out[name] = stdout
    scored = re.findall(r"^step (\d+): eval/mse=", out["evaluate.py"], flags=re.M)
    assert scored == ["10", "20", "30", "40"], out["evaluate.py"]
    history = client.get_metric_history(run_id, "eval/mse")
    assert sorted(m.step for m in history) == [10, 20, 30, 40]
    assert "is_best" in out["evaluate.py"] and out["evaluate.py"].count("True") == 1
    served = [int(s) for s in re.findall(r"^serving step (\d+)", out["serve.py"], flags=re.M)]
    assert served and served == sorted(set(served)) and served[-1] == 40, out["serve.py"]
