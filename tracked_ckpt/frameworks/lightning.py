"""PyTorch Lightning: every checkpoint ModelCheckpoint writes (and removes) mirrored in the MLflow run.

::

    trainer = L.Trainer(callbacks=[ModelCheckpoint(monitor="val_loss"), TrackedCheckpoints()], logger=MLFlowLogger())
    trainer.fit(model, ckpt_path=resume_path(run_id, "restore"))        # in a fresh process

Why a Callback that installs a CheckpointIO: the CheckpointIO is the one place Lightning writes and removes
checkpoint files (ModelCheckpoint's save_top_k removals, ``save_last``, ``trainer.save_checkpoint``), on rank 0
only; the Callback sees the trainer (its MLFlowLogger's run, ModelCheckpoint's monitor, the logged metrics),
which a CheckpointIO alone does not. Works with ``lightning`` and ``pytorch_lightning`` 2.x.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

try:  # the unified package first, the standalone one otherwise
    from lightning.fabric.plugins.io.checkpoint_io import CheckpointIO
    from lightning.pytorch import Callback
except ImportError:  # pragma: no cover - only pytorch_lightning installed
    from lightning_fabric.plugins.io.checkpoint_io import CheckpointIO  # type: ignore[assignment,unused-ignore]
    from pytorch_lightning import Callback  # type: ignore[assignment,unused-ignore]

from ..errors import ConfigError
from ..manager import CheckpointManager
from ..refs import Which, parse_ref
from .folders import delete_removed, fetch_folder, record_files

log = logging.getLogger(__name__)

FORMAT = "lightning"


class TrackedCheckpoints(Callback):
    """Record each checkpoint Lightning saves in the MLflow run; delete what ModelCheckpoint removes.

    The run: ``run_id`` if given, else the trainer's MLFlowLogger's run (metrics and checkpoints together),
    else ``MLFLOW_RUN_ID`` or the manager's own discovery for ``save_dir``. "Best" is ModelCheckpoint's
    ``monitor``/``mode`` (without a monitor: the latest step).

    Args:
        save_dir: local commit folder; default ``<default_root_dir>/tracked_ckpt`` (hard links need the
            same filesystem as ModelCheckpoint's ``dirpath``).
        manager_kwargs: passed on to CheckpointManager (experiment=, tracking_uri=, publish_timeout=, ...).
    """

    def __init__(self, save_dir: str | Path | None = None, *, run_id: str | None = None, **manager_kwargs: Any):
        self.save_dir = save_dir
        self.run_id = run_id
        self.manager_kwargs = manager_kwargs
        self.manager: CheckpointManager | None = None
        self.trainer: Any = None
        self._sources: dict[str, str] = {}  # absolute file path -> recorded checkpoint path
        self._last_step: int | None = None
        self._removed: set[str] = set()  # files the inner CheckpointIO removed
        self._earlier: dict[str, str] | None = None  # file name -> checkpoint path, of earlier processes of the run

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage != "fit" or self.manager is not None:
            return
        self.trainer = trainer
        strategy = trainer.strategy
        if not isinstance(strategy.checkpoint_io, _RecordingIO):
            strategy.checkpoint_io = _RecordingIO(strategy.checkpoint_io, self)
        if not trainer.is_global_zero:
            return
        run_id, uri = self.run_id, self.manager_kwargs.pop("tracking_uri", None)
        for lg in trainer.loggers:
            if type(lg).__name__ == "MLFlowLogger" and run_id is None:
                run_id, uri = lg.run_id, uri or lg._tracking_uri  # creates the logger's run if not yet there
        cb = trainer.checkpoint_callback
        monitor = getattr(cb, "monitor", None)
        metric, mode = (monitor, getattr(cb, "mode", "min")) if monitor else ("step", "max")
        save_dir = self.save_dir if self.save_dir is not None else Path(trainer.default_root_dir) / "tracked_ckpt"
        kwargs = {"monitor": metric, "mode": mode, **self.manager_kwargs}
        self.manager = CheckpointManager(save_dir, run_id=run_id, tracking_uri=uri, **kwargs)
        self.run_id = self.manager.run_id  # what to resume from; kept after fit ends

    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if stage == "fit" and self.manager is not None:
            self.manager.close()
            self.manager = None

    def saved(self, checkpoint: dict[str, Any], path: Path) -> None:
        """The inner CheckpointIO wrote ``path``: record it (once per step: ``last.ckpt`` repeats a save).

        Returns once the file is hard-linked; the commit and the record follow on the manager's recording thread.
        """
        if self.manager is None:
            return
        step = int(checkpoint.get("global_step", 0))
        if step == self._last_step:
            return
        meta: dict[str, Any] = {**self._metrics(), "step": step, "epoch": int(checkpoint.get("epoch", 0))}
        # Recorded as a folder named after the file (its stem), holding that one file.
        ref = record_files(self.manager, path, path.stem, [(path.name, path)], meta, format=FORMAT, step=step)
        self._sources[str(path.resolve())] = parse_ref(ref)[1]
        self._removed.discard(str(path.resolve()))  # a name written again is a new checkpoint
        self._last_step = step
        delete_removed(self.manager, self._sources, self._removed.__contains__)  # those an outage held back

    def removed(self, path: Path) -> None:
        """The inner CheckpointIO removed ``path`` (save_top_k): delete its record (or retry after the next save)."""
        key = str(path.resolve())
        self._removed.add(key)
        if self.manager is None:
            return
        if key not in self._sources and (earlier := self._recorded_earlier().get(path.name)) is not None:
            self._sources[key] = earlier  # written before a resume in the same dirpath: ModelCheckpoint restored it
        delete_removed(self.manager, self._sources, self._removed.__contains__)

    def _recorded_earlier(self) -> dict[str, str]:
        """{file name: checkpoint path} of the run's Lightning checkpoints (one scan, on the first removal)."""
        if self._earlier is None and self.manager is not None:
            self.manager.wait()  # the saves in flight are in the index too
            found = self.manager.committed()  # commit order: a name written twice maps to its newest
            self._earlier = {r.manifest.files[0].name: r.path for r in found
                             if r.manifest.format == FORMAT and len(r.manifest.files) == 1}  # fmt: skip
            self._earlier = {n: p for n, p in self._earlier.items() if p not in self._sources.values()}
        return self._earlier or {}

    def _metrics(self) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in (self.trainer.callback_metrics if self.trainer is not None else {}).items():
            try:
                x = float(v)
            except (TypeError, ValueError):
                continue
            if math.isfinite(x) and k not in ("step", "epoch"):
                out[k] = x
        return out


class _RecordingIO(CheckpointIO):
    """The strategy's own CheckpointIO, with each save recorded and each removal mirrored."""

    def __init__(self, inner: Any, owner: TrackedCheckpoints) -> None:
        self.inner, self.owner = inner, owner

    def save_checkpoint(self, checkpoint: dict[str, Any], path: Any, storage_options: Any | None = None) -> None:
        self.inner.save_checkpoint(checkpoint, path, storage_options=storage_options)
        self.owner.saved(checkpoint, Path(path))

    def load_checkpoint(
        self, path: Any, map_location: Any | None = None, weights_only: bool | None = None
    ) -> dict[str, Any]:
        result: dict[str, Any] = self.inner.load_checkpoint(path, map_location=map_location, weights_only=weights_only)
        return result

    def remove_checkpoint(self, path: Any) -> None:
        self.inner.remove_checkpoint(path)
        self.owner.removed(Path(path))

    def teardown(self) -> None:
        self.inner.teardown()


def resume_path(
    run_id: str, dest: str | Path = "restore", *, which: Which = "latest", tracking_uri: str | None = None
) -> str:
    """A verified local ``.ckpt`` of run ``run_id`` (under ``dest``) for ``trainer.fit(..., ckpt_path=...)``.

    ``which``: "latest", "best" (ModelCheckpoint's monitor) or a step.
    """
    folder = fetch_folder(run_id, dest, which=which, format=FORMAT, tracking_uri=tracking_uri)
    files = sorted(folder.glob("*.ckpt"))
    if len(files) != 1:
        raise ConfigError(f"{folder} (run {run_id}) holds {len(files)} .ckpt files, not one; pass it to Lightning "
                          "yourself")  # fmt: skip
    return str(files[0])
