"""When to save and what to keep: small, pure policy objects.

Policies see only numbers (step, metrics, time, earlier checkpoints) and do no I/O, so they are tested as
tables. Combine save policies with ``|`` (save when any says so) and retention policies with ``|``
(keep what any keeps). The manager adds its own protections on top: retention never deletes the latest
checkpoint, the best one, or the one the run resumed from.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Literal, Protocol, runtime_checkable

from .errors import ConfigError

Mode = Literal["max", "min"]


@dataclass(frozen=True)
class CheckpointInfo:
    """What policies (and views) know about one committed checkpoint."""

    path: str  # artifact path of the checkpoint folder inside its run
    step: int
    seq: int  # commit order within the run: 1, 2, 3, ...
    created: float  # unix seconds
    metrics: Mapping[str, float] = field(default_factory=dict)
    size: int = 0


@dataclass(frozen=True)
class SaveContext:
    """The facts a save policy decides on."""

    step: int
    now: float
    metrics: Mapping[str, float] = field(default_factory=dict)
    last_step: int | None = None
    last_time: float | None = None  # time of the last save, or when the manager started
    best_value: float | None = None  # best value of the monitored metric so far
    metric: str = "reward"
    mode: Mode = "max"


def is_better(value: float, best: float | None, mode: Mode, min_delta: float = 0.0) -> bool:
    """True when ``value`` improves on ``best`` (NaN never improves; anything beats None)."""
    if math.isnan(value):
        return False
    if best is None or math.isnan(best):
        return True
    return value > best + min_delta if mode == "max" else value < best - min_delta


def check_mode(mode: str) -> Mode:
    if mode not in ("max", "min"):
        raise ConfigError(f"mode={mode!r} is not a direction; pass mode='max' or mode='min'")
    return mode  # type: ignore[return-value]


# ----------------------------------------------------------------------------------------- save policies


@runtime_checkable
class SavePolicy(Protocol):
    def should_save(self, ctx: SaveContext) -> bool: ...


class _Combinable:
    def __or__(self, other: SavePolicy) -> AnyOf:
        return AnyOf(self, other)  # type: ignore[arg-type]


@dataclass(frozen=True)
class EveryNSteps(_Combinable):
    """Save when ``step`` is a multiple of ``n`` (and not already saved at this step)."""

    n: int

    def __post_init__(self) -> None:
        if not isinstance(self.n, int) or self.n < 1:
            raise ConfigError(f"EveryNSteps(n={self.n!r}): n must be a positive integer number of steps")

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.step % self.n == 0 and ctx.step != ctx.last_step


@dataclass(frozen=True)
class EveryInterval(_Combinable):
    """Save when at least ``seconds`` passed since the last save (or since the manager started)."""

    seconds: float

    def __post_init__(self) -> None:
        if not self.seconds > 0:
            raise ConfigError(f"EveryInterval(seconds={self.seconds!r}): pass a positive number of seconds")

    @classmethod
    def hours(cls, hours: float) -> EveryInterval:
        return cls(seconds=hours * 3600.0)

    def should_save(self, ctx: SaveContext) -> bool:
        return ctx.last_time is None or ctx.now - ctx.last_time >= self.seconds


@dataclass(frozen=True)
class OnImprovement(_Combinable):
    """Save when the monitored metric beats the best value so far (by more than ``min_delta``)."""

    min_delta: float = 0.0

    def should_save(self, ctx: SaveContext) -> bool:
        value = ctx.metrics.get(ctx.metric)
        return value is not None and is_better(value, ctx.best_value, ctx.mode, self.min_delta)


@dataclass(frozen=True, init=False)
class AnyOf(_Combinable):
    """Save when any of the policies says so."""

    policies: tuple[SavePolicy, ...]

    def __init__(self, *policies: SavePolicy) -> None:
        flat: list[SavePolicy] = []
        for p in policies:
            if not isinstance(p, SavePolicy):
                raise ConfigError(f"{p!r} is not a save policy: it needs a should_save(ctx) method")
            flat.extend(p.policies if isinstance(p, AnyOf) else (p,))
        object.__setattr__(self, "policies", tuple(flat))

    def should_save(self, ctx: SaveContext) -> bool:
        return any(p.should_save(ctx) for p in self.policies)


# ------------------------------------------------------------------------------------ retention policies


@runtime_checkable
class RetentionPolicy(Protocol):
    def keep(self, checkpoints: Sequence[CheckpointInfo], metric: str, mode: Mode) -> set[str]:
        """Return the paths of the checkpoints to keep; ``checkpoints`` are in commit order."""
        ...


class _KeepCombinable:
    def __or__(self, other: RetentionPolicy) -> KeepAny:
        return KeepAny(self, other)  # type: ignore[arg-type]


def _positive(name: str, value: int) -> None:
    if not isinstance(value, int) or value < 1:
        raise ConfigError(f"{name}={value!r}: pass a positive integer")


@dataclass(frozen=True)
class KeepLast(_KeepCombinable):
    """Keep the ``n`` most recently committed checkpoints."""

    n: int

    def __post_init__(self) -> None:
        _positive("KeepLast(n)", self.n)

    def keep(self, checkpoints: Sequence[CheckpointInfo], metric: str, mode: Mode) -> set[str]:
        return {c.path for c in sorted(checkpoints, key=lambda c: c.seq)[-self.n :]}


@dataclass(frozen=True)
class KeepBest(_KeepCombinable):
    """Keep the ``k`` checkpoints with the best monitored metric (ties: the later one wins)."""

    k: int

    def __post_init__(self) -> None:
        _positive("KeepBest(k)", self.k)

    def keep(self, checkpoints: Sequence[CheckpointInfo], metric: str, mode: Mode) -> set[str]:
        scored = [c for c in checkpoints if not math.isnan(c.metrics.get(metric, math.nan))]
        sign = 1.0 if mode == "max" else -1.0
        scored.sort(key=lambda c: (sign * c.metrics[metric], c.seq), reverse=True)
        return {c.path for c in scored[: self.k]}


@dataclass(frozen=True)
class KeepEvery(_KeepCombinable):
    """Keep every checkpoint whose step is a multiple of ``k`` (a sparse long-term history)."""

    k: int

    def __post_init__(self) -> None:
        _positive("KeepEvery(k)", self.k)

    def keep(self, checkpoints: Sequence[CheckpointInfo], metric: str, mode: Mode) -> set[str]:
        return {c.path for c in checkpoints if c.step % self.k == 0}


@dataclass(frozen=True, init=False)
class KeepAny(_KeepCombinable):
    """Keep what any of the policies keeps."""

    policies: tuple[RetentionPolicy, ...]

    def __init__(self, *policies: RetentionPolicy) -> None:
        flat: list[RetentionPolicy] = []
        for p in policies:
            if not isinstance(p, RetentionPolicy):
                raise ConfigError(f"{p!r} is not a retention policy: it needs a keep(...) method")
            flat.extend(p.policies if isinstance(p, KeepAny) else (p,))
        object.__setattr__(self, "policies", tuple(flat))

    def keep(self, checkpoints: Sequence[CheckpointInfo], metric: str, mode: Mode) -> set[str]:
        kept: set[str] = set()
        for p in self.policies:
            kept |= p.keep(checkpoints, metric, mode)
        return kept


def best_of(checkpoints: Sequence[CheckpointInfo], metric: str, mode: Mode) -> CheckpointInfo | None:
    """The checkpoint with the best value of ``metric`` (ties: the later commit); None if none has it.

    NaN never counts as best (as in KeepBest).
    """
    best: CheckpointInfo | None = None
    for c in sorted(checkpoints, key=lambda c: c.seq):
        value = c.metrics.get(metric)
        if value is None or math.isnan(value):
            continue
        if best is None or is_better(value, best.metrics[metric], mode) or value == best.metrics[metric]:
            best = c
    return best


def plan_deletions(
    checkpoints: Sequence[CheckpointInfo],
    policy: RetentionPolicy | None,
    *,
    metric: str,
    mode: Mode,
    protected: set[str],
) -> list[CheckpointInfo]:
    """The checkpoints that ``policy`` lets go, oldest first; never the latest, the best or ``protected``."""
    if policy is None or not checkpoints:
        return []
    keep = set(policy.keep(checkpoints, metric, mode)) | protected
    keep.add(max(checkpoints, key=lambda c: c.seq).path)
    best = best_of(checkpoints, metric, mode)
    if best is not None:
        keep.add(best.path)
    return [c for c in sorted(checkpoints, key=lambda c: c.seq) if c.path not in keep]
