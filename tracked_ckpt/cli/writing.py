"""Commands that change the record: prune, export, promote, models, sync."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from .errors import EXIT_CODES_HELP, EXIT_UNREACHABLE
from .group import REF_HELP, _common, _mode_options, _reads, cli, open_run, store_factory
from .output import _num, _table
from .reading import _parse

# ------------------------------------------------------------------------------------------------ prune


@cli.command("prune", epilog=EXIT_CODES_HELP)
@click.argument("run_id")
@click.option("--keep-last", type=click.IntRange(min=1), metavar="N", help="Keep the N most recent checkpoints.")
@click.option("--keep-best", type=click.IntRange(min=1), metavar="K", help="Keep the K best by the metric.")
@click.option("--dry-run", is_flag=True, help="Show what would be deleted; delete nothing.")
@_mode_options
@_common
@_reads
def prune_cmd(
    run_id: str,
    keep_last: int | None,
    keep_best: int | None,
    dry_run: bool,
    metric: str | None,
    mode: str | None,
    tracking_uri: str | None,
) -> None:
    """Delete old checkpoints of RUN_ID from MLflow with the library's retention rules.

    Keeps the union of --keep-last and --keep-best, and always the latest checkpoint, the best one, and
    the ones the run's tags name (promoted, a fork's origin). Only checkpoints/<name> folders (and their
    LoggedModels) are ever deleted; the summary tags
    (tracked_ckpt.count, .bytes, .pruned_last) are updated. Local copies in the trainer's save_dir are
    left alone. Do not prune a run that is still training: its next save rewrites the tags.

    \b
    Examples:
      tracked-ckpt prune RUN_ID --keep-last 3 --dry-run
      tracked-ckpt prune RUN_ID --keep-last 2 --keep-best 1
    """
    from .. import maintenance
    from ..policies import KeepBest, KeepLast, RetentionPolicy

    if keep_last is None and keep_best is None:
        raise click.UsageError("pass --keep-last N and/or --keep-best K")
    parts: list[RetentionPolicy] = [KeepLast(keep_last)] if keep_last else []
    parts += [KeepBest(keep_best)] if keep_best else []
    policy = parts[0] if len(parts) == 1 else parts[0] | parts[1]  # type: ignore[operator]
    catalog = open_run(run_id, tracking_uri)
    plan = maintenance.plan_prune(catalog, policy, metric, mode)
    if not plan.keep and not plan.delete:
        from ..errors import CheckpointNotFoundError

        raise CheckpointNotFoundError(f"run {run_id} has no committed checkpoint to prune")
    rows = [[str(c.step), _num(c.metrics.get(plan.metric)), "keep", plan.reasons[c.path], c.path] for c in plan.keep]
    rows += [[str(c.step), _num(c.metrics.get(plan.metric)), "delete", "", c.path] for c in plan.delete]
    rows.sort(key=lambda row: int(row[0]))
    click.echo(_table(["step", plan.metric, "action", "why kept", "path"], rows, left={"action", "why kept", "path"}))
    freed = sum(c.size for c in plan.delete)
    from ..progress import human_bytes

    if dry_run:
        click.echo(f"dry run: would delete {len(plan.delete)} checkpoint(s), {human_bytes(freed)}")
        return
    maintenance.apply_prune(catalog, plan)
    click.echo(f"deleted {len(plan.delete)} checkpoint(s), {human_bytes(freed)}; kept {len(plan.keep)}")


# ---------------------------------------------------------------------------------------- export / promote

MODEL_REF_HELP = REF_HELP


@cli.command("export", epilog=MODEL_REF_HELP + "\n" + EXIT_CODES_HELP)
@click.argument("ref", metavar="REF")
@click.option("-o", "--output", "out", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="The file to write.")  # fmt: skip
@click.option("--format", "fmt", type=click.Choice(["safetensors", "torch"]), default="safetensors", show_default=True,
              help="safetensors: one .safetensors file; torch: torch.save({'model': ..., 'tracked_ckpt': ...})")
@click.option("--force", is_flag=True, help="Overwrite the file if it exists.")
@_common
@_reads
def export_cmd(ref: str, out: Path, fmt: str, force: bool, tracking_uri: str | None) -> None:
    """Write the model weights of a checkpoint to one file, verified first (DCP shards are consolidated).

    The source run, step, checkpoint and digest go in the file's metadata (safetensors: the header's
    __metadata__). Optimizer, scheduler and RNG state are left out. safetensors needs
    pip install 'tracked-ckpt[export]'.

    \b
    Examples:
      tracked-ckpt export RUN_ID@best -o model.safetensors
      tracked-ckpt export RUN_ID --format torch -o model.pt
      python -c "from safetensors.torch import load_file; print(list(load_file('model.safetensors')))"
    """
    from ..export import export_model
    from ..progress import human_bytes

    _parse(ref)  # a bad reference is a usage error (exit 2), before anything is read
    if out.exists() and not force:
        raise FileExistsError(f"{out} exists; pass --force to overwrite it or -o another file")
    path = export_model(ref, out, format=fmt, tracking_uri=tracking_uri, overwrite=force,  # type: ignore[arg-type]
                        store_factory=store_factory())
    click.echo(f"exported the model weights of {ref} to {path} ({fmt}, {human_bytes(path.stat().st_size)})")


@cli.command("promote", epilog=MODEL_REF_HELP + "\n" + EXIT_CODES_HELP)
@click.argument("ref", metavar="REF")
@click.option("--name", required=True, help="Registered model name (created if missing).")
@click.option("--alias", help="Point this alias of the model (e.g. prod, champion) at the new version.")
@_common
@_reads
def promote_cmd(ref: str, name: str, alias: str | None, tracking_uri: str | None) -> None:
    """Register a checkpoint in the MLflow Model Registry as a new version of model NAME.

    The checkpoint is verified first; it gets a LoggedModel linked to its run at its step, a model version
    whose source is that LoggedModel, and the run tag tracked_ckpt.promoted, so retention and prune never delete
    it. Load it back with tracked_ckpt.load("models:/NAME@ALIAS", model).

    \b
    Examples:
      tracked-ckpt promote RUN_ID@best --name cartpole --alias prod
      tracked-ckpt show RUN_ID@best
    """
    from ..lifecycle import promote

    _parse(ref)
    p = promote(ref, name, alias=alias, tracking_uri=tracking_uri, store_factory=store_factory())
    with_alias = f", alias {alias!r}" if alias else ""
    if p.existing:
        click.echo(f"{p.checkpoint} (step {p.step}) is already {name!r} version {p.version}: nothing new registered"
                   f"{with_alias and '; ' + with_alias[2:] + ' points at it'}; load it with "
                   f"tracked_ckpt.load({p.uri!r}, model)")  # fmt: skip
        return
    click.echo(f"registered {p.checkpoint} (step {p.step}) as {name!r} version {p.version}{with_alias}; "
               f"load it with tracked_ckpt.load({p.uri!r}, model)")  # fmt: skip


@cli.command("models", epilog=EXIT_CODES_HELP)
@click.argument("run_ids", nargs=-1, required=True, metavar="RUN_ID...")
@_common
@_reads
def models_cmd(run_ids: tuple[str, ...], tracking_uri: str | None) -> None:
    """Give every kept checkpoint of each run its MLflow LoggedModel; delete those whose checkpoint is gone.

    For runs recorded before tracked_ckpt made a LoggedModel per checkpoint (or with logged_models=False):
    afterwards the experiment's Models tab lists them, and models:/MODEL_ID loads them. No weights are copied.
    A run that resumes training does the same by itself. Run it on runs that are not training.

    \b
    Examples:
      tracked-ckpt models RUN_ID
      tracked-ckpt ls RUN_ID          # the model_id column
    """
    from ..models import CheckpointModels

    for run_id in run_ids:
        catalog = open_run(run_id, tracking_uri)
        found = catalog.scan()
        done = CheckpointModels(catalog.store).reconcile({r.path: r.manifest for r in found})
        click.echo(f"run {run_id}: {len(found)} checkpoint(s) with their logged model; "
                   f"{done['created']} created, {done['deleted']} deleted")  # fmt: skip


# ------------------------------------------------------------------------------------------------- sync


@cli.command("sync")
@click.argument("save_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--timeout", type=float, default=300.0, show_default=True, help="Seconds to wait for MLflow.")
@_common
def sync_cmd(save_dir: Path, timeout: float, tracking_uri: str | None) -> None:
    """Record in MLflow the checkpoints an outage left queued in SAVE_DIR's outbox.

    A checkpoint is always committed locally first; when the tracking server is down, hung or failing its
    upload waits in SAVE_DIR/.outbox. A training process drains it by itself when the server is back; this
    command does it for a process that is gone. Exits 6 if anything is still queued afterwards.

    \b
    Examples:
      tracked-ckpt sync ./training_checkpoints
      MLFLOW_TRACKING_URI=sqlite:///mlflow.db tracked-ckpt sync ./training_checkpoints --timeout 60
    """
    from ..api import sync

    left = sync(save_dir, tracking_uri=tracking_uri, timeout=timeout)
    if not left:
        click.echo(f"nothing queued in {save_dir}")
    for run_id, n in left.items():
        click.echo(f"run {run_id}: {'all recorded' if n == 0 else f'{n} checkpoint(s) still queued'}")
    if any(left.values()):
        sys.exit(EXIT_UNREACHABLE)
