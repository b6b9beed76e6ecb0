"""The outbox and its publisher, driven inline (``start=False`` + ``drain_once()``): no threads, no sleeps."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import pytest

from tracked_ckpt.errors import StoreError
from tracked_ckpt.outbox import WAIT_INTERVALS, Outbox, Pending, PermanentStoreError, Publisher, Waiting


def entry(seq: int, run_id: str = "run1") -> Pending:
    return Pending(run_id, seq, f"step-{seq:08d}", seq * 10, 1000 + seq)


class Server:
    """What the publisher calls: publish and probe fail while ``down`` (transiently) or ``refusing`` (for good)."""

    def __init__(self) -> None:
        self.down = False
        self.refusing = False
        self.recorded: list[int] = []
        self.probes = 0
        self.gate: threading.Event | None = None  # when set: a probe waits for it
        self.waiting_for: set[int] = set()  # seqs whose files other nodes have not uploaded yet

    def publish(self, p: Pending) -> None:
        if self.refusing:
            e = StoreError("403 permission denied")
            e.transient = False
            raise e
        if self.down:
            raise StoreError("connection refused")
        if p.seq in self.waiting_for:
            raise Waiting("1 file from another node is not in the store yet")
        self.recorded.append(p.seq)

    def probe(self) -> None:
        if self.gate is not None:
            self.gate.wait()
        self.probes += 1
        if self.down:
            raise StoreError("connection refused")


def publisher(tmp_path: Path, server: Server) -> tuple[Outbox, Publisher]:
    box = Outbox(tmp_path)
    return box, Publisher(box, "run1", server.publish, "http://server", probe=server.probe, start=False)


def test_entries_are_durable_ordered_and_per_run(tmp_path: Path) -> None:
    box = Outbox(tmp_path)
    for p in (entry(3), entry(1), entry(2, "run2"), entry(2)):
        box.add(p)
    assert [p.seq for p in box.pending("run1")] == [1, 2, 3]
    seen = [(p.run_id, p.seq) for p in Outbox(tmp_path).pending()]  # as a new process sees them
    assert seen == [("run1", 1), ("run1", 2), ("run1", 3), ("run2", 2)]
    (box.dir / "garbage.json").write_text("{not json")
    assert len(box.pending()) == 4  # an unreadable entry is skipped, not fatal
    box.done(entry(1))
    box.done(entry(1))  # idempotent
    assert [p.seq for p in box.pending("run1")] == [2, 3]


def test_an_outage_is_entered_once_probed_and_left_in_order(tmp_path: Path) -> None:
    server = Server()
    box, pub = publisher(tmp_path, server)
    box.add(entry(1))
    assert pub.drain_once() and server.recorded == [1] and not pub.in_outage
    server.down = True
    box.add(entry(2))
    box.add(entry(3))
    assert not pub.drain_once() and pub.in_outage
    assert pub.wait_for(2, timeout=60) is False  # during an outage nobody waits
    assert not pub.drain_once() and server.probes == 1  # a pass during an outage probes first, publishes nothing
    server.down = False
    assert pub.drain_once() and not pub.in_outage
    assert server.recorded == [1, 2, 3] and box.pending() == []
    assert pub.wait_for(3, timeout=0)


def test_a_refusal_is_reported_to_every_waiting_save_and_kept(tmp_path: Path) -> None:
    server = Server()
    box, pub = publisher(tmp_path, server)
    server.refusing = True
    box.add(entry(1))
    box.add(entry(2))
    assert not pub.drain_once() and not pub.in_outage  # not an outage: retrying will not help
    for seq in (1, 2):
        with pytest.raises(PermanentStoreError, match="403"):
            pub.wait_for(seq, timeout=0)
    assert [p.seq for p in box.pending()] == [1, 2]  # nothing committed is dropped


def test_drained_gives_up_after_one_failed_probe_not_the_whole_budget(tmp_path: Path) -> None:
    server = Server()
    box, pub = publisher(tmp_path, server)
    box.add(entry(1))
    server.down = True
    pub.drain_once()
    gate = server.gate = threading.Event()
    t = threading.Thread(target=pub.drain_once)  # the publisher's next pass: its probe fails once let through
    t.start()
    threading.Timer(0.3, gate.set).start()  # after drained() below has started waiting
    t0 = time.monotonic()
    assert pub.drained(timeout=60) is False
    assert time.monotonic() - t0 < 5
    t.join()


def test_a_waiting_entry_is_retried_on_a_growing_back_off_without_an_outage(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    server = Server()
    box, pub = publisher(tmp_path, server)
    box.add(entry(1))
    box.add(entry(2))
    server.waiting_for = {1}
    assert pub._interval() is None  # nothing to retry: the thread waits for a kick
    for expected in (*WAIT_INTERVALS, WAIT_INTERVALS[-1]):
        assert not pub.drain_once() and not pub.in_outage
        assert pub._interval() == expected
    assert server.recorded == [] and [p.seq for p in box.pending()] == [1, 2]  # in order: 2 waits behind 1
    assert pub.wait_for(1, timeout=0) is False
    pub.note_timeout(10, timeout=30)  # a save gave up waiting: the warning says what for, once
    pub.note_timeout(20, timeout=30)
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warned) == 1 and "has not got every file of checkpoint step 10 yet (1 file from another" in warned[0]
    server.waiting_for = set()
    assert pub.drain_once() and server.recorded == [1, 2] and pub._interval() is None and not pub.in_outage
