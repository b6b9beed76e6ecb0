"""Exit codes, and the mapping from the library's exceptions to them and one readable line."""

from __future__ import annotations

import logging
import re
import sys
from typing import Any

import click

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

log = logging.getLogger("tracked_ckpt.cli")
URI_KEY = "tracked_ckpt.tracking_uri"  # ctx.meta: the --tracking-uri given before or after the command name


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
    from ..store.reading import resolve_uri
    from ..store.run_store import redact

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

