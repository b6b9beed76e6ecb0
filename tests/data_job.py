"""A training job that reads its data through a stateful loader, for exact-sample resume tests.

    python tests/data_job.py --save-dir D --experiment E --log L --out F [--loader torchdata|hf] [--workers N]
                             [--run-id R] [--die-after-step K]

Every step appends the sample indices of its batch to --log (``step i,j,k,l``); --die-after-step K SIGKILLs the
process right after step K. The loader (a shuffled torchdata StatefulDataLoader, or an HF datasets IterableDataset
streaming from a generator) is passed in ``extra=`` as a new user would; the model has dropout, so its weights
depend on both the sample order and the RNG.
"""

from __future__ import annotations

import argparse
import os
import signal
import warnings
from collections.abc import Iterable, Iterator
from typing import Any

import torch

from tracked_ckpt import CheckpointManager, EveryNSteps

SAMPLES, BATCH, EPOCHS, SAVE_EVERY = 40, 4, 2, 3  # 10 steps an epoch
warnings.filterwarnings("ignore", "'set_vital' is deprecated")  # torchdata 0.11 on torch 2.13


def features(i: int) -> torch.Tensor:
    return torch.sin(torch.arange(6, dtype=torch.float32) * (i + 1))


class Samples(torch.utils.data.Dataset[tuple[int, torch.Tensor]]):
    def __len__(self) -> int:
        return SAMPLES

    def __getitem__(self, i: int) -> tuple[int, torch.Tensor]:
        return i, features(i)


def _generate() -> Iterator[dict[str, Any]]:
    for i in range(SAMPLES):
        yield {"i": i, "x": features(i).tolist()}


def make_source(kind: str, workers: int) -> tuple[Any, Iterable[tuple[torch.Tensor, torch.Tensor]]]:
    """(the stateful object to checkpoint, the batches to iterate)."""
    if kind == "torchdata":
        from torchdata.stateful_dataloader import StatefulDataLoader

        loader = StatefulDataLoader(Samples(), batch_size=BATCH, shuffle=True, num_workers=workers)
        return loader, loader
    import datasets

    stream = datasets.IterableDataset.from_generator(_generate).with_format("torch")

    def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        rows = []
        for row in stream:
            rows.append(row)
            if len(rows) == BATCH:
                yield torch.stack([r["i"] for r in rows]), torch.stack([r["x"] for r in rows])
                rows = []

    class Epoch:  # a fresh generator per epoch, as ``for batch in loader`` would give
        def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
            return batches()

    return stream, Epoch()


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    for flag in ("--save-dir", "--experiment", "--log", "--out"):
        p.add_argument(flag, required=True)
    p.add_argument("--loader", choices=["torchdata", "hf"], default="torchdata")
    p.add_argument("--workers", type=int, default=0)
    p.add_argument("--run-id", default=None)
    p.add_argument("--die-after-step", type=int, default=None)
    args = p.parse_args(argv)

    torch.manual_seed(1234)
    model = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.ReLU(), torch.nn.Dropout(0.3), torch.nn.Linear(16, 1))
    opt = torch.optim.AdamW(model.parameters(), lr=0.01)
    state, batches = make_source(args.loader, args.workers)
    mgr = CheckpointManager(args.save_dir, experiment=args.experiment, run_id=args.run_id,
                            save_policy=EveryNSteps(SAVE_EVERY))  # fmt: skip
    meta = mgr.load(model, opt, extra={"loader": state})
    step, epoch = meta.get("step", 0), meta.get("epoch", 0)
    print(f"run_id {mgr.run_id} resumed_at {step}", flush=True)
    with open(args.log, "a") as log:
        while epoch < EPOCHS:
            if args.loader == "hf":
                state.set_epoch(epoch)  # HF's epoch loop; keeps a position just loaded for this epoch
            for idx, x in batches:
                step += 1
                log.write(f"{step} {','.join(str(int(i)) for i in idx)}\n")
                log.flush()  # in the kernel before the kill below
                loss = (model(x) - x.sum(1, keepdim=True)).pow(2).mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
                if mgr.should_save(step):
                    meta = {"step": step, "epoch": epoch, "samples": step * BATCH, "tokens": step * BATCH * 6}
                    mgr.save(model, opt, meta, extra={"loader": state})
                if step == args.die_after_step:
                    os.kill(os.getpid(), signal.SIGKILL)
            epoch += 1
    torch.save(model.state_dict(), args.out)
    mgr.close()


if __name__ == "__main__":
    main()
