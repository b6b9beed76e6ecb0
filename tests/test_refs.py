"""refs.py, the reference grammar, as pure tables: what each form parses to, and what is refused with which hint."""

from __future__ import annotations

from pathlib import Path

import pytest

from tracked_ckpt.errors import CheckpointCorruptError, CheckpointNotFoundError, ConfigError
from tracked_ckpt.refs import (
    ModelRef,
    Ref,
    is_model_uri,
    is_runs_uri,
    parse,
    parse_any,
    parse_model,
    parse_path,
    parse_ref,
    ref_for,
    run_of,
)

RUN = "0123456789abcdef0123456789abcdef"
MODEL_ID = "m-" + "0123456789abcdef" * 2


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (RUN, Ref(RUN, explicit=False)),
        (f"{RUN}@latest", Ref(RUN, which="latest")),
        (f"{RUN}@best", Ref(RUN, which="best")),
        (f"{RUN}@120", Ref(RUN, which=120)),
        (f"{RUN}@-1", Ref(RUN, which=-1)),
        (f"runs:/{RUN}/checkpoints/step-00000120", Ref(RUN, path="checkpoints/step-00000120")),
        (f"runs:/{RUN}/checkpoints/step-00000120/", Ref(RUN, path="checkpoints/step-00000120")),
        (f"models:/{MODEL_ID}", ModelRef(model_id=MODEL_ID)),
        ("models:/cartpole@prod", ModelRef(name="cartpole", alias="prod")),
        ("models:/cartpole/3", ModelRef(name="cartpole", version="3")),
        ("models:/team/cartpole/3", ModelRef(name="team/cartpole", version="3")),
    ],
)
def test_every_form_of_the_grammar_parses(text: str, expected: Ref | ModelRef) -> None:
    assert parse_any(text) == expected
    if isinstance(expected, ModelRef):
        assert expected.uri == text  # and is written back as it was read


@pytest.mark.parametrize(
    ("text", "hint"),
    [
        (f"{RUN}@worst", "RUN_ID@best"),
        (f"{RUN}@", "RUN_ID@STEP"),
        ("not a ref!", "runs:/RUN_ID/checkpoints/NAME"),
        ("", "RUN_ID@latest"),
        (f"runs:/{RUN}", "'runs:/<run_id>/checkpoints/<name>'"),
        ("models:/", "models:/NAME@ALIAS"),
        ("models:/cartpole", "models:/NAME/VERSION"),
        ("models:/cartpole/latest", "models:/<model_id>"),
        ("models:/a/b@prod", "models:/NAME@ALIAS"),
    ],
)
def test_a_malformed_reference_is_refused_naming_the_forms(text: str, hint: str) -> None:
    with pytest.raises(ConfigError) as err:
        parse_any(text)
    assert repr(text) in str(err.value) and hint in str(err.value)


@pytest.mark.parametrize(
    "path",
    ["../other", "checkpoints/../../x", "checkpoints", "elsewhere/step-1", "checkpoints/a/b"],
)
def test_a_runs_uri_must_name_a_checkpoint_folder(path: str) -> None:
    with pytest.raises((CheckpointCorruptError, ConfigError)):
        parse_ref(f"runs:/{RUN}/{path}")


def test_a_runs_uri_round_trips_and_names_its_run() -> None:
    ref = ref_for(RUN, "checkpoints/step-00000007")
    assert ref == f"runs:/{RUN}/checkpoints/step-00000007"
    assert parse_ref(ref) == (RUN, "checkpoints/step-00000007") and run_of(ref) == RUN
    assert is_runs_uri(ref) and not is_model_uri(ref)
    assert is_model_uri("models:/x@y") and not is_runs_uri("models:/x@y")
    assert parse(ref) == Ref(RUN, path="checkpoints/step-00000007")


def test_parse_model_refuses_a_run_reference() -> None:
    with pytest.raises(ConfigError, match="models:/<model_id>"):
        parse_model(f"{RUN}@best")


def test_parse_path_reads_a_runs_uri_an_own_folder_and_a_local_checkpoint(tmp_path: Path) -> None:
    other = "f" * 32
    assert parse_path(f"runs:/{other}/checkpoints/step-1", RUN) == (other, "checkpoints/step-1")
    assert parse_path("checkpoints/step-2", RUN) == (RUN, "checkpoints/step-2")
    with pytest.raises(CheckpointNotFoundError, match="neither a 'runs:/...' reference nor a checkpoint folder"):
        parse_path(str(tmp_path / "step-3"), RUN)
