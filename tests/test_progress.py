"""The progress line: units as a table; silent off a terminal; drawn in place, never backwards, ended on close."""

from __future__ import annotations

import io

import pytest

from tracked_ckpt.progress import MIN_BYTES, Progress, human_bytes


@pytest.mark.parametrize(
    ("n", "text"),
    [(0, "0 B"), (999, "999 B"), (1000, "1.0 kB"), (1_234_567, "1.2 MB"), (5e9, "5.0 GB"), (7e12, "7.0 TB"),
     (3e15, "3000.0 TB")],
)  # fmt: skip
def test_human_bytes(n: float, text: str) -> None:
    assert human_bytes(n) == text


def test_nothing_is_written_off_a_terminal() -> None:
    out = io.StringIO()  # not a TTY: a pipe, a log file, CI
    with Progress(10 * MIN_BYTES, "download", out) as p:
        assert not p.enabled
        p.update_to(MIN_BYTES)
    assert out.getvalue() == ""


class Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_small_transfers_draw_nothing_even_on_a_terminal() -> None:
    assert not Progress(MIN_BYTES - 1, "x", Terminal()).enabled
    assert Progress(MIN_BYTES, "x", Terminal()).enabled


def test_the_line_is_redrawn_in_place_never_backwards_and_ended_on_close() -> None:
    out = Terminal()
    p = Progress(2_000_000, "model.pt", out)
    p.update_to(1_000_000)
    p.update_to(500_000)  # a retry restarting a part does not move the bar back
    assert p.done == 1_000_000
    p.advance(5_000_000)
    assert p.done == 2_000_000  # capped at the total
    p.close()
    p.close()  # once
    text = out.getvalue()
    assert text.startswith("\rmodel.pt   50%  1.0 MB / 2.0 MB") and text.endswith("\n") and text.count("\n") == 1
    assert "model.pt  100%  2.0 MB / 2.0 MB" in text
