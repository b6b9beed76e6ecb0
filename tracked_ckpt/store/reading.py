"""How the read-only paths reach MLflow: an existing store only, within a short time.

MLflow creates a store wherever its URI points: with no URI set it uses ``sqlite:///mlflow.db`` in the working
directory, and its first call there creates an empty ~1 MB database. A read (``tracked-ckpt ls``, ``list_runs``,
``load``) started in the wrong folder would then answer "no runs" and leave that file behind. ``read_client``
refuses instead, naming the store it looked for and how to point at the right one. Reads also run under
``_http.READ``: a server that refuses connections fails them at once, a hung one within seconds.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import urlparse

from mlflow.tracking import MlflowClient

from ..errors import StoreNotFoundError
from .http import READ, bounded
from .run_store import redact


def resolve_uri(tracking_uri: str | None) -> str:
    """The tracking URI MLflow would use: the argument, else MLFLOW_TRACKING_URI, else its default in the cwd."""
    if tracking_uri:
        return tracking_uri
    import mlflow

    return str(mlflow.get_tracking_uri())


def missing_store(uri: str) -> Path | None:
    """The local file or folder a ``sqlite:`` / ``file:`` URI names, when it does not exist; else None."""
    scheme = urlparse(uri).scheme
    if scheme == "sqlite":
        from sqlalchemy.engine import make_url

        database = make_url(uri).database
        if not database or database == ":memory:" or database.startswith("file:"):
            return None
        path = Path(database)
    elif scheme in ("file", "") or (len(scheme) == 1 and uri[1:2] == ":"):  # a bare path is a file store
        from mlflow.utils.file_utils import local_file_uri_to_path

        path = Path(local_file_uri_to_path(uri))  # type: ignore[no-untyped-call]
    else:  # a server or a database server: asking it is the only way to know
        return None
    return None if path.exists() else path.absolute()


def read_client(tracking_uri: str | None) -> MlflowClient:
    """A client on an existing store; StoreNotFoundError (and nothing created) when the URI names a missing one."""
    uri = resolve_uri(tracking_uri)
    path = missing_store(uri)
    if path is not None:
        raise StoreNotFoundError(
            f"no MLflow tracking store at {redact(uri)} ({path} does not exist; nothing was created). Point at the "
            f"training's store with --tracking-uri URI (tracking_uri= in Python) or MLFLOW_TRACKING_URI, or cd to "
            f"the folder that holds its {path.name}"
        )
    return MlflowClient(tracking_uri=uri)


@contextlib.contextmanager
def reading() -> Iterator[None]:
    """MLflow calls made in this block follow the READ policy (a refused server fails in well under a second)."""
    with bounded(READ):
        yield
