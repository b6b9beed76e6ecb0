"""The run-tag layout: summary tags and the monitor encoding, as tables."""

from __future__ import annotations

import math

import pytest

from tracked_ckpt.policies import CheckpointInfo
from tracked_ckpt.runtags import monitor_of, monitor_value, pruned_value, summary_tags


def info(seq: int, step: int, reward: float, size: int = 10) -> CheckpointInfo:
    return CheckpointInfo(f"checkpoints/step-{step:08d}", step, seq, 0.0, {"reward": reward}, size)


def test_summary_of_nothing_has_no_latest_or_best() -> None:
    assert summary_tags([], "reward", "max") == {
        "tracked_ckpt.count": "0", "tracked_ckpt.bytes": "0", "tracked_ckpt.monitor": "reward:max",
    }  # fmt: skip


@pytest.mark.parametrize(
    ("mode", "best_step"), [("max", 20), ("min", 30)],
)  # fmt: skip
def test_summary_names_latest_by_commit_order_and_best_by_metric(mode: str, best_step: int) -> None:
    infos = [info(1, 10, 1.0), info(2, 20, 5.0), info(3, 30, -1.0), info(4, 5, math.nan)]
    tags = summary_tags(infos, "reward", mode)  # type: ignore[arg-type]
    assert tags["tracked_ckpt.latest"] == "checkpoints/step-00000005"  # seq 4: the newest, whatever its step
    assert tags["tracked_ckpt.latest_step"] == "5"
    assert tags["tracked_ckpt.best_step"] == str(best_step)  # NaN is never best
    assert tags["tracked_ckpt.count"] == "4" and tags["tracked_ckpt.bytes"] == "40"
    assert float(tags["tracked_ckpt.best_value"]) == {"max": 5.0, "min": -1.0}[mode]


@pytest.mark.parametrize(
    ("tags", "metric", "mode", "expected"),
    [
        ({}, None, None, ("reward", "max")),
        ({"tracked_ckpt.monitor": "loss:min"}, None, None, ("loss", "min")),
        ({"tracked_ckpt.monitor": "val:acc:max"}, None, None, ("val:acc", "max")),  # a metric name with a colon
        ({"tracked_ckpt.monitor": "loss:sideways"}, None, None, ("loss", "max")),
        ({"tracked_ckpt.monitor": "loss:min"}, "reward", "max", ("reward", "max")),  # arguments win
    ],
)
def test_monitor_round_trips_and_defaults(
    tags: dict[str, str], metric: str | None, mode: str | None, expected: tuple[str, str]
) -> None:
    assert monitor_of(tags, metric, mode) == expected
    assert monitor_of({"tracked_ckpt.monitor": monitor_value(*expected)}) == expected  # type: ignore[arg-type]


def test_pruned_value_is_short_enough_for_the_ui() -> None:
    assert pruned_value([info(1, 1, 0.0), info(2, 2, 0.0)]) == "step 1, step 2"
    assert len(pruned_value([info(i, i, 0.0) for i in range(1, 1000)])) == 500
