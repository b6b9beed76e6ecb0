"""The state module: metadata validation as a table, the parts of a state, fit checks, and the RNG round trip."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import pytest
import torch

from tracked_ckpt.errors import CheckpointMismatchError, InvalidMetadataError
from tracked_ckpt.state import (
    MODEL_FILE,
    STATE_FILE,
    TrainingState,
    check_fits,
    gather,
    restore,
    split_files,
    split_metadata,
)


@pytest.mark.parametrize(
    ("metadata", "metrics", "values"),
    [
        (None, {}, {}),
        ({"step": 3, "loss": 0.5}, {"step": 3.0, "loss": 0.5}, {"step": 3, "loss": 0.5}),
        ({"flag": True, "name": "a", "none": None}, {}, {"flag": True, "name": "a", "none": None}),  # bools: no metric
        ({"t": torch.tensor(2.5), "n": np.float32(1.5), "i": np.int64(4)}, {"t": 2.5, "n": 1.5, "i": 4.0},
         {"t": 2.5, "n": 1.5, "i": 4}),
        ({"b": np.bool_(True)}, {}, {"b": True}),
        ({"cfg": {"lr": 0.1, "dims": (1, 2)}}, {}, {"cfg": {"lr": 0.1, "dims": [1, 2]}}),  # nested: values only
        ({"vec": torch.ones(2).tolist()}, {}, {"vec": [1.0, 1.0]}),
        ({"train/loss 1": 1}, {"train/loss 1": 1.0}, {"train/loss 1": 1}),
    ],
)  # fmt: skip
def test_numbers_become_metrics_and_every_value_is_kept_as_json(
    metadata: dict[str, Any] | None, metrics: dict[str, float], values: dict[str, Any]
) -> None:
    m = split_metadata(metadata)
    assert m.metrics == metrics and m.values == values


@pytest.mark.parametrize(
    ("metadata", "message"),
    [
        ([("step", 1)], "metadata must be a dict, got list"),
        ({1: 2}, "metadata key 1 is not a string"),
        ({"x": object()}, r"metadata\['x'\] is a builtins.object, which is neither a number nor JSON-serializable"),
        ({"x": torch.ones(2)}, r"metadata\['x'\] is a torch.Tensor"),  # not 0-d: no number
        ({"cfg": {1: "a"}}, r"metadata\['cfg'\] is a dict with non-string keys"),
        ({"cfg": {"inner": {1}}}, r"metadata\['cfg.inner'\] is a builtins.set"),
        ({"bad:name": 1.0}, "'bad:name' holds a number but is not a valid MLflow metric name"),
        ({"step": -1}, r"metadata\['step'\]=-1 must be a non-negative whole number"),
        ({"step": 1.5}, r"metadata\['step'\]=1.5 must be a whole number"),
        ({"epoch": float("inf")}, "must be a non-negative whole number"),
        ({"samples": 2.5}, r"metadata\['samples'\]=2.5 must be a whole number"),
        ({"step": "3"}, "must be a non-negative whole number"),
    ],
)
def test_bad_metadata_is_refused_naming_the_key(metadata: Any, message: str) -> None:
    with pytest.raises(InvalidMetadataError, match=message):
        split_metadata(metadata)


@pytest.mark.parametrize(
    ("metadata", "step", "epoch"),
    [({}, None, None), ({"step": 7.0}, 7, None), ({"steps": 8, "epoch": 2}, 8, 2), ({"step": 1, "steps": 9}, 1, None)],
)
def test_step_and_epoch(metadata: dict[str, Any], step: int | None, epoch: int | None) -> None:
    m = split_metadata(metadata)
    assert (m.step, m.epoch) == (step, epoch)


class StatefulLoader(torch.utils.data.DataLoader):  # type: ignore[type-arg]  # as torchdata's is
    def state_dict(self) -> dict[str, int]:
        return {"position": 0}

    def load_state_dict(self, state_dict: dict[str, int]) -> None:
        pass


def test_parts_name_each_stateful_and_refuse_what_is_not() -> None:
    model = torch.nn.Linear(2, 2)
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loader = StatefulLoader(list(range(4)))
    state = TrainingState(model=model, optimizer=opt, extra={"loader": loader, "ema": torch.nn.Linear(2, 2)})
    assert list(state.parts()) == ["model", "optimizer", "extra.loader", "extra.ema"]
    assert list(state.positions()) == ["extra.loader"]
    assert list(state.without_positions().parts()) == ["model", "optimizer", "extra.ema"]
    with pytest.raises(InvalidMetadataError, match="extra state 'n' is a int, which has no state_dict"):
        TrainingState(extra={"n": 3}).parts()  # type: ignore[dict-item]


@pytest.mark.parametrize(
    ("payload", "files"),
    [
        ({"model": 1}, [STATE_FILE]),
        ({"optimizer": 1}, [STATE_FILE]),
        ({"model": 1, "optimizer": 2}, [MODEL_FILE, STATE_FILE]),  # weights alone: export reads only model.pt
    ],
)
def test_split_files(payload: dict[str, Any], files: list[str]) -> None:
    split = split_files(payload)
    assert [name for name, _ in split] == files
    assert {k for _, part in split for k in part} == set(payload)


def test_check_fits_lists_every_difference_and_changes_nothing() -> None:
    saved_model = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.Linear(3, 2))
    opt = torch.optim.Adam(saved_model.parameters())
    saved_model(torch.ones(1, 4)).sum().backward()
    opt.step()
    payload = {"model": saved_model.state_dict(), "optimizer": opt.state_dict()}
    check_fits(payload, TrainingState(model=saved_model, optimizer=opt), "step 1")  # itself: fits

    live = torch.nn.Sequential(torch.nn.Linear(4, 5), torch.nn.Linear(5, 2), torch.nn.Linear(2, 2))
    before = {k: v.clone() for k, v in live.state_dict().items()}
    live_opt = torch.optim.Adam(live.parameters())
    state = TrainingState(model=live, optimizer=live_opt, scheduler=torch.optim.lr_scheduler.StepLR(live_opt, 1))
    with pytest.raises(CheckpointMismatchError) as e:
        check_fits(payload, state, "step 1 of run r")
    text = str(e.value)
    assert "step 1 of run r does not fit the objects passed to load(); nothing was changed" in text
    assert "model key '0.weight': checkpoint shape (3, 4), model shape (5, 4)" in text
    assert "model key '2.weight' is missing from the checkpoint" in text
    assert "optimizer param group 0: checkpoint has 4 parameters, the optimizer 6" in text
    assert "the checkpoint has no 'scheduler' state" in text
    assert all(torch.equal(v, before[k]) for k, v in live.state_dict().items())


def test_gather_and_restore_bring_every_rng_back() -> None:
    model = torch.nn.Linear(2, 2)
    payload, rng_json = gather(TrainingState(model=model), rng=True)
    payload["model"] = {k: v.clone() for k, v in payload["model"].items()}  # gathered by reference: keep a copy
    expected = (torch.rand(3), random.random(), np.random.rand())
    with torch.no_grad():
        model.weight.add_(1)
    moved_on = (torch.rand(5), random.random(), np.random.rand())
    assert not torch.equal(moved_on[0][:3], expected[0])
    restore(payload, rng_json, TrainingState(model=model))
    again = (torch.rand(3), random.random(), np.random.rand())
    assert torch.equal(expected[0], again[0]) and expected[1:] == again[1:]
    assert torch.equal(model.weight, payload["model"]["weight"])
    payload, rng_json = gather(TrainingState(model=model), rng=False)
    assert "rng" not in payload and rng_json == {}
