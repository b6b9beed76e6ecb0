"""The publisher's back-off during an outage, on a moved clock: its thread's loop body run inline, no sleeps."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
from test_outbox import Server, entry

from tracked_ckpt.outbox import Outbox, Publisher


class Clock:
    """Seconds that move only when the publisher waits; the server answers again from ``up_at`` on."""

    def __init__(self, server: Server, up_at: float) -> None:
        self.t, self.server, self.up_at = 0.0, server, up_at
        self.waits: list[float | None] = []

    def now(self) -> float:
        return self.t

    def wait(self, cond: threading.Condition, timeout: float | None) -> bool:
        self.waits.append(timeout)
        assert timeout is not None, "outside an outage the thread waits for a kick, not a clock"
        self.t += timeout
        self.server.down = self.t < self.up_at
        return False


def run_outage(tmp_path: Path, up_at: float, enter: str) -> tuple[Clock, Server, Outbox]:
    server = Server()
    box = Outbox(tmp_path)
    clock = Clock(server, up_at)
    pub = Publisher(box, "run1", server.publish, "http://server", probe=server.probe, start=False, clock=clock.now,
                    wait=clock.wait)  # fmt: skip
    box.add(entry(1))
    box.add(entry(2))
    server.down = True
    if enter == "failed publish":
        pub.kick()  # a save kicks the thread; its pass fails and starts the outage
    else:
        pub.note_outage()  # an offline start: the outage is known before any pass
    while box.pending():
        assert pub.run_once()
        assert clock.t < 600, clock.waits
    assert pub._interval() is None  # the outage is over: the thread waits for the next kick
    pub.stop()
    assert not pub.run_once()
    return clock, server, box


@pytest.mark.parametrize(
    ("enter", "up_at", "waits"),
    [
        # Failed probes back off 1, 2, 2 ... s; a failed publish counts as one failure already.
        ("offline start", 0.5, [1.0]),
        ("offline start", 20.0, [1.0] + [2.0] * 10),
        ("failed publish", 0.5, [2.0]),
        ("failed publish", 20.0, [2.0] * 10),
    ],
)
def test_the_backlog_is_recorded_within_one_back_off_of_the_server_answering(
    tmp_path: Path, enter: str, up_at: float, waits: list[float]
) -> None:
    clock, server, _ = run_outage(tmp_path, up_at, enter)
    assert clock.waits == waits
    assert server.recorded == [1, 2]
    assert clock.t - up_at <= 2.0  # the longest back-off: well inside "within 10 s of the server answering"


def test_no_back_off_while_the_server_answers(tmp_path: Path) -> None:
    server = Server()
    pub = Publisher(Outbox(tmp_path), "run1", server.publish, "http://server", probe=server.probe, start=False)
    assert pub._interval() is None
    pub.note_outage()
    assert pub._interval() == 1.0
