"""A tiny Hugging Face Trainer job for tests/test_hf.py: a 1-layer GPT-2 built from a config, synthetic tokens.

    python hf_job.py OUT_WEIGHTS [--kill-at STEP] [--resume RUN_ID] [--tracked] [--report-mlflow] [--log LOG]

Prints ``RUN_ID <id>`` once the run is known. ``--kill-at`` SIGKILLs the process at the end of that step.
``--log`` appends the sample indices of every batch the Trainer's loader yields to LOG (one line a batch).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import torch
from transformers import GPT2Config, GPT2LMHeadModel, Trainer, TrainerCallback, TrainingArguments

from tracked_ckpt.frameworks.hf import TrackedCheckpoints, resume_folder

MAX_STEPS, SAVE_STEPS, LIMIT = 12, 3, 2


def dataset() -> list[dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(0, 64, (40, 16), generator=g)  # 40 samples, batch 4: 10 steps an epoch
    return [{"input_ids": row, "labels": row.clone(), "idx": i} for i, row in enumerate(ids)]


def collator(log: str | None) -> Any:
    """HF's default collator, less the sample index, which goes to ``log``."""
    from transformers import default_data_collator

    def collate(rows: list[dict[str, Any]]) -> dict[str, Any]:
        if log:
            with open(log, "a") as f:
                f.write(",".join(str(r["idx"]) for r in rows) + "\n")
        return default_data_collator([{k: v for k, v in r.items() if k != "idx"} for r in rows])  # type: ignore[no-any-return]

    return collate


class Kill(TrainerCallback):  # type: ignore[misc]
    """SIGKILL after step ``at``, once the saves so far are committed (their fsync and hash run in the background)."""

    def __init__(self, at: int, tracked: TrackedCheckpoints | None) -> None:
        self.at, self.tracked = at, tracked

    def on_step_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if state.global_step == self.at:
            if self.tracked is not None and self.tracked.manager is not None:
                self.tracked.manager.wait()
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class PrintRun(TrainerCallback):  # type: ignore[misc]
    def __init__(self, tracked: TrackedCheckpoints) -> None:
        self.tracked = tracked

    def on_train_begin(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.tracked.manager is not None:
            print("RUN_ID", self.tracked.manager.run_id, flush=True)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_weights")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume")
    p.add_argument("--tracked", action="store_true")
    p.add_argument("--report-mlflow", action="store_true")
    p.add_argument("--log")
    a = p.parse_args()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(vocab_size=64, n_positions=16, n_embd=32, n_layer=1, n_head=2))
    args = TrainingArguments(
        output_dir="out", max_steps=MAX_STEPS, save_steps=SAVE_STEPS, save_total_limit=LIMIT, logging_steps=1,
        per_device_train_batch_size=4, learning_rate=1e-3, seed=0, use_cpu=True, dataloader_num_workers=0,
        report_to=["mlflow"] if a.report_mlflow else "none", disable_tqdm=True, remove_unused_columns=False,
    )  # fmt: skip
    callbacks: list[Any] = []
    if a.tracked or a.resume:
        tracked = TrackedCheckpoints(run_id=a.resume if not a.report_mlflow else None)
        callbacks += [tracked, PrintRun(tracked)]
    if a.kill_at:
        callbacks.append(Kill(a.kill_at, tracked if a.tracked or a.resume else None))
    trainer = Trainer(model=model, args=args, train_dataset=dataset(), data_collator=collator(a.log),
                      callbacks=callbacks)  # fmt: skip
    resume = resume_folder(a.resume, args.output_dir) if a.resume else None
    trainer.train(resume_from_checkpoint=resume)
    print("FINAL_STEP", trainer.state.global_step, flush=True)
    torch.save(model.state_dict(), a.out_weights)


if __name__ == "__main__":
    main()
