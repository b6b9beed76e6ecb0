"""Resuming deep into an epoch: time from ``load()`` to the first batch, against the same at the epoch's start.

    python benchmarks/data_position.py                        # 10^6 samples in, 7 repeats (about a minute)
    python benchmarks/data_position.py --position 10000 --repeats 3   # small and quick

A cheap synthetic map-style dataset (``--samples``, default 2 x 10^6: each sample is its index) read by a torchdata
``StatefulDataLoader`` (``--workers``, default 0), shuffled two ways: ``shuffle=True`` (torchdata's own stateful
RandomSampler) and ``OffsetShuffle`` below (a permutation of (seed, epoch) plus an offset into it). For each, two
checkpoints of a tiny model on a local sqlite store: at the epoch's start and ``--position`` samples into it. Each
repeat builds a fresh loader and times ``load(model, data=loader)`` plus ``next(iter(loader))``; medians, the cases
alternating. Target: deep / start <= 1.1x (no cost that grows with the position). Baseline: torchdata alone, a fresh
loader given the same state by its own ``load_state_dict``. For scale, reading the position one batch at a time
(what a resume without a data position does, as HF's Trainer does for a stream) is timed once.
"""

from __future__ import annotations

import argparse
import copy
import statistics
import sys
import tempfile
import time
import uuid
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
warnings.filterwarnings("ignore", "'set_vital' is deprecated")  # torchdata 0.11 on torch 2.13


class Indices(torch.utils.data.Dataset[int]):
    def __init__(self, n: int) -> None:
        self.n = n

    def __len__(self) -> int:
        return self.n

    def __getitem__(self, i: int) -> int:
        return i


class OffsetShuffle(torch.utils.data.Sampler[int]):
    """A shuffled order restored in O(1): the permutation of (seed, epoch), and how far into it (0 workers)."""

    def __init__(self, n: int, seed: int = 0) -> None:
        self.n, self.seed, self.epoch, self.offset = n, seed, 0, 0

    def __len__(self) -> int:
        return self.n

    def __iter__(self) -> Iterator[int]:
        perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + self.epoch))
        for i in perm[self.offset :].tolist():
            self.offset += 1
            yield i
        self.epoch, self.offset = self.epoch + 1, 0

    def state_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "offset": self.offset}

    def load_state_dict(self, state: dict[str, int]) -> None:
        self.epoch, self.offset = state["epoch"], state["offset"]


def make_loader(a: argparse.Namespace, kind: str) -> Any:
    from torchdata.stateful_dataloader import StatefulDataLoader

    torch.manual_seed(0)
    if kind == "offset":
        return StatefulDataLoader(Indices(a.samples), a.batch, sampler=OffsetShuffle(a.samples), num_workers=a.workers)
    return StatefulDataLoader(Indices(a.samples), a.batch, shuffle=True, num_workers=a.workers)


def first_batch(a: argparse.Namespace, kind: str, restore: Callable[[Any], None]) -> tuple[float, Any]:
    """A fresh loader, ``restore(loader)``, then its first batch: (seconds, the batch)."""
    loader = make_loader(a, kind)
    t0 = time.perf_counter()
    restore(loader)
    batch = next(iter(loader))
    return time.perf_counter() - t0, batch


def bench(a: argparse.Namespace, kind: str, uri: str, work: Path) -> tuple[dict[str, list[float]], float]:
    """(times by case, seconds to read the position one batch at a time) for one way of shuffling."""
    from tracked_ckpt import CheckpointManager

    mgr = CheckpointManager(work / kind, tracking_uri=uri, experiment=f"bench-data-{uuid.uuid4().hex[:6]}")
    model, loader = torch.nn.Linear(4, 4), make_loader(a, kind)
    mgr.save(model, metadata={"step": 1, "samples": 0}, data=loader)  # the epoch's start
    states = {1: copy.deepcopy(loader.state_dict())}
    it, t0 = iter(loader), time.perf_counter()
    for _ in range(a.position // a.batch):
        next(it)
    skip_s = time.perf_counter() - t0
    mgr.save(model, metadata={"step": 2, "samples": a.position}, data=loader)
    states[2] = copy.deepcopy(loader.state_dict())
    want = next(it)  # the batch a resumed loader must yield first
    times: dict[str, list[float]] = {k: [] for k in ("start", "deep", "alone start", "alone deep")}
    for _ in range(a.repeats):  # alternating, so that drifting load on the machine hits every case alike
        for step, case in ((1, "start"), (2, "deep")):
            took, batch = first_batch(a, kind, lambda ld, s=step: mgr.load(torch.nn.Linear(4, 4), which=s, data=ld))
            times[case].append(took)
            took, alone = first_batch(a, kind, lambda ld, s=step: ld.load_state_dict(copy.deepcopy(states[s])))
            times[f"alone {case}"].append(took)
            assert step == 1 or (torch.equal(batch, want) and torch.equal(alone, want)), "not resumed at the next batch"
    mgr.close()
    return times, skip_s


def main(argv: list[str] | None = None) -> dict[str, float]:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=2_000_000)
    p.add_argument("--position", type=int, default=1_000_000, help="samples into the epoch (a multiple of --batch)")
    p.add_argument("--batch", type=int, default=64)
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--repeats", type=int, default=7)
    p.add_argument("--tracking-uri", default=None, help="an existing store (default: a new sqlite one, removed after)")
    a = p.parse_args(argv)
    print(f"position {a.position:,} samples into an epoch of {a.samples:,}, batch {a.batch}, workers {a.workers}, "
          f"medians of {a.repeats}")  # fmt: skip
    figures: dict[str, float] = {}
    with tempfile.TemporaryDirectory(prefix="bench-data-") as tmp:
        for kind in ("shuffle", "offset"):
            times, skip_s = bench(a, kind, a.tracking_uri or f"sqlite:///{tmp}/mlflow.db", Path(tmp))
            med = {case: statistics.median(v) for case, v in times.items()}
            figures.update({f"{kind} {case}": m for case, m in med.items()})
            figures[f"{kind} ratio"] = med["deep"] / med["start"]
            figures[f"{kind} read"] = skip_s
            print(f"{'shuffle=True' if kind == 'shuffle' else 'OffsetShuffle'}:")
            for case, m in med.items():
                who = "torchdata load_state_dict" if case.startswith("alone") else "tracked_ckpt load()"
                print(f"  {who + ' + first batch, ' + case.split()[-1]:55s} {m * 1e3:8.1f} ms "
                      f"(min {min(times[case]) * 1e3:.1f})")  # fmt: skip
            print(f"  {'deep / start, tracked_ckpt (target <= 1.1x)':55s} {med['deep'] / med['start']:8.2f}x")
            print(f"  {'deep / start, torchdata alone':55s} {med['alone deep'] / med['alone start']:8.2f}x")
            print(f"  {'deep: tracked_ckpt / torchdata alone':55s} {med['deep'] / med['alone deep']:8.2f}x")
            print(f"  {'reading the position one batch at a time (once)':55s} {skip_s * 1e3:8.1f} ms")
    return figures


if __name__ == "__main__":
    main()
