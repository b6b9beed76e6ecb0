"""Work on a run's checkpoints after the fact: name one, verify them, prune them, pull one to a folder.

These are the library side of the ``tracked-ckpt`` commands; they log, never print, and raise the errors of
``errors.py``. A checkpoint is named by a *reference*::

    RUN_ID                 the latest committed checkpoint of the run
    RUN_ID@latest          the same
    RUN_ID@best            the best by the run's monitored metric (tag tracked_ckpt.monitor, e.g. reward:max)
    RUN_ID@120             the checkpoint saved at step 120
    runs:/RUN_ID/checkpoints/step-00000120     the exact folder (what save() returns)
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from . import resolver
from .catalog import Resolved, RunCatalog, open_in_place
from .errors import CheckpointCorruptError, CheckpointNotFoundError, StoreError
from .manifest import ARTIFACT_PREFIX, MANIFEST_NAME, check_checkpoint_path, check_relpath, verify_file
from .policies import CheckpointInfo, Mode, RetentionPolicy, best_of, plan_deletions
from .progress import Progress, human_bytes, watch_file
from .refs import parse as parse  # the CLI's REF argument: one grammar, in refs.py
from .refs import ref_for as runs_uri
from .runtags import (
    TAG_BEST,
    TAG_LATEST,
    TAG_PRUNED,
    fork_origin_paths,
    monitor_of,
    promoted_paths,
    pruned_value,
    summary_tags,
)

log = logging.getLogger(__name__)
_CHUNK = 8 << 20


open_catalog = resolver.open_catalog  # the catalog of a run ID (the store seam honoured): one place, resolver.py
resolve = resolver.select  # the committed checkpoint a parsed Ref names in a run's catalog


def markers(catalog: RunCatalog, r: Resolved, metric: str | None = None, mode: str | None = None) -> list[str]:
    """``["latest", "best"]``, the subset that applies to ``r``."""
    tags = catalog.store.tags()
    best_metric, best_mode = monitor_of(tags, metric, mode)
    latest, best = catalog.latest(tags), catalog.best(best_metric, best_mode, tags)
    return [name for name, hit in (("latest", latest), ("best", best)) if hit is not None and hit.path == r.path]


# ------------------------------------------------------------------------------------------------ verify


@dataclass(frozen=True)
class Verdict:
    """The outcome of verifying one checkpoint folder."""

    path: str
    status: Literal["ok", "corrupt", "uncommitted"]
    step: int | None = None
    files: int = 0
    size: int = 0
    detail: str = ""

    @property
    def failed(self) -> bool:
        return self.status == "corrupt"


def verify_one(catalog: RunCatalog, r: Resolved) -> Verdict:
    """Fetch every file of ``r`` and check its size and BLAKE3 digest against the manifest."""
    t0 = time.perf_counter()
    m = r.manifest
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-verify-") as tmp:
        try:
            catalog.fetch_verified(r, Path(tmp))
        except CheckpointCorruptError as e:
            return Verdict(r.path, "corrupt", m.step, len(m.files), m.size, str(e))
    log.info("verified step %d (%s, %d files) in %.2f s", m.step, r.path, len(m.files), time.perf_counter() - t0)
    return Verdict(r.path, "ok", m.step, len(m.files), m.size)


def verify_run(catalog: RunCatalog) -> list[Verdict]:
    """Verify every checkpoint folder of the run, including those whose manifest is unreadable.

    A folder without a manifest is an interrupted save ("uncommitted": never loaded, not a failure).
    """
    verdicts = []
    for entry in sorted((e for e in catalog.store.list(ARTIFACT_PREFIX) if e.is_dir), key=lambda e: e.path):
        try:
            path = check_checkpoint_path(entry.path)
            r = Resolved(path, catalog.manifest(path))
        except CheckpointNotFoundError:
            verdicts.append(Verdict(entry.path, "uncommitted", detail="no manifest: an interrupted save"))
            continue
        except CheckpointCorruptError as e:
            verdicts.append(Verdict(entry.path, "corrupt", detail=str(e)))
            continue
        verdicts.append(verify_one(catalog, r))
    return verdicts


# ------------------------------------------------------------------------------------------------- prune


@dataclass(frozen=True)
class PrunePlan:
    """What ``prune`` deletes and keeps (with the reason each one is kept), oldest first."""

    run_id: str
    metric: str
    mode: Mode
    delete: list[CheckpointInfo]
    keep: list[CheckpointInfo]
    reasons: dict[str, str] = field(default_factory=dict)  # kept path -> "latest", "best", "policy", ...


def plan_prune(
    catalog: RunCatalog, policy: RetentionPolicy, metric: str | None = None, mode: str | None = None
) -> PrunePlan:
    """Apply ``policy`` with the library's rules: never the latest, never the best, nor what the tags name."""
    tags = catalog.store.tags()
    metric, chosen_mode = monitor_of(tags, metric, mode)
    infos = [r.info for r in catalog.scan()]
    # The tagged latest/best stay even when --metric picks another "best": what the run advertises must exist.
    tagged = {p for p in (tags.get(TAG_LATEST), tags.get(TAG_BEST)) if p}
    promoted = promoted_paths(tags)  # registered in the Model Registry (lifecycle.promote): never deleted
    origins = fork_origin_paths(tags)  # a fork started from it: its forked_from tag must keep naming a folder
    doomed = plan_deletions(infos, policy, metric=metric, mode=chosen_mode, protected=tagged | promoted | origins)
    gone = {c.path for c in doomed}
    keep = [c for c in infos if c.path not in gone]
    latest = max(infos, key=lambda c: c.seq).path if infos else None
    best = best_of(infos, metric, chosen_mode)
    by_policy = policy.keep(infos, metric, chosen_mode)
    reasons = {}
    for c in keep:
        why = [
            name
            for name, hit in (
                ("latest", c.path == latest),
                (f"best {metric}", best is not None and c.path == best.path),
                ("tagged", c.path in tagged),
                ("promoted", c.path in promoted),
                ("fork origin", c.path in origins),
                ("policy", c.path in by_policy),
            )
            if hit
        ]
        reasons[c.path] = ", ".join(why)
    return PrunePlan(catalog.run_id, metric, chosen_mode, doomed, keep, reasons)


def apply_prune(catalog: RunCatalog, plan: PrunePlan) -> None:
    """Delete ``plan.delete`` from the run's artifact store, then update the run's summary tags.

    Local copies in the training ``save_dir`` are not touched. A trainer still running on the run keeps its
    own view and rewrites the summary tags at its next save: prune runs that are not training.
    """
    from .models import CheckpointModels

    deleted: list[CheckpointInfo] = []
    models = CheckpointModels(catalog.store)
    try:
        for c in plan.delete:
            t0 = time.perf_counter()
            catalog.store.delete(c.path)
            deleted.append(c)
            models.delete(c.path)  # its LoggedModel (one search of the run's models, the first time)
            elapsed = time.perf_counter() - t0
            log.info("deleted step %d (%s, %s) in %.2f s", c.step, c.path, human_bytes(c.size), elapsed)
    finally:
        if deleted:
            left = plan.keep + [c for c in plan.delete if c not in deleted]
            catalog.store.set_tags({**summary_tags(left, plan.metric, plan.mode), TAG_PRUNED: pruned_value(deleted)})


# -------------------------------------------------------------------------------------------------- pull


def pull(
    catalog: RunCatalog, r: Resolved, out_dir: Path, *, overwrite: bool = False, progress: Progress | None = None
) -> list[Path]:
    """Download checkpoint ``r`` into ``out_dir``, verified against its manifest; return the files written.

    Files are fetched into a hidden folder inside ``out_dir``, verified, then moved into place, the manifest
    last: ``out_dir`` never holds a file that failed verification. FileExistsError unless ``overwrite``.
    """
    names = [f.name for f in r.manifest.files] + [MANIFEST_NAME]
    out_dir.mkdir(parents=True, exist_ok=True)
    clashes = [n for n in names if (out_dir / n).exists()]
    if clashes and not overwrite:
        raise FileExistsError(f"{out_dir} already holds {', '.join(clashes)}; pass --force to overwrite")
    where = f"checkpoint {runs_uri(catalog.run_id, r.path)} (step {r.manifest.step})"
    bar = progress or Progress(r.manifest.size, f"pull step {r.manifest.step}", enabled=False)
    t0 = time.perf_counter()
    staging = Path(tempfile.mkdtemp(prefix=".tracked_ckpt-pull-", dir=out_dir))
    try:
        done = 0
        for f in r.manifest.files:
            src = f"{r.path}/{f.name}"
            (staging / f.name).parent.mkdir(parents=True, exist_ok=True)  # a foreign folder's nested file
            try:
                digest = _fetch_into(catalog, src, staging / f.name, bar, done)
            except (FileNotFoundError, StoreError) as e:
                if isinstance(e, StoreError) and catalog.store.exists(src):
                    raise  # the file is there: the store failed (unreachable, permissions)
                raise CheckpointCorruptError(f"{where}: file {f.name!r} listed in the manifest is missing") from e
            done += f.size
            bar.update_to(done)
            verify_file(staging / f.name, f, where, digest=digest)
        _fetch_into(catalog, f"{r.path}/{MANIFEST_NAME}", staging / MANIFEST_NAME, None, 0)
        bar.close()
        for n in names:  # the manifest last, as in a save
            (out_dir / n).parent.mkdir(parents=True, exist_ok=True)
            os.replace(staging / n, out_dir / n)
    finally:
        bar.close()
        shutil.rmtree(staging, ignore_errors=True)
    log.info(
        "pulled step %d from %s into %s (%s) in %.2f s",
        r.manifest.step,
        runs_uri(catalog.run_id, r.path),
        out_dir,
        human_bytes(r.manifest.size),
        time.perf_counter() - t0,
    )
    return [out_dir / n for n in names]


def _fetch_into(catalog: RunCatalog, path: str, dest: Path, bar: Progress | None, base: int) -> str | None:
    """Copy or download artifact ``path`` to ``dest``; its BLAKE3 if a download computed it on the way."""
    root = catalog.store.local_dir
    if root is not None:  # a local artifact store: copy in chunks, so the bar moves
        with open_in_place(root, check_relpath(path, "artifact path"), catalog.run_id) as src, open(dest, "wb") as out:
            while chunk := src.read(_CHUNK):
                out.write(chunk)
                if bar is not None:
                    bar.advance(len(chunk))
        return None
    download = dest.parent / ".download"
    download.mkdir(exist_ok=True)
    if bar is None:
        got = catalog.store.fetch(path, download)
    else:
        with watch_file(download / path, bar, base):
            got = catalog.store.fetch(path, download)
    os.replace(got.path, dest)
    return got.blake3
