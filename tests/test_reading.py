"""reading.py: reads find an existing store or say which one is missing (creating nothing), and give up on a
refusing server at once; runs.py's experiment lookups, the creating one and the read-only one."""

from __future__ import annotations

import os
import socket
import time
from pathlib import Path

import pytest
import torch
from conftest import free_port
from mlflow.tracking import MlflowClient

import tracked_ckpt
from tracked_ckpt import CheckpointManager
from tracked_ckpt.errors import ExperimentNotFoundError, StoreError, StoreNotFoundError
from tracked_ckpt.runs import KIND_TRAINING, TAG_EXPERIMENT_KIND, existing_experiment_ids, experiment_id
from tracked_ckpt.store.http import READ
from tracked_ckpt.store.reading import missing_store, read_client, resolve_uri


@pytest.mark.parametrize(
    ("uri", "missing"),
    [
        ("sqlite:///mlflow.db", "mlflow.db"),
        ("sqlite:///sub/store.db?timeout=5", "sub/store.db"),
        ("sqlite:///{tmp}/there.db", None),
        ("sqlite:///{tmp}/gone.db", "{tmp}/gone.db"),
        ("sqlite://", None),  # in memory: nothing on disk to create
        ("sqlite:///:memory:", None),
        ("file://{tmp}/mlruns", "{tmp}/mlruns"),
        ("{tmp}/mlruns", "{tmp}/mlruns"),  # a bare path is a file store
        ("file://{tmp}", None),
        ("http://127.0.0.1:5000", None),  # a server: only asking it tells
        ("postgresql://u@db/mlflow", None),
    ],
)
def test_missing_store_names_the_local_file_or_folder(
    uri: str, missing: str | None, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    (tmp_path / "there.db").write_bytes(b"")
    expected = None if missing is None else tmp_path / missing.format(tmp=tmp_path)
    assert missing_store(uri.format(tmp=tmp_path)) == expected
    assert list(tmp_path.iterdir()) == [tmp_path / "there.db"]


def test_library_reads_in_a_folder_without_a_store_raise_and_create_nothing(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MLFLOW_TRACKING_URI")
    assert resolve_uri(None) == f"sqlite:///{tmp_path}/mlflow.db"  # MLflow's own default, made absolute
    run = "0123456789abcdef0123456789abcdef"
    calls = [
        lambda: tracked_ckpt.list_runs(),
        lambda: tracked_ckpt.list_runs("tracked-ckpt-demo"),
        lambda: tracked_ckpt.list_checkpoints(run),
        lambda: tracked_ckpt.list_checkpoints(experiment="tracked-ckpt-demo"),
        lambda: tracked_ckpt.load(run, torch.nn.Linear(2, 2)),
    ]
    for call in calls:
        with pytest.raises(StoreNotFoundError, match=r"no MLflow tracking store at sqlite:///") as info:
            call()
        assert isinstance(info.value, FileNotFoundError)
        assert all(hint in str(info.value) for hint in ("tracking_uri=", "MLFLOW_TRACKING_URI", "cd to"))
    with pytest.raises(StoreNotFoundError, match="gone.db does not exist"):
        tracked_ckpt.list_runs(tracking_uri=f"sqlite:///{tmp_path}/gone.db")
    assert list(tmp_path.iterdir()) == []


def test_library_reads_give_up_on_a_refusing_server_at_once(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST_")]:
        monkeypatch.delenv(key)  # MLflow's defaults: 7 retries with back-off, minutes in all
    url = f"http://127.0.0.1:{free_port()}"
    for call in (
        lambda: tracked_ckpt.list_runs(tracking_uri=url),
        lambda: tracked_ckpt.list_checkpoints("0123456789abcdef0123456789abcdef", tracking_uri=url),
        lambda: tracked_ckpt.load("0123456789abcdef0123456789abcdef", torch.nn.Linear(2, 2), tracking_uri=url),
    ):
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="127.0.0.1"):
            call()
        assert time.monotonic() - t0 < 3


def test_library_reads_give_up_on_a_hung_server_within_seconds(monkeypatch: pytest.MonkeyPatch) -> None:
    """A server that accepts connections and never answers: MLflow alone would wait 120 s per try, 8 tries."""
    for key in [k for k in os.environ if k.startswith("MLFLOW_HTTP_REQUEST_")]:
        monkeypatch.delenv(key)
    with socket.socket() as hung:
        hung.bind(("127.0.0.1", 0))
        hung.listen(8)  # the kernel completes the handshakes; nobody reads or answers
        url = f"http://127.0.0.1:{hung.getsockname()[1]}"
        t0 = time.monotonic()
        with pytest.raises(StoreError, match="127.0.0.1"):
            tracked_ckpt.list_runs(tracking_uri=url)
        took = time.monotonic() - t0
    assert READ.timeout <= took < (READ.max_retries + 1) * READ.timeout + 3


def test_experiments_tracked_ckpt_creates_open_in_the_training_view(tmp_path: Path, experiment: str) -> None:
    client = MlflowClient()
    server = str(client.tracking_uri)
    with CheckpointManager(tmp_path / "ck", experiment=experiment) as mgr:
        mgr.save(torch.nn.Linear(2, 2), None, {"step": 1})
    assert client.get_experiment_by_name(experiment).tags[TAG_EXPERIMENT_KIND] == KIND_TRAINING  # type: ignore[union-attr]
    theirs = client.create_experiment(f"{experiment}-theirs", tags={TAG_EXPERIMENT_KIND: "genai_development"})
    plain = client.create_experiment(f"{experiment}-plain")
    assert experiment_id(client, server, f"{experiment}-theirs") == theirs
    assert experiment_id(client, server, f"{experiment}-plain") == plain
    assert client.get_experiment(theirs).tags[TAG_EXPERIMENT_KIND] == "genai_development"  # the user's own kind
    assert TAG_EXPERIMENT_KIND not in client.get_experiment(plain).tags


def test_the_read_only_lookup_never_creates_an_experiment(experiment: str, monkeypatch: pytest.MonkeyPatch) -> None:
    client = read_client(None)
    server = str(client.tracking_uri)
    with pytest.raises(ExperimentNotFoundError, match=f"experiment '{experiment}' does not exist at {server}"):
        existing_experiment_ids(client, server, experiment)
    assert client.get_experiment_by_name(experiment) is None
    created = client.create_experiment(experiment)
    assert existing_experiment_ids(client, server, experiment) == [created]
    assert created in existing_experiment_ids(client, server, None, every=True)
    monkeypatch.setenv("MLFLOW_EXPERIMENT_NAME", experiment)
    assert existing_experiment_ids(client, server, None) == [created]
    client.delete_experiment(created)
    with pytest.raises(ExperimentNotFoundError):
        existing_experiment_ids(client, server, experiment)
