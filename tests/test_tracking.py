"""store/tracking.py: MLflow's errors translated in one place (``TrackingStore._call``), as tables; no server needed.

The calls below raise what MLflow's client raises (MlflowException with its codes, requests' OSErrors); the store
turns each into the error a caller can act on.
"""

from __future__ import annotations

import pytest
from mlflow.exceptions import MlflowException
from mlflow.protos.databricks_pb2 import ErrorCode
from mlflow.tracking import MlflowClient

from tracked_ckpt.errors import RunNotFoundError, StoreError
from tracked_ckpt.store.tracking import TrackingStore, describe_mlflow_error, not_found, redact

SERVER = "http://user:secret@tracking.example:5000"


def mlflow_error(message: str, code: str) -> MlflowException:
    """What MLflow's client raises for an error answer with this code."""
    return MlflowException(message, error_code=ErrorCode.Value(code))


@pytest.mark.parametrize(
    ("error", "transient", "hint"),
    [
        (mlflow_error("no", "PERMISSION_DENIED"), False, "lacks permission"),
        (mlflow_error("who", "UNAUTHENTICATED"), False, "MLFLOW_TRACKING_USERNAME"),
        (mlflow_error("bad", "INVALID_PARAMETER_VALUE"), False, "tracking server is up"),
        (mlflow_error("oops", "INTERNAL_ERROR"), True, "tracking server is up"),
        (ConnectionRefusedError("Max retries exceeded ... Connection refused"), True, "connection refused"),
        (OSError("API request failed with exception Read timed out"), True, "no answer in time"),
        (OSError("403 Client Error: Forbidden"), False, "lacks permission"),
    ],
)
def test_describe_mlflow_error_says_what_failed_and_whether_a_retry_helps(
    error: Exception, transient: bool, hint: str
) -> None:
    err = describe_mlflow_error(error, "search runs", redact(SERVER))
    assert isinstance(err, StoreError) and err.transient is transient
    assert str(err).startswith("MLflow at http://tracking.example:5000 failed to search runs: ") and hint in str(err)
    assert "secret" not in str(err)
    assert err.error_code == str(getattr(error, "error_code", "") or "")


def raising(e: Exception) -> object:
    def fn() -> object:
        raise e

    return fn


def test_call_translates_every_failure_once_and_keeps_the_code() -> None:
    store = TrackingStore(MlflowClient(tracking_uri=SERVER))
    assert store.server == "http://tracking.example:5000"
    assert store._call(lambda: 42, "answer") == 42
    with pytest.raises(StoreError, match="failed to read model m-1") as err:
        store._call(raising(mlflow_error("gone", "RESOURCE_DOES_NOT_EXIST")), "read model m-1")
    assert not_found(err.value) and isinstance(err.value.__cause__, MlflowException)
    with pytest.raises(RunNotFoundError, match="run 'abc' does not exist at tracking URI http://tracking.example"):
        store._call(raising(mlflow_error("gone", "RESOURCE_DOES_NOT_EXIST")), "get run abc")
    with pytest.raises(StoreError, match="connection refused") as down:
        store._call(raising(ConnectionError("Max retries exceeded: Connection refused")), "get run abc")
    assert not not_found(down.value) and down.value.transient
    injected = StoreError("injected")
    with pytest.raises(StoreError) as same:
        store._call(raising(injected), "list experiments")
    assert same.value is injected  # already translated: passed on as is
    with pytest.raises(KeyError):  # a bug of ours is no store failure
        store._call(raising(KeyError("x")), "list experiments")


def test_a_registered_model_that_exists_already_is_no_failure() -> None:
    class Registry(TrackingStore):
        codes: list[str] = []

        def _call(self, fn: object, action: str) -> object:
            code = self.codes.pop(0)
            raise describe_mlflow_error(mlflow_error(action, code), action, self.server)

    store = Registry(MlflowClient(tracking_uri=SERVER))
    store.codes = ["RESOURCE_ALREADY_EXISTS"]
    store.ensure_registered_model("cartpole", "d")
    store.codes = ["PERMISSION_DENIED"]
    with pytest.raises(StoreError, match="create registered model 'cartpole'"):
        store.ensure_registered_model("cartpole", "d")
