"""The run-tag layout: which tags tracked_ckpt writes on a run, and how the summary ones are computed.

Tags are what the MLflow UI shows at a glance and what ``list_runs`` reads in one query; they are hints for
the read side (catalog.py verifies every one against a manifest), never the record itself::

    tracked_ckpt.latest / latest_step        the newest committed checkpoint folder and its step
    tracked_ckpt.best / best_step / best_value  the best one by the monitored metric
    tracked_ckpt.monitor                     "<metric>:<mode>", what "best" was chosen by
    tracked_ckpt.count / bytes               committed checkpoints kept, and their size
    tracked_ckpt.pruned_last                 what retention deleted last
    tracked_ckpt.skipped                     steps a backlog did not upload (retention would have deleted them)
    tracked_ckpt.save_dir                    the save_dir a new run was made for, shortened for the UI (".../a/b");
                                             the full path is the run *param* of the same name (a relaunch
                                             searches it; runs made before 0.2 carry the full path in the tag)
    tracked_ckpt.lease                       the writer's heartbeat (lease.py)
    tracked_ckpt.forked_from                 a fork's parent checkpoint, ``runs:/PARENT/checkpoints/NAME``
    tracked_ckpt.parent_run / parent_step    the same, split for search (lifecycle.py)
    tracked_ckpt.promoted                    checkpoint folders registered in the Model Registry (retention keeps
                                             them), comma-separated names: ``step-00000040,step-00000100``
    tracked_ckpt.fork_origins                checkpoint folders a fork of the run started from (retention keeps
                                             them, like promoted ones; written by the fork), the same form
    mlflow.note.content                      the run page's description: how to resume (written by tracked_ckpt
                                             only while it starts with NOTE_MARK, so a user's own note stays)
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from .policies import CheckpointInfo, Mode, best_of, check_mode

TAG_LATEST = "tracked_ckpt.latest"
TAG_LATEST_STEP = "tracked_ckpt.latest_step"
TAG_BEST = "tracked_ckpt.best"
TAG_BEST_STEP = "tracked_ckpt.best_step"
TAG_MONITOR = "tracked_ckpt.monitor"
TAG_BEST_VALUE = "tracked_ckpt.best_value"
TAG_COUNT = "tracked_ckpt.count"
TAG_BYTES = "tracked_ckpt.bytes"
TAG_PRUNED = "tracked_ckpt.pruned_last"
TAG_SAVE_DIR = "tracked_ckpt.save_dir"
TAG_SKIPPED = "tracked_ckpt.skipped"  # steps whose files a backlog did not upload (retention would delete them)
TAG_FORKED_FROM = "tracked_ckpt.forked_from"
TAG_PARENT_RUN = "tracked_ckpt.parent_run"
TAG_PARENT_STEP = "tracked_ckpt.parent_step"
TAG_PROMOTED = "tracked_ckpt.promoted"
TAG_FORK_ORIGINS = "tracked_ckpt.fork_origins"
TAG_NOTE = "mlflow.note.content"

# What each save cost, logged as metrics at its step. The "system/" prefix puts their charts on the run page's
# "System metrics" tab, beside CPU and memory, and keeps the "Model metrics" tab for what the model learns.
METRIC_BLOCKED_S = "system/checkpoint_blocked_s"  # seconds save() blocked the training thread
METRIC_COMMIT_S = "system/checkpoint_commit_s"  # seconds to serialize and commit in save_dir
METRIC_RECORD_S = "system/checkpoint_record_s"  # seconds to upload the files (the manifest last) to MLflow
METRIC_BYTES = "system/checkpoint_bytes"  # the checkpoint's size
COST_METRICS = (METRIC_BLOCKED_S, METRIC_COMMIT_S, METRIC_RECORD_S, METRIC_BYTES)
NOTE_MARK = "<!-- tracked_ckpt -->"


def short_path(path: str, parts: int = 2) -> str:
    """The last ``parts`` components of a path, for a tag value the UI shows whole: ``.../demo/checkpoints``."""
    pieces = path.rstrip("/").split("/")
    return path if len(pieces) <= parts + 1 else ".../" + "/".join(pieces[-parts:])


def monitor_value(metric: str, mode: Mode) -> str:
    return f"{metric}:{mode}"


def monitor_of(tags: Mapping[str, str], metric: str | None = None, mode: str | None = None) -> tuple[str, Mode]:
    """The metric and direction that define "best" for a run: the arguments, else its monitor tag, else reward:max."""
    tag_metric, _, tag_mode = tags.get(TAG_MONITOR, "reward:max").rpartition(":")
    chosen_mode = mode or (tag_mode if tag_mode in ("max", "min") else "max")
    return metric or tag_metric or "reward", check_mode(chosen_mode)


def summary_tags(index: Iterable[CheckpointInfo], metric: str, mode: Mode) -> dict[str, str]:
    """The summary tags of a run whose committed checkpoints are ``index``."""
    infos = list(index)
    tags = {
        TAG_COUNT: str(len(infos)),
        TAG_BYTES: str(sum(c.size for c in infos)),
        TAG_MONITOR: monitor_value(metric, mode),
    }
    latest = max(infos, key=lambda c: c.seq, default=None)
    if latest is not None:
        tags[TAG_LATEST], tags[TAG_LATEST_STEP] = latest.path, str(latest.step)
    best = best_of(infos, metric, mode)
    if best is not None:
        tags[TAG_BEST], tags[TAG_BEST_STEP] = best.path, str(best.step)
        tags[TAG_BEST_VALUE] = repr(best.metrics[metric])
    return tags


def pruned_value(deleted: Iterable[CheckpointInfo]) -> str:
    return ", ".join(f"step {c.step}" for c in deleted)[:500]


def promoted_paths(tags: Mapping[str, str], key: str = TAG_PROMOTED) -> set[str]:
    """The checkpoint folders of a run registered in the Model Registry (``TAG_PROMOTED``): never deleted.

    ``key=TAG_FORK_ORIGINS``: those a fork started from, never deleted either.
    """
    return {f"checkpoints/{n.strip()}" for n in tags.get(key, "").split(",") if n.strip()}


def fork_origin_paths(tags: Mapping[str, str]) -> set[str]:
    """The checkpoint folders of a run that a fork started from (``TAG_FORK_ORIGINS``): never deleted."""
    return promoted_paths(tags, TAG_FORK_ORIGINS)


def kept_by_tags(tags: Mapping[str, str]) -> set[str]:
    """What retention and prune never delete, whatever the policy: promoted checkpoints and forks' origins."""
    return promoted_paths(tags) | fork_origin_paths(tags)


def fork_note(tags: Mapping[str, str]) -> str:
    """The run page's paragraph naming a fork's parent ("" for a run that is not a fork)."""
    ref = tags.get(TAG_FORKED_FROM)
    if not ref:
        return ""
    parent, step = tags.get(TAG_PARENT_RUN, "?"), tags.get(TAG_PARENT_STEP, "?")
    return (
        f"**Forked from** run `{parent}` at step {step} (`{ref}`): it started from that checkpoint, and its "
        f"metric history up to step {step} is the parent's. `tracked-ckpt runs --tree` shows the lineage.\n\n"
    )


def run_note(run_id: str, save_dir_name: str, monitor: str, mode: str, preface: str = "") -> str:
    """The run page's description (markdown): what the checkpoints are and how to resume.

    ``preface`` (e.g. ``fork_note``) comes first: the UI shows only the first lines until "Show more".
    """
    return (
        f"{NOTE_MARK}\n{preface}### Checkpoints (tracked_ckpt)\n"
        f"Checkpoints of this run are the artifact folders under `checkpoints/`; the tags "
        f"`{TAG_LATEST}` and `{TAG_BEST}` name the latest and the best (by `{monitor}`, {mode}).\n\n"
        f"**Resume this run** from Python:\n\n```python\nfrom tracked_ckpt import CheckpointManager\n"
        f'mgr = CheckpointManager("{save_dir_name}", run_id="{run_id}")\n'
        "metadata = mgr.load(model, optimizer)\n```\n\n"
        f'or load its best checkpoint: `tracked_ckpt.load("{run_id}", model, which="best")`.\n\n'
        f"From the shell: `tracked-ckpt ls {run_id}` · `tracked-ckpt pull {run_id} -o ./ckpt` · "
        f"`MLFLOW_RUN_ID={run_id} python train.py`\n"
    )
