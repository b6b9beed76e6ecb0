"""How long one of tracked_ckpt's MLflow HTTP calls may take: its own retries and timeouts, not MLflow's defaults.

MLflow's client retries a failed call 7 times with exponential back-off and waits up to 120 s for each answer
(``MLFLOW_HTTP_REQUEST_MAX_RETRIES`` / ``_BACKOFF_FACTOR`` / ``_TIMEOUT``): ~4 minutes against a server that refuses,
far longer against one that hangs. tracked_ckpt retries at its own level (the outbox, the publisher's probes), so
each of its calls gets a short budget instead. ``bounded()`` sets a context variable for the calls made inside it;
MLflow's ``http_request`` is wrapped once, at import, and fills in ``max_retries``, ``backoff_factor`` and
``timeout`` from that variable where its caller passed none. Calls outside ``bounded()`` (the user's own MLflow
calls) are untouched. A user's environment may lower the budget further, never raise it.

Artifact transfers get a longer read timeout than metadata calls: a proxying server answers an upload only
after it has stored it. ``requests`` timeouts bound the wait for the next bytes, not the whole transfer, so a
large file that keeps moving is never cut.
"""

from __future__ import annotations

import contextlib
import contextvars
import functools
import importlib
import os
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any


@dataclass(frozen=True)
class CallPolicy:
    """Retries and timeouts of one MLflow HTTP call."""

    max_retries: int
    backoff_factor: float
    timeout: float  # seconds to connect, and between bytes of an answer (metadata calls)
    transfer_timeout: float  # the same for artifact uploads and downloads

    def effective(self) -> CallPolicy:
        """This policy, lowered (never raised) by the user's ``MLFLOW_HTTP_REQUEST_*`` variables."""
        retries, backoff, timeout = self.max_retries, self.backoff_factor, self.timeout
        transfer = self.transfer_timeout
        with contextlib.suppress(ValueError):
            if "MLFLOW_HTTP_REQUEST_MAX_RETRIES" in os.environ:
                retries = min(retries, int(os.environ["MLFLOW_HTTP_REQUEST_MAX_RETRIES"]))
        with contextlib.suppress(ValueError):
            if "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR" in os.environ:
                backoff = min(backoff, float(os.environ["MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR"]))
        with contextlib.suppress(ValueError):
            if "MLFLOW_HTTP_REQUEST_TIMEOUT" in os.environ:
                user = float(os.environ["MLFLOW_HTTP_REQUEST_TIMEOUT"])
                timeout, transfer = min(timeout, user), min(transfer, user)
        return CallPolicy(max(0, retries), max(0.0, backoff), timeout, transfer)


# One retry (immediate, urllib3 sleeps only from the second) absorbs a dropped keep-alive connection or a single
# 503 from a load balancer; anything longer is an outage, which the publisher handles without blocking training.
CALL = CallPolicy(max_retries=1, backoff_factor=0.5, timeout=15.0, transfer_timeout=60.0)
# "Is the server back?": one short attempt, so that a hung server costs a probe at most this long.
PROBE = CallPolicy(max_retries=0, backoff_factor=0.0, timeout=5.0, transfer_timeout=5.0)
# Reads for a person waiting at a prompt or in a notebook (ls, show, list_runs, load): a refused server fails
# at once, a hung one within ~10 s, instead of MLflow's minutes. Downloads keep the long between-bytes timeout.
READ = CallPolicy(max_retries=1, backoff_factor=0.5, timeout=5.0, transfer_timeout=60.0)

# Completing a multipart upload: the object store assembles the parts before it answers (S3 documents "several
# minutes" for large objects; moto took ~48 s for 5.2 GiB here). Not retried: a second "complete" of one upload fails.
FINISH = CallPolicy(max_retries=0, backoff_factor=0.0, timeout=15.0, transfer_timeout=900.0)

_policy: contextvars.ContextVar[CallPolicy | None] = contextvars.ContextVar("tracked_ckpt_http_policy", default=None)


@contextlib.contextmanager
def bounded(policy: CallPolicy | None = None) -> Iterator[CallPolicy]:
    """MLflow HTTP calls made in this block (on this thread) follow ``policy``, lowered by the user's environment.

    Without ``policy``: the enclosing block's policy if there is one (a PROBE stays a probe), else ``CALL``.
    """
    install()
    outer = _policy.get()
    effective = outer if policy is None and outer is not None else (policy or CALL).effective()
    token = _policy.set(effective)
    try:
        yield effective
    finally:
        _policy.reset(token)


def current() -> CallPolicy:
    """The policy of the enclosing ``bounded()`` block, else ``CALL`` (for requests tracked_ckpt makes itself)."""
    return _policy.get() or CALL.effective()


def in_context(fn: Callable[..., Any]) -> Callable[..., Any]:
    """``fn`` carrying the caller's policy: worker threads (a ThreadPoolExecutor) keep the caller's budget."""
    policy = _policy.get()

    def run(*args: Any, **kwargs: Any) -> Any:
        token = _policy.set(policy)
        try:
            return fn(*args, **kwargs)
        finally:
            _policy.reset(token)

    return run


# Modules that import ``http_request`` by name (``from mlflow.utils.rest_utils import http_request``).
_USERS = (
    "mlflow.utils.rest_utils",
    "mlflow.store.tracking.rest_store",
    "mlflow.store.artifact.http_artifact_repo",
    "mlflow.store.model_registry.rest_store",
)
_installed = False


def install() -> None:
    """Wrap MLflow's ``http_request`` once; a no-op afterwards."""
    global _installed
    if _installed:
        return
    rest_utils = importlib.import_module("mlflow.utils.rest_utils")
    original = rest_utils.http_request
    if getattr(original, "_tracked_ckpt", False):
        _installed = True
        return

    @functools.wraps(original)
    def http_request(host_creds: Any, endpoint: str, method: str, *args: Any, **kwargs: Any) -> Any:
        policy = _policy.get()
        if policy is not None and not args:
            if kwargs.get("max_retries") is None:
                kwargs["max_retries"] = policy.max_retries
            if kwargs.get("backoff_factor") is None:
                kwargs["backoff_factor"] = policy.backoff_factor
            if kwargs.get("timeout") is None:
                transfer = "mlflow-artifacts" in f"{getattr(host_creds, 'host', '')}{endpoint}"
                kwargs["timeout"] = policy.transfer_timeout if transfer else policy.timeout
        return original(host_creds, endpoint, method, *args, **kwargs)

    http_request._tracked_ckpt = True  # type: ignore[attr-defined]
    for name in _USERS:
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    # Every loaded module holding the original by name (including MLflow modules imported before this call).
    for module in list(sys.modules.values()):
        if module is not None and getattr(module, "http_request", None) is original:
            setattr(module, "http_request", http_request)  # noqa: B010
    _installed = True
