"""Async save's parts: the staging copy (values, sharing, reused buffers) and the one-thread saver's error reporting."""

from __future__ import annotations

import threading
from collections import OrderedDict, namedtuple
from typing import Any

import pytest
import torch

from tracked_ckpt.errors import SaveError
from tracked_ckpt.snapshot import BackgroundSaver, StagingBuffers

Pair = namedtuple("Pair", "a b")


def payload() -> dict[str, Any]:
    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    shared = torch.arange(6.0)
    return {
        "model": model.state_dict(),  # an OrderedDict with _metadata
        "param": torch.nn.Parameter(torch.ones(2)),
        "nested": [shared, (shared, Pair(torch.zeros(1), "x")), {"step": 3, "none": None, "dtype": torch.float16}],
        "view": torch.arange(12.0).reshape(3, 4).t(),  # not contiguous
        "ints": torch.arange(4, dtype=torch.int64),
        "other": {"set": {1, 2}},
    }


def test_the_copy_equals_the_payload_and_owns_its_memory() -> None:
    src = payload()
    out = StagingBuffers().copy(src)
    assert out["nested"][2] == {"step": 3, "none": None, "dtype": torch.float16}
    assert isinstance(out["model"], OrderedDict) and out["model"]._metadata == src["model"]._metadata
    assert isinstance(out["param"], torch.nn.Parameter) and torch.equal(out["param"], src["param"])
    assert isinstance(out["nested"][1][1], Pair) and out["nested"][1][1].b == "x"
    assert torch.equal(out["view"], src["view"]) and torch.equal(out["ints"], src["ints"])
    assert out["other"] == {"set": {1, 2}} and out["other"]["set"] is not src["other"]["set"]
    for k, v in src["model"].items():
        assert torch.equal(out["model"][k], v) and out["model"][k].data_ptr() != v.data_ptr()
    with torch.no_grad():  # training goes on: the copy does not move
        src["nested"][0].add_(100)
        src["view"].mul_(0)
    assert out["nested"][0][0] == 0 and out["view"].abs().sum() > 0


def test_a_tensor_shared_in_the_payload_stays_shared_in_the_copy() -> None:
    out = StagingBuffers().copy(payload())
    assert out["nested"][0] is out["nested"][1][0]


def test_buffers_are_reused_while_shapes_hold_and_dropped_with_their_keys() -> None:
    staging = StagingBuffers()
    first = staging.copy({"a": torch.ones(4), "b": torch.ones(2)})
    nbytes = staging.nbytes
    second = staging.copy({"a": torch.full((4,), 2.0), "b": torch.ones(3)})
    assert second["a"].data_ptr() == first["a"].data_ptr() and torch.equal(second["a"], torch.full((4,), 2.0))
    assert second["b"].data_ptr() != first["b"].data_ptr()  # a new shape: a new buffer
    assert staging.nbytes == nbytes + 4
    staging.copy({"a": torch.ones(4)})
    assert staging.nbytes == 16  # "b" left the state: its buffer is dropped
    staging.clear()
    assert staging.nbytes == 0


def test_the_saver_reports_the_first_failure_once_and_keeps_going() -> None:
    saver = BackgroundSaver()
    done: list[int] = []
    gate = threading.Event()

    def fail() -> None:
        raise OSError("disk full")

    saver.submit(1, lambda: (gate.wait(), done.append(1)))
    saver.submit(2, fail, wait=False)  # queued behind step 1
    saver.submit(3, lambda: (_ for _ in ()).throw(SaveError("step 3: refused")), wait=False)
    gate.set()
    with pytest.raises(SaveError, match="background save of step 2 failed: OSError: disk full") as e:
        saver.wait()
    assert isinstance(e.value.__cause__, OSError)
    saver.wait()  # reported once
    saver.submit(4, lambda: done.append(4))
    assert saver.close() is None and done == [1, 4]


def test_close_returns_a_failure_not_yet_reported() -> None:
    saver = BackgroundSaver()
    saver.submit(5, lambda: 1 / 0)
    error = saver.close()
    assert isinstance(error, SaveError) and "step 5" in str(error) and "ZeroDivisionError" in str(error)
    assert saver.close() is None  # closed twice: nothing new
