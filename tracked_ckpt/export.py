"""The model weights of a checkpoint, out of the training state: warm start another model, export a file.

Both read only the ``model`` part (fetching ``model.pt`` alone where the checkpoint has one), verified first (size,
BLAKE3, ``weights_only``) and consolidated into one CPU state dict whatever the checkpoint's format: ``model.pt`` /
``state.pt`` of a single process, or the DCP shards of any
world size (read in this one process). ``warm_start`` loads it into a model non-strictly, through a key map,
and reports what did not match; ``export_model`` writes it as one safetensors file (or a ``torch.save`` dict)
with the source run, step and digest in the file's metadata.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import torch

from .catalog import Resolved, RunCatalog
from .errors import CheckpointMismatchError, ConfigError
from .formats import format_of
from .progress import human_bytes
from .refs import ref_for
from .resolver import resolve
from .store.run_store import RunStore, StoreFactory

log = logging.getLogger(__name__)

KeyMap = Mapping[str, str] | Callable[[str], str | None]
Format = Literal["safetensors", "torch"]


def model_state(catalog: RunCatalog, r: Resolved, cache_dir: Path | None = None) -> dict[str, torch.Tensor]:
    """The checkpoint's model state dict on CPU, verified, consolidated from DCP shards when needed."""
    where = f"checkpoint {ref_for(catalog.run_id, r.path)} (step {r.manifest.step})"
    fmt = format_of(r.manifest)
    # model.pt alone where the layout has it (no optimizer bytes move); a library's folder raises before any download
    only = fmt.restore_files(r.manifest, where, weights_only=True)
    with tempfile.TemporaryDirectory(prefix="tracked_ckpt-") as tmp:
        folder = catalog.fetch_verified(r, Path(tmp), cache_dir, only)
        sd = fmt.model_weights(folder, r.manifest, where)
    # mmap=True loads map the file, which the temporary folder's removal would pull away: own the memory.
    return {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in sd.items()}


# ----------------------------------------------------------------------------------------------- warm start


@dataclass(frozen=True)
class WarmStart:
    """What ``warm_start`` loaded: the source, and the keys that did not match (after the key map)."""

    source: str  # runs:/RUN/checkpoints/NAME
    step: int
    loaded: list[str]
    missing: list[str] = field(default_factory=list)  # in the model, not in the checkpoint: left as they were
    unexpected: list[str] = field(default_factory=list)  # in the checkpoint, not in the model: ignored
    metadata: dict[str, Any] = field(default_factory=dict)


def map_keys(sd: Mapping[str, torch.Tensor], key_map: KeyMap | None) -> dict[str, torch.Tensor]:
    """Rename checkpoint keys: a mapping of prefixes (``{"module.": ""}``, longest first) or a function (None drops)."""
    if key_map is None:
        return dict(sd)
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if callable(key_map):
            new = key_map(key)
        else:
            prefix = max((p for p in key_map if key.startswith(p)), key=len, default=None)
            new = key if prefix is None else key_map[prefix] + key[len(prefix) :]
        if new is None:
            continue
        if new in out:
            raise ConfigError(f"key_map maps two checkpoint keys onto {new!r} ({key!r} is one); make it one-to-one")
        out[new] = value
    return out


def apply_model_state(
    model: torch.nn.Module, sd: Mapping[str, torch.Tensor], *, strict: bool, where: str
) -> tuple[list[str], list[str], list[str]]:
    """(loaded, missing, unexpected) after loading ``sd`` into ``model``; any shape mismatch changes nothing."""
    live = model.state_dict()
    missing = [k for k in live if k not in sd]
    unexpected = [k for k in sd if k not in live]
    problems = [f"model key {k!r}: checkpoint shape {tuple(sd[k].shape)}, model shape {tuple(live[k].shape)}"
                for k in live if k in sd and tuple(sd[k].shape) != tuple(live[k].shape)]  # fmt: skip
    if strict:
        problems += [f"model key {k!r} is missing from the checkpoint" for k in missing]
        problems += [f"model key {k!r} is in the checkpoint but not in the model" for k in unexpected]
    if problems:
        listed = "\n  - ".join(problems[:50]) + ("\n  - ..." if len(problems) > 50 else "")
        raise CheckpointMismatchError(
            f"{where} does not fit the model passed; nothing was changed:\n  - {listed}\n"
            "Map renamed keys with key_map= (e.g. {'module.': ''}), pass strict=False to skip missing and "
            "unexpected keys; a shape mismatch needs the model built with the checkpoint's configuration."
        )
    loaded = [k for k in live if k in sd]
    model.load_state_dict({k: sd[k] for k in loaded}, strict=False)
    return loaded, missing, unexpected


def warm_start(
    source: str,
    model: torch.nn.Module,
    *,
    key_map: KeyMap | None = None,
    strict: bool = False,
    tracking_uri: str | None = None,
    store_factory: StoreFactory = RunStore,
) -> WarmStart:
    """Load only the model weights of checkpoint ``source`` into ``model``: no optimizer, scheduler or RNG.

    Args:
        source: ``RUN``, ``RUN@best``, ``RUN@STEP``, ``runs:/RUN/checkpoints/NAME`` or ``models:/NAME@ALIAS``.
        key_map: renames checkpoint keys before matching: ``{"module.": ""}`` (prefixes) or a function
            returning the new key (None drops the key).
        strict: raise CheckpointMismatchError for missing/unexpected keys too (shape mismatches always raise).
    """
    from .store.reading import reading

    t0 = time.perf_counter()
    with reading():
        catalog, r = resolve(source, tracking_uri=tracking_uri, store_factory=store_factory)
        sd = model_state(catalog, r)
    ref = ref_for(catalog.run_id, r.path)
    where = f"checkpoint {ref} (step {r.manifest.step})"
    loaded, missing, unexpected = apply_model_state(model, map_keys(sd, key_map), strict=strict, where=where)
    if missing or unexpected:
        log.warning("warm start from %s: %d keys loaded, %d missing from the checkpoint %s, %d unexpected %s",
                    ref, len(loaded), len(missing), missing[:5], len(unexpected), unexpected[:5])  # fmt: skip
    log.info("warm start: model weights of step %d from %s in %.2f s", r.manifest.step, ref, time.perf_counter() - t0)
    return WarmStart(ref, r.manifest.step, loaded, missing, unexpected, dict(r.manifest.metadata))


# --------------------------------------------------------------------------------------------------- export


def export_model(
    source: str, path: str | Path, *, format: Format = "safetensors", tracking_uri: str | None = None,
    overwrite: bool = False, store_factory: StoreFactory = RunStore,
) -> Path:  # fmt: skip
    """Write the model weights of checkpoint ``source`` to ``path``: one safetensors file, or a torch.save dict.

    The source (run, step, checkpoint, digest) goes in the file's metadata (safetensors: its header's
    ``__metadata__``; torch: the ``"tracked_ckpt"`` entry beside ``"model"``). Needs ``safetensors`` for that
    format (``pip install 'tracked-ckpt[export]'``).
    """
    from .lifecycle import checkpoint_digest
    from .store.reading import reading

    if format not in ("safetensors", "torch"):
        raise ConfigError(f"format={format!r}: pass 'safetensors' or 'torch'")
    out = Path(path).expanduser()
    if out.exists() and not overwrite:
        raise FileExistsError(f"{out} exists; pass overwrite=True (--force) or another path")
    save_file = _safetensors_save() if format == "safetensors" else None
    t0 = time.perf_counter()
    with reading():
        catalog, r = resolve(source, tracking_uri=tracking_uri, store_factory=store_factory)
        sd = model_state(catalog, r)
    source_info = {
        "tracked_ckpt.run_id": catalog.run_id,
        "tracked_ckpt.step": str(r.manifest.step),
        "tracked_ckpt.checkpoint": ref_for(catalog.run_id, r.path),
        "tracked_ckpt.digest": checkpoint_digest(r),
        "tracked_ckpt.metrics": json.dumps(dict(r.manifest.metrics), sort_keys=True),
    }
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp")
    mode = _new_file_mode(tmp)
    if save_file is not None:
        save_file(_unshared(sd), str(tmp), metadata=source_info)
    else:
        torch.save({"model": sd, "tracked_ckpt": source_info}, tmp)
    tmp.chmod(mode)  # safetensors writes 0600; an exported model is for others to read, like torch.save's file
    tmp.replace(out)  # never a half-written file at ``path``
    log.info("exported the model of step %d from %s to %s (%s, %s) in %.2f s", r.manifest.step,
             source_info["tracked_ckpt.checkpoint"], out, format, human_bytes(out.stat().st_size),
             time.perf_counter() - t0)  # fmt: skip
    return out


def _new_file_mode(path: Path) -> int:
    """Create ``path`` as open() creates a file (0666 less the umask: 0644 usually) and return its mode bits."""
    path.unlink(missing_ok=True)  # a leftover of a crash keeps whatever mode it had
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
    try:
        return os.fstat(fd).st_mode & 0o777
    finally:
        os.close(fd)


def _safetensors_save() -> Callable[..., None]:
    try:
        from safetensors.torch import save_file
    except ImportError:
        raise ConfigError(
            "format='safetensors' needs the safetensors package, which is not installed; "
            "pip install safetensors (the [export] extra: pip install -e '.[export]' in a clone of tracked-ckpt), "
            "or export in the torch format instead: format='torch' (--format torch from the command line)"
        ) from None
    return save_file


def _unshared(sd: Mapping[str, Any]) -> dict[str, torch.Tensor]:
    """Tensors only, contiguous, none sharing memory (safetensors refuses tied weights): copy the second of a tie."""
    seen: set[tuple[int, int]] = set()
    out: dict[str, torch.Tensor] = {}
    for key, value in sd.items():
        if not isinstance(value, torch.Tensor):
            log.debug("export: skipping non-tensor model entry %r", key)
            continue
        t = value.detach().contiguous()
        span = (t.untyped_storage().data_ptr(), int(t.storage_offset()))
        out[key] = t.clone() if span in seen or not _owns_storage(t) else t
        seen.add(span)
    return out


def _owns_storage(t: torch.Tensor) -> bool:
    return t.untyped_storage().nbytes() == t.numel() * t.element_size()

