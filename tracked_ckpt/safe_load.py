"""The one way tracked_ckpt unpickles a file: ``torch.load(weights_only=True)``, refusals named.

Below every format and ``data.py`` (each reads torch files), so that none of them imports the loading layer.
"""

from __future__ import annotations

import pickle
import re
from pathlib import Path
from typing import Any

import torch

from .errors import CheckpointCorruptError, UnsafeCheckpointError


def unsafe_pickle_error(e: pickle.UnpicklingError, where: str, what: str) -> UnsafeCheckpointError:
    """The weights_only unpickler refused a global: name it, and ``what`` asked for it."""
    found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"global ([\w.]+)", str(e))
    culprit = found.group(1) if found else "an unsupported object"
    return UnsafeCheckpointError(
        f"{where}: {what} asks to unpickle {culprit}, which weights_only loading refuses; "
        "it was not written by tracked_ckpt (or was tampered with). Nothing was loaded"
    )


def torch_load_safe(path: Path, where: str) -> dict[str, Any]:
    """A verified torch file's dict, memory-mapped; weights_only passed explicitly (no env var can flip it)."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as e:
        raise unsafe_pickle_error(e, where, f"file {path.name!r}") from None
    except (RuntimeError, EOFError, ValueError, OSError) as e:
        raise CheckpointCorruptError(f"{where}: file {path.name!r} is not a readable torch file: {e}") from e
    if not isinstance(payload, dict):
        raise CheckpointCorruptError(f"{where}: {path.name!r} holds a {type(payload).__name__}, not a dict")
    return payload
