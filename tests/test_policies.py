"""Save and retention policies as pure tables: no MLflow, no files."""

from __future__ import annotations

import math

import pytest

from tracked_ckpt import EveryInterval, EveryNSteps, KeepBest, KeepEvery, KeepLast, OnImprovement
from tracked_ckpt.errors import ConfigError
from tracked_ckpt.policies import AnyOf, CheckpointInfo, KeepAny, SaveContext, best_of, plan_deletions


def ctx(step: int, **kw: object) -> SaveContext:
    return SaveContext(step=step, now=kw.pop("now", 1000.0), **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("policy", "context", "expected"),
    [
        (EveryNSteps(10), ctx(10), True),
        (EveryNSteps(10), ctx(15), False),
        (EveryNSteps(10), ctx(0), True),
        (EveryNSteps(10), ctx(20, last_step=20), False),  # already saved at this step
        (EveryInterval(60), ctx(1, last_time=950.0), False),
        (EveryInterval(60), ctx(1, last_time=940.0), True),
        (EveryInterval(60), ctx(1, last_time=None), True),
        (EveryInterval.hours(2), ctx(1, last_time=1000.0 - 7199), False),
        (EveryInterval.hours(2), ctx(1, last_time=1000.0 - 7200), True),
        (OnImprovement(), ctx(1, metrics={"reward": 1.0}, best_value=0.5), True),
        (OnImprovement(), ctx(1, metrics={"reward": 0.5}, best_value=0.5), False),
        (OnImprovement(), ctx(1, metrics={"reward": 0.4}, best_value=0.5, mode="min"), True),
        (OnImprovement(min_delta=0.2), ctx(1, metrics={"reward": 0.6}, best_value=0.5), False),
        (OnImprovement(), ctx(1, metrics={"reward": math.nan}, best_value=None), False),
        (OnImprovement(), ctx(1, metrics={"reward": 0.1}, best_value=None), True),
        (OnImprovement(), ctx(1, metrics={}, best_value=0.1), False),
        (OnImprovement(), ctx(1, metrics={"loss": 0.1}, best_value=0.5, metric="loss", mode="min"), True),
        (EveryNSteps(10) | EveryInterval(60), ctx(7, last_time=900.0), True),
        (EveryNSteps(10) | EveryInterval(60), ctx(7, last_time=990.0), False),
        (EveryNSteps(10) | OnImprovement(), ctx(7, metrics={"reward": 2.0}, best_value=1.0), True),
    ],
)
def test_save_policies(policy: object, context: SaveContext, expected: bool) -> None:
    assert policy.should_save(context) is expected  # type: ignore[attr-defined]


def test_combinations_flatten() -> None:
    p = EveryNSteps(1) | EveryInterval(1) | OnImprovement()
    assert isinstance(p, AnyOf) and len(p.policies) == 3
    k = KeepLast(1) | KeepBest(1) | KeepEvery(5)
    assert isinstance(k, KeepAny) and len(k.policies) == 3


@pytest.mark.parametrize(
    "bad",
    [lambda: EveryNSteps(0), lambda: EveryNSteps(2.5), lambda: EveryInterval(0), lambda: KeepLast(0),
     lambda: KeepBest(-1), lambda: KeepEvery(0), lambda: AnyOf(object())],  # type: ignore[arg-type]
)
def test_invalid_policies_name_the_field(bad: object) -> None:
    with pytest.raises(ConfigError, match=r"\("):
        bad()  # type: ignore[operator]


def ck(seq: int, step: int, reward: float | None = None) -> CheckpointInfo:
    metrics = {} if reward is None else {"reward": reward}
    return CheckpointInfo(path=f"checkpoints/s{seq}", step=step, seq=seq, created=float(seq), metrics=metrics)


HISTORY = [ck(1, 10, 0.1), ck(2, 20, 0.9), ck(3, 30, 0.3), ck(4, 40, 0.2), ck(5, 50, 0.4), ck(6, 60, 0.0)]


def deleted(policy: object, protected: set[str] | None = None, mode: str = "max", history=HISTORY) -> list[int]:  # type: ignore[no-untyped-def]
    plan = plan_deletions(history, policy, metric="reward", mode=mode, protected=protected or set())  # type: ignore[arg-type]
    return [c.step for c in plan]


@pytest.mark.parametrize(
    ("policy", "protected", "mode", "expected_deleted"),
    [
        (None, None, "max", []),
        (KeepLast(2), None, "max", [10, 30, 40]),  # 20 is the best, 50/60 the last two
        (KeepLast(1), None, "min", [10, 20, 30, 40, 50]),  # min: 60 (0.0) is latest and best
        (KeepBest(2), None, "max", [10, 30, 40]),  # 20 and 50 best; 60 latest
        (KeepBest(1) | KeepLast(1), None, "max", [10, 30, 40, 50]),
        (KeepEvery(20), None, "max", [10, 30, 50]),
        (KeepLast(1), {"checkpoints/s1"}, "max", [30, 40, 50]),  # resumed-from is protected
    ],
)
def test_retention_table(policy: object, protected: set[str] | None, mode: str, expected_deleted: list[int]) -> None:
    assert deleted(policy, protected, mode) == expected_deleted


def test_retention_never_deletes_latest_or_best_even_if_policy_says_so() -> None:
    class KeepNothing:
        def keep(self, checkpoints: object, metric: str, mode: str) -> set[str]:
            return set()

    assert deleted(KeepNothing()) == [10, 30, 40, 50]


def test_best_of_ties_and_missing_metric() -> None:
    hist = [ck(1, 10, 0.5), ck(2, 20, None), ck(3, 30, 0.5), ck(4, 40, math.nan)]
    best = best_of(hist, "reward", "max")
    assert best is not None and best.step == 30  # ties: the later commit
    assert best_of([ck(1, 10)], "reward", "max") is None
    assert best_of([ck(1, 10, math.nan)], "reward", "max") is None  # a NaN reward is never the best
