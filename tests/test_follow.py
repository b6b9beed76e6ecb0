"""Following a live run: a trainer process records checkpoints, follower processes pick each one up through MLflow.

Everything is real: the `mlflow server` fixture, a trainer process (tests/follow_trainer.py) and follower processes
(tests/follow_job.py) each in its own empty working directory, killed with SIGKILL, cut off by a TCP proxy.
"""

from __future__ import annotations

import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from conftest import ROOT
from fault_proxy import FaultProxy
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager

TESTS = Path(__file__).resolve().parent


def start(script: str, *args: str, cwd: Path, uri: str) -> subprocess.Popen[str]:
    cwd.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "PYTHONPATH": str(ROOT), "MLFLOW_TRACKING_URI": uri}
    return subprocess.Popen([sys.executable, str(TESTS / script), *args], cwd=cwd, env=env, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)  # fmt: skip


def lines(out: str, word: str) -> list[list[str]]:
    return [line.split()[1:] for line in out.splitlines() if line.startswith(word + " ")]


def readline(p: subprocess.Popen[str]) -> str:
    assert p.stdout is not None
    line = p.stdout.readline()
    assert line, f"{p.args} ended early:\n{p.stderr.read()[-3000:] if p.stderr else ''}"
    return line


def finish(p: subprocess.Popen[str], timeout: float = 180) -> tuple[str, str]:
    out, err = p.communicate(timeout=timeout)
    assert p.returncode == 0, f"{p.args} failed ({p.returncode}):\n{out}\n{err[-3000:]}"
    return out, err


@pytest.mark.server
def test_followers_of_a_live_run(mlflow_server: str, tmp_path: Path, experiment: str) -> None:
    """One trainer (10 saves, 1 s apart) serves every claim:

    - an evaluator yields every committed checkpoint once, in order; killed (SIGKILL) after 3 scores and restarted,
      it continues after the last step scored (read from the run's metrics), so each step is scored exactly once;
    - a network outage between the restarted evaluator and MLflow loses nothing;
    - a slow latest_only follower skips to the newest and ends with the last checkpoint;
    - the scores are run metrics at the checkpoints' steps, and list_checkpoints shows them.
    """
    saves = 10
    proxy = FaultProxy(mlflow_server)
    go = tmp_path / "go"
    trainer = start("follow_trainer.py", "--experiment", experiment, "--saves", str(saves), "--every", "1",
                    "--wait-for", str(go), cwd=tmp_path / "train", uri=mlflow_server)  # fmt: skip
    procs = [trainer]
    try:
        run_id = readline(trainer).split()[1]
        latest = start("follow_job.py", run_id, "--mode", "latest", "--slow", "3", cwd=tmp_path / "infer",
                       uri=mlflow_server)  # fmt: skip
        first = start("follow_job.py", run_id, cwd=tmp_path / "eval", uri=proxy.url)
        # The restarted evaluator: a fresh process in another empty folder, imported ahead to keep the test short.
        second = start("follow_job.py", run_id, "--wait-for", str(tmp_path / "restart"), cwd=tmp_path / "eval2",
                       uri=proxy.url)  # fmt: skip
        procs += [latest, first, second]
        for p in (latest, first, second):
            assert readline(p) == "READY\n"
        go.touch()  # the trainer starts saving
        first_out = ""
        while first_out.count("SCORED") < 3:
            first_out += readline(first)
        first.send_signal(signal.SIGKILL)
        first.wait()
        (tmp_path / "restart").touch()
        second_head = readline(second)  # its first checkpoint: it is following now
        proxy.set_mode("refuse")  # the evaluator loses MLflow for 4 s while the trainer goes on recording
        time.sleep(4)
        proxy.set_mode("pass")
        second_out, second_err = finish(second)
        second_out = second_head + second_out
        trainer_out, _ = finish(trainer)
        latest_out, _ = finish(latest)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        proxy.close()

    recorded = {int(s): float(t) for s, t in lines(trainer_out, "RECORDED")}
    steps = sorted(recorded)
    assert len(steps) == saves
    first_loaded = lines(first_out, "LOADED")
    second_loaded = lines(second_out, "LOADED")
    yielded = [int(s) for s, _ in first_loaded + second_loaded]
    scored_first = [int(s) for (s,) in lines(first_out, "SCORED")]
    # The restart re-yields at most the one checkpoint killed between loading and scoring; nothing is skipped.
    assert yielded[: len(scored_first)] == scored_first == steps[:3]
    assert sorted(set(yielded)) == steps and yielded == sorted(yielded), yielded
    assert len(yielded) - len(set(yielded)) <= 1, yielded
    assert "waiting for MLflow to answer again" in second_err and "answers again" in second_err, second_err[-2000:]

    history = MlflowClient(mlflow_server).get_metric_history(run_id, "eval/score")
    assert sorted((m.step, m.value) for m in history) == [(s, 2.0 * s) for s in steps]  # each step scored once

    seen_latest = [int(s) for s, _ in lines(latest_out, "LOADED")]
    assert seen_latest == sorted(set(seen_latest)) and seen_latest[-1] == steps[-1]
    assert len(seen_latest) < saves, seen_latest  # 3 s per checkpoint, one every ~1 s: it skipped

    frame = tracked_ckpt.list_checkpoints(run_id, tracking_uri=mlflow_server)
    assert frame["eval/score"].tolist() == [2.0 * s for s in steps]
    # The first evaluator followed from before the first save: its lag is the live one (the second's includes its
    # restart and the outage). Reported, not asserted: benchmarks/follow.py measures it (docs/performance.md).
    lag = [float(t) - recorded[int(s)] for s, t in first_loaded]
    print(f"\nrecorded -> evaluator loaded: median {statistics.median(lag):.2f} s over {len(lag)} checkpoints")




def test_weights_only_moves_the_model_bytes_alone(mlflow_server: str, tmp_path: Path, experiment: str) -> None:
    """Over HTTP, a weights-only follower downloads model.pt alone: <= 40% of an Adam checkpoint's bytes."""
    width = 256
    model = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, width)).sum().backward()
    opt.step()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=mlflow_server) as mgr:
        mgr.save(model, opt, {"step": 1})
    proxy = FaultProxy(mlflow_server)
    try:
        moved = {}
        for weights_only in (False, True):
            before = proxy.down
            got = list(tracked_ckpt.follow(mgr.run_id, weights_only=weights_only, tracking_uri=proxy.url))
            moved[weights_only] = proxy.down - before
            assert [c.step for c in got] == [1]
        fresh = torch.nn.Sequential(torch.nn.Linear(width, width), torch.nn.Linear(width, 4))
        for c in tracked_ckpt.follow(mgr.run_id, weights_only=True, tracking_uri=proxy.url):
            c.load(fresh)
            assert sorted(p.name for p in c.local_path.iterdir()) == ["MANIFEST.json", "model.pt"]
        for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True):
            assert torch.equal(a, b)
    finally:
        proxy.close()
    print(f"\nbytes moved per checkpoint: whole {moved[False]}, weights only {moved[True]} "
          f"({moved[True] / moved[False]:.0%})")  # fmt: skip
    assert moved[True] <= 0.4 * moved[False], moved


# ------------------------------------------------------------------------------- local store, in one process


def _trained_run(tmp_path: Path, experiment: str, saves: int = 3) -> tuple[str, torch.nn.Module]:
    model = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    opt = torch.optim.Adam(model.parameters())
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        for step in range(1, saves + 1):
            model(torch.randn(4, 8)).sum().backward()
            opt.step()
            mgr.save(model, opt, {"step": step, "reward": float(step)})
    return mgr.run_id, model


def test_scores_define_best_after_the_fact_and_reach_the_logged_model(tmp_path: Path, experiment: str) -> None:
    run_id, _ = _trained_run(tmp_path, experiment)
    client = MlflowClient()
    # A checkpoint that is a LoggedModel (issue 20 tags it with its reference): its score is linked to it too.
    exp_id = client.get_run(run_id).info.experiment_id
    lm = client.create_logged_model(exp_id, source_run_id=run_id, name="step-00000002",
                                    tags={"tracked_ckpt.checkpoint": f"runs:/{run_id}/checkpoints/step-00000002"})
    for ckpt in tracked_ckpt.follow(run_id):
        ckpt.log_eval({"eval/accuracy": {1: 0.5, 2: 0.9, 3: 0.7}[ckpt.step]})
    history = client.get_metric_history(run_id, "eval/accuracy")
    assert sorted((m.step, m.value) for m in history) == [(1, 0.5), (2, 0.9), (3, 0.7)]
    assert [m.value for m in client.get_logged_model(lm.model_id).metrics or []] == [0.9]
    # "best" by the score, though the trainer never saw it (its own monitor is reward)
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    assert tracked_ckpt.load(run_id, fresh, which="best", metric="eval/accuracy")["step"] == 2
    frame = tracked_ckpt.list_checkpoints(run_id, metric="eval/accuracy")
    assert frame["eval/accuracy"].tolist() == [0.5, 0.9, 0.7] and frame["is_best"].tolist() == [False, True, False]
    tracked_ckpt.log_eval(f"runs:/{run_id}/checkpoints/step-00000003", {"eval/accuracy": 0.95})  # a re-score wins
    assert tracked_ckpt.load(run_id, fresh, which="best", metric="eval/accuracy")["step"] == 3
    from click.testing import CliRunner

    from tracked_ckpt.cli import cli

    shown = CliRunner().invoke(cli, ["show", f"{run_id}@2"])
    assert "eval       eval/accuracy=0.9" in shown.stdout, shown.output
    with pytest.raises(tracked_ckpt.ConfigError, match="not a number"):
        tracked_ckpt.log_eval(f"runs:/{run_id}/checkpoints/step-00000003", {"eval/accuracy": "high"})


def test_cli_runs_the_command_per_checkpoint_and_logs_what_it_prints(tmp_path: Path, experiment: str) -> None:
    from click.testing import CliRunner

    from tracked_ckpt.cli import cli

    run_id, _ = _trained_run(tmp_path, experiment)
    script = ("import os, sys; p = sys.argv[1]; assert os.path.isfile(os.path.join(p, 'model.pt')); "
              "print('evaluating', p); print(f'eval/len={int(os.environ[\"TRACKED_CKPT_STEP\"]) * 10}')")  # fmt: skip
    args = ["follow", run_id, "--log-metrics", "--resume", "eval/len", "--weights-only", "--",
            sys.executable, "-c", script, "{path}"]  # fmt: skip
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 0, result.output
    assert result.stdout.count("evaluating") == 3
    history = MlflowClient().get_metric_history(run_id, "eval/len")
    assert sorted((m.step, m.value) for m in history) == [(1, 10.0), (2, 20.0), (3, 30.0)]
    again = CliRunner().invoke(cli, args)  # resumed after step 3: nothing left to run
    assert again.exit_code == 0 and "evaluating" not in again.stdout, again.output
    failing = CliRunner().invoke(cli, [*args[:2], "--", sys.executable, "-c", "raise SystemExit(3)"])
    assert failing.exit_code == 3 and "step 1" in failing.stderr and "exited with status 3" in failing.stderr


def test_checkpoints_of_the_old_layout_still_load(
    tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before model.pt, everything lay in state.pt: such checkpoints load, follow and export as before."""
    from tracked_ckpt.formats import torch_file
    from tracked_ckpt.state import STATE_FILE

    monkeypatch.setattr(torch_file, "split_files", lambda payload: [(STATE_FILE, dict(payload))])  # what 0.2 wrote
    run_id, model = _trained_run(tmp_path, experiment, saves=1)
    monkeypatch.undo()
    (ckpt,) = tracked_ckpt.follow(run_id, weights_only=True)  # no model.pt: the whole state.pt is fetched
    assert sorted(f.name for f in ckpt._resolved.manifest.files) == ["rng.json", "state.pt"]
    fresh = torch.nn.Sequential(torch.nn.Linear(8, 8), torch.nn.Linear(8, 2))
    ckpt.load(fresh)
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values(), strict=True))
    assert ckpt.model_state().keys() == model.state_dict().keys()
    opt = torch.optim.Adam(fresh.parameters())
    assert tracked_ckpt.load(run_id, fresh, opt)["step"] == 1 and opt.state_dict()["state"]


def test_metric_lines_of_a_command_and_bad_arguments(tmp_path: Path) -> None:
    from tracked_ckpt.follow_cmd import expand, parse_metrics

    out = "loss=0.5\nevaluating ./x\neval/acc = 0.9\nbad=abc\nx=nan\nrate=1e-3\nloss=0.25\n"
    assert parse_metrics(out) == {"loss": 0.25, "eval/acc": 0.9, "rate": 0.001}  # the last value of a key wins
    assert expand(["--ckpt={path}", "{step}", "{other}"], {"path": "/c", "step": "7"}) == ["--ckpt=/c", "7", "{other}"]
    with pytest.raises(tracked_ckpt.ConfigError, match="keep=0"):
        tracked_ckpt.follow("abc", keep=0)
    with pytest.raises(tracked_ckpt.ConfigError, match="not a checkpoint reference"):
        tracked_ckpt.follow("no such run!")
    with pytest.raises(tracked_ckpt.StoreNotFoundError):  # raised where follow() is called; nothing created
        tracked_ckpt.follow("abc", tracking_uri=f"sqlite:///{tmp_path / 'none.db'}")
    assert not (tmp_path / "none.db").exists()


def test_a_corrupt_or_uncommitted_checkpoint_is_never_yielded(
    tmp_path: Path, experiment: str, caplog: pytest.LogCaptureFixture
) -> None:
    run_id, _ = _trained_run(tmp_path, experiment)
    root = Path(MlflowClient().get_run(run_id).info.artifact_uri.removeprefix("file://")) / "checkpoints"
    with open(root / "step-00000002" / "model.pt", "r+b") as f:  # bit rot in the weights of step 2
        f.seek(200)
        byte = f.read(1)
        f.seek(200)
        f.write(bytes([byte[0] ^ 0xFF]))
    (root / "step-00000099").mkdir()  # an upload in flight: files, no manifest yet
    (root / "step-00000099" / "model.pt").write_bytes(b"partial")
    with caplog.at_level("WARNING", logger="tracked_ckpt"):
        steps = [c.step for c in tracked_ckpt.follow(run_id, poll_interval=0.05, max_interval=0.1)]
    assert steps == [1, 3]
    assert "skipping checkpoints/step-00000002 after 3 failed verifications" in caplog.text
