"""Log a built HTML report as an artifact of the flow's parent MLflow run (under `report/`).

The flow's join step calls `dashboards.report.build_report(...)` and then this function; it is its own
module so that the flow never talks to MLflow directly.
"""

from __future__ import annotations

from pathlib import Path

from mlflow.tracking import MlflowClient


def log_report_to_mlflow(parent_run_id: str, html_path: str | Path, tracking_uri: str | None = None) -> str:
    """Upload `html_path` to `report/<file name>` of run `parent_run_id`; returns that artifact path."""
    path = Path(html_path)
    if not path.is_file():
        raise ValueError(f"html_path ({str(path)!r}) is not a file; build it first with dashboards.report.build_report.")
    MlflowClient(tracking_uri=tracking_uri).log_artifact(parent_run_id, str(path), artifact_path="report")
    return f"report/{path.name}"
