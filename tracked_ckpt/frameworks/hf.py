"""Hugging Face ``transformers.Trainer``: each ``checkpoint-N/`` recorded in the MLflow run, resumed by run ID.

::

    trainer = Trainer(..., callbacks=[TrackedCheckpoints()])
    trainer.train(resume_from_checkpoint=resume_folder(run_id, args.output_dir))   # in a fresh process

Importing this module imports transformers; ``import tracked_ckpt`` never does.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path
from typing import Any

from transformers import TrainerCallback, TrainerControl, TrainerState, TrainingArguments

from ..manager import CheckpointManager
from ..refs import Which, parse_ref
from .folders import delete_removed, fetch_folder, record_folder, recorded_sources

log = logging.getLogger(__name__)

FORMAT = "hf-trainer"
_NOT_METRICS = {"epoch", "step", "total_flos"}


class TrackedCheckpoints(TrainerCallback):
    """Record every checkpoint the Trainer saves in the MLflow run; mirror its ``save_total_limit`` deletions.

    The run: ``run_id`` if given, else the one HF's own ``MLflowCallback`` started (``report_to="mlflow"``;
    same run, metrics and checkpoints together), else ``MLFLOW_RUN_ID``, else the manager's own discovery for
    ``save_dir``. "Best" is ``metric_for_best_model`` (``greater_is_better``), else the training loss.

    Args:
        save_dir: local commit folder; default ``<output_dir>/tracked_ckpt`` (same filesystem: hard links).
        manager_kwargs: passed on to CheckpointManager (experiment=, tracking_uri=, publish_timeout=, ...).
    """

    def __init__(self, save_dir: str | Path | None = None, *, run_id: str | None = None, **manager_kwargs: Any):
        self.save_dir = save_dir
        self.run_id = run_id
        self.manager_kwargs = manager_kwargs
        self.manager: CheckpointManager | None = None
        self._sources: dict[str, str] = {}  # checkpoint-N -> recorded path, for folders this Trainer manages

    def on_train_begin(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                       **kwargs: Any) -> None:  # fmt: skip
        if not state.is_world_process_zero or self.manager is not None:
            return
        metric, mode = monitor_of_args(args)
        save_dir = self.save_dir if self.save_dir is not None else _output_dir(args) / "tracked_ckpt"
        kwargs = {"monitor": metric, "mode": mode, **self.manager_kwargs}
        self.manager = CheckpointManager(save_dir, run_id=self.run_id, **kwargs)
        self.run_id = self.manager.run_id  # what to resume from; kept after training ends
        # Folders already in output_dir (the one resumed from): HF's rotation may delete them; mirror that.
        out = _output_dir(args)
        self._sources = {s: p for s, p in recorded_sources(self.manager, FORMAT).items() if (out / s).is_dir()}

    def on_save(self, args: TrainingArguments, state: TrainerState, control: TrainerControl, **kwargs: Any) -> None:
        if not state.is_world_process_zero or self.manager is None:
            return
        # HF has already rotated (rotation runs before on_save); the new folder is recorded before we return.
        folder = _output_dir(args) / f"checkpoint-{state.global_step}"
        epoch = math.floor(state.epoch or 0.0)
        meta = {**latest_logs(state), "step": state.global_step, "epoch": epoch}
        ref = record_folder(self.manager, folder, meta, format=FORMAT, step=state.global_step)
        self._sources[folder.name] = parse_ref(ref)[1]
        out = _output_dir(args)
        delete_removed(self.manager, self._sources, lambda source: not (out / source).exists())  # save_total_limit

    def on_train_end(self, args: TrainingArguments, state: TrainerState, control: TrainerControl,
                     **kwargs: Any) -> None:  # fmt: skip
        if self.manager is not None:
            self.manager.close()
            self.manager = None


def _output_dir(args: TrainingArguments) -> Path:
    return Path(args.output_dir or "trainer_output")  # the Trainer's own default when output_dir is None


def monitor_of_args(args: TrainingArguments) -> tuple[str, str]:
    """The metric and direction that define "best", as the Trainer itself chooses its best model."""
    name = args.metric_for_best_model
    if not name:
        return "loss", "min"
    name = name if name.startswith("eval_") else f"eval_{name}"
    greater = args.greater_is_better if args.greater_is_better is not None else not name.endswith("loss")
    return name, "max" if greater else "min"


def latest_logs(state: TrainerState) -> dict[str, float]:
    """The newest value of every number the Trainer logged so far (loss, eval_*, learning_rate, ...)."""
    merged: dict[str, float] = {}
    for entry in state.log_history:
        for k, v in entry.items():
            if k not in _NOT_METRICS and isinstance(v, int | float) and not isinstance(v, bool):
                merged[k] = float(v)
    return merged


def resume_folder(
    run_id: str, output_dir: str | Path, *, which: Which = "latest", tracking_uri: str | None = None
) -> str:
    """A verified local ``checkpoint-N`` folder of run ``run_id`` under ``output_dir``, for ``resume_from_checkpoint``.

    ``which``: "latest", "best" (the run's monitor, ``metric_for_best_model``) or a step.
    """
    return str(fetch_folder(run_id, output_dir, which=which, format=FORMAT, tracking_uri=tracking_uri))
