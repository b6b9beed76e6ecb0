"""The ``tracked-ckpt`` click group and the options its commands share (logging, --tracking-uri, retries)."""

from __future__ import annotations

import functools
import logging
import os
import sys
from collections.abc import Callable
from typing import Any, TypeVar

import click

from .errors import EXIT_CODES_HELP, URI_KEY, _Cli

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


def _experiment_option(help: str) -> Callable[[F], F]:
    """``-e/--experiment NAME`` (``MLFLOW_EXPERIMENT_NAME``), as ``ls`` and ``runs`` take it."""
    return click.option("-e", "--experiment", metavar="NAME", envvar="MLFLOW_EXPERIMENT_NAME", show_envvar=True,
                        help=help)  # fmt: skip


def _common(f: F) -> F:
    f = click.option(
        "-v", "--verbose", count=True, expose_value=False, callback=_set_verbosity, help="More log lines (-vv: debug)."
    )(f)
    return _uri_option(group=False)(f)


def _reads(f: F) -> F:
    """A command that reads MLflow: bounded retries and timeouts (a refused server fails in a second)."""

    @functools.wraps(f)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        from ..store.reading import reading

        with reading():
            return f(*args, **kwargs)

    return wrapper  # type: ignore[return-value]


def _mode_options(f: F) -> F:
    f = click.option("--mode", type=click.Choice(["max", "min"]), help="Direction of --metric.")(f)
    return click.option(
        "--metric", metavar="NAME", help="Metric that defines 'best' (default: the run's tag tracked_ckpt.monitor)."
    )(f)


def store_factory() -> Any:
    """The storage seam of this invocation: ``cli.main(obj={"store_factory": ...})`` (a test's RunStore subclass)."""
    from ..store.run_store import RunStore

    obj = click.get_current_context().find_root().obj
    return obj.get("store_factory", RunStore) if isinstance(obj, dict) else RunStore


def open_run(run_id: str, tracking_uri: str | None) -> Any:
    """The catalog of ``run_id`` through this invocation's store seam (resolver.open_catalog)."""
    from ..resolver import open_catalog

    return open_catalog(run_id, tracking_uri, store_factory=store_factory())


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
