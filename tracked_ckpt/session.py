"""Attaching a manager to its run, and letting go of it: store, lease, recorder, status and note.

``RunSession.open`` finds the run (runs.py) and attaches: the store seam, the lease (one writer per run), the
recorder (recovering what earlier processes left), the run's RUNNING status and its run-page note. When the server
does not answer, it attaches *offline*: the run must be known without the server (``run_id=``, ``MLFLOW_RUN_ID``, or
the pointer in ``save_dir``), the recorder indexes the verified local copies, and the lease, status and note wait
for the publisher's first contact with the server. ``finish`` marks the run ended and releases the lease, bounded
in time whatever the server does.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from mlflow.tracking import MlflowClient

from .errors import CheckpointNotFoundError, ConfigError, StoreError
from .local import LocalDir
from .policies import Mode, RetentionPolicy, SavePolicy, check_mode
from .recording import RunRecorder
from .runs import FoundRun, find_run, known_locally
from .runtags import NOTE_MARK, TAG_MONITOR, TAG_NOTE, fork_note, monitor_value, run_note
from .store.lease import Lease
from .store.run_store import RunStore, redact

if TYPE_CHECKING:
    from .lifecycle import Fork

log = logging.getLogger(__name__)

StoreFactory = Callable[..., RunStore]  # (client, run_id, *, connect=True) -> RunStore


@dataclass(frozen=True, kw_only=True)
class Options:
    """A manager's configuration (CheckpointManager's keyword arguments of the same names), checked once."""

    monitor: str = "reward"
    mode: Mode = "max"
    resume: str = "auto"
    save_policy: SavePolicy | None = None
    retention: RetentionPolicy | None = None
    save_rng: bool = True
    publish_timeout: float = 30.0
    lease_timeout: float = 60.0
    store_factory: StoreFactory = RunStore
    logged_models: bool = True

    def __post_init__(self) -> None:
        check_mode(self.mode)
        if self.resume not in ("auto", "never", "must"):
            raise ConfigError(f"resume={self.resume!r}: pass 'auto', 'never' or 'must'")
        if self.save_policy is not None and not isinstance(self.save_policy, SavePolicy):
            raise ConfigError(f"save_policy={self.save_policy!r} has no should_save(ctx); use e.g. EveryNSteps(100)")
        if self.retention is not None and not isinstance(self.retention, RetentionPolicy):
            raise ConfigError(f"retention={self.retention!r} has no keep(...); use e.g. KeepLast(3)")
        if not self.publish_timeout >= 0:
            raise ConfigError(f"publish_timeout={self.publish_timeout!r}: pass a number of seconds >= 0")
        if not self.lease_timeout > 0:
            raise ConfigError(f"lease_timeout={self.lease_timeout!r}: pass a number of seconds > 0")

    @classmethod
    def pick(cls, kwargs: dict[str, Any]) -> Options:
        """The options among a manager's keyword arguments."""
        return cls(**{k: v for k, v in kwargs.items() if k in cls.__dataclass_fields__})


class RunSession:
    """One manager's hold on one run."""

    store: RunStore
    lease: Lease
    recorder: RunRecorder

    def __init__(self, client: MlflowClient, local: LocalDir, options: Options) -> None:
        self.client, self.local, self.options = client, local, options
        self.server = redact(str(client.tracking_uri))
        self.how = ""
        self.owns_status = True  # False for the user's own mlflow.start_run(): the user ends it
        self.fork: Fork | None = None

    @property
    def run_id(self) -> str:
        return self.store.run_id

    def open(
        self, run_id: str | None, experiment: str | None, run_name: str | None, fork_from: str | None = None,
        fork_metrics: bool = True,
    ) -> None:  # fmt: skip
        """Find the run and attach to it; when the server is unreachable, start from save_dir and record later.

        ``fork_from``: on a new run, record its parent checkpoint (lifecycle.py) before the run-page note is written.
        """
        if fork_from is not None:
            from .lifecycle import Fork

            self.fork = Fork(fork_from, fork_metrics)
        self._attach(run_id, experiment, run_name)
        if self.options.resume == "must" and not self.recorder.index:
            raise CheckpointNotFoundError(
                f"resume='must' but run {self.run_id} ({self.how}) has no committed checkpoint at {self.server} (nor "
                f"in {self.local.root}); check run_id / save_dir, or use resume='auto' to start from scratch"
            )

    def join(self, run_id: str, shares: bool = False) -> None:
        """Attach to the run that rank 0 opened (torchrun's other ranks): they never decide nor record, so no lease
        and no status; the store connects on first use. ``shares``: this rank leads another node, whose publisher
        uploads that node's share of each checkpoint from its own outbox; else the recorder does not publish."""
        self.owns_status, self.how = False, "joined rank 0's run"
        self.store = self.options.store_factory(self.client, run_id, connect=False)
        o = self.options
        self.recorder = RunRecorder(self.store, self.local, monitor=o.monitor, mode=o.mode, retention=None,
                                    publish_timeout=o.publish_timeout, start=shares, logged_models=False)  # fmt: skip

    @property
    def decides(self) -> bool:
        """True for the session that holds the run (lease, status, publisher); False for a rank that joined it."""
        return "lease" in vars(self)

    def _attach(self, run_id: str | None, experiment: str | None, run_name: str | None) -> None:
        try:
            found = find_run(self.client, self.server, self.local, run_id=run_id, experiment=experiment,
                             run_name=run_name, new_only=self.options.resume == "never")  # fmt: skip
        except StoreError as e:
            if not e.transient:
                raise
            if self.options.resume == "never":
                raise StoreError(
                    f"MLflow at {self.server} is unreachable ({e}) and resume='never' asks for a new run, which cannot "
                    "be created offline; retry once the server answers"
                ) from e
            self._open_offline(known_locally(self.client, self.server, self.local, run_id, e), e)
            return
        try:
            self._open_online(found)
        except StoreError as e:
            if not e.transient:
                raise
            self.abandon(bounded=False)  # the server broke off half-way: go offline with the run we found
            self._open_offline(found, e)

    def _open_online(self, found: FoundRun) -> None:
        self.owns_status, self.how = found.owns_status, found.how
        self.store = self.options.store_factory(self.client, found.run_id)
        self.lease = self._lease()
        # The save_dir lock is held already, so a holder that wrote through this save_dir is gone.
        self.lease.acquire(self.store.tags_at_open)
        if self.fork is not None:
            self.fork.attach(self.store, found.how)
        self.recorder = self._recorder()
        if found.how != "new":
            self.recorder.recover()
        others = {p.run_id for p in self.recorder.outbox.pending()} - {found.run_id}
        if others:
            log.warning("%s holds queued checkpoints of other runs %s: `tracked-ckpt sync %s` uploads them",
                        self.recorder.outbox.dir, sorted(others), self.local.root)  # fmt: skip
        self.local.write_pointer(found.run_id, self.server, self.store.experiment_id)
        self._mark_attached()

    def _open_offline(self, found: FoundRun, cause: StoreError) -> None:
        self.owns_status, self.how = found.owns_status, f"{found.how}, offline"
        self.store = self.options.store_factory(self.client, found.run_id, connect=False)
        self.lease = self._lease()
        self.recorder = self._recorder(on_connect=self._attach_late)
        self.recorder.recover_offline()
        if not self.recorder.index:
            # Nothing to resume from here: training would restart from scratch and, once the server answers, its
            # checkpoints would be numbered and named over the run's own. Wait for the server instead.
            self.recorder.stop()
            err = StoreError(
                f"MLflow at {self.server} is unreachable ({cause}) and {self.local.root} holds no committed checkpoint "
                f"of run {found.run_id} to resume from; start the job once the server answers (or from the save_dir "
                "that trained the run)"
            )
            err.transient = True
            raise err
        self.recorder.publisher.note_outage()
        log.warning(
            "MLflow at %s is unreachable (%s): resuming run %s from the %d checkpoint(s) committed in %s. Saves are "
            "committed locally and queued; they, the run's status and its note are recorded once the server answers",
            self.server, cause, found.run_id, len(self.recorder.index), self.local.root,
        )  # fmt: skip

    def _lease(self) -> Lease:
        t = self.options.lease_timeout
        return Lease(self.store, self.local.root, interval=max(1.0, t / 4), timeout=t)

    def _recorder(self, on_connect: Callable[[], None] | None = None) -> RunRecorder:
        o = self.options
        return RunRecorder(self.store, self.local, monitor=o.monitor, mode=o.mode, retention=o.retention,
                           publish_timeout=o.publish_timeout, on_connect=on_connect,
                           logged_models=o.logged_models)  # fmt: skip

    def _attach_late(self) -> None:
        """The server answered after an offline start (publisher thread): what an online start does first."""
        self.lease.acquire(self.store.tags_at_open)
        self.local.write_pointer(self.run_id, self.server, self.store.experiment_id)
        self._mark_attached()

    def _mark_attached(self) -> None:
        o = self.options
        if not self.how.startswith("new") and self.owns_status:
            self.store.set_status("RUNNING")
        note = self.store.tags_at_open.get(TAG_NOTE)
        if note is None or note.startswith(NOTE_MARK):  # a note the user wrote stays
            note = run_note(self.run_id, self.local.root.name, o.monitor, o.mode, fork_note(self.store.tags_at_open))
            self.store.set_tags({TAG_NOTE: note, TAG_MONITOR: monitor_value(o.monitor, o.mode)})

    def close(self, status: str, leads_node: bool) -> None:
        """At the manager's close: record what is queued (bounded by ``publish_timeout``), then, if this session
        holds the run, mark it ended. ``leads_node``: another node's leader, whose outbox holds that node's files."""
        if not self.decides and not leads_node:
            return
        drained = self.recorder.drain(self.options.publish_timeout)
        if not drained:
            what = "record every checkpoint" if self.decides else "get every file of this node"
            log.warning("MLflow at %s did not %s in time: they stay queued in %s and are uploaded by the next "
                        "process on this save_dir or `tracked-ckpt sync %s`", self.server, what,
                        self.recorder.outbox.dir, self.local.root)  # fmt: skip
        if not self.decides:
            self.recorder.stop()
            return
        if drained:
            self.recorder.flush_late_costs()
        self.finish(status, drained)

    def finish(self, status: str, drained: bool) -> None:
        """Mark the run ended and release the lease; bounded, since the server may hang."""
        connected = self.recorder.attached
        self.recorder.stop()
        if not connected:  # an offline start that never reached the server: nothing to mark
            self.lease.stop()
            return

        def finish() -> None:
            if self.owns_status:
                try:
                    self.store.set_status(status)
                except StoreError as e:  # at interpreter exit, a failure to mark the run must not mask the outcome
                    log.debug("could not mark run %s %s: %s", self.run_id, status, e)
            self.lease.release()

        _bounded(finish, max(1.0, self.options.publish_timeout) if drained else 1.0)

    def abandon(self, bounded: bool = True) -> None:
        """Undo a half-finished attach: stop the publisher and the heartbeat (and release the lease if bounded)."""
        recorder: RunRecorder | None = vars(self).pop("recorder", None)
        lease: Lease | None = vars(self).pop("lease", None)
        if recorder is not None:
            recorder.stop()
        if lease is not None:
            if bounded:
                _bounded(lease.release, 2.0)
            else:
                lease.stop()


def _bounded(fn: Any, timeout: float) -> None:
    """Run ``fn`` on a daemon thread and wait at most ``timeout`` seconds for it."""
    t = threading.Thread(target=fn, daemon=True, name="tracked_ckpt-close")
    t.start()
    t.join(timeout)
