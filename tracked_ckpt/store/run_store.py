"""The storage seam: everything tracked_ckpt asks of MLflow about one run.

``RunStore`` wraps an explicit ``MlflowClient`` and the run's artifact repository (never MLflow's global
active run or tracking URI). Paths are artifact paths relative to the run, as ``str``. Every call runs under
tracked_ckpt's own HTTP budget (``_http.bounded``), never MLflow's minutes of retries. A store can be made
without asking the server anything (``connect=False``): it connects on first use, so a job whose server is down
can start from its local copies and record later. Tests inject faults by subclassing it and passing the class as
``store_factory=`` (``CheckpointManager``, ``load``, ``list_checkpoints``, ``promote``...). It extends
``TrackingStore`` (tracking.py: experiments, run search, logged models, the registry, the one ``_call``): with it,
the only place that talks to MLflow.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import shutil
import time
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, NamedTuple

from mlflow.entities import Metric, RunTag
from mlflow.store.artifact.artifact_repository_registry import get_artifact_repository
from mlflow.store.artifact.local_artifact_repo import LocalArtifactRepository
from mlflow.tracking import MlflowClient

from .._faults import fault_point
from ..errors import CheckpointCorruptError, RunNotFoundError, StoreError
from ..manifest import MANIFEST_NAME, check_checkpoint_path, check_relpath
from . import http as _http
from . import transfer
from .tracking import TrackingStore, describe_mlflow_error, redact

__all__ = ["Entry", "Fetched", "RunStore", "StoreFactory", "describe_mlflow_error", "redact"]

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Entry:
    path: str
    is_dir: bool
    size: int | None


class Fetched(NamedTuple):
    """A local file holding an artifact; ``blake3``: its digest, computed as the bytes arrived (None: not known)."""

    path: Path
    blake3: str | None


class RunStore(TrackingStore):
    """Artifacts, metrics and tags of one MLflow run (and, inherited, the tracking server's other calls)."""

    def __init__(self, client: MlflowClient, run_id: str, *, connect: bool = True) -> None:
        super().__init__(client)
        self.run_id = run_id
        self.tags_at_open: dict[str, str] = {}  # saves a get_run for callers that just opened it
        self._repo: Any = None
        self._experiment_id: str | None = None
        self._artifact_uri: str | None = None
        if connect:
            self.connect()

    def connect(self) -> None:
        """Read the run (its tags, experiment and artifact location); RunNotFoundError if it is gone."""
        run = self.get_run(self.run_id)
        if run.info.lifecycle_stage == "deleted":
            raise RunNotFoundError(
                f"run {self.run_id} at {self.server} is deleted; restore it in the MLflow UI or `mlflow gc` it"
            )
        self.tags_at_open = dict(run.data.tags)
        self._experiment_id = run.info.experiment_id
        self._artifact_uri = run.info.artifact_uri
        self._repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=self.client.tracking_uri)

    @property
    def connected(self) -> bool:
        return self._repo is not None

    @property
    def repo(self) -> Any:
        if self._repo is None:
            self.connect()
        return self._repo

    @property
    def experiment_id(self) -> str:
        if self._experiment_id is None:
            self.connect()
        return str(self._experiment_id)

    @property
    def artifact_uri(self) -> str:
        if self._artifact_uri is None:
            self.connect()
        return str(self._artifact_uri)

    def probe(self) -> None:
        """One short call ("is the server back?"): StoreError unless the tracking server answers at once."""
        with _http.bounded(_http.PROBE):
            run = self.get_run(self.run_id)
        if self._repo is None:
            self._experiment_id, self._artifact_uri = run.info.experiment_id, run.info.artifact_uri
            self._repo = get_artifact_repository(run.info.artifact_uri, tracking_uri=self.client.tracking_uri)
            self.tags_at_open = dict(run.data.tags)

    @property
    def local_dir(self) -> Path | None:
        """The run's artifact folder when the artifact store is a local directory, else None."""
        if isinstance(self.repo, LocalArtifactRepository):
            return Path(self.repo.artifact_dir)
        return None

    # ------------------------------------------------------------------------------------------ artifacts

    def upload(self, local_file: Path, artifact_dir: str) -> None:
        """Upload one file into ``artifact_dir``; all-or-nothing per file."""
        check_relpath(artifact_dir, "artifact folder")
        fault_point(f"upload:{local_file.name}")
        root = self.local_dir
        if root is not None:
            _link_or_copy(local_file, root / artifact_dir / local_file.name)
            return
        self._call(
            lambda: (
                transfer.upload(self.repo, local_file, artifact_dir)  # in parallel parts, where it can
                or self.repo.log_artifact(str(local_file), artifact_dir)
            ),
            f"upload {local_file.name}",
        )

    def list(self, path: str) -> list[Entry]:
        check_relpath(path, "artifact path")
        infos = self._call(lambda: self.repo.list_artifacts(path), f"list artifacts under {path}")
        entries = [Entry(i.path, i.is_dir, i.file_size) for i in infos]
        for e in entries:
            check_relpath(e.path, "artifact listing entry")
        return entries

    def exists(self, path: str) -> bool:
        root = self.local_dir
        if root is not None:
            return (root / check_relpath(path)).exists()
        parent, _, name = path.rpartition("/")
        return any(e.path.rpartition("/")[2] == name for e in self.list(parent))

    def fetch(self, path: str, tmp_dir: Path) -> Fetched:
        """A local path holding artifact ``path``: in place for a local store, else downloaded into tmp_dir."""
        check_relpath(path, "artifact path")
        root = self.local_dir
        if root is not None:
            local = root / path
            # tracked_ckpt never writes symlinks: one here (file or folder) would read outside the run.
            if local.is_symlink() or not local.resolve().is_relative_to(root.resolve()):
                raise CheckpointCorruptError(
                    f"artifact {path} of run {self.run_id} is a symlink (to {local.resolve()}); refusing to follow it"
                )
            return Fetched(local, None)
        dst = tmp_dir / path  # S3 or a tracking server: parallel ranges, hashed as they arrive (transfer.py)
        digest = self._call(lambda: transfer.download(self.repo, path, dst), f"download {path}")
        if digest is not None:
            return Fetched(dst, digest)
        local = self._call(lambda: self.repo.download_artifacts(path, str(tmp_dir)), f"download {path}")
        result = Path(local)
        if result.is_symlink():
            raise StoreError(f"download of {path} produced a symlink; refusing to follow it")
        return Fetched(result, None)

    def read_range(self, path: str, offset: int, length: int) -> bytes | None:
        """Bytes [offset, offset + length) of artifact ``path``, or None where only whole files can be fetched."""
        check_relpath(path, "artifact path")
        root = self.local_dir
        if root is not None:
            with self.fetch(path, root).path.open("rb") as f:  # in place, symlinks refused by fetch
                f.seek(offset)
                return f.read(length)
        result: bytes | None = self._call(lambda: transfer.read_range(self.repo, path, offset, length),
                                          f"read {length} bytes of {path}")  # fmt: skip
        return result

    def delete(self, path: str) -> None:
        """Delete one checkpoint folder; only ``checkpoints/<name>`` is accepted (delete_artifacts trusts paths)."""
        check_checkpoint_path(path)
        fault_point("retention")
        # The manifest first: a folder that lost its commit marker is never resolved, even if the rest stays.
        self._call(lambda: self.repo.delete_artifacts(f"{path}/{MANIFEST_NAME}"), f"delete {path}/{MANIFEST_NAME}")
        fault_point("retention_mid")
        self._call(lambda: self.repo.delete_artifacts(path), f"delete {path}")

    # ------------------------------------------------------------------------------------------ run data

    def publish(
        self,
        step: int,
        metrics: dict[str, float],
        tags: dict[str, str],
        timestamp_ms: int | None = None,
        late: Sequence[tuple[str, float, int, int]] = (),
        model_id: str | None = None,
    ) -> None:
        """Metrics at ``step`` and tags in one MLflow call (a fixed ``timestamp_ms`` makes replays idempotent).

        ``late``: (key, value, step, timestamp_ms) of metrics of earlier steps known only now, in the same call.
        ``model_id``: the checkpoint's LoggedModel, which gets the same metrics (not the "system/" costs).
        """
        now = int(time.time() * 1000) if timestamp_ms is None else timestamp_ms
        on_model = {k: model_id if model_id and not k.startswith("system/") else None for k in metrics}
        batch_metrics = [
            Metric(k, v, now, step, model_id=on_model[k], run_id=self.run_id if on_model[k] else None)
            for k, v in metrics.items()
        ]
        batch_metrics += [Metric(k, v, ts, s) for k, v, s, ts in late]
        batch_tags = [RunTag(k, v) for k, v in tags.items()]
        self._call(
            lambda: self.client.log_batch(self.run_id, metrics=batch_metrics, tags=batch_tags, synchronous=True),
            f"log metrics and tags of step {step}",
        )

    def run(self) -> Any:
        """The MLflow run (info, tags, metrics, outputs), read now."""
        return self.get_run(self.run_id)

    def tags(self) -> dict[str, str]:
        return dict(self.run().data.tags)

    def history(self, key: str) -> Sequence[Any]:
        """Every logged value of run metric ``key`` (mlflow Metric entities)."""
        return self.metric_history(self.run_id, key)

    def set_tags(self, tags: dict[str, str]) -> None:
        self._call(
            lambda: self.client.log_batch(self.run_id, tags=[RunTag(k, v) for k, v in tags.items()]),
            "set run tags",
        )

    def delete_tag(self, key: str) -> None:
        self._call(lambda: self.client.delete_tag(self.run_id, key), f"delete run tag {key}")

    def set_status(self, status: str) -> None:
        """Mark the run RUNNING (a resume) or ended (FINISHED, FAILED, KILLED)."""
        if status == "RUNNING":
            self._call(lambda: self.client.update_run(self.run_id, status="RUNNING"), f"mark run {self.run_id} running")
            return
        # MLflow prints the run's URL here, with the tracking URI's user:password@ if it has one: not that.
        quiet = contextlib.redirect_stdout(io.StringIO()) if "@" in str(self.client.tracking_uri) else None
        with quiet or contextlib.nullcontext():
            self._call(lambda: self.client.set_terminated(self.run_id, status=status), f"mark run {status}")


StoreFactory = Callable[..., RunStore]  # (client, run_id, *, connect=True) -> RunStore: the seam's type


def _link_or_copy(src: Path, dst: Path) -> None:
    """Publish ``src`` at ``dst`` atomically: a hard link when on the same filesystem, else a copy."""
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.with_name(f".{dst.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        try:
            os.link(src, tmp)
        except OSError:
            shutil.copyfile(src, tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        os.replace(tmp, dst)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
