"""The ``tracked-ckpt`` command: list, inspect, pull, verify and prune checkpoints recorded in MLflow runs.

Kept apart from the library: only this module prints or configures logging. MLflow, torch and pandas are
imported inside the commands, so ``--help`` answers at once.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import re
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import click

if TYPE_CHECKING:
    import pandas as pd

    from ..catalog import Resolved, RunCatalog

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2
EXIT_NOT_FOUND = 3
EXIT_NO_CHECKPOINT = 4
EXIT_CORRUPT = 5
EXIT_UNREACHABLE = 6
EXIT_NO_STORE = 7

EXIT_CODES_HELP = """\b
Exit codes:
  0  success
  1  other error (e.g. a local folder that cannot be written)
  2  usage: bad option or reference, output folder already holds the files
  3  run (or experiment) not found
  4  no committed checkpoint matches
  5  verification failed: a file or manifest does not match (corrupt)
  6  MLflow unreachable or refused the request (tracking server, artifact store)
  7  no tracking store at the URI (a missing mlflow.db): none is created;
     pass --tracking-uri, set MLFLOW_TRACKING_URI, or cd to the store's folder
"""

REF_HELP = """\b
REF names one checkpoint:
  RUN_ID            the latest committed checkpoint of the run
  RUN_ID@latest     the same
  RUN_ID@best       the best by the run's monitored metric (tag tracked_ckpt.monitor)
  RUN_ID@120        the checkpoint saved at step 120
  runs:/RUN_ID/checkpoints/step-00000120   the exact folder (what save() returns)
  models:/MODEL_ID  the checkpoint's logged model (the Models tab's, e.g. models:/m-0123...)
  models:/NAME@ALIAS | models:/NAME/VERSION   a version `promote` registered
"""

F = TypeVar("F", bound=Callable[..., Any])
log = logging.getLogger("tracked_ckpt.cli")
URI_KEY = "tracked_ckpt.tracking_uri"  # ctx.meta: the --tracking-uri given before or after the command name


# --------------------------------------------------------------------------------------- errors, logging


def classify(e: BaseException, tracking_uri: str | None = None) -> tuple[int, str] | None:
    """The exit code and one-line message for a known failure; None for a bug (which keeps its traceback)."""
    from ..errors import (
        CheckpointCorruptError,
        CheckpointNotFoundError,
        ConfigError,
        ExperimentNotFoundError,
        RunNotFoundError,
        StoreError,
        StoreNotFoundError,
        TrackedCkptError,
    )

    unreachable = _unreachable(e, tracking_uri)
    if unreachable is not None:
        return EXIT_UNREACHABLE, unreachable
    table: list[tuple[type[BaseException] | tuple[type[BaseException], ...], int]] = [
        (StoreNotFoundError, EXIT_NO_STORE),
        ((RunNotFoundError, ExperimentNotFoundError), EXIT_NOT_FOUND),
        (CheckpointNotFoundError, EXIT_NO_CHECKPOINT),
        (CheckpointCorruptError, EXIT_CORRUPT),
        (StoreError, EXIT_UNREACHABLE),
        ((ConfigError, FileExistsError), EXIT_USAGE),
        (TrackedCkptError, EXIT_ERROR),
    ]
    for types, code in table:
        if isinstance(e, types):
            return code, str(e)
    mlflow_exc = getattr(sys.modules.get("mlflow.exceptions"), "MlflowException", None)
    if mlflow_exc is not None and isinstance(e, mlflow_exc):
        if getattr(e, "error_code", "") == "RESOURCE_DOES_NOT_EXIST":
            return EXIT_NOT_FOUND, _first_line(e)
        return EXIT_UNREACHABLE, f"{_first_line(e)} (is the MLflow tracking server at {_uri(tracking_uri)} up?)"
    requests_exc = getattr(sys.modules.get("requests.exceptions"), "RequestException", None)
    if (requests_exc is not None and isinstance(e, requests_exc)) or isinstance(e, ConnectionError):
        return EXIT_UNREACHABLE, f"{_first_line(e)} (is the MLflow tracking server at {_uri(tracking_uri)} up?)"
    if isinstance(e, OSError):  # a local file problem, e.g. pull -o into a folder we cannot write
        return EXIT_ERROR, _first_line(e)
    return None


# How a connection failure reads in requests/urllib3 messages (wrapped by MLflow, then by StoreError).
_CONNECTION_FAILURES = [
    (re.compile(r"Connection refused|ECONNREFUSED|Errno 111"), "connection refused"),
    (re.compile(r"timed out|ReadTimeout|ConnectTimeout"), "no answer in time"),
    (re.compile(r"Name or service not known|nodename nor servname|Failed to resolve|getaddrinfo"), "unknown host"),
    (re.compile(r"Max retries exceeded|Connection aborted|RemoteDisconnected|NewConnectionError"), "connection failed"),
]


def _unreachable(e: BaseException, tracking_uri: str | None) -> str | None:
    """One line for "the server cannot be reached" (naming it and what to check), else None."""
    from ..errors import StoreError

    transport: list[type[BaseException]] = [StoreError, ConnectionError, TimeoutError]
    for module, name in (("mlflow.exceptions", "MlflowException"), ("requests.exceptions", "RequestException")):
        found = getattr(sys.modules.get(module), name, None)
        if found is not None:
            transport.append(found)
    if not isinstance(e, tuple(transport)):
        return None
    chain: list[BaseException] = []
    cur: BaseException | None = e
    while cur is not None and len(chain) < 10:
        chain.append(cur)
        cur = cur.__cause__ or cur.__context__
    text = " ".join(f"{type(c).__name__} {c}" for c in chain)
    for pattern, reason in _CONNECTION_FAILURES:
        if pattern.search(text):
            return (
                f"cannot reach the MLflow tracking server at {_uri(tracking_uri)} ({reason}); check that it is running "
                "and that the URI, port and network are right (--tracking-uri or MLFLOW_TRACKING_URI)"
            )
    return None


def _first_line(e: BaseException) -> str:
    from ..errors import TrackedCkptError

    text = str(e).strip().splitlines()
    if not text:
        return type(e).__name__
    if isinstance(e, TrackedCkptError) or len(text[0]) <= 400:  # ours are written to be read whole
        return text[0]
    return text[0][:400].rsplit(" ", 1)[0] + " ..."


def _uri(tracking_uri: str | None) -> str:
    """The store a command reads, as MLflow resolves it (absolute for the default sqlite:///mlflow.db)."""
    from ..reading import resolve_uri
    from ..store import redact

    return redact(resolve_uri(tracking_uri))


class _Cli(click.Group):
    """Maps the library's exceptions to distinct exit codes and one readable line on stderr."""

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort):
            raise
        except Exception as e:
            known = classify(e, ctx.meta.get(URI_KEY))
            if known is None:
                raise
            code, message = known
            click.echo(f"tracked-ckpt: error: {message}", err=True)
            log.debug("details", exc_info=True)
            ctx.exit(code)


class _StderrHandler(logging.StreamHandler):  # type: ignore[type-arg]
    """Writes to whatever sys.stderr is at the time (click's test runner swaps it)."""

    @property
    def stream(self) -> Any:
        return sys.stderr

    @stream.setter
    def stream(self, value: Any) -> None:
        pass


def _set_verbosity(ctx: click.Context, param: click.Parameter, value: int) -> None:
    """-v: INFO from tracked_ckpt; -vv: DEBUG, and MLflow's own INFO lines. Default: warnings only."""
    # -v may come before and after the command name; ctx.meta is shared by the whole invocation.
    verbosity = ctx.meta["tracked_ckpt.verbosity"] = ctx.meta.get("tracked_ckpt.verbosity", 0) + (value or 0)
    level = (logging.WARNING, logging.INFO, logging.DEBUG)[min(verbosity, 2)]
    # MLflow configures its own logger when imported (after this runs); it reads this variable.
    os.environ["MLFLOW_LOGGING_LEVEL"] = "INFO" if verbosity >= 2 else "ERROR"
    root = logging.getLogger()
    if not any(isinstance(h, _StderrHandler) for h in root.handlers):
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
        root.addHandler(handler)
    root.setLevel(logging.WARNING)
    logging.getLogger("tracked_ckpt").setLevel(level)
    # urllib3 warns on every retry ("Retrying (Retry(total=0 ...") before the error says the same in one line.
    logging.getLogger("urllib3").setLevel(logging.DEBUG if verbosity >= 2 else logging.ERROR)
    if "mlflow" in sys.modules:
        logging.getLogger("mlflow").setLevel(logging.INFO if verbosity >= 2 else logging.ERROR)


def _remember_uri(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """--tracking-uri before the command name, after it (which wins), else MLFLOW_TRACKING_URI."""
    if value is not None:
        ctx.meta[URI_KEY] = value
    return ctx.meta.get(URI_KEY)


def _uri_option(*, group: bool) -> Callable[[F], F]:
    # Only the group reads the environment, so that a command's own option is known to be typed (and wins).
    return click.option(
        "--tracking-uri",
        callback=_remember_uri,
        expose_value=not group,
        envvar="MLFLOW_TRACKING_URI" if group else None,
        show_envvar=group,
        metavar="URI",
        help="MLflow tracking URI (default: MLFLOW_TRACKING_URI, else sqlite:///mlflow.db in the current folder). "
        "Before or after the command name.",
    )


def _common(f: F) -> F:
    f = click.option(
        "-v", "--verbose", count=True, expose_value=False, callback=_set_verbosity, help="More log lines (-vv: debug)."
    )(f)
    return _uri_option(group=False)(f)


def _reads(f: F) -> F:
    """A command that reads MLflow: bounded retries and timeouts (a refused server fails in a second)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..reading import reading

        with reading():
            return f(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _mode_options(f: F) -> F:
    f = click.option("--mode", type=click.Choice(["max", "min"]), help="Direction of --metric.")(f)
    return click.option(
        "--metric", metavar="NAME", help="Metric that defines 'best' (default: the run's tag tracked_ckpt.monitor)."
    )(f)


FORMAT = click.option(
    "--format", "fmt", type=click.Choice(["table", "csv", "json"]), default="table", show_default=True
)


@click.group(cls=_Cli, epilog=EXIT_CODES_HELP, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="tracked-ckpt", prog_name="tracked-ckpt")
@click.option("-v", "--verbose", count=True, expose_value=False, callback=_set_verbosity, help="More log lines.")
@_uri_option(group=True)
def cli() -> None:
    """Checkpoints recorded in MLflow runs, from the shell.

    Works on the store --tracking-uri or MLFLOW_TRACKING_URI names (a tracking server or a database), else
    on the local default store, sqlite:///mlflow.db with ./mlruns, in the current folder. Reading commands
    never create a store: without one there they exit 7. RUN_ID below is a run ID that `tracked-ckpt runs`
    prints; the examples work as shown in the folder where the first one ran.

    \b
    Examples:
      tracked-ckpt demo --iterations 15
      tracked-ckpt runs --experiment tracked-ckpt-demo
      tracked-ckpt ls RUN_ID
      tracked-ckpt show RUN_ID@best
      tracked-ckpt pull RUN_ID@10 -o ./step-10
      tracked-ckpt verify RUN_ID
      tracked-ckpt prune RUN_ID --keep-last 2 --keep-best 1 --dry-run
      tracked-ckpt export RUN_ID@best -o best.safetensors
      tracked-ckpt promote RUN_ID@best --name cartpole --alias prod
      tracked-ckpt --tracking-uri sqlite:///mlflow.db sync ./training_checkpoints
    """


# ------------------------------------------------------------------------------------------------ ls / runs


@cli.command("ls", epilog=EXIT_CODES_HELP)
@click.argument("run_id", required=False)
@click.option(
    "-e",
    "--experiment",
    metavar="NAME",
    envvar="MLFLOW_EXPERIMENT_NAME",
    show_envvar=True,
    help="Only runs of this experiment (default: every experiment).",
)
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
    from ..reading import read_client
    from ..views import checkpoints_of, tracked_runs

    client = read_client(tracking_uri)
    mode_ = mode if mode is None else _check_mode(mode)
    if run_id is not None:
        df = checkpoints_of(client, [run_id], metric, mode_)
        if df.empty:
            raise CheckpointNotFoundError(f"run {run_id} at {_redacted(client)} has no committed checkpoint")
    else:
        runs = tracked_runs(client, _experiment_ids(client, experiment))
        df = checkpoints_of(client, [r.info.run_id for r in runs], metric, mode_)
    if df.empty:
        click.echo(f"no committed checkpoints {_searched(client, experiment)}", err=True)
    if fmt != "table":
        _emit_frame(df, fmt)
    elif not df.empty:
        click.echo(_checkpoints_table(df, with_run=run_id is None))


@cli.command("runs", epilog=EXIT_CODES_HELP)
@click.option(
    "-e",
    "--experiment",
    metavar="NAME",
    envvar="MLFLOW_EXPERIMENT_NAME",
    show_envvar=True,
    help="Only this experiment (default: every experiment).",
)
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
    from ..reading import read_client
    from ..views import runs_frame, tracked_runs

    client = read_client(tracking_uri)
    df = runs_frame(tracked_runs(client, _experiment_ids(client, experiment)))
    if df.empty:
        click.echo(f"no runs with tracked_ckpt checkpoints {_searched(client, experiment)}", err=True)
    if fmt != "table":
        _emit_frame(df, fmt)
    elif not df.empty:
        click.echo(_runs_table(_tree_order(df) if tree else df, tree=tree))


def _experiment_ids(client: Any, experiment: str | None) -> list[str]:
    """The experiment named, else every active one (never created: reads look things up)."""
    from ..runs import existing_experiment_ids

    return existing_experiment_ids(client, _redacted(client), experiment, every=True)


def _searched(client: Any, experiment: str | None) -> str:
    where = f"experiment {experiment!r}" if experiment else "any experiment"
    return f"in {where} at {_redacted(client)}"


def _check_mode(mode: str) -> Any:
    from ..policies import check_mode

    return check_mode(mode)


def _redacted(client: Any) -> str:
    from ..store import redact

    return redact(str(client.tracking_uri))


def _emit_frame(df: pd.DataFrame, fmt: str) -> None:
    """csv or json with one shape per field: ISO 8601 UTC times (microseconds), floats as repr (exact)."""
    if fmt == "csv":
        out = df.copy()
        for col in out.columns:
            if str(out[col].dtype).startswith("datetime64"):
                out[col] = out[col].map(_json_value)
        click.echo(out.to_csv(index=False), nl=False)
    else:
        records = [{k: _json_value(v) for k, v in row.items()} for row in df.to_dict("records")]
        click.echo(json.dumps(records, indent=1))


def _json_value(v: Any) -> Any:
    """A cell as JSON: None for NA/NaN/inf, ISO 8601 for a time, Python int/float/bool/str otherwise."""
    import pandas as pd

    if isinstance(v, (list, dict, tuple)):
        return v
    if _is_na(v):
        return None
    if isinstance(v, pd.Timestamp):
        return iso_utc(v)
    if hasattr(v, "item"):  # numpy scalars
        v = v.item()
    if isinstance(v, float) and not math.isfinite(v):
        return None
    return v


def iso_utc(ts: pd.Timestamp) -> str:
    """``2026-11-29T21:37:16.123456Z``: the one timestamp format of the CLI's csv and json output."""
    return str(ts.tz_convert("UTC").strftime("%Y-%m-%dT%H:%M:%S.%fZ"))


_FIRST_COLUMNS = {"samples": 0, "tokens": 1, "reward": 2}  # how far into the data, then the usual monitor


def _checkpoints_table(df: pd.DataFrame, *, with_run: bool) -> str:
    from ..views import CHECKPOINT_COLUMNS

    metrics = [c for c in df.columns if c not in CHECKPOINT_COLUMNS]
    metrics.sort(key=lambda c: (_FIRST_COLUMNS.get(c, len(_FIRST_COLUMNS)), c))
    headers = (["run"] if with_run else []) + ["step", "epoch", *metrics, "size", "age", "mark", "path"]
    rows = []
    for row in df.to_dict("records"):  # not itertuples: it renames metric columns like "val/loss"
        cells = [row["run_id"]] if with_run else []
        cells += [_int(row["step"]), _int(row["epoch"])]
        cells += [_num(row[m]) for m in metrics]
        marks = [name for name, flag in (("latest", row["is_latest"]), ("best", row["is_best"])) if flag]
        cells += [_size(row["size_bytes"]), _age(row["created"]), ",".join(marks), row["path"]]
        rows.append(cells)
    return _table(headers, rows, left={"run", "mark", "path"})


def _runs_table(df: pd.DataFrame, tree: bool = False) -> str:
    headers = ["run", "name", "status", "ckpts", "latest", "best", "size", "started", "forked from"]
    rows = []
    for r in df.itertuples(index=False):
        metric = str(r.monitor).rpartition(":")[0] if isinstance(r.monitor, str) else "best"
        best = "-" if math.isnan(r.best_value) else f"{metric}={_num(r.best_value)} @{_int(r.best_step)}"
        counts = [_int(r.checkpoints), _int(r.latest_step), best, _size(r.size_bytes), _age(r.start_time)]
        parent = "-" if _is_na(r.forked_from) else f"{_parent_run(r.forked_from)} @{_int(r.fork_step)}"
        depth = int(getattr(r, "depth", 0)) if tree else 0
        run = ("   " * (depth - 1) + "└─ " if depth else "") + r.run_id
        rows.append([run, _str(r.run_name), _str(r.status), *counts, parent])
    return _table(headers, rows, left={"run", "name", "status", "best", "forked from"})


def _parent_run(ref: str) -> str:
    return ref[len("runs:/") :].partition("/")[0]


def _tree_order(df: pd.DataFrame) -> pd.DataFrame:
    """Runs in lineage order: each root (newest first), then its forks depth-first, with a ``depth`` column."""
    ids = set(df["run_id"])
    children: dict[str, list[int]] = {}
    roots = []
    for i, ref in enumerate(df["forked_from"]):
        parent = None if _is_na(ref) else _parent_run(str(ref))
        if parent in ids:
            children.setdefault(str(parent), []).append(i)
        else:
            roots.append(i)  # a run, or a fork whose parent is not listed (another experiment, deleted)
    order: list[tuple[int, int]] = []

    def visit(i: int, depth: int) -> None:
        order.append((i, depth))
        for c in children.get(str(df["run_id"].iloc[i]), []):
            visit(c, depth + 1)

    for i in roots:
        visit(i, 0)
    out = df.iloc[[i for i, _ in order]].copy()
    out["depth"] = [d for _, d in order]
    return out


def _table(headers: Sequence[str], rows: Sequence[Sequence[str]], left: set[str]) -> str:
    widths = [max(len(h), *(len(r[i]) for r in rows)) for i, h in enumerate(headers)]

    def line(cells: Sequence[str]) -> str:
        out = [c.ljust(w) if h in left else c.rjust(w) for c, w, h in zip(cells, widths, headers, strict=True)]
        return "  ".join(out).rstrip()

    return "\n".join([line(headers), *(line(r) for r in rows)])


def _is_na(v: Any) -> bool:
    import pandas as pd

    return v is None or bool(pd.isna(v))


def _int(v: Any) -> str:
    return "-" if _is_na(v) else str(int(v))


def _str(v: Any) -> str:
    return "-" if _is_na(v) else str(v)


def _num(v: Any) -> str:
    return "-" if _is_na(v) else f"{float(v):.6g}"


def _size(v: Any) -> str:
    from ..progress import human_bytes

    return "-" if _is_na(v) else human_bytes(int(v))


def _age(ts: Any) -> str:
    if _is_na(ts):
        return "-"
    seconds = max(time.time() - ts.timestamp(), 0.0)
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60)):
        if seconds >= size:
            return f"{seconds / size:.0f}{unit}"
    return f"{seconds:.0f}s"


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
    from .. import maintenance

    parsed = _parse(ref)
    if parsed is None:  # models:/...: MLflow's model APIs name the run and the folder
        from ..lifecycle import resolve_source
        from ..reading import read_client

        return resolve_source(read_client(tracking_uri), ref)
    catalog = maintenance.open_catalog(parsed.run_id, tracking_uri)
    return catalog, maintenance.resolve(catalog, parsed, metric, mode)


def _parse(ref: str) -> Any:
    """A run reference (maintenance.Ref), or None for a well-formed ``models:/`` one; exit 2 for a bad one."""
    from .. import maintenance
    from ..errors import ConfigError
    from ..refs import is_model_uri, parse_model

    try:
        return None if is_model_uri(ref) and parse_model(ref) else maintenance.parse(ref)
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
    if parsed is None:
        verdicts = [maintenance.verify_one(*_resolve(ref, metric, mode, tracking_uri))]
    elif parsed.explicit:
        catalog = maintenance.open_catalog(parsed.run_id, tracking_uri)
        verdicts = [maintenance.verify_one(catalog, maintenance.resolve(catalog, parsed, metric, mode))]
    else:
        verdicts = maintenance.verify_run(maintenance.open_catalog(parsed.run_id, tracking_uri))
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
    catalog = maintenance.open_catalog(run_id, tracking_uri)
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
    path = export_model(ref, out, format=fmt, tracking_uri=tracking_uri, overwrite=force)  # type: ignore[arg-type]
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
    p = promote(ref, name, alias=alias, tracking_uri=tracking_uri)
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
    from .. import maintenance
    from ..models import CheckpointModels

    for run_id in run_ids:
        catalog = maintenance.open_catalog(run_id, tracking_uri)
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


# ----------------------------------------------------------------------------------------------- follow


@cli.command("follow", epilog=EXIT_CODES_HELP)
@click.argument("run")
@click.argument("command", nargs=-1, type=click.UNPROCESSED, metavar="-- CMD [ARGS]...")
@click.option("--latest-only", is_flag=True, help="Skip to the newest checkpoint each time (an inference server).")
@click.option("--log-metrics", is_flag=True, help="Log CMD's key=value output lines into the run at the step.")
@click.option("--resume", metavar="KEY", help="Start after the last step at which the run has metric KEY.")
@click.option("--until-step", type=int, help="Stop after the checkpoint of this step (or the first one past it).")
@click.option("--timeout", type=float, help="Stop after this many seconds.")
@click.option("--weights-only", is_flag=True, help="Fetch only the model's weights (model.pt).")
@click.option("--cache-dir", type=click.Path(file_okay=False), help="Keep fetched files here (default: a temp dir).")
@_common
def follow_cmd(run: str, command: tuple[str, ...], latest_only: bool, log_metrics: bool, resume: str | None,
               until_step: int | None, timeout: float | None, weights_only: bool, cache_dir: str | None,
               tracking_uri: str | None) -> None:  # fmt: skip
    """Run CMD for each new checkpoint of RUN as it is recorded; exit when the run ends.

    CMD gets the checkpoint's verified local folder and step as {path}, {step}, {ref}, {run_id} in its
    arguments and as TRACKED_CKPT_PATH, TRACKED_CKPT_STEP, TRACKED_CKPT_REF, TRACKED_CKPT_RUN_ID. A failing CMD
    stops the follower with its exit status.

    \b
    Examples:
      tracked-ckpt follow RUN_ID --log-metrics --resume eval/accuracy -- python eval.py {path}
      tracked-ckpt follow RUN_ID --latest-only --weights-only -- ./reload-server.sh
    """
    from ..follow_cmd import follow_command

    sys.exit(follow_command(run, command, latest_only=latest_only, log_metrics=log_metrics, resume=resume,
                            until_step=until_step, timeout=timeout, weights_only=weights_only, cache_dir=cache_dir,
                            tracking_uri=tracking_uri))  # fmt: skip


# ------------------------------------------------------------------------------------------------- demo


@cli.command(
    "demo",
    add_help_option=False,
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def demo_cmd(ctx: click.Context, args: tuple[str, ...]) -> None:
    """Run the demo training job (REINFORCE cart-pole) in the current folder; `demo --help` for options.

    \b
    Examples:
      tracked-ckpt demo                   # a new run, or resume this folder's run
      tracked-ckpt demo --iterations 10
    """
    from ..demo import main as demo_main

    uri = ctx.meta.get(URI_KEY)
    if uri and not any(a == "--tracking-uri" or a.startswith("--tracking-uri=") for a in args):
        args = ("--tracking-uri", uri, *args)  # given before the command name
    sys.exit(demo_main(list(args), prog="tracked-ckpt demo"))


def main(argv: Sequence[str] | None = None) -> None:
    """Console-script entry point (``tracked-ckpt``)."""
    cli.main(args=list(argv) if argv is not None else None, prog_name="tracked-ckpt")
