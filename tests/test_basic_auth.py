"""Against a real ``mlflow server --app-name basic-auth`` (needs ``mlflow[auth]``), credentials from the env.

alice creates the experiment (so she may MANAGE it); bob has MLflow's default permission, READ. Passwords
must never show up in logs, error messages (whole exception chains), save_dir or the server's stores.
"""

from __future__ import annotations

import logging
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch
from conftest import make_training, start_mlflow_server, stop_server
from mlflow.server.auth.client import AuthServiceClient
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager, KeepLast
from tracked_ckpt.errors import CheckpointNotFoundError, SaveError, StoreError
from tracked_ckpt.manifest import MANIFEST_NAME, Manifest, verify_file

pytestmark = pytest.mark.server

ADMIN_PASSWORD = f"admin-{secrets.token_hex(8)}"
PASSWORDS = {"alice": f"alice-{secrets.token_hex(8)}", "bob": f"bob-{secrets.token_hex(8)}"}
WRONG = f"wrong-{secrets.token_hex(8)}"
SECRETS = [ADMIN_PASSWORD, WRONG, *PASSWORDS.values()]


@dataclass(frozen=True)
class AuthServer:
    url: str
    workdir: Path


@pytest.fixture(scope="module")
def auth_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[AuthServer]:
    workdir = tmp_path_factory.mktemp("mlflow-auth")
    # MLflow's defaults, plus its credential cache: without it every request re-runs PBKDF2 (~3x slower).
    config = workdir / "basic_auth.ini"
    config.write_text(
        "[mlflow]\ndefault_permission = READ\ndatabase_uri = sqlite:///basic_auth.db\nadmin_username = admin\n"
        "authorization_function = mlflow.server.auth:authenticate_request_basic_auth\nauth_cache_ttl_seconds = 600\n"
    )
    env = {
        "MLFLOW_AUTH_CONFIG_PATH": str(config),
        "MLFLOW_AUTH_ADMIN_PASSWORD": ADMIN_PASSWORD,
        "MLFLOW_FLASK_SERVER_SECRET_KEY": secrets.token_hex(16),
    }
    url, proc = start_mlflow_server(workdir, "--app-name", "basic-auth", env=env)
    try:
        with pytest.MonkeyPatch.context() as mp:
            mp.setenv("MLFLOW_TRACKING_USERNAME", "admin")
            mp.setenv("MLFLOW_TRACKING_PASSWORD", ADMIN_PASSWORD)
            for user, password in PASSWORDS.items():
                AuthServiceClient(url).create_user(user, password)
        yield AuthServer(url, workdir)
    finally:
        stop_server(proc)


@pytest.fixture(autouse=True)
def fast_http(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "15")


def login(monkeypatch: pytest.MonkeyPatch, user: str, password: str | None = None) -> None:
    monkeypatch.setenv("MLFLOW_TRACKING_USERNAME", user)
    monkeypatch.setenv("MLFLOW_TRACKING_PASSWORD", password or PASSWORDS[user])


def _messages(e: BaseException | None) -> str:
    """Every message of an exception chain (not the traceback's source lines: this file holds the passwords)."""
    out = []
    while e is not None:
        out.append(f"{type(e).__name__}: {e}")
        e = e.__cause__ or e.__context__
    return "\n".join(out)


def assert_no_secret(texts: list[str], *roots: Path) -> None:
    for text in texts:
        for s in SECRETS:
            assert s not in text, f"a password leaked into: {text[:300]}"
    for root in roots:
        for f in root.rglob("*"):
            if f.is_file():
                data = f.read_bytes()
                assert not any(s.encode() in data for s in SECRETS), f"a password leaked into {f}"


def test_owner_saves_prunes_and_loads_and_a_reader_loads(
    auth_server: AuthServer, tmp_path: Path, experiment: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    url = auth_server.url
    login(monkeypatch, "alice")
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "alice", experiment=experiment, tracking_uri=url,
                           retention=KeepLast(1)) as mgr:  # fmt: skip
        mgr.save(model, opt, {"step": 1, "reward": 0.1})
        mgr.save(model, opt, {"step": 2, "reward": 0.2})
        assert [e.path for e in mgr.store.list("checkpoints")] == ["checkpoints/step-00000002"]  # MANAGE deletes
        fresh, fresh_opt, _ = make_training(seed=5)
        assert mgr.load(fresh, fresh_opt)["step"] == 2
        run_id = mgr.run_id
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())
    login(monkeypatch, "bob")  # READ, MLflow's default: enough to load anyone's checkpoint
    other, _, _ = make_training(seed=6)
    assert tracked_ckpt.load(run_id, other, tracking_uri=url)["step"] == 2
    assert all(torch.equal(other.state_dict()[k], v) for k, v in model.state_dict().items())
    login(monkeypatch, "bob", WRONG)
    with pytest.raises(StoreError, match=r"401.*MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD") as err:
        tracked_ckpt.load(run_id, other, tracking_uri=url)
    assert url in str(err.value)
    assert_no_secret([_messages(err.value)], tmp_path)


def test_reader_gets_clear_permission_errors_and_keeps_the_local_checkpoint(
    auth_server: AuthServer,
    tmp_path: Path,
    experiment: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    url = auth_server.url
    caplog.set_level(logging.DEBUG)
    errors: list[str] = []
    model, opt, _ = make_training()
    login(monkeypatch, "alice")
    with CheckpointManager(tmp_path / "alice", experiment=experiment, tracking_uri=url) as mgr:
        mgr.save(model, opt, {"step": 1})
        exp_id = mgr.store.experiment_id

    login(monkeypatch, "bob")
    with pytest.raises(StoreError) as err:
        CheckpointManager(tmp_path / "bob0", experiment=experiment, tracking_uri=url)
    assert f"MLflow at {url} failed to create a run in experiment {exp_id}" in str(err.value)
    assert "403" in str(err.value) and "lacks permission; ask for EDIT" in str(err.value)
    errors.append(_messages(err.value))

    login(monkeypatch, "alice")
    AuthServiceClient(url).grant_user_permission("bob", "experiment", exp_id, "EDIT")
    login(monkeypatch, "bob")
    mgr = CheckpointManager(tmp_path / "bob", experiment=experiment, tracking_uri=url, retention=KeepLast(1),
                            publish_timeout=5.0)  # fmt: skip
    try:
        mgr.save(model, opt, {"step": 1})
        with caplog.at_level(logging.WARNING, logger="tracked_ckpt"):
            mgr.save(model, opt, {"step": 2})  # retention may not delete step 1: EDIT is not MANAGE
        assert "retention could not delete checkpoints/step-00000001" in caplog.text and "MANAGE" in caplog.text

        login(monkeypatch, "alice")
        AuthServiceClient(url).revoke_user_permission("bob", "experiment", exp_id)  # back to the default, READ
        login(monkeypatch, "bob")
        with pytest.raises(SaveError) as failed:
            mgr.save(model, opt, {"step": 3})
        msg = str(failed.value)
        assert "step 3 is committed locally" in msg and f"MLflow at {url} failed to upload" in msg, msg
        assert "403" in msg and "lacks permission; ask for EDIT" in msg, msg
        errors.append(_messages(failed.value))
        # The local commit is whole and verifies; MLflow has nothing of step 3.
        local = tmp_path / "bob" / mgr.run_id / "step-00000003"
        assert str(local) in msg
        manifest = Manifest.from_json((local / MANIFEST_NAME).read_bytes(), str(local))
        assert manifest.step == 3
        for entry in manifest.files:
            verify_file(local / entry.name, entry, str(local))
        login(monkeypatch, "alice")
        with pytest.raises(CheckpointNotFoundError, match="at step 3"):
            tracked_ckpt.load(mgr.run_id, model, which=3, tracking_uri=url)
        assert MlflowClient(url).get_run(mgr.run_id).data.tags["tracked_ckpt.latest_step"] == "2"
        login(monkeypatch, "bob")
    finally:
        mgr.close()
    assert_no_secret([caplog.text, *errors], tmp_path, auth_server.workdir / "artifacts")
    # Nor in anything the run records (tags, params), read from the tracking store itself.
    run = MlflowClient(url).get_run(mgr.run_id)
    assert_no_secret([repr(run.data.tags), repr(run.data.params)])


def test_credentials_in_the_tracking_uri_stay_out_of_errors_logs_and_files(
    auth_server: AuthServer,
    tmp_path: Path,
    experiment: str,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
    capfd: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_USERNAME", raising=False)
    monkeypatch.delenv("MLFLOW_TRACKING_PASSWORD", raising=False)
    caplog.set_level(logging.DEBUG)
    host = auth_server.url.split("://", 1)[1]
    uri = f"http://alice:{PASSWORDS['alice']}@{host}"
    model, opt, _ = make_training()
    with CheckpointManager(tmp_path / "ck", experiment=experiment, tracking_uri=uri) as mgr:
        mgr.save(model, opt, {"step": 1})
        assert mgr.load(model, opt)["step"] == 1
        assert PASSWORDS["alice"] not in repr(mgr)
        run_id = mgr.run_id
    with pytest.raises(StoreError, match="401") as err:
        tracked_ckpt.load(run_id, model, tracking_uri=f"http://bob:{WRONG}@{host}")
    assert f"MLflow at http://{host} failed" in str(err.value)
    out = capfd.readouterr()
    assert_no_secret([_messages(err.value), caplog.text, out.out, out.err], tmp_path)
