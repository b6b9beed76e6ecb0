"""The benchmark suite's --smoke mode runs end to end (a few seconds); its figures are not asserted."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
from conftest import ROOT


@pytest.mark.server
def test_smoke_benchmark_runs_every_case(tmp_path: Path, mlflow_server: str, monkeypatch: pytest.MonkeyPatch) -> None:
    spec = importlib.util.spec_from_file_location("bench_run", ROOT / "benchmarks" / "run.py")
    assert spec is not None and spec.loader is not None
    bench = importlib.util.module_from_spec(spec)
    monkeypatch.setitem(sys.modules, "bench_run", bench)  # its dataclasses look their module up there
    spec.loader.exec_module(bench)
    argv = ["--smoke", "--repeats", "2", "--server", mlflow_server, "--counts", "10,30", "--no-save"]
    argv += ["--tracking-uri", os.environ["MLFLOW_TRACKING_URI"], "--workdir", str(tmp_path)]
    b = bench.main(argv)
    groups = {(r.group, r.size) for r in b.rows}
    assert groups == {("blocked", "4MB"), ("save", "4MB"), ("load", "4MB"), ("remote", "4MB"),
                      ("scale", "n=10"), ("scale", "n=30")}  # fmt: skip
    assert all(len(r.times) >= 2 for r in b.rows)
    targets = bench.ratios(b, ["4MB"], [10, 30])
    assert {t[0] for t in targets} >= {"async blocked ≤ 1.3x copy_", "server resume < download+load"}
