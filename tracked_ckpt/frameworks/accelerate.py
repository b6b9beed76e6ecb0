"""Accelerate: ``accelerator.save_state`` folders recorded in the MLflow run, ``load_state`` from a run ID.

::

    tracked = TrackedState(accelerator)                  # the manager lives on the main process only
    tracked.save_state(metadata={"step": step, "loss": loss})      # instead of accelerator.save_state()
    meta = load_state(accelerator, run_id)               # in a fresh process: fetched, verified, loaded

Accelerate writes and rotates the folders itself (``ProjectConfiguration(total_limit=...)``); what it deletes
is deleted from the run, also the folders an earlier process of the run wrote in the same ``project_dir``. With
``automatic_checkpoint_naming``, ``load_state`` continues Accelerate's numbering after the folder it loaded (and
after any already on disk), as Accelerate itself does not. Importing this module imports nothing of Accelerate's;
its objects are passed in.
"""

from __future__ import annotations

import logging
import re
from pathlib import Path
from typing import Any

from ..manager import CheckpointManager
from ..refs import Which, parse_ref
from .folders import delete_removed, fetch_checkpoint, record_folder, recorded_sources

log = logging.getLogger(__name__)

FORMAT = "accelerate"


class TrackedState:
    """Record each ``accelerator.save_state`` folder as a checkpoint of the run (main process only).

    Args:
        accelerator: the ``accelerate.Accelerator``.
        save_dir: local commit folder; default ``<project_dir or .>/tracked_ckpt`` (same filesystem: hard links).
        manager_kwargs: passed on to CheckpointManager (run_id=, experiment=, monitor=, mode=, ...).
    """

    def __init__(self, accelerator: Any, save_dir: str | Path | None = None, **manager_kwargs: Any) -> None:
        self.accelerator = accelerator
        self.manager: CheckpointManager | None = None
        self._sources: dict[Path, str] = {}  # folder accelerate wrote -> recorded checkpoint path
        self.run_id: str | None = None  # the run (main process): what to resume from; kept after close()
        if accelerator.is_main_process:
            root = Path(accelerator.project_dir or ".")
            self.manager = CheckpointManager(save_dir if save_dir is not None else root / "tracked_ckpt",
                                             **manager_kwargs)  # fmt: skip
            self.run_id = self.manager.run_id
            # Folders of an earlier process of the run in this project_dir: total_limit may rotate them; mirror that.
            auto = _auto_dir(accelerator)
            if auto is not None:
                self._sources = {(auto / s).resolve(): p for s, p in recorded_sources(self.manager, FORMAT).items()
                                 if (auto / s).is_dir()}  # fmt: skip

    def save_state(
        self, output_dir: str | Path | None = None, metadata: dict[str, Any] | None = None, *, step: int | None = None,
        **save_kwargs: Any,
    ) -> str:  # fmt: skip
        """``accelerator.save_state(output_dir)``, then record the folder (``metadata`` as for ``mgr.save``)."""
        if self.manager is not None:  # the previous folder's background hash is over before anything is rewritten
            self.manager.wait()
        where = self.accelerator.save_state(None if output_dir is None else str(output_dir), **save_kwargs)
        folder = Path(where if where is not None else output_dir)  # type: ignore[arg-type]
        if self.manager is not None:
            ref = record_folder(self.manager, folder, metadata, format=FORMAT, step=step)
            self._sources[folder.resolve()] = parse_ref(ref)[1]
            delete_removed(self.manager, self._sources, lambda src: not src.exists())  # total_limit rotated it
        self.accelerator.wait_for_everyone()
        return str(folder)

    def close(self) -> None:
        if self.manager is not None:
            self.manager.close()
            self.manager = None


def load_state(
    accelerator: Any, run_id: str, dest: str | Path = "restore", *, which: Which = "latest",
    tracking_uri: str | None = None, **load_kwargs: Any,
) -> dict[str, Any]:  # fmt: skip
    """Fetch checkpoint ``which`` of ``run_id`` verified into ``dest``, ``accelerator.load_state`` it.

    Returns the metadata it was saved with (``step`` among them). The main process downloads; the others
    wait, then verify the same folder.
    """
    if accelerator.is_main_process:
        fetch_checkpoint(run_id, dest, which=which, format=FORMAT, tracking_uri=tracking_uri)
    accelerator.wait_for_everyone()
    folder, manifest = fetch_checkpoint(run_id, dest, which=which, format=FORMAT, tracking_uri=tracking_uri)
    accelerator.load_state(str(folder), **load_kwargs)
    log.info("accelerate state of step %d loaded from run %s (%s)", manifest.step, run_id, folder)
    _continue_numbering(accelerator, folder.name)
    return {**manifest.metadata, "step": manifest.step}


def _auto_dir(accelerator: Any) -> Path | None:
    """``<project_dir>/checkpoints``, where ``save_state()`` writes with automatic naming; else None."""
    config = accelerator.project_configuration
    return Path(config.project_dir or ".") / "checkpoints" if config.automatic_checkpoint_naming else None


def _continue_numbering(accelerator: Any, loaded: str) -> None:
    """The next ``save_state()`` writes after ``checkpoint_<N>`` loaded and after every folder already on disk.

    Accelerate restarts at ``checkpoint_0`` in a new process: in the same ``project_dir`` its ``total_limit``
    would then delete the new folder first (numbers sort it oldest), or the save fails on an existing name.
    """
    auto = _auto_dir(accelerator)
    if auto is None:
        return
    numbers = [_number(loaded)] + [_number(d.name) for d in auto.iterdir()] if auto.is_dir() else [_number(loaded)]
    top = max((n for n in numbers if n is not None), default=None)
    if top is not None and accelerator.project_configuration.iteration <= top:
        accelerator.project_configuration.iteration = top + 1
        log.info("accelerate's automatic checkpoint naming continues at checkpoint_%d", top + 1)


def _number(name: str) -> int | None:
    found = re.search(r"(\d+)\D*$", name)  # the last number in the name, as Accelerate sorts its folders
    return int(found.group(1)) if found else None
