"""The tracking server's half of the storage seam: experiments, run search, logged models and the Model Registry.

``TrackingStore`` wraps an explicit ``MlflowClient`` (never MLflow's global tracking URI); ``RunStore``
(run_store.py) extends it with one run's artifacts, metrics and tags. Every MLflow call of tracked_ckpt goes
through ``_call``: tracked_ckpt's own HTTP budget (http.py), and MLflow's errors turned into ``StoreError`` /
``RunNotFoundError`` in one place (``describe_mlflow_error``). A test injects a fault by subclassing ``RunStore``
(or this class) and overriding ``_call`` or one method; ``store_factory=`` hands the subclass to any command.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from ..errors import RunNotFoundError, StoreError
from . import http as _http

_HTTP_STATUS = re.compile(r"(?:error code|status code|status)\D{0,4}(4\d\d)\b|\b(4\d\d) Client Error")
_PERMANENT_CODES = {"PERMISSION_DENIED", "UNAUTHENTICATED", "INVALID_PARAMETER_VALUE", "BAD_REQUEST"}
NOT_FOUND_CODES = ("RESOURCE_DOES_NOT_EXIST", "INVALID_PARAMETER_VALUE", "NOT_FOUND")


def describe_mlflow_error(e: Exception, action: str, server: str) -> StoreError:
    """Turn an MLflow/HTTP failure into a StoreError naming the server, the action and what to do.

    ``transient`` tells the outbox whether retrying can help: refused, timed out and 5xx can; permission,
    authentication and validation errors cannot. ``error_code`` keeps MLflow's code ("" when it had none).
    """
    code = str(getattr(e, "error_code", "") or "")
    text = _short(str(e).splitlines()[0] if str(e) else type(e).__name__)
    status = _HTTP_STATUS.search(text)
    http = (status.group(1) or status.group(2)) if status else ""
    if code == "PERMISSION_DENIED" or http == "403" or "Permission denied" in text:
        hint = "the MLflow user lacks permission; ask for EDIT (MANAGE to delete) on the experiment"
    elif code == "UNAUTHENTICATED" or http == "401":
        hint = "check MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD"
    else:
        hint = "check that the tracking server is up and reachable"
    err = StoreError(f"MLflow at {server} failed to {action}: {text} ({hint})")
    denied = "AccessDenied" in text or "InvalidAccessKeyId" in text or "SignatureDoesNotMatch" in text
    err.transient = not (
        code in _PERMANENT_CODES or http in ("400", "401", "403") or "Permission denied" in text or denied
    )
    err.error_code = code
    return err


_NETWORK = (
    (re.compile(r"Read timed out|timed out|Timeout", re.I), "no answer in time"),
    (re.compile(r"too many (\d{3}) error responses", re.I), "HTTP {0} (the server is failing)"),
    (re.compile(r"Connection refused|NewConnectionError|Failed to establish", re.I), "connection refused"),
    (re.compile(r"RemoteDisconnected|Connection aborted|Connection reset|ConnectionResetError", re.I),
     "connection dropped"),
)


def _short(text: str) -> str:
    """One short clause for a network failure (MLflow's own text runs to hundreds of characters), else the text."""
    if "Max retries exceeded" in text or "failed with exception" in text or "timed out" in text:
        for pattern, said in _NETWORK:
            m = pattern.search(text)
            if m:
                return said.format(*m.groups())
    return text if len(text) <= 300 else text[:297].rsplit(" ", 1)[0] + " ..."


def _from_object_store(e: Exception) -> bool:
    """An error of the S3 client (boto3/botocore/s3transfer), which MLflow's S3 repository lets through as is."""
    return type(e).__module__.split(".")[0] in ("botocore", "boto3", "s3transfer")


def redact(uri: str) -> str:
    """A tracking URI with any user:password@ part removed, safe for logs and errors."""
    if "@" in uri and "://" in uri:
        scheme, rest = uri.split("://", 1)
        return f"{scheme}://{rest.split('@', 1)[1]}"
    return uri


def not_found(e: StoreError) -> bool:
    """Whether a StoreError says the thing asked for does not exist (a model, a version), not that MLflow failed."""
    return getattr(e, "error_code", "") in NOT_FOUND_CODES


class TrackingStore:
    """What tracked_ckpt asks of an MLflow tracking server beyond one run's files: every call through ``_call``."""

    def __init__(self, client: MlflowClient) -> None:
        self.client = client
        self.server = redact(str(client.tracking_uri))

    def _call(self, fn: Any, action: str) -> Any:
        """``fn()`` under the HTTP budget; MLflow, network and object-store errors become StoreError (one place)."""
        try:
            with _http.bounded():  # inside an explicit PROBE block, that stricter policy stays (see probe)
                return fn()
        except MlflowException as e:
            if e.error_code == "RESOURCE_DOES_NOT_EXIST" and action.startswith("get run "):
                raise RunNotFoundError(
                    f"run {action.removeprefix('get run ')!r} does not exist at tracking URI {self.server}; check the "
                    "run ID and MLFLOW_TRACKING_URI (`tracked-ckpt runs` lists runs)"
                ) from None
            raise describe_mlflow_error(e, action, self.server) from e
        except OSError as e:
            if isinstance(e, StoreError):  # already translated (a nested call, an injected fault)
                raise
            raise describe_mlflow_error(e, action, self.server) from e
        except Exception as e:
            if not _from_object_store(e):
                raise
            raise describe_mlflow_error(e, action, self.server) from e

    # ------------------------------------------------------------------------------------ experiments, runs

    def experiment_by_name(self, name: str) -> Any:
        """The experiment named ``name`` (any lifecycle stage), or None."""
        return self._call(lambda: self.client.get_experiment_by_name(name), f"find experiment {name!r}")

    def experiment_name(self, experiment_id: str) -> str:
        return str(self._call(lambda: self.client.get_experiment(experiment_id).name, "read an experiment"))

    def create_experiment(self, name: str, tags: dict[str, str]) -> str:
        return str(self._call(lambda: self.client.create_experiment(name, tags=tags), f"create experiment {name!r}"))

    def experiment_ids(self) -> list[str]:
        """The IDs of every active experiment."""
        found = self._call(lambda: self.client.search_experiments(), "list experiments")
        return [str(e.experiment_id) for e in found]

    def get_run(self, run_id: str) -> Any:
        """The MLflow run; RunNotFoundError when it does not exist."""
        return self._call(lambda: self.client.get_run(run_id), f"get run {run_id}")

    def search_runs(self, experiment_ids: Sequence[str], filter_string: str = "", **kwargs: Any) -> Any:
        """One page of ``search_runs`` (``max_results``, ``order_by``, ``page_token`` as MLflow takes them)."""
        ids = list(experiment_ids)
        return self._call(lambda: self.client.search_runs(ids, filter_string, **kwargs), "search runs")

    def create_run(self, experiment_id: str, tags: dict[str, str], run_name: str | None, params: Any) -> str:
        """A new run with these tags and params (a list of mlflow Param); its ID."""
        def create() -> str:
            run = self.client.create_run(experiment_id, tags=tags, run_name=run_name)
            self.client.log_batch(run.info.run_id, params=params)
            return str(run.info.run_id)

        return str(self._call(create, f"create a run in experiment {experiment_id}"))

    def delete_run(self, run_id: str) -> None:
        self._call(lambda: self.client.delete_run(run_id), f"delete run {run_id}")

    def metric_history(self, run_id: str, key: str) -> list[Any]:
        return list(self._call(lambda: self.client.get_metric_history(run_id, key), f"read metric {key}"))

    def log_batch(self, run_id: str, action: str, **batch: Any) -> None:
        """``log_batch`` of metrics/params/tags into run ``run_id`` (``synchronous=`` passed through)."""
        self._call(lambda: self.client.log_batch(run_id, **batch), action)

    # --------------------------------------------------------------------------------------- logged models

    def logged_model(self, model_id: str) -> Any:
        return self._call(lambda: self.client.get_logged_model(model_id), f"read model {model_id}")

    def create_logged_model(self, experiment_id: str, action: str, **fields: Any) -> Any:
        return self._call(lambda: self.client.create_logged_model(experiment_id, **fields), action)

    def finalize_logged_model(self, model_id: str) -> None:
        self._call(lambda: self.client.finalize_logged_model(model_id, "READY"), f"finalize model {model_id}")

    def set_logged_model_tags(self, model_id: str, tags: dict[str, str]) -> None:
        self._call(lambda: self.client.set_logged_model_tags(model_id, tags), f"tag model {model_id}")

    def delete_logged_model(self, model_id: str, action: str) -> None:
        self._call(lambda: self.client.delete_logged_model(model_id), action)

    def search_logged_models(self, experiment_ids: list[str], filter_string: str, action: str, **kwargs: Any) -> Any:
        """One page of ``search_logged_models`` (``max_results``, ``page_token``)."""
        return self._call(lambda: self.client.search_logged_models(experiment_ids, filter_string, **kwargs), action)

    def log_outputs(self, run_id: str, outputs: list[Any], action: str) -> None:
        self._call(lambda: self.client.log_outputs(run_id, outputs), action)

    # ------------------------------------------------------------------------------------ the Model Registry

    def model_version(self, name: str, *, alias: str | None = None, version: str | None = None) -> Any:
        """The version of registered model ``name`` that ``alias`` (else ``version``) names."""
        if alias is not None:
            return self._call(lambda: self.client.get_model_version_by_alias(name, alias), f"look up {name}@{alias}")
        return self._call(lambda: self.client.get_model_version(name, str(version)), f"look up {name}/{version}")

    def search_model_versions(self, filter_string: str, action: str) -> list[Any]:
        return list(self._call(lambda: self.client.search_model_versions(filter_string), action))

    def ensure_registered_model(self, name: str, description: str) -> None:
        """Create registered model ``name`` unless it exists."""
        try:
            self._call(lambda: self.client.create_registered_model(name, description=description),
                       f"create registered model {name!r}")  # fmt: skip
        except StoreError as e:
            if getattr(e, "error_code", "") != "RESOURCE_ALREADY_EXISTS":
                raise

    def create_model_version(self, name: str, action: str, **fields: Any) -> Any:
        return self._call(lambda: self.client.create_model_version(name, **fields), action)

    def set_alias(self, name: str, alias: str, version: str) -> None:
        self._call(lambda: self.client.set_registered_model_alias(name, alias, version), f"set alias {name}@{alias}")
