"""Who decides, and how the ranks agree: the collaborator that makes one CheckpointManager work under torchrun.

A manager asks its ``Ranks`` four things: am I rank 0 (the one that decides and records), run this on rank 0 and
give every rank the answer (``on_rank0``), did any rank fail (``agree``), and what does every rank hold
(``gather``). In one process (``SingleProcess``) each question answers itself at no cost; under torchrun
(``TorchRun``) each is one collective on a gloo group of our own, so a background save never interleaves with the
training's own (e.g. NCCL) traffic. Two groups, made by every rank in the same order: ``ctl`` for the training
thread (decisions, loads, preemption), ``io`` for the save thread (shards written, commit).

A *node* is the set of ranks that share one save_dir on one host: a node-local disk. Its lowest rank is the node's
leader, which commits the node's files and queues them in the node's own outbox (docs/distributed.md).
"""

from __future__ import annotations

import pickle
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal, Protocol, TypeVar, cast

from ..errors import SaveError

T = TypeVar("T")
_PROBE = ".tracked_ckpt-node-"
Channel = Literal["ctl", "io"]


class Ranks(Protocol):
    """The questions a manager asks about the processes that save one checkpoint together."""

    rank: int
    world_size: int
    distributed: bool  # under torchrun (even at world size 1): checkpoints are DCP folders

    @property
    def is_rank0(self) -> bool: ...

    def on_rank0(self, fn: Callable[[], T], channel: Channel = "ctl") -> T:
        """Run ``fn`` on rank 0; every rank returns its result, or raises its exception."""
        ...

    def agree(self, err: BaseException | None, channel: Channel = "ctl") -> None:
        """Raise on every rank if any rank failed (its own error where it failed, else the first rank's)."""
        ...

    def gather(self, obj: Any, channel: Channel = "ctl") -> list[Any]:
        """Every rank's ``obj``, in rank order, on every rank."""
        ...

    def any(self, flag: bool) -> bool:
        """True on every rank if ``flag`` is True on any rank."""
        ...


class SingleProcess:
    """One process: it is rank 0, and every question answers itself."""

    rank = 0
    world_size = 1
    distributed = False

    @property
    def is_rank0(self) -> bool:
        return True

    def on_rank0(self, fn: Callable[[], T], channel: Channel = "ctl") -> T:
        return fn()

    def agree(self, err: BaseException | None, channel: Channel = "ctl") -> None:
        if err is not None:
            raise err

    def gather(self, obj: Any, channel: Channel = "ctl") -> list[Any]:
        return [obj]

    def any(self, flag: bool) -> bool:
        return flag


class TorchRun:
    """The ranks of an initialized ``torch.distributed`` process group (torchrun)."""

    distributed = True

    def __init__(self) -> None:
        import torch.distributed as dist

        self._dist = dist
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        # Two gloo groups, made by every rank in the same order; neither shares the training (e.g. NCCL) group.
        self._groups = {"ctl": dist.new_group(backend="gloo"), "io": dist.new_group(backend="gloo")}

    @property
    def is_rank0(self) -> bool:
        return self.rank == 0

    def on_rank0(self, fn: Callable[[], T], channel: Channel = "ctl") -> T:
        box: list[Any] = [None]
        if self.rank == 0:
            try:
                box[0] = ("ok", fn())
            except Exception as e:
                box[0] = ("err", portable(e, 0))
                self._dist.broadcast_object_list(box, src=0, group=self._groups[channel])
                raise
        self._dist.broadcast_object_list(box, src=0, group=self._groups[channel])
        kind, value = box[0]
        if kind == "err":
            raise value
        return cast(T, value)

    def agree(self, err: BaseException | None, channel: Channel = "ctl") -> None:
        errors = self.gather(None if err is None else portable(err, self.rank), channel)
        first = next((e for e in errors if e is not None), None)
        if first is not None:
            raise err if err is not None else first

    def gather(self, obj: Any, channel: Channel = "ctl") -> list[Any]:
        out: list[Any] = [None] * self.world_size
        self._dist.all_gather_object(out, obj, group=self._groups[channel])
        return out

    def any(self, flag: bool) -> bool:
        return any(self.gather(flag))

    @property
    def io_group(self) -> Any:
        """The process group that DCP's save collectives run on (the save thread's)."""
        return self._groups["io"]

    @property
    def ctl_group(self) -> Any:
        return self._groups["ctl"]


def current() -> Ranks:
    """``TorchRun`` when a default process group is up (torchrun), else ``SingleProcess``."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return TorchRun()
    return SingleProcess()


def node_of(ranks: Ranks, save_dir: Path) -> list[int]:
    """The ranks that share this rank's save_dir (one node-local disk, or one shared filesystem), lowest first.

    Each rank leaves a probe file in its save_dir and looks for the others': whatever the host names and paths,
    ranks that see each other's probes write into one folder.
    """
    if not ranks.distributed:
        return [ranks.rank]
    token = ranks.on_rank0(lambda: uuid.uuid4().hex[:12])
    save_dir.mkdir(parents=True, exist_ok=True)
    probe = save_dir / f"{_PROBE}{token}-{ranks.rank}"
    probe.touch()
    try:
        ranks.gather(None)  # every rank's probe is written
        seen = sorted(int(p.name.rpartition("-")[2]) for p in save_dir.glob(f"{_PROBE}{token}-*"))
        ranks.gather(None)  # every rank has looked
    finally:
        probe.unlink(missing_ok=True)
    return seen


def portable(e: BaseException, rank: int) -> BaseException:
    """The exception itself when it pickles (to re-raise it on every rank), else a SaveError describing it."""
    try:
        pickle.loads(pickle.dumps(e))
        return e
    except Exception:
        return SaveError(f"rank {rank}: {type(e).__name__}: {e}")
