"""What each framework adapter adds to the framework's own checkpoint save, on the local store.

    python benchmarks/frameworks.py                  # ~100 MB checkpoints, 5 saves each (a few minutes on 2 cores)
    python benchmarks/frameworks.py --width 256 --repeats 3     # small and quick (the smoke test uses this)

For each framework: the framework's save alone (``trainer._save_checkpoint`` for HF, ``trainer.save_checkpoint``
for Lightning, ``accelerator.save_state`` for Accelerate), then the same save followed by the adapter's call,
which the training thread waits for (hard links into ``save_dir`` staging); the rest of the recording (fsync,
BLAKE3, manifest, outbox, the run's artifacts, one ``log_batch``) runs on the manager's recording thread and is
timed apart ("behind"), waited for before the next save so that it never overlaps a measurement. Every save
writes a new folder, as in training. Medians; the target is ≤ 1.1x the framework's save alone.

None of the three frameworks fsyncs what it writes; the adapter does (a local commit is durable before it is
recorded), so a second baseline adds an fsync of every file the framework wrote: the ratio against it is
what the recording itself costs beyond durability.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def timed(fn: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def fsync_all(path: Path) -> float:
    """Seconds to fsync every file under ``path`` (a folder, or one file)."""
    t0 = time.perf_counter()
    for f in [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]:
        fd = os.open(f, os.O_RDONLY)
        os.fsync(fd)
        os.close(fd)
    return time.perf_counter() - t0


def mlp(width: int) -> torch.nn.Module:
    return torch.nn.Sequential(*[torch.nn.Linear(width, width) for _ in range(4)])


Times = tuple[list[float], list[float], list[float], list[float], list[float]]  # ..., with the adapter, behind, call


def bench_hf(width: int, repeats: int, work: Path) -> Times:
    from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainingArguments

    from tracked_ckpt.frameworks.hf import TrackedCheckpoints

    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=256, n_positions=32, n_embd=width, n_layer=4, n_head=4))
    data = [{"input_ids": torch.randint(0, 256, (32,)), "labels": torch.randint(0, 256, (32,))} for _ in range(4)]
    args = TrainingArguments(output_dir=str(work / "hf"), max_steps=1, save_strategy="no", use_cpu=True,
                             report_to="none", disable_tqdm=True, per_device_train_batch_size=2)  # fmt: skip
    trainer = Trainer(model=model, args=args, train_dataset=data)
    trainer.train()  # optimizer and scheduler state exist now
    tracked = TrackedCheckpoints(work / "hf-ckpt", experiment=f"bench-hf-{uuid.uuid4().hex[:6]}")
    tracked.on_train_begin(args, trainer.state, trainer.control)
    alone: list[float] = []
    durable: list[float] = []
    total: list[float] = []
    call: list[float] = []
    behind: list[float] = []
    for i in range(2 * repeats):
        trainer.state.global_step = 100 + i
        t_save = timed(lambda: trainer._save_checkpoint(trainer.model, None))
        if i % 2:
            call.append(timed(lambda: tracked.on_save(args, trainer.state, trainer.control)))
            total.append(t_save + call[-1])
            behind.append(timed(tracked.manager.wait))  # type: ignore[union-attr]
        else:
            alone.append(t_save)
            durable.append(t_save + fsync_all(work / "hf" / f"checkpoint-{100 + i}"))
    tracked.on_train_end(args, trainer.state, trainer.control)
    return alone, durable, total, behind, call


def bench_lightning(width: int, repeats: int, work: Path) -> Times:
    import lightning as L

    from tracked_ckpt import CheckpointManager
    from tracked_ckpt.frameworks.lightning import TrackedCheckpoints

    class M(L.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = mlp(width)

        def training_step(self, batch: Any, idx: int) -> torch.Tensor:
            return self.net(batch[0]).pow(2).mean()

        def configure_optimizers(self) -> Any:
            return torch.optim.AdamW(self.parameters())

    data = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(torch.randn(4, width)), batch_size=2)
    trainer = L.Trainer(max_steps=1, accelerator="cpu", logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, default_root_dir=str(work / "pl"))  # fmt: skip
    trainer.fit(M(), data)
    cb = TrackedCheckpoints()
    cb.trainer = trainer
    cb.manager = CheckpointManager(work / "pl-ckpt", experiment=f"bench-pl-{uuid.uuid4().hex[:6]}")
    alone: list[float] = []
    durable: list[float] = []
    total: list[float] = []
    call: list[float] = []
    behind: list[float] = []
    for i in range(2 * repeats):
        path = work / "pl" / f"step={i}.ckpt"
        t_save = timed(lambda: trainer.save_checkpoint(path))  # noqa: B023
        if i % 2:
            ckpt = {"global_step": 100 + i, "epoch": 0}
            call.append(timed(lambda: cb.saved(ckpt, path)))  # noqa: B023
            total.append(t_save + call[-1])
            behind.append(timed(cb.manager.wait))
        else:
            alone.append(t_save)
            durable.append(t_save + fsync_all(path))
    cb.manager.close()
    return alone, durable, total, behind, call


def bench_accelerate(width: int, repeats: int, work: Path) -> Times:
    from accelerate import Accelerator

    from tracked_ckpt.frameworks.accelerate import TrackedState

    accelerator = Accelerator(cpu=True)
    model = mlp(width)
    opt = torch.optim.AdamW(model.parameters())
    model, opt = accelerator.prepare(model, opt)
    model(torch.randn(2, width)).pow(2).mean().backward()
    opt.step()
    tracked = TrackedState(accelerator, work / "acc-ckpt", experiment=f"bench-acc-{uuid.uuid4().hex[:6]}")
    alone: list[float] = []
    durable: list[float] = []
    total: list[float] = []
    call: list[float] = []
    behind: list[float] = []
    for i in range(2 * repeats):
        out = work / "acc" / f"state_{i}"
        if i % 2:
            call.append(0.0)  # save_state wraps accelerator.save_state: the call is the total
            total.append(timed(lambda: tracked.save_state(out, {"step": 100 + i})))  # noqa: B023
            behind.append(timed(tracked.manager.wait))  # type: ignore[union-attr]
        else:
            alone.append(timed(lambda: accelerator.save_state(str(out))))  # noqa: B023
            durable.append(alone[-1] + fsync_all(out))
    tracked.close()
    return alone, durable, total, behind, call


Row = tuple[str, float, float, float, float, float]  # framework, alone, + fsync, with the adapter, behind, call (s)


def main(argv: list[str] | None = None) -> list[Row]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--width", type=int, default=1024, help="hidden width (1024: ~100 MB per checkpoint)")
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--only", default="hf,lightning,accelerate")
    a = p.parse_args(argv)
    benches = {"hf": bench_hf, "lightning": bench_lightning, "accelerate": bench_accelerate}
    rows = []
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-bench-") as tmp:
        old = os.getcwd()
        os.chdir(tmp)  # MLflow's local default store (sqlite:///mlflow.db, ./mlruns) in a fresh folder
        os.environ.setdefault("MLFLOW_TRACKING_URI", f"sqlite:///{tmp}/mlflow.db")
        try:
            for name in a.only.split(","):
                times = benches[name](a.width, a.repeats, Path(tmp))
                rows.append((name, *(statistics.median(t) for t in times)))  # type: ignore[arg-type]
        finally:
            os.chdir(old)
    print(f"\n| framework (width {a.width}) | save alone | save + fsync | with the adapter | ratio to alone "
          "(target ≤ 1.1x) | ratio to save + fsync | adapter call | behind (recording thread) |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|")
    for name, alone, durable, total, behind, call in rows:
        own = f"{call * 1000:.1f} ms" if call else "(in the total)"
        print(f"| {name} | {alone * 1000:.0f} ms | {durable * 1000:.0f} ms | {total * 1000:.0f} ms | "
              f"{total / alone:.2f}x | {total / durable:.2f}x | {own} | {behind * 1000:.0f} ms |")  # fmt: skip
    return rows


if __name__ == "__main__":
    main()
