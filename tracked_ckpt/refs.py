"""How a checkpoint is named: the one home of the reference grammar.

::

    runs:/RUN_ID/checkpoints/step-00000120     the exact folder (what save() returns)
    RUN_ID                                     the latest committed checkpoint of the run
    RUN_ID@latest | RUN_ID@best | RUN_ID@120   the latest, the best by the run's monitored metric, step 120
    checkpoints/step-00000120                  a folder of the manager's own run (CheckpointManager.load)
    ./save_dir/<run_id>/step-00000120          a local checkpoint folder holding a MANIFEST.json (the same)
    models:/m-<32 hex>                         a checkpoint's LoggedModel (its model_id)
    models:/NAME@ALIAS | models:/NAME/VERSION  a model version ``promote`` registered

``parse`` reads the command-line forms (the first three); ``parse_path`` reads what ``CheckpointManager.load``
accepts as ``checkpoint_path`` (the first and the last two); ``parse_model`` reads the ``models:/`` forms, which
MLflow's model APIs turn into a run and a folder; ``parse_any`` reads every form a user may pass for a checkpoint.
This module only reads text: resolver.py opens the run and finds the checkpoint a reference names.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from .errors import CheckpointNotFoundError, ConfigError
from .manifest import ARTIFACT_PREFIX, MANIFEST_NAME, Manifest, check_checkpoint_path

Which = Literal["latest", "best"] | int

_RUN_ID = r"[0-9A-Za-z_-]+"
_RUNS_URI = re.compile(rf"^runs:/({_RUN_ID})/(.+?)/?$")
_SELECTOR = re.compile(rf"^({_RUN_ID})(?:@(latest|best|-?\d+))?$")
_MODEL_ID = re.compile(r"^m-[0-9a-f]{32}$")  # what MLflow 3 names a LoggedModel
MODELS = "models:/"
RUNS = "runs:/"


def is_model_uri(text: str) -> bool:
    return text.startswith(MODELS)


def is_runs_uri(text: str) -> bool:
    return text.startswith(RUNS)


@dataclass(frozen=True)
class ModelRef:
    """A parsed ``models:/`` reference: a LoggedModel's id, or a registered model's name with an alias or version."""

    model_id: str | None = None
    name: str | None = None
    alias: str | None = None
    version: str | None = None

    @property
    def uri(self) -> str:
        """The ``models:/`` text naming it (``parse_model``'s inverse)."""
        if self.model_id is not None:
            return f"{MODELS}{self.model_id}"
        return f"{MODELS}{self.name}@{self.alias}" if self.alias else f"{MODELS}{self.name}/{self.version}"


def parse_model(uri: str) -> ModelRef:
    """Parse ``models:/<model_id>``, ``models:/NAME@ALIAS`` or ``models:/NAME/VERSION``."""
    body = uri[len(MODELS) :] if is_model_uri(uri) else ""
    if _MODEL_ID.match(body):
        return ModelRef(model_id=body)
    name, at, alias = body.partition("@")
    if at and name and alias and "/" not in name:
        return ModelRef(name=name, alias=alias)
    name, slash, version = body.rpartition("/")
    if slash and name and version.isdigit():
        return ModelRef(name=name, version=version)
    raise ConfigError(
        f"{uri!r}: name a model as models:/<model_id> (a checkpoint's logged model, e.g. models:/m-0123...), "
        "models:/NAME@ALIAS or models:/NAME/VERSION (a version `promote` registered)"
    )


def ref_for(run_id: str, path: str) -> str:
    return f"{RUNS}{run_id}/{path}"


def run_of(ref: str) -> str:
    """The run ID of a ``runs:/RUN_ID/...`` reference (not validated: for display)."""
    return ref.removeprefix(RUNS).partition("/")[0]


def parse_ref(ref: str) -> tuple[str, str]:
    """Split ``runs:/<run_id>/checkpoints/<name>`` into (run_id, path); validates the path."""
    m = _RUNS_URI.match(ref)
    if not m:
        raise ConfigError(
            f"{ref!r} is not a checkpoint reference; pass the 'runs:/<run_id>/checkpoints/<name>' string "
            "that save() returned, or a run ID with which='latest' | 'best' | <step>"
        )
    return m.group(1), check_checkpoint_path(m.group(2))


@dataclass(frozen=True)
class Ref:
    """A parsed checkpoint reference: a run plus either ``which`` or an exact folder ``path``."""

    run_id: str
    which: Which = "latest"
    path: str | None = None
    explicit: bool = True  # False for a bare RUN_ID (verify then checks every checkpoint of the run)


def parse(text: str) -> Ref:
    """Parse ``RUN_ID``, ``RUN_ID@latest|best|STEP`` or ``runs:/RUN_ID/checkpoints/NAME``."""
    if is_runs_uri(text):
        run_id, path = parse_ref(text)
        return Ref(run_id, path=path)
    m = _SELECTOR.match(text)
    if not m:
        raise ConfigError(
            f"{text!r} is not a checkpoint reference; use RUN_ID, RUN_ID@latest, RUN_ID@best, RUN_ID@STEP "
            "(e.g. RUN_ID@120) or runs:/RUN_ID/checkpoints/NAME"
        )
    run_id, sel = m.group(1), m.group(2)
    if sel is None:
        return Ref(run_id, explicit=False)
    which: Which = sel if sel in ("latest", "best") else int(sel)  # type: ignore[assignment]
    return Ref(run_id, which=which)


def parse_any(text: str) -> Ref | ModelRef:
    """Any checkpoint reference a user may pass: ``models:/...`` (a ModelRef) or a run reference (``parse``)."""
    return parse_model(text) if is_model_uri(text) else parse(text)


def parse_path(ref: str, own_run_id: str) -> tuple[str, str]:
    """(run_id, artifact path) of a ``checkpoint_path``: ``runs:/...``, ``checkpoints/<name>`` or a local folder."""
    if is_runs_uri(ref):
        return parse_ref(ref)
    if ref.startswith(f"{ARTIFACT_PREFIX}/"):
        return own_run_id, check_checkpoint_path(ref)
    manifest = Path(ref) / MANIFEST_NAME
    if not manifest.is_file():
        raise CheckpointNotFoundError(
            f"checkpoint_path={ref!r} is neither a 'runs:/...' reference nor a checkpoint folder with a "
            f"{MANIFEST_NAME}; pass what save() returned or get_latest_checkpoint() gives"
        )
    local = Manifest.from_json(manifest.read_bytes(), str(manifest))
    return local.run_id, check_checkpoint_path(f"{ARTIFACT_PREFIX}/{Path(ref).name}")
