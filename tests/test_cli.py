"""The tracked-ckpt command through its real entry points: `python -m tracked_ckpt` and the console script.

Runs live in real MLflow stores: the session's sqlite store (conftest), a real `mlflow server` over the demo's
store (tests/demo_store.py) for proxied artifacts, and a closed port for an unreachable server. Click's
CliRunner is used only for output details, after the same path was shown to work in a subprocess.
"""

from __future__ import annotations

import csv
import io
import json
import math
import os
import pty
import re
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pandas as pd
import pytest
import torch
from click.testing import CliRunner
from conftest import free_port, make_training, train_steps
from demo_store import DEMO_ITERATIONS, DemoServer, demo_server
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager
from tracked_ckpt.cli import cli
from tracked_ckpt.maintenance import open_catalog, parse, plan_prune
from tracked_ckpt.manifest import MANIFEST_NAME, Manifest, hash_file
from tracked_ckpt.policies import KeepLast
from tracked_ckpt.progress import Progress
from tracked_ckpt.resolver import resolve
from tracked_ckpt.runtags import TAG_BEST, TAG_BYTES, TAG_COUNT, TAG_LATEST, TAG_PRUNED
from tracked_ckpt.store.run_store import RunStore

REWARDS = {10: 1.0, 20: 5.0, 30: 3.0, 40: 4.0, 50: 2.0}  # the best is step 20, the latest step 50
COMMANDS = ["ls", "runs", "show", "pull", "verify", "prune", "export", "promote"]
RUN = "0123456789abcdef0123456789abcdef"
# Every command a user may type first, with the arguments it needs (`demo` trains: only its --help here).
EVERY_COMMAND = [
    ["runs"],
    ["ls"],
    ["ls", RUN],
    ["show", f"{RUN}@best"],
    ["pull", RUN],
    ["verify", RUN],
    ["prune", RUN, "--keep-last", "1"],
    ["export", f"{RUN}@best", "-o", "model.safetensors"],
    ["promote", f"{RUN}@best", "--name", "model"],
    ["sync", "."],
    ["demo", "--help"],
    ["--help"],
    ["--version"],
]
pytestmark = pytest.mark.usefixtures("restore_logging")  # in-process invocations configure logging
ISO_UTC_US = re.compile(r"^\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\.\d{6}Z$")


def cli_proc(
    *args: str, env: dict[str, str] | None = None, cwd: Path | None = None
) -> subprocess.CompletedProcess[str]:
    full_env = {**os.environ, **(env or {})}
    cmd = [sys.executable, "-m", "tracked_ckpt", *args]
    return subprocess.run(cmd, capture_output=True, text=True, env=full_env, cwd=cwd, timeout=120)


def invoke(*args: str) -> tuple[int, str, str]:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    return result.exit_code, result.stdout, result.stderr


def make_run(save_dir: Path, experiment: str, rewards: dict[int, float] = REWARDS, **kwargs: object) -> str:
    model, opt, sched = make_training(**kwargs)  # type: ignore[arg-type]
    with CheckpointManager(save_dir, experiment=experiment, resume="never") as mgr:
        for step, reward in rewards.items():
            train_steps(model, opt, sched, 1)
            mgr.save(model, opt, {"step": step, "epoch": step // 20, "reward": reward, "loss": 1 / step})
        return mgr.run_id


def artifact_dir(run_id: str) -> Path:
    root = RunStore(MlflowClient(), run_id).local_dir
    assert root is not None
    return root


@pytest.fixture(scope="module")
def run5(tmp_path_factory: pytest.TempPathFactory) -> tuple[str, str]:
    """A run with checkpoints at steps 10..50 (rewards in REWARDS), left unchanged by every test."""
    experiment = f"cli-{uuid.uuid4().hex[:8]}"
    return make_run(tmp_path_factory.mktemp("run5"), experiment), experiment


# --------------------------------------------------------------------------------------------------- help


def test_help_lists_commands_examples_and_exit_codes_without_importing_mlflow() -> None:
    script = shutil.which("tracked-ckpt")
    assert script is not None, "the console script is not installed (pip install -e .)"
    top = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=60)
    assert top.returncode == 0, top.stderr
    assert all(f"  {c} " in top.stdout for c in [*COMMANDS, "demo"])
    assert "3  run (or experiment) not found" in top.stdout and "6  MLflow unreachable" in top.stdout
    assert "7  no tracking store at the URI" in top.stdout
    for command in COMMANDS:
        p = cli_proc(command, "--help")
        assert p.returncode == 0, p.stderr
        assert "Examples:" in p.stdout and "Exit codes:" in p.stdout and "5  verification failed" in p.stdout
    assert "RUN_ID@best" in cli_proc("show", "--help").stdout
    result = CliRunner().invoke(cli, ["demo", "--help"])  # the demo's own options (it ran for real in demo_store)
    assert result.exit_code == 0 and "--iterations" in result.stdout
    code = (
        "import sys\nfrom tracked_ckpt.cli import main\n"
        "try:\n    main(['pull', '--help'])\nexcept SystemExit as e:\n    assert e.code == 0\n"
        "print(sorted(m for m in ('mlflow', 'torch', 'pandas') if m in sys.modules))"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0 and p.stdout.strip().endswith("[]"), p.stdout + p.stderr


def test_read_commands_import_no_torch(run5: tuple[str, str]) -> None:
    run_id, experiment = run5
    code = (
        "import sys\nfrom tracked_ckpt.cli import main\n"
        f"for argv in (['ls', '{run_id}'], ['show', '{run_id}'], ['runs', '--experiment', '{experiment}'], ['ls']):\n"
        "    try:\n        main(argv)\n"
        "    except SystemExit as e:\n        assert e.code in (0, None), (argv, e.code)\n"
        "print('torch' in sys.modules)"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0 and p.stdout.strip().endswith("False"), p.stdout[-2000:] + p.stderr[-2000:]
    assert "step" in p.stdout and run_id in p.stdout  # the commands ran and printed


# ---------------------------------------------------------------------------------------------- ls / runs


def test_ls_shows_steps_metrics_and_latest_best_markers(run5: tuple[str, str]) -> None:
    run_id, _ = run5
    p = cli_proc("ls", run_id)
    assert p.returncode == 0, p.stderr
    header, *rows = p.stdout.splitlines()
    assert header.split() == ["step", "epoch", "reward", "loss", "size", "age", "mark", "path"]
    by_step = {int(r.split()[0]): r for r in rows}
    assert sorted(by_step) == sorted(REWARDS)
    assert "  best  " in by_step[20] and "  latest  " in by_step[50]
    assert by_step[30].split()[:4] == ["30", "1", "3", "0.0333333"] and by_step[30].endswith("step-00000030")
    assert all(m not in by_step[s] for s in (10, 30, 40) for m in ("latest", "best"))


def test_ls_csv_and_json_carry_the_typed_view_columns(run5: tuple[str, str]) -> None:
    run_id, experiment = run5
    code, out, _ = invoke("ls", run_id, "--format", "json")
    assert code == 0
    rows = json.loads(out)
    assert [r["step"] for r in rows] == sorted(REWARDS)
    assert [r["reward"] for r in rows] == list(REWARDS.values())
    assert [r["is_best"] for r in rows] == [False, True, False, False, False]
    assert rows[-1]["is_latest"] and rows[0]["epoch"] == 0 and rows[0]["ref"].startswith(f"runs:/{run_id}/")
    assert all(r["model_id"].startswith("m-") for r in rows)  # each checkpoint's LoggedModel
    assert rows[0]["created"].endswith("Z") and isinstance(rows[0]["size_bytes"], int)
    code, out, _ = invoke("ls", "--experiment", experiment, "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert code == 0 and len(table) == len(REWARDS)
    assert list(table[0]) == [
        *("run_id", "path", "ref", "model_id", "step", "seq", "epoch", "created", "size_bytes", "is_latest"),
        "is_best",
        *("blocked_s", "commit_s", "record_s", "loss", "reward"),
    ]
    assert {r["run_id"] for r in table} == {run_id}
    code, out, _ = invoke("ls", "--experiment", experiment)  # the table with a run column
    assert code == 0 and out.splitlines()[0].split()[:2] == ["run", "step"] and out.count(run_id) == len(REWARDS)


def test_runs_one_row_per_run_from_the_tags(run5: tuple[str, str]) -> None:
    run_id, experiment = run5
    code, out, _ = invoke("runs", "--experiment", experiment, "--format", "json")
    assert code == 0
    (row,) = json.loads(out)
    size = sum(e.size for e in open_catalog(run_id).scan() for e in e.manifest.files)
    assert row["run_id"] == run_id and row["status"] == "FINISHED" and row["checkpoints"] == len(REWARDS)
    assert (row["latest_step"], row["best_step"], row["best_value"], row["size_bytes"]) == (50, 20, 5.0, size)
    code, out, _ = invoke("runs", "-e", experiment)
    header, line = out.splitlines()
    assert header.split() == ["run", "name", "status", "ckpts", "latest", "best", "size", "started", "forked", "from"]
    assert line.startswith(run_id) and "reward=5 @20" in line and " 5 " in line


# -------------------------------------------------------------------------------------------- show / pull


def test_show_prints_manifest_files_sizes_and_digests(run5: tuple[str, str]) -> None:
    run_id, _ = run5
    p = cli_proc("show", f"{run_id}@best")
    assert p.returncode == 0, p.stderr
    folder = artifact_dir(run_id) / "checkpoints/step-00000020"
    manifest = Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), "test")
    assert p.stdout.startswith(f"runs:/{run_id}/checkpoints/step-00000020   (best)")
    assert "  step       20" in p.stdout and "reward=5" in p.stdout
    for f in manifest.files:
        size, digest = hash_file(folder / f.name)
        (line,) = [x for x in p.stdout.splitlines() if x.split()[:1] == [f.name]]
        assert line.split() == [f.name, str(size), digest]
    for ref, step, marks in [
        (run_id, 50, ["latest"]),
        (f"{run_id}@latest", 50, ["latest"]),
        (f"{run_id}@30", 30, []),
        (f"runs:/{run_id}/checkpoints/step-00000040", 40, []),
    ]:
        code, out, _ = invoke("show", ref, "--format", "json")
        data = json.loads(out)
        assert code == 0 and (data["step"], data["markers"]) == (step, marks), ref
        assert data["files"] and all(len(f["blake3"]) == 64 for f in data["files"])
    code, out, _ = invoke("show", run_id + "@best", "--metric", "reward", "--mode", "min", "--format", "json")
    assert code == 0 and json.loads(out)["step"] == 10


def test_best_of_a_loss_min_run_is_the_same_for_load_cli_and_manager(tmp_path: Path) -> None:
    """'best' is the run's own monitor everywhere, not reward:max (a loss/min run has no reward at all)."""
    losses = {10: 0.9, 20: 0.2, 30: 0.5}  # the best is step 20, the latest step 30
    model, opt, sched = make_training()
    kwargs: dict[str, object] = {"experiment": f"cli-{uuid.uuid4().hex[:8]}", "monitor": "loss", "mode": "min"}
    with CheckpointManager(tmp_path / "ckpt", resume="never", **kwargs) as mgr:  # type: ignore[arg-type]
        for step, loss in losses.items():
            train_steps(model, opt, sched, 1)
            mgr.save(model, opt, {"step": step, "loss": loss})
        run_id = mgr.run_id
    fresh, fresh_opt, _ = make_training()
    assert tracked_ckpt.load(run_id, fresh, fresh_opt, which="best")["step"] == 20
    code, out, err = invoke("show", f"{run_id}@best", "--format", "json")
    assert code == 0 and json.loads(out)["step"] == 20, err
    assert resolve(f"{run_id}@best")[1].manifest.step == 20  # the one resolver every path above goes through
    with CheckpointManager(tmp_path / "ckpt", resume="must", **kwargs) as mgr:  # type: ignore[arg-type]
        assert mgr.get_best_checkpoint() == f"runs:/{run_id}/checkpoints/step-00000020"
        assert mgr.load(fresh, fresh_opt, which="best")["step"] == 20
    # An explicit metric still wins over the run's monitor (the loss's worst, by max).
    assert tracked_ckpt.load(run_id, fresh, fresh_opt, which="best", metric="loss", mode="max")["step"] == 10


def test_pull_writes_verified_files_and_refuses_to_overwrite(run5: tuple[str, str], tmp_path: Path) -> None:
    run_id, _ = run5
    out = tmp_path / "best"
    p = cli_proc("pull", f"{run_id}@best", "-o", str(out))
    assert p.returncode == 0, p.stderr
    assert "verified against MANIFEST.json" in p.stdout and p.stderr == ""  # no progress bar on a pipe
    manifest = Manifest.from_json((out / MANIFEST_NAME).read_bytes(), "pulled")
    assert manifest.step == 20 and sorted(x.name for x in out.iterdir()) == sorted(
        [MANIFEST_NAME, *(f.name for f in manifest.files)]
    )
    for f in manifest.files:
        assert hash_file(out / f.name) == (f.size, f.blake3)
    payload = torch.load(out / "state.pt", weights_only=True)
    saved = torch.load(artifact_dir(run_id) / "checkpoints/step-00000020/state.pt", weights_only=True)
    assert payload.keys() == saved.keys()
    code, _, err = invoke("pull", f"{run_id}@best", "-o", str(out))
    assert code == 2 and "--force" in err
    (tmp_path / "file").write_text("")
    code, _, err = invoke("pull", f"{run_id}@30", "-o", str(tmp_path / "file" / "sub"))
    assert code == 1 and "Not a directory" in err  # a local problem: one line, no traceback
    code, _, _ = invoke("pull", f"{run_id}@30", "-o", str(out), "--force")
    assert code == 0 and Manifest.from_json((out / MANIFEST_NAME).read_bytes(), "x").step == 30
    assert [x.name for x in out.iterdir() if x.name.startswith(".")] == []  # no staging left behind


# ---------------------------------------------------------------------------------------- verify / prune


def test_verify_finds_a_flipped_byte_and_an_unreadable_manifest(tmp_path: Path, experiment: str) -> None:
    run_id = make_run(tmp_path / "ck", experiment, {1: 1.0, 2: 2.0, 3: 3.0})
    root = artifact_dir(run_id) / "checkpoints"
    with open(root / "step-00000002/state.pt", "r+b") as f:  # bit rot in the middle of the file
        f.seek(f.seek(0, 2) // 2)
        byte = f.read(1)
        f.seek(-1, 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    (root / "step-00000099").mkdir()  # an interrupted save: data, no manifest
    (root / "step-00000099/state.pt").write_bytes(b"partial")
    shutil.copytree(root / "step-00000001", root / "step-00000007")
    (root / "step-00000007" / MANIFEST_NAME).write_text("{not json")

    p = cli_proc("verify", run_id)
    assert p.returncode == 5, p.stdout + p.stderr
    status = {line.split()[1]: line.split()[0] for line in p.stdout.splitlines() if line.split()[0].isupper()}
    assert status == {
        "checkpoints/step-00000001": "OK",
        "checkpoints/step-00000002": "CORRUPT",
        "checkpoints/step-00000003": "OK",
        "checkpoints/step-00000007": "CORRUPT",
        "checkpoints/step-00000099": "UNCOMMITTED",
    }
    assert "does not match its BLAKE3 digest" in p.stdout and "2 of 5 checkpoint folders FAILED" in p.stderr

    p = cli_proc("-v", "verify", f"{run_id}@3")
    assert p.returncode == 0 and "1 checkpoint(s) verified" in p.stdout
    assert "INFO tracked_ckpt.maintenance: verified step 3" in p.stderr  # -v: the library's log lines
    code, _, err = invoke("pull", f"{run_id}@2", "-o", str(tmp_path / "out"))
    assert code == 5 and "BLAKE3" in err
    assert not (tmp_path / "out" / "state.pt").exists()  # a file that failed verification never lands
    (root / "step-00000001/rng.json").unlink()
    code, _, err = invoke("pull", f"{run_id}@1", "-o", str(tmp_path / "out"))
    assert code == 5 and "'rng.json' listed in the manifest is missing" in err
    os.symlink(root / "step-00000003/state.pt", root / "step-00000001/rng.json")  # planted: a link elsewhere
    code, _, err = invoke("pull", f"{run_id}@1", "-o", str(tmp_path / "out"))
    assert code == 5 and "symlink" in err and not (tmp_path / "out" / "rng.json").exists()


def test_prune_applies_the_library_rules_and_updates_the_tags(tmp_path: Path, experiment: str) -> None:
    run_id = make_run(tmp_path / "ck", experiment)
    code, out, _ = invoke("prune", run_id, "--keep-last", "1", "--dry-run")
    assert code == 0 and "would delete 3 checkpoint(s)" in out
    assert sorted(e.name for e in (artifact_dir(run_id) / "checkpoints").iterdir()) == [
        f"step-{s:08d}" for s in REWARDS
    ]
    p = cli_proc("prune", run_id, "--keep-last", "2")
    assert p.returncode == 0, p.stderr
    assert "deleted 2 checkpoint(s)" in p.stdout
    left = sorted(e.name for e in (artifact_dir(run_id) / "checkpoints").iterdir())
    assert left == ["step-00000020", "step-00000040", "step-00000050"]  # the best (20) is never deleted
    tags = MlflowClient().get_run(run_id).data.tags
    assert tags[TAG_COUNT] == "3" and tags[TAG_PRUNED] == "step 10, step 30"
    assert int(tags[TAG_BYTES]) == sum(r.manifest.size for r in open_catalog(run_id).scan())
    assert tags[TAG_LATEST].endswith("step-00000050") and tags[TAG_BEST].endswith("step-00000020")
    code, out, _ = invoke("ls", run_id, "--format", "json")
    assert [r["step"] for r in json.loads(out)] == [20, 40, 50]
    code, _, err = invoke("prune", run_id)
    assert code == 2 and "--keep-last" in err


def test_prune_under_another_metric_keeps_the_tagged_best(run5: tuple[str, str]) -> None:
    catalog = open_catalog(run5[0])
    plan = plan_prune(catalog, KeepLast(1), metric="loss", mode="max")
    assert [c.step for c in plan.delete] == [30, 40]  # 10 has the best loss (1/10), 20 is the tagged best
    assert plan.reasons["checkpoints/step-00000010"] == "best loss"
    assert plan.reasons["checkpoints/step-00000020"] == "tagged"
    assert plan.reasons["checkpoints/step-00000050"] == "latest, tagged, policy"


# --------------------------------------------------------------------------------------------- exit codes


def test_distinct_exit_codes_for_unknown_run_no_checkpoint_and_bad_reference(
    run5: tuple[str, str], experiment: str
) -> None:
    p = cli_proc("show", "0123456789abcdef0123456789abcdef")
    assert p.returncode == 3 and "does not exist" in p.stderr and "Traceback" not in p.stderr
    empty = MlflowClient().create_run(MlflowClient().create_experiment(experiment)).info.run_id
    p = cli_proc("pull", empty)
    assert p.returncode == 4 and "no committed checkpoint" in p.stderr and "Traceback" not in p.stderr
    p = cli_proc("show", f"{run5[0]}@latest!")
    assert p.returncode == 2 and "RUN_ID@best" in p.stderr
    assert invoke("ls", empty)[0] == 4
    assert invoke("show", f"{run5[0]}@999")[0] == 4
    assert invoke("verify", empty)[0] == 4
    assert invoke("runs", "--experiment", "no-such-experiment")[0] == 3
    assert invoke("ls", "--format", "xml")[0] == 2
    client = MlflowClient()
    client.delete_run(empty)
    assert invoke("show", empty)[0] == 3


def test_every_read_command_gives_up_on_a_refusing_server_within_seconds(
    run5: tuple[str, str], tmp_path: Path
) -> None:
    """MLflow's own defaults (7 retries, 120 s timeouts) in force: tracked_ckpt's READ policy bounds the wait."""
    url = f"http://127.0.0.1:{free_port()}"  # nothing listens: connections are refused
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_HTTP_REQUEST_")}
    env["MLFLOW_TRACKING_URI"] = url
    for args in EVERY_COMMAND[:7]:
        t0 = time.monotonic()
        p = subprocess.run(
            [sys.executable, "-m", "tracked_ckpt", *args], capture_output=True, text=True, env=env, cwd=tmp_path
        )
        took = time.monotonic() - t0
        assert p.returncode == 6, (args, p.stdout + p.stderr)
        assert took < 10, (args, took)
        (line,) = p.stderr.splitlines()  # one line: no urllib3 "Retrying ..." warnings, no traceback
        assert line == (
            f"tracked-ckpt: error: cannot reach the MLflow tracking server at {url} (connection refused); check "
            "that it is running and that the URI, port and network are right (--tracking-uri or MLFLOW_TRACKING_URI)"
        ), args
    assert list(tmp_path.iterdir()) == []


def test_no_command_creates_a_store_where_there_is_none(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """From an empty folder without MLFLOW_TRACKING_URI: exit 7 naming the store, and not one file written."""
    empty = tmp_path / "empty"
    empty.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    for args in (["runs"], ["pull", RUN]):  # the real entry point, twice
        p = subprocess.run(
            [sys.executable, "-m", "tracked_ckpt", *args], capture_output=True, text=True, env=env, cwd=empty
        )
        assert p.returncode == 7, p.stdout + p.stderr
        assert p.stderr == (
            f"tracked-ckpt: error: no MLflow tracking store at sqlite:///{empty}/mlflow.db ({empty}/mlflow.db does "
            "not exist; nothing was created). Point at the training's store with --tracking-uri URI (tracking_uri= "
            "in Python) or MLFLOW_TRACKING_URI, or cd to the folder that holds its mlflow.db\n"
        )
    monkeypatch.chdir(empty)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    for args in EVERY_COMMAND:
        code, out, err = invoke(*args)
        expected = 0 if args[0] in ("sync", "demo", "--help", "--version") else 7
        assert code == expected, (args, out, err)
        assert list(empty.iterdir()) == [], args
    elsewhere = tmp_path / "elsewhere" / "mlflow.db"
    for args in (["--tracking-uri", f"sqlite:///{elsewhere}", "ls"], ["runs", "--tracking-uri", f"file://{elsewhere}"]):
        code, _, err = invoke(*args)
        assert code == 7 and f"{elsewhere} does not exist" in err, err
    assert list(tmp_path.iterdir()) == [empty] and list(empty.iterdir()) == []


def test_empty_results_name_the_store_that_was_searched(experiment: str, local_store: str) -> None:
    MlflowClient().create_experiment(experiment)
    code, out, err = invoke("runs", "--experiment", experiment)
    assert code == 0 and out == ""
    assert err == f"no runs with tracked_ckpt checkpoints in experiment {experiment!r} at {local_store}\n"
    code, out, err = invoke("ls", "-e", experiment, "--format", "json")
    assert code == 0 and json.loads(out) == []
    assert err == f"no committed checkpoints in experiment {experiment!r} at {local_store}\n"


def test_global_options_go_before_or_after_the_command(run5: tuple[str, str], tmp_path: Path) -> None:
    run_id, _ = run5
    uri = os.environ["MLFLOW_TRACKING_URI"]
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}
    p = subprocess.run(
        [sys.executable, "-m", "tracked_ckpt", "--tracking-uri", uri, "-v", "ls", run_id, "--format", "json"],
        capture_output=True, text=True, env=env, cwd=tmp_path,
    )
    assert p.returncode == 0, p.stderr
    assert [r["step"] for r in json.loads(p.stdout)] == sorted(REWARDS)
    missing = f"sqlite:///{tmp_path}/missing.db"
    assert invoke("ls", run_id, "--tracking-uri", uri)[0] == 0
    assert invoke("--tracking-uri", missing, "ls", run_id)[0] == 7  # the command line wins over the environment
    assert invoke("--tracking-uri", missing, "ls", run_id, "--tracking-uri", uri)[0] == 0  # the later one wins
    assert invoke("--tracking-uri", uri, "ls", run_id, "--tracking-uri", missing)[0] == 7
    assert invoke("--tracking-uri", missing, "show", run_id)[0] == 7
    assert not (tmp_path / "missing.db").exists()


def test_json_output_has_one_shape_per_field_across_commands(run5: tuple[str, str]) -> None:
    run_id, experiment = run5
    _, out, _ = invoke("ls", run_id, "--format", "json")
    rows = {r["step"]: r for r in json.loads(out)}
    for step, row in rows.items():
        _, out, _ = invoke("show", f"{run_id}@{step}", "--format", "json")
        shown = json.loads(out)
        manifest = Manifest.from_json((artifact_dir(run_id) / row["path"] / MANIFEST_NAME).read_bytes(), "test")
        assert ISO_UTC_US.match(row["created"]) and shown["created"] == row["created"]
        micros = round(manifest.created * 1e6)
        assert row["created"] == time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(micros // 10**6)) + (
            f".{micros % 10**6:06d}Z"
        )
        assert shown["size_bytes"] == row["size_bytes"] == manifest.size
        assert shown["ref"] == row["ref"] and shown["path"] == row["path"]
        assert row["loss"] == shown["metrics"]["loss"] == 1 / step  # every bit of the float, not 15 digits
        assert row["reward"] == shown["metrics"]["reward"] == REWARDS[step]
    _, out, _ = invoke("runs", "-e", experiment, "--format", "json")
    (run,) = json.loads(out)
    assert ISO_UTC_US.match(run["start_time"]) and run["start_time"].endswith("000Z")  # MLflow keeps milliseconds
    _, out, _ = invoke("ls", run_id, "--format", "csv")
    table = list(csv.DictReader(io.StringIO(out)))
    assert [r["created"] for r in table] == [rows[s]["created"] for s in sorted(rows)]
    assert [float(r["loss"]) for r in table] == [1 / s for s in sorted(rows)]
    assert not any(math.isnan(float(r["loss"])) for r in table)


def help_examples(*command: str) -> list[str]:
    """The example lines of ``tracked-ckpt COMMAND --help``, as printed."""
    result = CliRunner().invoke(cli, [*command, "--help"])
    assert result.exit_code == 0, result.output
    block = result.stdout.split("Examples:\n", 1)[1].split("\n\n", 1)[0]
    return [line.strip() for line in block.splitlines() if line.strip()]


def test_every_help_example_runs_as_printed_after_the_demo(tmp_path: Path) -> None:
    """In a fresh folder, the examples of every --help, in order: the first one runs the demo, the rest read its
    store (RUN_ID replaced by the demo's run ID); each exits 0. (`demo --help` is the demo's own argparse help.)"""
    examples = [e for c in [(), *([c] for c in [*COMMANDS, "sync"])] for e in help_examples(*c)]
    assert examples[0] == "tracked-ckpt demo --iterations 15"
    assert any("--experiment tracked-ckpt-demo" in e for e in examples)
    env = {k: v for k, v in os.environ.items() if k != "MLFLOW_TRACKING_URI"}  # the demo's default store
    env["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{env['PATH']}"  # `python` in an example: this one
    shell = f'tracked-ckpt() {{ "{sys.executable}" -m tracked_ckpt "$@"; }}\n'
    run_id = ""
    for example in examples:
        if "RUN_ID" in example:
            assert run_id, example
        line = example.replace("RUN_ID", run_id)
        p = subprocess.run(["bash", "-c", shell + line], capture_output=True, text=True, env=env, cwd=tmp_path)
        assert p.returncode == 0, f"{example}\n{p.stdout}\n{p.stderr}"
        if not run_id:
            run_id = re.search(r"new run ([0-9a-f]{32})", p.stdout).group(1)  # type: ignore[union-attr]
            # the demo's log lines, as `python -m tracked_ckpt.demo` shows them, sizes for humans
            saved = r"INFO tracked_ckpt.recording.recorder: saved step 5 to \S+ \(\d+\.\d kB\)"
            assert re.search(saved, p.stderr), p.stderr
    assert (tmp_path / "best" / "state.pt").is_file() and (tmp_path / "checkpoints.csv").stat().st_size > 0


def test_both_demo_entry_points_show_the_same_help_with_every_option_explained() -> None:
    helps = []
    for cmd in (["-m", "tracked_ckpt.demo"], ["-m", "tracked_ckpt", "demo"]):
        p = subprocess.run([sys.executable, *cmd, "--help"], capture_output=True, text=True, timeout=120)
        assert p.returncode == 0, p.stderr
        helps.append(p.stdout)
    assert helps[0].startswith("usage: python -m tracked_ckpt.demo ")
    assert helps[1].startswith("usage: tracked-ckpt demo ")
    options = [h[h.index("\noptions:") :] for h in helps]
    assert options[0] == options[1]
    lines = options[0].splitlines()[1:]
    for i, line in enumerate(lines):  # an option alone on its line has its help on the next one
        if re.fullmatch(r"  -[-\w]+(?: [A-Z_]+)?(?:, --[-\w]+)?", line):
            assert i + 1 < len(lines) and re.match(r" {10,}\S", lines[i + 1]), f"no help for {line.strip()}"


# ----------------------------------------------------------------------------- a real server, a terminal


@pytest.fixture(scope="module")
def server(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> DemoServer:
    return demo_server(request.config, tmp_path_factory)


@pytest.mark.server
def test_demo_command_populated_a_store_the_cli_reads_over_http(server: DemoServer) -> None:
    assert "new run " + server.store.run_id in server.store.stdout
    p = cli_proc("ls", server.store.run_id, "--format", "json", env={"MLFLOW_TRACKING_URI": server.url})
    assert p.returncode == 0, p.stderr
    assert [r["step"] for r in json.loads(p.stdout)] == list(range(5, DEMO_ITERATIONS + 1, 5))


@pytest.mark.server
def test_pull_over_proxied_artifacts_shows_progress_only_on_a_terminal(server: DemoServer, tmp_path: Path) -> None:
    model, opt, sched = make_training(hidden=40_000)  # ~3.4 MB of state with AdamW's moments
    train_steps(model, opt, sched, 1)
    experiment = f"cli-http-{uuid.uuid4().hex[:8]}"
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=server.url) as mgr:
        mgr.save(model, opt, {"step": 1, "reward": 1.0})
        run_id = mgr.run_id
    assert RunStore(MlflowClient(server.url), run_id).local_dir is None  # really downloaded through the server
    env = {"MLFLOW_TRACKING_URI": server.url, "COLUMNS": "100"}

    piped = cli_proc("pull", run_id, "-o", str(tmp_path / "piped"), env=env)
    assert piped.returncode == 0 and piped.stderr == "", piped.stderr

    primary, secondary = pty.openpty()
    cmd = [sys.executable, "-m", "tracked_ckpt", "pull", run_id, "-o", str(tmp_path / "tty")]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=secondary, env={**os.environ, **env}, text=True)
    os.close(secondary)
    terminal = b""
    while True:
        try:
            chunk = os.read(primary, 4096)
        except OSError:  # EIO: the child closed the terminal
            break
        if not chunk:
            break
        terminal += chunk
    os.close(primary)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 0, terminal.decode(errors="replace")
    assert b"pull step 1" in terminal and b"100%" in terminal and b"MB/s" in terminal
    assert "verified" in out
    p = cli_proc("verify", run_id, env=env)
    assert p.returncode == 0 and "OK " in p.stdout, p.stdout + p.stderr


# ------------------------------------------------------------------------------------- progress, logging


class FakeTerminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_progress_draws_on_a_terminal_only_and_ends_its_line() -> None:
    quiet = io.StringIO()
    with Progress(10 << 20, "pull", stream=quiet) as bar:
        bar.advance(10 << 20)
    assert quiet.getvalue() == ""
    shown = FakeTerminal()
    with Progress(10 << 20, "pull", stream=shown) as bar:
        bar.advance(5 << 20)
        bar.advance(5 << 20)
    assert shown.getvalue().startswith("\rpull") and "100%" in shown.getvalue() and shown.getvalue().endswith("\n")
    small = FakeTerminal()
    with Progress(1000, "pull", stream=small) as bar:
        bar.advance(1000)
    assert small.getvalue() == ""  # too small to be worth a bar


def test_the_library_configures_no_logging_handlers(run5: tuple[str, str]) -> None:
    code = (
        "import logging, sys, tracked_ckpt\n"
        "from tracked_ckpt import maintenance, views, manager, progress, cli\n"
        f"tracked_ckpt.list_checkpoints({run5[0]!r})\n"
        "maintenance.verify_run(maintenance.open_catalog(" + repr(run5[0]) + "))\n"
        "print(logging.getLogger().handlers, logging.getLogger('tracked_ckpt').handlers)\n"
    )
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout.strip() == "[] []"


def test_table_keeps_metric_names_that_are_not_identifiers() -> None:
    from tracked_ckpt.cli import _checkpoints_table

    row = {"run_id": "r", "path": "checkpoints/step-00000001", "ref": "runs:/r/checkpoints/step-00000001"}
    row |= {"step": 1, "seq": 1, "epoch": None, "created": pd.Timestamp.now(tz="UTC"), "size_bytes": 2_500_000}
    row |= {"is_latest": True, "is_best": False, "val/loss": 0.25, "reward": 7.0}
    header, line = _checkpoints_table(pd.DataFrame([row]), with_run=False).splitlines()
    assert header.split() == ["step", "epoch", "reward", "val/loss", "size", "age", "mark", "path"]
    assert line.split() == ["1", "-", "7", "0.25", "2.5", "MB", "0s", "latest", "checkpoints/step-00000001"]


def test_reference_syntax() -> None:
    rid = "0123456789abcdef0123456789abcdef"
    assert (parse(rid).which, parse(rid).explicit) == ("latest", False)
    assert parse(f"{rid}@best").which == "best" and parse(f"{rid}@best").explicit
    assert parse(f"{rid}@120").which == 120
    assert parse(f"runs:/{rid}/checkpoints/step-00000120").path == "checkpoints/step-00000120"
    for bad in (f"{rid}@", f"{rid}@first", "runs:/x/../../etc", f"{rid}/checkpoints", ""):
        with pytest.raises(ValueError):
            parse(bad)
