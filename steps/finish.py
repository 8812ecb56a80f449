"""End step: close the flow's parent MLflow run with its summary and report, and say where to look.

The parent run gets the best branch's evaluation metrics (`best/...`), the number of failed branches, the
registered model version as tags, and the HTML sweep report (`report/`). It is marked FAILED when every
branch failed, so a broken sweep stands out in the MLflow UI.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from steps import tracking


def finish(parent_run_id: str, summary: Any, registration: Any, pathspec: str) -> str:
    """Log the sweep summary and report to the parent run, close it, print where to look; returns the report path."""
    client = tracking.client()
    metrics = {"sweep/failed_branches": float(len(summary.failed)), "sweep/branches": float(len(summary.outcomes))}
    if summary.best is not None:
        metrics.update({f"best/{name}": value for name, value in summary.best.evaluation.metrics.items()})
        client.set_tag(parent_run_id, "pcsd.best_branch", summary.best.label)
    if registration is not None:
        client.set_tag(parent_run_id, "pcsd.registered_model", registration.model_uri)
    tracking.log_metrics(parent_run_id, metrics)
    report_path = _log_report(parent_run_id)
    tracking.finish_run(parent_run_id, "FINISHED" if summary.best is not None else "FAILED")
    print(where_to_look(pathspec))
    return report_path


def where_to_look(pathspec: str = "") -> str:
    """The commands that show a finished run: the MLflow UI and the Metaflow cards."""
    # `card view end` alone shows the latest run's card.
    run = f"{pathspec.split('/')[1]}/" if pathspec.count("/") >= 1 else ""
    return "\n".join([
        "Done. Where to look:",
        f"  MLflow UI:       mlflow ui --backend-store-uri {tracking.tracking_uri()}",
        f"  Metaflow cards:  python flows/pcsd_flow.py card view {run}end   (also {run}join, {run}distill)",
        "  Sweep report:    python -m dashboards.report --latest",
    ])  # fmt: skip


def _log_report(parent_run_id: str) -> str:
    """The dashboards' HTML sweep report, logged under `report/` of the parent run ("" if it cannot be built)."""
    try:
        from dashboards.report import build_report
        from steps.report import log_report_to_mlflow

        path = build_report(tracking_uri=tracking.tracking_uri(), parent_run_id=parent_run_id)
        log_report_to_mlflow(parent_run_id, path, tracking_uri=tracking.tracking_uri())
    except Exception as error:  # the report is a convenience: a failure must not lose the run's results
        print(f"warning: sweep report not built: {error}")
        return ""
    return str(Path(path).resolve())  # the card and the Metaflow artifact outlive the task's cwd
