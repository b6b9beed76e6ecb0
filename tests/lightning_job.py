"""A tiny Lightning job for tests/test_lightning.py: an MLP on synthetic data, MLFlowLogger, ModelCheckpoint.

    python lightning_job.py OUT_WEIGHTS [--kill-at STEP] [--resume RUN_ID] [--tracked] [--stateful LOG]

Prints ``RUN_ID <id>`` once the run is known; ``--kill-at`` SIGKILLs the process after that training step.
``--stateful LOG``: a shuffled torchdata StatefulDataLoader, a checkpoint every 3 steps (mid-epoch), and the sample
indices of every step appended to LOG.
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from typing import Any

import lightning as L
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import MLFlowLogger

from tracked_ckpt.frameworks.lightning import TrackedCheckpoints, resume_path

EPOCHS, BATCHES = 4, 8


class MLP(L.LightningModule):
    def __init__(self, log: str | None = None) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 1))
        self.sample_log = log

    def training_step(self, batch: Any, idx: int) -> torch.Tensor:
        x, y = batch[-2:]
        if self.sample_log:  # (index, x, y) batches: log which samples this step reads
            with open(self.sample_log, "a") as f:
                f.write(f"{self.global_step + 1} {','.join(str(int(i)) for i in batch[0])}\n")
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True)
        return loss

    def configure_optimizers(self) -> Any:
        return torch.optim.AdamW(self.parameters(), lr=1e-2)


def loader(stateful: bool = False) -> Any:
    g = torch.Generator().manual_seed(7)
    x = torch.randn(BATCHES * 8, 8, generator=g)
    y = x.sum(dim=1, keepdim=True) + 0.1 * torch.randn(BATCHES * 8, 1, generator=g)
    if not stateful:
        return torch.utils.data.DataLoader(torch.utils.data.TensorDataset(x, y), batch_size=8, shuffle=False)
    from torchdata.stateful_dataloader import StatefulDataLoader

    indexed = torch.utils.data.TensorDataset(torch.arange(BATCHES * 8), x, y)
    return StatefulDataLoader(indexed, batch_size=8, shuffle=True)  # Lightning saves its state in the .ckpt


class Kill(L.Callback):
    """SIGKILL after step ``at``, once the saves so far are committed (their fsync and hash run in the background)."""

    def __init__(self, at: int, tracked: TrackedCheckpoints | None) -> None:
        self.at, self.tracked = at, tracked

    def on_train_batch_end(self, trainer: Any, *args: Any) -> None:
        if trainer.global_step == self.at:
            if self.tracked is not None and self.tracked.manager is not None:
                self.tracked.manager.wait()
            sys.stdout.flush()
            os.kill(os.getpid(), signal.SIGKILL)


class PrintRun(L.Callback):
    def __init__(self, tracked: TrackedCheckpoints) -> None:
        self.tracked = tracked

    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self.tracked.manager is not None:
            print("RUN_ID", self.tracked.manager.run_id, flush=True)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser()
    p.add_argument("out_weights")
    p.add_argument("--kill-at", type=int)
    p.add_argument("--resume")
    p.add_argument("--tracked", action="store_true")
    p.add_argument("--stateful", metavar="LOG")
    a = p.parse_args(argv)
    L.seed_everything(0, verbose=False)
    model = MLP(a.stateful)
    checkpoints = ModelCheckpoint(dirpath="ckpts", monitor="train_loss", mode="min", save_top_k=2)
    if a.stateful:
        checkpoints = ModelCheckpoint(dirpath="ckpts", every_n_train_steps=3, save_top_k=-1)
    callbacks: list[Any] = [checkpoints]
    logger: Any = False
    if a.tracked or a.resume:
        logger = MLFlowLogger(experiment_name=os.environ["MLFLOW_EXPERIMENT_NAME"], run_id=a.resume,
                              tracking_uri=os.environ["MLFLOW_TRACKING_URI"])  # fmt: skip
        tracked = TrackedCheckpoints()
        callbacks += [tracked, PrintRun(tracked)]
    if a.kill_at:
        callbacks.append(Kill(a.kill_at, tracked if a.tracked or a.resume else None))
    trainer = L.Trainer(max_epochs=EPOCHS, accelerator="cpu", devices=1, logger=logger, callbacks=callbacks,
                        enable_progress_bar=False, enable_model_summary=False, log_every_n_steps=1)  # fmt: skip
    ckpt = resume_path(a.resume, "restore") if a.resume else None
    trainer.fit(model, loader(bool(a.stateful)), ckpt_path=ckpt)
    print("FINAL_STEP", trainer.global_step, flush=True)
    torch.save(model.state_dict(), a.out_weights)


if __name__ == "__main__":
    main()
