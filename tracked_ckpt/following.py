"""Follow a live run: yield each checkpoint as the trainer records it, for evaluators and inference servers.

::

    for ckpt in tracked_ckpt.follow(run_id, resume="eval/accuracy"):
        ckpt.load(model)                                   # verified; only model.pt is fetched
        ckpt.log_eval({"eval/accuracy": evaluate(model)})  # into the training run, at ckpt.step

How it asks MLflow: one ``get_run`` per poll (the run's status and its ``tracked_ckpt.latest`` tags). Only when
those tags changed (or the run ended, or every ``RELIST_S`` as a safety net, since tags are hints) does it list the
``checkpoints/`` folder and read the manifests of folders it has not seen; a folder without a manifest is an upload
in flight and is looked at again on the next change. It never yields an uncommitted checkpoint (no manifest) nor a
corrupt one (every file it hands out was checked against the manifest's size and BLAKE3).

When it stops: when the run's status is FINISHED, KILLED or FAILED (after yielding what was committed before),
at ``until_step``, or after ``timeout`` seconds. Run status is what a clean end writes (``CheckpointManager.close``
drains its uploads first, then marks the run); it is not proof of anything else: a trainer killed with SIGKILL leaves
its run RUNNING forever (pass ``timeout``), and a relaunch flips a FINISHED run back to RUNNING (a follower that
stopped in between is simply started again; ``resume=`` makes that safe).

Outages: a failed poll or download is logged once, retried with back-off, and following goes on where it was;
nothing is skipped. Bytes are fetched once into ``cache_dir`` (a local artifact store is read in place).
"""

from __future__ import annotations

import logging
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .catalog import Resolved, RunCatalog
from .errors import CheckpointCorruptError, CheckpointNotFoundError, ConfigError, StoreError
from .evals import TAG_EVALS, eval_keys, last_scored_step, record_eval
from .manifest import MANIFEST_NAME, Manifest
from .progress import human_bytes
from .refs import parse, ref_for
from .resolver import open_catalog
from .runtags import TAG_LATEST, TAG_LATEST_STEP
from .state import Stateful, TrainingState
from .store import http as _http
from .store.run_store import RunStore, StoreFactory

log = logging.getLogger(__name__)

ENDED = ("FINISHED", "KILLED", "FAILED")
RELIST_S = 30.0  # list the folder this often even when the tags did not move (a tag write may have failed)
_MAX_TRIES = 3  # a checkpoint that fails verification this many times is skipped (it is corrupt, not in flight)


@dataclass
class FollowedCheckpoint:
    """One committed checkpoint of the followed run, its files verified in ``local_path``."""

    run_id: str
    path: str  # the artifact folder, checkpoints/step-00000120
    step: int
    seq: int
    metrics: dict[str, float]
    metadata: dict[str, Any]
    local_path: Path  # the verified files (with weights_only: model.pt and the manifest alone)
    seen_at: float  # time.time() when the follower found it committed
    _follower: _Follower = field(repr=False)
    _resolved: Resolved = field(repr=False)

    @property
    def ref(self) -> str:
        return ref_for(self.run_id, self.path)

    def load(
        self,
        model: Stateful | None = None,
        optimizer: Stateful | None = None,
        *,
        scheduler: Stateful | None = None,
        scaler: Stateful | None = None,
        extra: Mapping[str, Stateful] | None = None,
    ) -> dict[str, Any]:
        """Restore into the live objects (verified again from ``local_path``); returns the checkpoint's metadata.

        With only a model, only the model's file is read. Anything more of a weights-only copy (an optimizer)
        fetches the rest of the checkpoint.
        """
        from .loading import load_resolved

        state = TrainingState(model, optimizer, scheduler, scaler, dict(extra or {}))
        model_only = set(state.parts()) <= {"model"}
        with _http.bounded(_http.READ):  # a weights-only copy does not match a full load: that fetches the rest
            return load_resolved(self._follower.catalog, self._resolved, state, self.local_path, model_only)

    def model_state(self) -> dict[str, Any]:
        """The model's state dict on CPU (consolidated from DCP shards for a torchrun checkpoint)."""
        from .export import model_state

        with _http.bounded(_http.READ):
            return model_state(self._follower.catalog, self._resolved, self.local_path)

    def log_eval(self, metrics: Mapping[str, Any]) -> None:
        """Log ``metrics`` into the training run at this checkpoint's step (see ``tracked_ckpt.log_eval``)."""
        self._follower.log_eval(self, metrics)


def follow(
    run: str,
    *,
    latest_only: bool = False,
    resume: str | None = None,
    until_step: int | None = None,
    timeout: float | None = None,
    weights_only: bool = False,
    cache_dir: str | Path | None = None,
    keep: int = 2,
    poll_interval: float = 1.0,
    max_interval: float = 2.0,
    tracking_uri: str | None = None,
    store_factory: StoreFactory = RunStore,
) -> Iterator[FollowedCheckpoint]:
    """The checkpoints of run ``run`` as they are committed, oldest unseen first; ends when the run does.

    Args:
        run: a run ID (or a checkpoint reference of the run, ``RUN_ID@best``, ``runs:/RUN_ID/checkpoints/NAME``).
        latest_only: skip to the newest committed checkpoint each time (an inference server).
        resume: a metric key this follower logs with ``log_eval``: start after the highest step at which the run
            has it, so a restarted follower scores nothing twice (found in MLflow, not in local state).
        until_step: stop after yielding the checkpoint of this step, or the first one past it.
        timeout: stop after this many seconds (a trainer killed by SIGKILL leaves its run RUNNING forever).
        weights_only: fetch only the model's file (``model.pt``) where the checkpoint has one.
        cache_dir: where fetched files are kept (default: a temporary folder removed at the end); a restarted
            follower with the same ``cache_dir`` does not fetch again what is there.
        keep: fetched checkpoints kept in ``cache_dir``; older ones are removed.
        poll_interval, max_interval: seconds between polls; the wait grows by half while nothing is new.
        store_factory: the storage seam, as ``CheckpointManager`` takes it.
    """
    if keep < 1:
        raise ConfigError(f"keep={keep}: keep at least 1 fetched checkpoint (the one being used)")
    if poll_interval <= 0 or max_interval < poll_interval:
        raise ConfigError(f"poll_interval={poll_interval}, max_interval={max_interval}: need 0 < poll <= max")
    run_id = parse(run).run_id  # checked here, not at the first next(): bad arguments fail where they are passed
    # A missing sqlite store is not created; the run is read at the first poll (the server may not be up yet).
    catalog = open_catalog(run_id, tracking_uri, store_factory=store_factory, connect=False)
    options = {"latest_only": latest_only, "resume": resume, "weights_only": weights_only, "keep": keep}
    return _follow(catalog, cache_dir, options, until_step, timeout, poll_interval, max_interval)


def _follow(
    catalog: RunCatalog, cache_dir: str | Path | None, options: dict[str, Any], *loop: Any
) -> Iterator[FollowedCheckpoint]:
    root = Path(tempfile.mkdtemp(prefix="tracked_ckpt-follow-")) if cache_dir is None else Path(cache_dir)
    try:
        yield from _Follower(catalog, root / catalog.run_id, **options).items(*loop)
    finally:
        if cache_dir is None:
            shutil.rmtree(root, ignore_errors=True)


class _Follower:
    def __init__(
        self, catalog: RunCatalog, cache: Path, *, latest_only: bool, resume: str | None, weights_only: bool, keep: int
    ) -> None:
        self.store = catalog.store
        self.catalog = catalog
        self.cache = cache
        self.latest_only = latest_only
        self.resume = resume
        self.weights_only = weights_only
        self.keep = keep
        self.seen_seq = -1  # the commit order (manifest seq) of the last checkpoint yielded
        self.floor: int | None = None  # with ``resume``: steps up to this one were scored by an earlier follower
        self.known: dict[str, Manifest] = {}  # committed folders read so far
        self.skipped: set[str] = set()  # corrupt, deleted or refused: never yielded
        self.tries: dict[str, int] = {}
        self.tags: dict[str, str] = {}
        self.signal: tuple[str | None, str | None] | None = None
        self.listed_at = 0.0
        self.down_since: float | None = None
        self.fetched: list[Path] = []

    # ------------------------------------------------------------------------------------------ the loop

    def items(
        self, until_step: int | None, timeout: float | None, interval: float, max_interval: float
    ) -> Iterator[FollowedCheckpoint]:
        start, wait = time.monotonic(), interval
        while True:
            fresh, ended = self._poll_or_wait()
            done = 0
            for r in fresh:
                item = self._fetch_or_wait(r)
                if item is None:  # an outage, or a file not verified yet: try again after the wait
                    break
                done += 1
                self.seen_seq = r.manifest.seq
                yield item
                if until_step is not None and r.manifest.step >= until_step:
                    log.info("run %s: reached step %d (until_step=%d); stopping", self.store.run_id, r.manifest.step,
                             until_step)  # fmt: skip
                    return
            if ended is not None and done == len(fresh):
                log.info("run %s is %s and every committed checkpoint was yielded; stopping", self.store.run_id, ended)
                return
            if timeout is not None and time.monotonic() - start >= timeout:
                log.info("run %s: followed for %.0f s (timeout); stopping", self.store.run_id, timeout)
                return
            wait = interval if done else min(max_interval, wait * 1.5)
            time.sleep(wait)

    def _poll_or_wait(self) -> tuple[list[Resolved], str | None]:
        """(checkpoints to yield, in order; the run's end status or None); ([], None) while MLflow is down."""
        try:
            with _http.bounded(_http.READ):
                result = self._poll()
        except StoreError as e:
            self._down(e)
            return [], None
        self._up()
        return result

    def _poll(self) -> tuple[list[Resolved], str | None]:
        run = self.store.run()
        self.tags = dict(run.data.tags)
        status = str(run.info.status)
        ended = status if status in ENDED else None
        if self.resume is not None and self.floor is None:
            last = last_scored_step(self.store, self.resume)
            self.floor = -1 if last is None else last
            if last is not None:
                log.info("run %s: %s was logged up to step %d; following after it", self.store.run_id, self.resume,
                         last)  # fmt: skip
        signal = (self.tags.get(TAG_LATEST), self.tags.get(TAG_LATEST_STEP))
        if signal != self.signal or ended or time.monotonic() - self.listed_at > RELIST_S:
            newest = self.catalog._from_tag(self.tags, TAG_LATEST) if self.latest_only and signal[0] else None
            if newest is not None:  # the newest is all this follower wants: its manifest, no listing
                self.known[newest.path] = newest.manifest
            else:
                self._relist()
            self.signal, self.listed_at = signal, time.monotonic()
        return self._candidates(), ended

    def _relist(self) -> None:
        for path in self.catalog.folders():
            if path in self.known or path in self.skipped:
                continue
            try:
                self.known[path] = self.catalog.manifest(path)
            except CheckpointNotFoundError:
                log.debug("run %s: %s has no manifest yet (upload in flight)", self.store.run_id, path)
            except CheckpointCorruptError as e:
                log.warning("run %s: skipping %s: %s", self.store.run_id, path, e)
                self.skipped.add(path)

    def _candidates(self) -> list[Resolved]:
        floor = -1 if self.floor is None else self.floor
        fresh = sorted(
            (Resolved(p, m) for p, m in self.known.items()
             if m.seq > self.seen_seq and m.step > floor and p not in self.skipped),
            key=lambda r: r.manifest.seq,
        )  # fmt: skip
        return fresh[-1:] if self.latest_only else fresh

    # ------------------------------------------------------------------------------------------ fetching

    def _fetch_or_wait(self, r: Resolved) -> FollowedCheckpoint | None:
        t0 = time.perf_counter()
        try:
            with _http.bounded(_http.READ):
                folder = self._fetch(r)
        except StoreError as e:
            self._down(e)
            return None
        except CheckpointNotFoundError as e:
            log.warning("run %s: %s was deleted before it could be fetched (retention?): %s", self.store.run_id,
                        r.path, e)  # fmt: skip
            self.skipped.add(r.path)
            self.known.pop(r.path, None)
            return None
        except CheckpointCorruptError as e:
            if isinstance(e.__cause__, StoreError) and e.__cause__.transient:
                self._down(e.__cause__)
                return None
            self.tries[r.path] = self.tries.get(r.path, 0) + 1
            if self.tries[r.path] >= _MAX_TRIES:
                log.warning("run %s: skipping %s after %d failed verifications: %s", self.store.run_id, r.path,
                            _MAX_TRIES, e)  # fmt: skip
                self.skipped.add(r.path)
            else:
                log.info("run %s: %s did not verify (%s); trying again", self.store.run_id, r.path, e)
            return None
        self._up()
        m = r.manifest
        size = sum(f.size for f in m.files if (folder / f.name).is_file())
        log.info("run %s: step %d ready in %s (%s verified in %.2f s)", self.store.run_id, m.step, folder,
                 human_bytes(size), time.perf_counter() - t0)  # fmt: skip
        return FollowedCheckpoint(self.store.run_id, r.path, m.step, m.seq, dict(m.metrics), dict(m.metadata),
                                  folder, time.time(), self, r)  # fmt: skip

    def only(self, m: Manifest) -> set[str] | None:
        from .formats import format_of

        return format_of(m).weight_files(m) if self.weights_only else None

    def _fetch(self, r: Resolved) -> Path:
        """A verified local folder of ``r``: the artifact folder itself for a local store, else in the cache."""
        only = self.only(r.manifest)
        if self.store.local_dir is not None:  # read in place: nothing to copy
            return self.catalog.fetch_verified(r, self.cache, None, only)
        dest = self.cache / r.path.rpartition("/")[2]
        partial = self.cache / f".partial-{uuid.uuid4().hex[:8]}"
        try:
            folder = self.catalog.fetch_verified(r, partial, dest, only)
            if folder != dest:  # fetched now: publish it in the cache, with its manifest (what marks it complete)
                (folder / MANIFEST_NAME).write_text(r.manifest.to_json())
                shutil.rmtree(dest, ignore_errors=True)
                folder.rename(dest)
        finally:
            shutil.rmtree(partial, ignore_errors=True)
        self._prune(dest)
        return dest

    def _prune(self, newest: Path) -> None:
        if newest in self.fetched:
            self.fetched.remove(newest)
        self.fetched.append(newest)
        while len(self.fetched) > self.keep:
            shutil.rmtree(self.fetched.pop(0), ignore_errors=True)

    # ------------------------------------------------------------------------------------------ outages

    def _down(self, e: StoreError) -> None:
        if not e.transient:
            raise e
        if self.down_since is None:
            self.down_since = time.monotonic()
            log.warning("following run %s: %s; waiting for MLflow to answer again (nothing is skipped)",
                        self.store.run_id, e)  # fmt: skip

    def _up(self) -> None:
        if self.down_since is not None:
            log.warning("following run %s: MLflow answers again after %.0f s", self.store.run_id,
                        time.monotonic() - self.down_since)  # fmt: skip
            self.down_since = None

    # ------------------------------------------------------------------------------------------ scores

    def log_eval(self, item: FollowedCheckpoint, metrics: Mapping[str, Any]) -> None:
        """Log the scores; through an outage, wait and retry (one timestamp: a retry never logs them twice)."""
        now, wait = int(time.time() * 1000), 1.0
        while True:
            try:
                with _http.bounded():
                    record_eval(self.store, item.ref, item.step, metrics, self.tags, now)
                break
            except StoreError as e:
                self._down(e)
                time.sleep(wait)
                wait = min(5.0, wait * 1.5)
        self._up()
        self.tags[TAG_EVALS] = ",".join(sorted({*eval_keys(self.tags), *metrics}))  # written once per new key
