"""Commands that only read: ls, runs, show, pull, verify."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from .errors import EXIT_CODES_HELP, EXIT_CORRUPT
from .group import FORMAT, REF_HELP, _common, _experiment_option, _mode_options, _reads, cli, open_run, store_factory
from .output import (
    _checkpoints_table,
    _emit_frame,
    _json_value,
    _num,
    _runs_table,
    _table,
    _tree_order,
    iso_utc,
)

if TYPE_CHECKING:
    from ..catalog import Resolved, RunCatalog


# ------------------------------------------------------------------------------------------------ ls / runs


@cli.command("ls", epilog=EXIT_CODES_HELP)
@click.argument("run_id", required=False)
@_experiment_option("Only runs of this experiment (default: every experiment).")
@FORMAT
@_mode_options
@_common
@_reads
def ls_cmd(
    run_id: str | None, experiment: str | None, fmt: str, metric: str | None, mode: str | None, tracking_uri: str | None
) -> None:
    """List the committed checkpoints of RUN_ID, or of every tracked run.

    Columns: step, epoch, the logged metrics (reward, loss, ...), size, age and markers (latest, best).
    csv and json carry the full typed columns of tracked_ckpt.list_checkpoints. Exits 4 when RUN_ID
    has no committed checkpoint.

    \b
    Examples:
      tracked-ckpt ls RUN_ID                              # one run
      tracked-ckpt ls --experiment tracked-ckpt-demo      # every tracked run of an experiment
      tracked-ckpt ls RUN_ID --format csv > checkpoints.csv
    """
    from ..errors import CheckpointNotFoundError
    from ..views import checkpoints_of, tracked_runs

    tracking = _tracking(tracking_uri)
    mode_ = mode if mode is None else _check_mode(mode)
    if run_id is not None:
        df = checkpoints_of(tracking.client, [run_id], metric, mode_, store_factory())
        if df.empty:
            raise CheckpointNotFoundError(f"run {run_id} at {tracking.server} has no committed checkpoint")
    else:
        runs = tracked_runs(tracking, _experiment_ids(tracking, experiment))
        df = checkpoints_of(tracking.client, [r.info.run_id for r in runs], metric, mode_, store_factory())
    if df.empty:
        click.echo(f"no committed checkpoints {_searched(tracking, experiment)}", err=True)
    if fmt != "table":
        _emit_frame(df, fmt)
    elif not df.empty:
        click.echo(_checkpoints_table(df, with_run=run_id is None))


@cli.command("runs", epilog=EXIT_CODES_HELP)
@_experiment_option("Only this experiment (default: every experiment).")
@click.option("--tree", is_flag=True, help="Show forks under the run they were forked from (table format).")
@FORMAT
@_common
@_reads
def runs_cmd(experiment: str | None, tree: bool, fmt: str, tracking_uri: str | None) -> None:
    """One row per run that has checkpoints: name, status, count, latest step, best metric, bytes, parent.

    Read from the run tags in one query per experiment. csv and json carry the typed columns of
    tracked_ckpt.list_runs (forked_from: the parent checkpoint of a fork). --tree indents each fork under
    its parent, with the step it was forked at.

    \b
    Examples:
      tracked-ckpt runs
      tracked-ckpt runs --tree
      tracked-ckpt runs --experiment tracked-ckpt-demo --format json
    """
    from ..views import runs_frame, tracked_runs

    tracking = _tracking(tracking_uri)
    df = runs_frame(tracked_runs(tracking, _experiment_ids(tracking, experiment)))
    if df.empty:
        click.echo(f"no runs with tracked_ckpt checkpoints {_searched(tracking, experiment)}", err=True)
    if fmt != "table":
        _emit_frame(df, fmt)
    elif not df.empty:
        click.echo(_runs_table(_tree_order(df) if tree else df, tree=tree))


def _tracking(tracking_uri: str | None) -> Any:
    """The tracking server's store of this invocation (an existing store only), through the store seam."""
    from ..resolver import server_store
    from ..store.reading import read_client

    return server_store(read_client(tracking_uri), store_factory())


def _experiment_ids(tracking: Any, experiment: str | None) -> list[str]:
    """The experiment named, else every active one (never created: reads look things up)."""
    from ..runs import existing_experiment_ids

    return existing_experiment_ids(tracking, tracking.server, experiment, every=True)


def _searched(tracking: Any, experiment: str | None) -> str:
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    return f"in {where} at {tracking.server}"


def _check_mode(mode: str) -> Any:
    from ..policies import check_mode

    return check_mode(mode)


# ------------------------------------------------------------------------------------------------- show


@cli.command("show", epilog=REF_HELP + "\n" + EXIT_CODES_HELP)
@click.argument("ref", metavar="REF")
@click.option("--format", "fmt", type=click.Choice(["text", "json"]), default="text", show_default=True)
@_mode_options
@_common
@_reads
def show_cmd(ref: str, fmt: str, metric: str | None, mode: str | None, tracking_uri: str | None) -> None:
    """Show a checkpoint's manifest: step, metrics, metadata, files with sizes and BLAKE3 digests.

    \b
    Examples:
      tracked-ckpt show RUN_ID              # the latest
      tracked-ckpt show RUN_ID@best --format json
      tracked-ckpt show runs:/RUN_ID/checkpoints/step-00000015   # a path `ls` prints
    """
    from .. import maintenance

    catalog, r = _resolve(ref, metric, mode, tracking_uri)
    marks = maintenance.markers(catalog, r, metric, mode)
    if fmt == "json":
        click.echo(json.dumps(_manifest_json(catalog, r, marks), indent=1, sort_keys=True))
        return
    click.echo(_describe(catalog, r, marks))


def _manifest_json(catalog: RunCatalog, r: Resolved, marks: list[str]) -> dict[str, Any]:
    """The manifest with the fields `ls --format json` shares spelled as there (created, size_bytes, metrics)."""
    import pandas as pd

    from ..views import utc_times

    data: dict[str, Any] = json.loads(r.manifest.to_json())
    data["created"] = iso_utc(utc_times(pd.Series([r.manifest.created]), "s").iloc[0])
    data["metrics"] = {k: _json_value(v) for k, v in r.manifest.metrics.items()}
    data.update(ref=_uri_of(catalog, r), path=r.path, size_bytes=r.manifest.size, markers=marks)
    data["eval"] = {k: _json_value(v) for k, v in _scores(catalog, r).items()}
    return data


def _scores(catalog: RunCatalog, r: Resolved) -> dict[str, float]:
    """What evaluators logged on the run at this checkpoint's step (``log_eval``)."""
    from ..evals import eval_metrics

    return eval_metrics(catalog.store, catalog.store.tags()).get(r.manifest.step, {})


def _describe(catalog: RunCatalog, r: Resolved, marks: list[str]) -> str:
    from ..manifest import MANIFEST_NAME
    from ..progress import human_bytes

    m = r.manifest
    created = time.strftime("%Y-%m-%d %H:%M:%S UTC", time.gmtime(m.created))
    lines = [
        f"{_uri_of(catalog, r)}" + (f"   ({', '.join(marks)})" if marks else ""),
        f"  run        {m.run_id}",
        f"  step       {m.step}",
        f"  epoch      {'-' if m.epoch is None else m.epoch}",
        f"  seq        {m.seq}   (commit order in the run)",
        f"  created    {created}",
        f"  metrics    {'  '.join(f'{k}={_num(v)}' for k, v in sorted(m.metrics.items())) or '-'}",
    ]
    if scores := _scores(catalog, r):
        lines.append(f"  eval       {'  '.join(f'{k}={_num(v)}' for k, v in sorted(scores.items()))}")
    if m.metadata:
        lines.append(f"  metadata   {json.dumps(dict(m.metadata), sort_keys=True)}")
    if m.resumed_from:
        lines.append(f"  resumed    from {m.resumed_from}")
    lines.append(f"  written by tracked_ckpt {m.library_version or '?'}, torch {m.torch_version or '?'}")
    lines.append(f"  files      {len(m.files)}, {human_bytes(m.size)} ({m.size} bytes), committed by {MANIFEST_NAME}")
    rows = [[f.name, str(f.size), f.blake3] for f in m.files]
    table = _table(["name", "bytes", "blake3"], rows, left={"name", "blake3"})
    lines += ["    " + t for t in table.splitlines()]
    return "\n".join(lines)


def _uri_of(catalog: RunCatalog, r: Resolved) -> str:
    from ..refs import ref_for

    return ref_for(catalog.run_id, r.path)


def _resolve(ref: str, metric: str | None, mode: str | None, tracking_uri: str | None) -> tuple[RunCatalog, Resolved]:
    from ..resolver import resolve

    _parse(ref)  # exit 2 for a malformed one, before asking MLflow
    return resolve(ref, tracking_uri=tracking_uri, store_factory=store_factory(), metric=metric, mode=mode)


def _parse(ref: str) -> Any:
    """A run reference (refs.Ref), or None for a well-formed ``models:/`` one; exit 2 for a bad one."""
    from ..errors import ConfigError
    from ..refs import Ref, parse_any

    try:
        parsed = parse_any(ref)
        return parsed if isinstance(parsed, Ref) else None
    except ConfigError as e:
        raise click.BadParameter(str(e), param_hint="REF") from None


# ------------------------------------------------------------------------------------------------- pull


@cli.command("pull", epilog=REF_HELP + "\n" + EXIT_CODES_HELP)
@click.argument("ref", metavar="REF")
@click.option(
    "-o",
    "--output",
    "out",
    type=click.Path(file_okay=False, path_type=Path),
    help="Folder to write into (default: ./<checkpoint folder name>, e.g. ./step-00000120).",
)
@click.option("--force", is_flag=True, help="Overwrite files already in the folder.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: on a terminal, for large files).")
@_mode_options
@_common
@_reads
def pull_cmd(
    ref: str,
    out: Path | None,
    force: bool,
    progress: bool | None,
    metric: str | None,
    mode: str | None,
    tracking_uri: str | None,
) -> None:
    """Download a checkpoint into a folder and verify every file against its manifest.

    The folder gets the data files (state.pt, rng.json) and MANIFEST.json; a file that fails verification
    never lands there (exit 5). The progress bar goes to stderr and only when it is a terminal.

    \b
    Examples:
      tracked-ckpt pull RUN_ID -o ./latest
      tracked-ckpt pull RUN_ID@best -o ./best
      python -c "import torch; print(torch.load('best/state.pt', weights_only=True).keys())"
    """
    from .. import maintenance
    from ..progress import Progress, human_bytes

    catalog, r = _resolve(ref, metric, mode, tracking_uri)
    target = out if out is not None else Path(r.path.rpartition("/")[2])
    bar = Progress(r.manifest.size, f"pull step {r.manifest.step}", enabled=None if progress is None else progress)
    files = maintenance.pull(catalog, r, target, overwrite=force, progress=bar)
    click.echo(
        f"pulled {_uri_of(catalog, r)} (step {r.manifest.step}) into {target}/: "
        f"{len(files) - 1} files, {human_bytes(r.manifest.size)}, verified against MANIFEST.json"
    )


# ----------------------------------------------------------------------------------------------- verify


@cli.command("verify", epilog=REF_HELP + "\n" + EXIT_CODES_HELP)
@click.argument("ref", metavar="REF|RUN_ID")
@_mode_options
@_common
@_reads
def verify_cmd(ref: str, metric: str | None, mode: str | None, tracking_uri: str | None) -> None:
    """Check files against their manifest (size and BLAKE3): every checkpoint of RUN_ID, or the one REF names.

    One line per checkpoint folder: OK, CORRUPT (exit 5) or UNCOMMITTED (an interrupted save without a
    manifest: never loaded, not a failure).

    \b
    Examples:
      tracked-ckpt verify RUN_ID            # every checkpoint of the run
      tracked-ckpt verify RUN_ID@best       # just that one
    """
    from .. import maintenance
    from ..progress import human_bytes

    parsed = _parse(ref)
    if parsed is None or parsed.explicit:
        verdicts = [maintenance.verify_one(*_resolve(ref, metric, mode, tracking_uri))]
    else:
        verdicts = maintenance.verify_run(open_run(parsed.run_id, tracking_uri))
    for v in verdicts:
        what = f"step {v.step}: {v.files} files, {human_bytes(v.size)}" if v.step is not None else ""
        click.echo(f"{v.status.upper():<11} {v.path}  {what}".rstrip())
        if v.detail and v.failed:
            click.echo(f"            {v.detail}")
    failed = [v for v in verdicts if v.failed]
    ok = sum(v.status == "ok" for v in verdicts)
    if failed:
        click.echo(f"tracked-ckpt: verify: {len(failed)} of {len(verdicts)} checkpoint folders FAILED", err=True)
        sys.exit(EXIT_CORRUPT)
    if not ok:
        from ..errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"{ref} names no committed checkpoint to verify")
    click.echo(f"{ok} checkpoint(s) verified")
