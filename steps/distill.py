"""Distill step: train one sweep branch with the Distiller, tracked in its own nested MLflow run.

Opens the branch's child run under the flow's parent run, logs the resolved config, streams the
Distiller's per-step metrics into it (`log_metrics(metrics, step)` -> MLflow metrics at that step),
then logs the per-token samples and a training-curve plot. Ray workers are shut down in `finally`
(`Distiller.close`), also when training fails. Only paths and small numbers are returned: never weights.

    from steps.distill import distill
    result = distill(branch, parent_run_id=parent_id, flow_run_id="17", pathspec="PCSDFlow/17/distill/3")
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from steps import tracking
from steps.plan import Branch


@dataclass
class DistillResult:
    label: str
    run_id: str  # the branch's child MLflow run
    checkpoint_dir: str  # the final HF checkpoint (model + tokenizer), loadable by from_pretrained
    steps: int
    history: list[dict[str, float]]  # per-step metrics, as the Distiller logged them
    curves_png: str  # training-curve plot (also an MLflow artifact)
    wall_s: float = 0.0  # the whole training, model loading included


def distill(branch: Branch, *, parent_run_id: str, flow_run_id: str, pathspec: str) -> DistillResult:
    """Train `branch` (its train_path set by the preprocess step) and log everything to a child run."""
    import mlflow

    import torch

    from dashboards.plots import training_curves_png
    from pcsd_core.trainer import Distiller

    torch.set_num_threads(branch.threads())
    cfg = branch.config
    run_id = tracking.start_child_run(parent_run_id, branch.label, flow_run_id, pathspec, cfg.to_flat_dict())
    with tracking.open_run(run_id):
        mlflow.log_text(cfg.to_yaml(), "config/resolved_config.yaml")
        mlflow.log_dict(branch.data_stats, "data/stats.json")
        log_metrics = tracking.metric_logger(run_id)  # buffers through a tracking-server outage
        distiller = Distiller(cfg, branch.train_path, log_metrics=log_metrics)
        started = time.perf_counter()
        try:
            distiller.setup()
            result = distiller.train()
        finally:
            distiller.close()  # shuts Ray down even when training raised
            log_metrics.flush()
        wall_s = time.perf_counter() - started
        history = [_plain_metrics(row) for row in result.history]
        output_dir = Path(cfg.train.output_dir)
        curves_png = output_dir / "plots" / "training_curves.png"
        curves_png.parent.mkdir(parents=True, exist_ok=True)
        curves_png.write_bytes(training_curves_png(history, title=branch.label))
        mlflow.log_artifact(str(curves_png), "plots")
        samples_dir = output_dir / "samples"
        if samples_dir.is_dir():
            mlflow.log_artifacts(str(samples_dir), "samples")
    return DistillResult(
        label=branch.label,
        run_id=run_id,
        checkpoint_dir=str(result.checkpoint_dir),
        steps=result.steps,
        history=history,
        curves_png=str(curves_png),
        wall_s=wall_s,
    )


def _plain_metrics(row: dict[str, Any]) -> dict[str, float]:
    """History rows as plain floats (tensors, numpy scalars) so they pickle and JSON-encode anywhere."""
    plain = {}
    for key, value in row.items():
        try:
            plain[key] = float(value)
        except (TypeError, ValueError):
            continue
    return plain
