"""Training state: gather it from live objects, check that a checkpoint fits them, restore it.

Everything goes through the ``state_dict`` / ``load_state_dict`` protocol. Tensors (and the torch RNG)
go to ``state.pt``, loaded with ``weights_only=True``; the Python and NumPy RNG go to ``rng.json``;
user metadata goes to the manifest. RNG is restored last, so nothing after it draws random numbers.
"""

from __future__ import annotations

import math
import numbers
import random
import re
from collections.abc import Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, cast, runtime_checkable

import numpy as np
import torch

from .errors import CheckpointMismatchError, InvalidMetadataError

STATE_FILE = "state.pt"
# The model's weights alone, beside state.pt (since 0.3): a follower that needs only the model fetches only this
# file (with Adam, about a third of the bytes). Older checkpoints hold everything in state.pt; both load.
MODEL_FILE = "model.pt"
RNG_FILE = "rng.json"
# Metadata keys for how far into the data a checkpoint is, counted over all ranks: logged as metrics at its step.
SEEN_KEYS = ("samples", "tokens")
_METRIC_NAME = re.compile(r"^[\w./\- ]{1,250}$")


@runtime_checkable
class Stateful(Protocol):
    def state_dict(self) -> Any: ...
    def load_state_dict(self, state_dict: Any) -> Any: ...


@dataclass
class TrainingState:
    """The live objects a checkpoint captures; ``extra`` maps names to any other Stateful.

    ``data`` holds data positions by part name ("data", "data.<name>"; data.py): like loaders and datasets found
    in ``extra``, they are saved per data-parallel rank under torchrun.
    """

    model: Stateful | None = None
    optimizer: Stateful | None = None
    scheduler: Stateful | None = None
    scaler: Stateful | None = None
    extra: Mapping[str, Stateful] = field(default_factory=dict)
    data: Mapping[str, Stateful] = field(default_factory=dict)

    def parts(self) -> dict[str, Stateful]:
        named = {"model": self.model, "optimizer": self.optimizer, "scheduler": self.scheduler}
        named["scaler"] = self.scaler
        parts = {k: v for k, v in named.items() if v is not None}
        parts.update(self.data)
        for name, obj in self.extra.items():
            if not isinstance(obj, Stateful):
                raise InvalidMetadataError(
                    f"extra state {name!r} is a {type(obj).__name__}, which has no state_dict()/"
                    "load_state_dict(); wrap it in an object that has both"
                )
            parts[f"extra.{name}"] = obj
        return parts

    def positions(self) -> dict[str, Stateful]:
        """The parts that are data positions: ``data`` and the loaders/datasets passed in ``extra``."""
        return {**self.data, **{f"extra.{n}": o for n, o in self.extra.items() if _is_loader(o)}}

    def without_positions(self) -> TrainingState:
        """The same state less its data positions (``load(..., skip_data=True)``)."""
        return replace(self, extra={n: o for n, o in self.extra.items() if not _is_loader(o)}, data={})


def _is_loader(obj: object) -> bool:
    """A torch DataLoader (torchdata's StatefulDataLoader) or Dataset (HF datasets' IterableDataset is one)."""
    return isinstance(obj, torch.utils.data.DataLoader | torch.utils.data.Dataset)


# ------------------------------------------------------------------------------------------------ metadata


def _as_number(value: Any) -> int | float | None:
    """numbers (not bools), numpy scalars and 0-d tensors count as numbers."""
    if isinstance(value, bool | np.bool_):
        return None
    if isinstance(value, torch.Tensor):
        if value.numel() != 1 or value.dim() != 0 or value.dtype == torch.bool:
            return None
        return value.detach().item()
    if isinstance(value, np.generic) and isinstance(value.item(), int | float):
        return value.item()  # type: ignore[no-any-return]
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real):
        return float(value)
    return None


def _json_value(key: str, value: Any) -> Any:
    if value is None or isinstance(value, str | bool):
        return value
    if isinstance(value, np.bool_):
        return bool(value)
    number = _as_number(value)
    if number is not None:
        return number
    if isinstance(value, list | tuple):
        return [_json_value(key, v) for v in value]
    if isinstance(value, dict):
        if not all(isinstance(k, str) for k in value):
            raise InvalidMetadataError(f"metadata[{key!r}] is a dict with non-string keys; JSON needs str keys")
        return {k: _json_value(f"{key}.{k}", v) for k, v in value.items()}
    raise InvalidMetadataError(
        f"metadata[{key!r}] is a {type(value).__module__}.{type(value).__qualname__}, which is neither a "
        "number nor JSON-serializable; convert it (str(), float(), .tolist()) or save it as extra state"
    )


@dataclass(frozen=True)
class Metadata:
    step: int | None
    epoch: int | None
    metrics: dict[str, float]  # numeric values, logged as MLflow metrics at ``step``
    values: dict[str, Any]  # every value, JSON-able, returned by load()


def split_metadata(metadata: Mapping[str, Any] | None) -> Metadata:
    """Validate metadata: numbers become metrics, other JSON-able values are kept, the rest is refused."""
    if metadata is None:
        metadata = {}
    if not isinstance(metadata, Mapping):
        raise InvalidMetadataError(f"metadata must be a dict, got {type(metadata).__name__}")
    values: dict[str, Any] = {}
    metrics: dict[str, float] = {}
    for key, value in metadata.items():
        if not isinstance(key, str):
            raise InvalidMetadataError(f"metadata key {key!r} is not a string")
        values[key] = _json_value(key, value)
        number = _as_number(value)
        if number is not None:
            if not _METRIC_NAME.match(key):
                raise InvalidMetadataError(
                    f"metadata key {key!r} holds a number but is not a valid MLflow metric name; use "
                    "letters, digits, '_', '-', '.', '/' and spaces"
                )
            metrics[key] = float(number)
    for key in SEEN_KEYS:
        _integral(values, key)  # counts of what was read: a fraction or a negative is the caller's bug
    step = _integral(values, "step") if "step" in values else _integral(values, "steps")
    return Metadata(step=step, epoch=_integral(values, "epoch"), metrics=metrics, values=values)


def _integral(values: Mapping[str, Any], key: str) -> int | None:
    value = values.get(key)
    if value is None:
        return None
    if not isinstance(value, int | float) or isinstance(value, bool) or not math.isfinite(value) or value < 0:
        raise InvalidMetadataError(f"metadata[{key!r}]={value!r} must be a non-negative whole number")
    if value != int(value):
        raise InvalidMetadataError(f"metadata[{key!r}]={value!r} must be a whole number")
    return int(value)


# ---------------------------------------------------------------------------------------- gather / restore


def gather(state: TrainingState, *, rng: bool) -> tuple[dict[str, Any], dict[str, Any]]:
    """(tensor payload for state.pt, JSON payload for rng.json) of the live objects, by reference."""
    payload: dict[str, Any] = {name: obj.state_dict() for name, obj in state.parts().items()}
    rng_json: dict[str, Any] = {}
    if rng:
        payload["rng"] = {"torch": torch.get_rng_state(), "cuda": cuda_rng_states()}
        rng_json = host_rng_json()
    return payload, rng_json


def split_files(payload: Mapping[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(file name, part of ``payload``) per file: the model alone in model.pt, everything else in state.pt."""
    if "model" not in payload or len(payload) == 1:
        return [(STATE_FILE, dict(payload))]
    return [(MODEL_FILE, {"model": payload["model"]}), (STATE_FILE, {k: v for k, v in payload.items() if k != "model"})]


def host_rng_json() -> dict[str, Any]:
    """Python and NumPy RNG state as JSON (restored by ``restore``; no pickle)."""
    version, internal, gauss = random.getstate()
    np_state = cast(tuple[Any, ...], np.random.get_state())
    return {
        "python": [version, list(internal), gauss],
        "numpy": [np_state[0], np_state[1].tolist(), *(x.item() if hasattr(x, "item") else x for x in np_state[2:])],
    }


def cuda_rng_states() -> list[torch.Tensor]:
    # Only when CUDA is already in use: initializing it just to read RNG state costs seconds.
    if torch.cuda.is_available() and torch.cuda.is_initialized():  # type: ignore[no-untyped-call]
        return list(torch.cuda.get_rng_state_all())
    return []


def check_fits(payload: Mapping[str, Any], state: TrainingState, where: str) -> None:
    """Raise CheckpointMismatchError listing every difference; touch nothing."""
    problems: list[str] = []
    for name, obj in state.parts().items():
        if name not in payload:
            problems.append(f"the checkpoint has no {name!r} state, but one was passed to load()")
            continue
        if name == "model":
            problems += _model_diff(payload[name], obj.state_dict())
        elif name == "optimizer":
            problems += _optimizer_diff(payload[name], obj)
    if problems:
        listed = "\n  - ".join(problems[:50]) + ("\n  - ..." if len(problems) > 50 else "")
        raise CheckpointMismatchError(
            f"{where} does not fit the objects passed to load(); nothing was changed:\n  - {listed}\n"
            "Build the model/optimizer with the configuration the checkpoint was trained with."
        )


def _shape(t: Any) -> tuple[int, ...] | None:
    return tuple(t.shape) if isinstance(t, torch.Tensor) else None


def _model_diff(saved: Mapping[str, Any], live: Mapping[str, Any]) -> list[str]:
    problems = [f"model key {k!r} is missing from the checkpoint" for k in live if k not in saved]
    problems += [f"model key {k!r} is in the checkpoint but not in the model" for k in saved if k not in live]
    for k in live:
        if k in saved and _shape(saved[k]) != _shape(live[k]):
            problems.append(f"model key {k!r}: checkpoint shape {_shape(saved[k])}, model shape {_shape(live[k])}")
    return problems


def _optimizer_diff(saved: Mapping[str, Any], optimizer: Stateful) -> list[str]:
    live = optimizer.state_dict()
    saved_groups, live_groups = saved.get("param_groups", []), live.get("param_groups", [])
    if len(saved_groups) != len(live_groups):
        return [f"optimizer: checkpoint has {len(saved_groups)} param groups, the optimizer {len(live_groups)}"]
    problems: list[str] = []
    for i, (s, g) in enumerate(zip(saved_groups, live_groups, strict=True)):
        if len(s["params"]) != len(g["params"]):
            problems.append(
                f"optimizer param group {i}: checkpoint has {len(s['params'])} parameters, "
                f"the optimizer {len(g['params'])}"
            )
    # Optimizer state tensors (exp_avg, momentum, ...) have their parameter's shape: map saved parameter
    # ids to the live parameters by position, since a fresh optimizer has no state to compare with.
    live_params = [p for g in getattr(optimizer, "param_groups", []) for p in g["params"]]
    saved_ids = [pid for g in saved_groups for pid in g["params"]]
    shapes = {pid: _shape(p) for pid, p in zip(saved_ids, live_params, strict=False)}
    for pid, entry in saved.get("state", {}).items():
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() > 0 and pid in shapes and _shape(value) != shapes[pid]:
                problems.append(
                    f"optimizer state {pid}.{key}: checkpoint shape {_shape(value)}, parameter shape {shapes[pid]}"
                )
    return problems


def settle_loaders(state: TrainingState) -> None:
    """Build each restored loader's iterator now, before the RNG is restored.

    Creating a DataLoader's iterator draws its base seed from the global torch RNG. In the uninterrupted run
    that draw happened at the epoch's start, before the checkpoint's RNG state was taken; after a resume the
    training loop's ``iter(loader)`` would draw once more, and dropout would see other numbers (bitwise weights
    lost, though the samples match). A StatefulDataLoader builds its iterator on ``state_dict()`` and hands that
    same one to the next ``iter()``: doing it here makes the draw land before the RNG restore, where it is undone.
    """
    for name, obj in state.positions().items():
        if isinstance(obj, torch.utils.data.DataLoader):
            try:
                obj.state_dict()
            except Exception as e:  # torchdata checks a position only here (often a bare AssertionError)
                raise CheckpointMismatchError(
                    f"the loader {name!r} does not take the position it was saved with ({type(e).__name__}: {e}); "
                    "the rest of the state was restored already. Build the loader as when it was saved (dataset "
                    "length, batch size, shuffle or sampler, workers), or load(..., skip_data=True)"
                ) from e


def restore(payload: Mapping[str, Any], rng_json: Mapping[str, Any], state: TrainingState) -> None:
    """Load every part into the live objects, RNG last. Call check_fits first."""
    for name, obj in state.parts().items():
        obj.load_state_dict(payload[name])
    settle_loaders(state)
    rng = payload.get("rng")
    if rng is not None:
        torch.set_rng_state(rng["torch"])
        cuda = rng.get("cuda") or []
        if cuda and torch.cuda.is_available() and torch.cuda.device_count() == len(cuda):
            torch.cuda.set_rng_state_all(cuda)
    if "python" in rng_json:
        version, internal, gauss = rng_json["python"]
        random.setstate((version, tuple(internal), gauss))
    if "numpy" in rng_json:
        name, keys, *rest = rng_json["numpy"]
        np.random.set_state((name, np.asarray(keys, dtype=np.uint32), *rest))
