"""The read side: resolve latest / best / at-step-N by asking the MLflow run, then fetch and verify files.

Fast path: the run tags name the latest and best checkpoint folders (one ``get_run``, one listing of the
checkpoint folders and one manifest read, whatever the number of checkpoints). Tags are hints, never trusted: the
manifest they point at must exist, parse, name this run and agree with the tag; otherwise we warn and scan the
checkpoint folders. They may also lag: a save killed between its manifest upload and the tag update leaves a
committed checkpoint newer than the tagged latest. Folder names carry the step, and the seq whenever the step
went back (``recorder.plan``), so only the folders that may be newer than the tagged one are read (``_lagging``).
A folder without a valid manifest is an uncommitted checkpoint and is never resolved.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import stat
import tempfile
from collections.abc import Collection, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from .errors import CheckpointCorruptError, CheckpointNotFoundError, ConfigError, StoreError
from .evals import TAG_EVALS, eval_keys, eval_metrics, with_scores
from .manifest import ARTIFACT_PREFIX, MANIFEST_NAME, Manifest, check_checkpoint_path, verify_file
from .policies import CheckpointInfo, Mode, best_of
from .refs import Which, ref_for
from .runtags import TAG_BEST, TAG_BEST_STEP, TAG_LATEST, TAG_LATEST_STEP, TAG_MONITOR, monitor_of
from .store.run_store import RunStore

log = logging.getLogger(__name__)

_NAME = re.compile(r"step-(-?\d+)(?:\.(\d+))?")


def name_step(name: str) -> tuple[int, int | None] | None:
    """(step, seq or None) of a folder named ``step-N`` or ``step-N.SEQ`` (recorder.plan); None for another name."""
    m = _NAME.fullmatch(name)
    return None if m is None else (int(m.group(1)), int(m.group(2)) if m.group(2) else None)


def info_of(m: Manifest, path: str) -> CheckpointInfo:
    return CheckpointInfo(path=path, step=m.step, seq=m.seq, created=m.created, metrics=m.metrics, size=m.size)


@dataclass(frozen=True)
class Resolved:
    path: str
    manifest: Manifest

    @property
    def info(self) -> CheckpointInfo:
        return info_of(self.manifest, self.path)


class RunCatalog:
    """Committed checkpoints of one run, resolved through MLflow."""

    def __init__(self, store: RunStore) -> None:
        self.store = store
        self.unreadable: dict[str, CheckpointCorruptError] = {}  # folders whose manifest failed, from scan()
        self.listed: list[str] = []  # every checkpoint-shaped folder seen by scan(), committed or not

    @property
    def run_id(self) -> str:
        return self.store.run_id

    def manifest(self, path: str) -> Manifest:
        """The validated manifest of the checkpoint folder ``path``; CheckpointNotFoundError if uncommitted."""
        check_checkpoint_path(path)
        where = f"{ref_for(self.run_id, path)}/{MANIFEST_NAME}"
        try:
            text = self._read(f"{path}/{MANIFEST_NAME}")
        except (FileNotFoundError, StoreError) as e:
            if not (isinstance(e, StoreError) and self.store.exists(path + "/" + MANIFEST_NAME)):
                raise CheckpointNotFoundError(
                    f"{ref_for(self.run_id, path)} has no manifest: it is not a committed checkpoint"
                ) from e
            # Listed now: it landed between the two calls (a record in progress), or the server failed the read.
            text = self._read(f"{path}/{MANIFEST_NAME}")
        m = Manifest.from_json(text, where)
        if m.run_id != self.run_id:
            raise CheckpointCorruptError(
                f"{where} belongs to run {m.run_id}, not {self.run_id}: it was copied or planted; not loading it"
            )
        return m

    def _read(self, artifact: str) -> bytes:
        root = self.store.local_dir
        if root is not None:  # in place: a temporary folder per manifest cost ~2 ms to remove (10k: 20 s)
            with open_in_place(root, artifact, self.run_id) as f:
                return f.read()
        with tempfile.TemporaryDirectory(prefix="tracked_ckpt-") as tmp:
            return self.store.fetch(artifact, Path(tmp)).path.read_bytes()

    def folders(self) -> list[str]:
        """Every checkpoint-shaped folder of the run, committed or not (one listing)."""
        root = self.store.local_dir
        if root is not None:  # one scandir: MLflow's listing stats every entry (10k folders: ~0.8 s)
            listed = [f"{ARTIFACT_PREFIX}/{name}" for name in _local_dirs(root / ARTIFACT_PREFIX)]
        else:
            listed = [e.path for e in self.store.list(ARTIFACT_PREFIX) if e.is_dir]
        paths = []
        for listed_path in listed:
            try:
                paths.append(check_checkpoint_path(listed_path))
            except CheckpointCorruptError as err:
                log.warning("ignoring artifact folder %r in run %s: %s", listed_path, self.run_id, err)
        return paths

    def scan(self) -> list[Resolved]:
        """Every committed checkpoint of the run, in commit order (one listing plus one read per folder)."""
        paths = self.folders()

        def read(path: str) -> Resolved | CheckpointCorruptError | None:
            try:
                return Resolved(path, self.manifest(path))
            except CheckpointNotFoundError:
                log.debug("skipping uncommitted checkpoint folder %s", path)
            except CheckpointCorruptError as err:
                log.warning("skipping checkpoint %s: %s", path, err)
                return err
            return None

        if self.store.local_dir is not None:
            found = [read(p) for p in paths]
        else:
            with ThreadPoolExecutor(max_workers=8) as pool:
                found = list(pool.map(read, paths))
        # Kept so that an explicit request for one of these raises its error instead of "not found".
        self.unreadable = {p: r for p, r in zip(paths, found, strict=True) if isinstance(r, CheckpointCorruptError)}
        self.listed = paths  # every checkpoint-shaped folder, committed or not
        return sorted((r for r in found if isinstance(r, Resolved)), key=lambda r: r.manifest.seq)

    def _lagging(self, step: int, seq: int, tagged: str) -> list[Resolved]:
        """Committed checkpoints after the ``tagged`` one (of ``step`` and ``seq``), oldest first; usually none.

        Reads only the manifests of folders that can be newer: a higher step, the same step under another name,
        a seq suffix above ``seq``, or a name plan() did not make. A folder without a manifest is skipped.
        """
        newer = []
        for path in self.folders():
            if path == tagged or not _maybe_newer(path.rpartition("/")[2], step, seq):
                continue
            try:
                m = self.manifest(path)
            except CheckpointNotFoundError:
                continue  # uncommitted: a save in flight, or one that died before its manifest
            except CheckpointCorruptError as err:
                log.warning("skipping checkpoint %s: %s", path, err)
                continue
            if m.seq > seq:
                newer.append(Resolved(path, m))
        return sorted(newer, key=lambda r: r.manifest.seq)

    def _from_tag(self, tags: dict[str, str], key: str) -> Resolved | None:
        path = tags.get(key)
        if not path:
            return None
        try:
            r = Resolved(path, self.manifest(path))
        except (CheckpointNotFoundError, CheckpointCorruptError) as e:
            log.warning(
                "run %s: tag %s=%r does not point at a valid checkpoint (%s); scanning", self.run_id, key, path, e
            )
            return None
        step_tag = tags.get(TAG_LATEST_STEP if key == TAG_LATEST else TAG_BEST_STEP)
        if step_tag is not None and step_tag != str(r.manifest.step):
            log.warning("run %s: tag %s disagrees with the manifest at %s; scanning", self.run_id, key, path)
            return None
        return r

    def latest(self, tags: dict[str, str] | None = None) -> Resolved | None:
        """The newest committed checkpoint: the tagged one, or one committed after it (``_lagging``)."""
        tags = self.store.tags() if tags is None else tags
        hit = self._from_tag(tags, TAG_LATEST)
        if hit is not None:
            newer = self._lagging(hit.manifest.step, hit.manifest.seq, hit.path)
            if newer:
                log.warning("run %s: its tags name %s as the latest, but %s was committed after it (a save "
                            "interrupted before its tags were written)", self.run_id, hit.path, newer[-1].path)
            return ([hit, *newer])[-1]
        found = self.scan()
        return found[-1] if found else None

    def best(self, metric: str, mode: Mode, tags: dict[str, str] | None = None) -> Resolved | None:
        tags = self.store.tags() if tags is None else tags
        if tags.get(TAG_MONITOR) == f"{metric}:{mode}":
            hit = self._from_tag(tags, TAG_BEST)
            latest_step = tags.get(TAG_LATEST_STEP, "")
            if hit is not None and metric in hit.manifest.metrics and latest_step.lstrip("-").isdigit():
                # A checkpoint the tags lag behind may be the best: those after the tagged latest (and any after
                # the best with a seq suffix, which the tags' choice already weighed) are compared too.
                found = [hit, *self._lagging(int(latest_step), hit.manifest.seq, tags.get(TAG_LATEST, ""))]
                chosen = best_of([r.info for r in found], metric, mode)
                return next((r for r in found if chosen is not None and r.path == chosen.path), hit)
        found = self.scan()
        infos = [r.info for r in found]
        if metric in eval_keys(tags):  # a score an evaluator logged on the run (log_eval), not in the manifests
            infos = with_scores(infos, eval_metrics(self.store, {TAG_EVALS: metric}))
        chosen = best_of(infos, metric, mode)
        return next((r for r in found if chosen is not None and r.path == chosen.path), None)

    def at_step(self, step: int) -> Resolved | None:
        matches = [r for r in self.scan() if r.manifest.step == step]
        named = f"{ARTIFACT_PREFIX}/step-{step:08d}"  # the manager's folder name for this step
        bad = [e for p, e in self.unreadable.items() if p == named or p.startswith(named + ".")]
        if not matches and bad and "belongs to run" not in str(bad[-1]):  # a copied decoy is not ours: not found
            raise CheckpointCorruptError(f"run {self.run_id}: the checkpoint of step {step} is unusable: {bad[-1]}")
        return matches[-1] if matches else None

    def resolve(self, which: Which, metric: str | None = None, mode: str | None = None) -> Resolved:
        """The committed checkpoint ``which`` names; "best" by ``metric``/``mode``, else by the run's own monitor."""
        if which == "latest":
            r = self.latest()
        elif which == "best":
            tags = self.store.tags()
            metric, mode = monitor_of(tags, metric, mode)
            r = self.best(metric, mode, tags)
        elif isinstance(which, int) and not isinstance(which, bool):
            r = self.at_step(which)
        else:
            raise ConfigError(f"which={which!r}: pass 'latest', 'best' or an integer step")
        if r is None:
            what = f"at step {which}" if isinstance(which, int) else f"({which})"
            if which == "best":
                what = f"with metric {metric!r} (best, {mode})"
            raise CheckpointNotFoundError(
                f"run {self.run_id} has no committed checkpoint {what}; "
                f"`tracked-ckpt ls {self.run_id}` lists the ones it has"
            )
        return r

    def candidates_latest_first(self) -> Iterator[Resolved]:
        """Latest first, then older ones: used to fall back past a checkpoint that fails verification."""
        first = self.latest()
        if first is None:
            return
        yield first
        for r in reversed(self.scan()):
            if r.manifest.seq < first.manifest.seq:
                yield r

    def fetch_verified(
        self, r: Resolved, tmp_dir: Path, cache_dir: Path | None = None, only: Collection[str] | None = None
    ) -> Path:
        """A local folder with every file of ``r`` (or the files named in ``only``) checked against its manifest."""
        where = f"checkpoint {ref_for(self.run_id, r.path)} (step {r.manifest.step})"
        streamed: dict[str, str | None] = {}  # digests computed while downloading: nothing is read twice
        wanted = [f for f in r.manifest.files if only is None or f.name in only]
        if cache_dir is not None and _cache_matches(cache_dir, r.manifest, only):
            folder = cache_dir
        else:
            folder = tmp_dir
            _check_listing([e.path.rpartition("/")[2] for e in self.store.list(r.path)], r.manifest, where)
            for f in wanted:
                try:
                    local, streamed[f.name] = self.store.fetch(f"{r.path}/{f.name}", tmp_dir)
                except (FileNotFoundError, StoreError, CheckpointCorruptError) as e:
                    raise CheckpointCorruptError(f"{where}: file {f.name!r} cannot be read: {e}") from e
                folder = local.parents[f.name.count("/")]  # a nested name ("sub/x.bin") lies deeper
        for f in wanted:
            verify_file(folder / f.name, f, where, digest=streamed.get(f.name))
        return folder


def _maybe_newer(name: str, step: int, seq: int) -> bool:
    """Whether folder ``name`` can hold a checkpoint committed after one of ``step`` and ``seq``.

    plan() names a checkpoint ``step-N``, adding ``.SEQ`` when the name is taken or N is below a step already
    saved: so a later save has a higher step, the same step under another name, or a seq suffix.
    """
    parsed = name_step(name)
    if parsed is None:
        return True  # not a name plan() makes: read it
    named_step, named_seq = parsed
    if named_step > step:
        return True
    return named_seq > seq if named_seq is not None else named_step == step


def _check_listing(names: list[str], m: Manifest, where: str) -> None:
    """The folder must hold exactly the manifest's files: an extra one means tampering or a mixed-up folder."""
    # Hidden "*.tmp" names are in-flight uploads (ours and MLflow's local store write a temp, then rename).
    names = [n for n in names if not (n.startswith(".") and n.endswith(".tmp"))]
    expected = m.top_level  # a foreign folder's subfolders are checked file by file (verify_file)
    if extra := sorted(set(names) - expected):
        raise CheckpointCorruptError(
            f"{where}: the folder holds {extra} that its manifest does not list (planted, or files of another "
            "save mixed in); refusing to load it"
        )
    if missing := sorted(expected - set(names)):
        raise CheckpointCorruptError(f"{where}: file {missing[0]!r} listed in the manifest is missing")


def _local_dirs(folder: Path) -> list[str]:
    try:
        with os.scandir(folder) as it:
            return [e.name for e in it if e.is_dir()]
    except FileNotFoundError:
        return []


def open_in_place(root: Path, artifact: str, run_id: str) -> IO[bytes]:
    """Open ``root/artifact`` for reading, refusing a symlink at any level and anything but a regular file.

    O_NOFOLLOW per component (no resolve() calls); O_NONBLOCK so that a planted FIFO cannot hang the open.
    """
    *dirs, name = artifact.split("/")
    fds = [os.open(root, os.O_RDONLY | os.O_DIRECTORY)]
    try:
        try:
            for d in dirs:
                fds.append(os.open(d, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW, dir_fd=fds[-1]))
            fd = os.open(name, os.O_RDONLY | os.O_NOFOLLOW | os.O_NONBLOCK, dir_fd=fds[-1])
        except OSError as e:
            if e.errno not in (errno.ELOOP, errno.ENOTDIR):
                raise
            raise CheckpointCorruptError(
                f"artifact {artifact} of run {run_id} is or lies under a symlink (or a file where a folder should be); "
                "refusing to follow it"
            ) from e
        if not stat.S_ISREG(os.fstat(fd).st_mode):
            os.close(fd)
            raise CheckpointCorruptError(f"artifact {artifact} of run {run_id} is not a regular file; not reading it")
        return os.fdopen(fd, "rb")
    finally:
        for d_fd in fds:
            os.close(d_fd)


def _cache_matches(folder: Path, m: Manifest, only: Collection[str] | None = None) -> bool:
    try:
        local = Manifest.from_json((folder / MANIFEST_NAME).read_bytes(), str(folder))
        names = {p.name for p in folder.iterdir()}
    except (OSError, CheckpointCorruptError):
        return False
    # A partial copy (a follower that fetched only the weights) holds exactly the files it was asked for.
    exact = names == m.top_level or (only is not None and names == {*only, MANIFEST_NAME} and names <= m.top_level)
    return exact and local.files == m.files and local.run_id == m.run_id and local.seq == m.seq
