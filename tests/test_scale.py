"""Resolution cost does not grow with the number of checkpoints: latest/best read one manifest, whatever n."""

from __future__ import annotations

from pathlib import Path

import torch

from tracked_ckpt import CheckpointManager, list_checkpoints
from tracked_ckpt.catalog import RunCatalog


class CountingCatalog(RunCatalog):
    """The real catalog, counting the manifests it reads."""

    reads: list[str]

    def _read(self, artifact: str) -> bytes:
        self.reads.append(artifact)
        return super()._read(artifact)


def test_latest_and_best_read_one_manifest_and_listing_reads_each_once(tmp_path: Path, experiment: str) -> None:
    model = torch.nn.Linear(2, 1)
    rewards = [float(i * 7 % 31) for i in range(1, 31)]  # distinct, the best in the middle
    best = rewards.index(max(rewards)) + 1
    with CheckpointManager(tmp_path / "ck", experiment=experiment, save_rng=False) as mgr:
        for step, reward in enumerate(rewards, 1):
            mgr.save(model, None, {"step": step, "reward": reward})
        catalog = CountingCatalog(mgr.store)
    catalog.reads = []
    assert catalog.resolve("latest").manifest.step == len(rewards)
    assert catalog.resolve("best").manifest.step == best
    assert len(catalog.reads) == 2, catalog.reads

    catalog.reads = []
    assert [r.manifest.step for r in catalog.scan()] == list(range(1, len(rewards) + 1))
    assert len(catalog.reads) == len(rewards)
    df = list_checkpoints(mgr.run_id)
    assert list(df["step"]) == list(range(1, len(rewards) + 1))
    assert df["is_best"].tolist().index(True) == best - 1
