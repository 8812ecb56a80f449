"""Small MLflow helpers shared by the steps: where runs go, how they nest, what they are tagged with.

Layout (DESIGN.md "Tracking contract"): one parent run per flow run, named `pcsd-<flow run id>`, and one
nested child run per sweep branch, named after the branch label. Runs are created and reopened by id, so
every Metaflow task (a separate process, possibly another working directory) logs into the same runs.

Names (tags, metrics, the default store `sqlite:///<repo>/mlflow.db`) come from the tracking contract,
`pcsd_core.tracking_contract`, which the dashboards read by too.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pcsd_core.tracking_contract import (DEFAULT_EXPERIMENT, TAG_BRANCH, TAG_FLOW_RUN_ID, TAG_PARENT_RUN,
                                         TAG_PATHSPEC, TAG_RUN_NAME, tracking_uri)

MAX_PARAM_CHARS = 6000  # MLflow rejects longer param values


def setup_tracking(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at the tracking store and experiment; return the experiment id."""
    mlflow.set_tracking_uri(tracking_uri())
    found = mlflow.set_experiment(os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment))
    return found.experiment_id


def client() -> MlflowClient:
    return MlflowClient(tracking_uri=tracking_uri())


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    """MLflow params are strings of bounded length; None becomes "" and long values are cut."""
    return {key: ("" if value is None else str(value))[:MAX_PARAM_CHARS] for key, value in params.items()}


def start_parent_run(flow_run_id: str, pathspec: str, params: dict[str, Any], experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create the flow run's parent run (left open until `finish_run`); return its id."""
    experiment_id = setup_tracking(experiment)
    tags = {TAG_FLOW_RUN_ID: str(flow_run_id), TAG_PATHSPEC: pathspec, TAG_RUN_NAME: f"pcsd-{flow_run_id}"}
    run = client().create_run(experiment_id, run_name=f"pcsd-{flow_run_id}", tags=tags)
    _log_params(run.info.run_id, params)
    return run.info.run_id


def start_child_run(parent_run_id: str, label: str, flow_run_id: str, pathspec: str, params: dict[str, Any]) -> str:
    """Create the nested run of one sweep branch under `parent_run_id`; return its id."""
    parent = client().get_run(parent_run_id)
    tags = {
        TAG_PARENT_RUN: parent_run_id,
        TAG_BRANCH: label,
        TAG_FLOW_RUN_ID: str(flow_run_id),
        TAG_PATHSPEC: pathspec,
    }
    run = client().create_run(parent.info.experiment_id, run_name=label, tags=tags)
    _log_params(run.info.run_id, params)
    return run.info.run_id


@contextlib.contextmanager
def open_run(run_id: str, system_metrics: bool = True) -> Iterator[mlflow.ActiveRun]:
    """Reopen a run by id as the active run (system metrics sampled meanwhile); FAILED if the body raises."""
    mlflow.set_tracking_uri(tracking_uri())
    # The run's own experiment must be the active one, or MLflow refuses to reopen it.
    mlflow.set_experiment(experiment_id=client().get_run(run_id).info.experiment_id)
    with mlflow.start_run(run_id=run_id, log_system_metrics=system_metrics and _has_psutil()) as run:
        yield run


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def set_run_status(run_id: str, status: str) -> None:
    """RUNNING again (a retried step), or ended as FINISHED / FAILED / KILLED."""
    if status == "RUNNING":
        client().update_run(run_id, status="RUNNING")
    else:
        finish_run(run_id, status)


def metric_logger(run_id: str) -> Callable[[dict[str, float], int], None]:
    """A `log_metrics(metrics, step)` callable for the Distiller that writes to `run_id` in one batch."""
    mlflow_client = client()

    def log_metrics(metrics: dict[str, float], step: int) -> None:
        timestamp_ms = int(time.time() * 1000)
        batch = [Metric(key, float(value), timestamp_ms, int(step)) for key, value in metrics.items()]
        mlflow_client.log_batch(run_id, metrics=batch)

    return log_metrics


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    metric_logger(run_id)(metrics, 0 if step is None else step)


def _log_params(run_id: str, params: dict[str, Any]) -> None:
    flat = flatten_params(params)
    items = list(flat.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client().log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401  (system metrics need it)
    except ImportError:
        return False
    return True
