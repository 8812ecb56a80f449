"""Distill step: train one sweep branch with the Distiller, tracked in its own nested MLflow run.

Opens the branch's child run under the flow's parent run, logs the resolved config, streams the
Distiller's per-step metrics into it (`log_metrics(metrics, step)` -> MLflow metrics at that step),
then logs the per-token samples and a training-curve plot. Ray workers are shut down in `finally`
(`Distiller.close`), also when training fails. Checkpoints go to the branch's `train.output_dir`, a local folder
or a storage URI (uploaded as each one is saved, `steps.storage`). Only the checkpoint's location, the plot and
small numbers are returned: never weights.

    from steps.distill import distill
    result = distill(branch, parent_run_id=parent_id, flow_run_id="17", pathspec="PCSDFlow/17/distill/3")
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcsd_core.config.loader import replace_fields
from pcsd_core.config.schema import PCSDConfig
from pcsd_core.metric_names import TRAIN_LOSS
from steps import storage, tracking
from steps.contract import TAG_KEPT_CHECKPOINT, TAG_STOPPED_BECAUSE
from steps.plan import Branch


@dataclass
class DistillResult:
    label: str
    run_id: str  # the branch's child MLflow run
    checkpoint_dir: str  # the final HF checkpoint: a local folder or a storage URI (`steps.storage`)
    steps: int
    history: list[dict[str, float]]  # per-step metrics, as the Distiller logged them (a retry's: from step 1)
    curves_png: bytes  # training-curve plot (also an MLflow artifact; b"" without a plotter); bytes: no shared disk
    wall_s: float = 0.0  # the whole training, model loading included
    resumed_from_step: int = 0  # > 0 when a retried task continued from its own last checkpoint
    stopped_because: str = ""  # why training ended before its last step (`train.stop_if_repetition_above`), or ""


def distill(branch: Branch, *, parent_run_id: str, flow_run_id: str, pathspec: str,
            plot_curves: Callable[..., bytes] | None = None) -> DistillResult:
    """Train `branch` (its train_path set by the preprocess step) and log everything to a child run.

    A retried task (the flow's `@retry`, after a dead Ray worker or a lost machine) reopens the same child run and
    continues from the last checkpoint the failed attempt saved (`train.checkpoint_every`), not from step 0;
    the steps that attempt already logged are not logged twice. `plot_curves(history, title=...)` draws the
    training curves as PNG bytes (the flow passes `dashboards.plots.training_curves_png`), logged under `plots/`.
    """
    import mlflow

    import torch

    from pcsd_core.models import check_hardware
    from pcsd_core.engine.trainer import Distiller

    check_hardware(branch.config)  # the start step could not, when this task runs on a compute backend's machine
    torch.set_num_threads(branch.threads())
    location = branch.config.train.output_dir
    run_id = tracking.start_child_run(parent_run_id, branch.label, flow_run_id, pathspec, branch.config.to_flat_dict())
    with storage.scratch() as scratch, tracking.open_run(run_id):
        mlflow.log_text(branch.config.to_yaml(), "config/resolved_config.yaml")
        mlflow.log_dict(branch.data_stats, "data/stats.json")
        output_dir = storage.workspace(location, scratch)
        resume_from = _own_last_checkpoint(location, scratch) or _user_resume_from(branch.config, scratch)
        cfg = replace_fields(branch.config, {"train.output_dir": str(output_dir),
                                             "train.resume_from": str(resume_from or "")})
        # Steps a failed attempt logged before it died are kept; the resumed attempt logs only the ones after.
        logged_before = tracking.last_logged_step(run_id, TRAIN_LOSS)
        log_metrics = tracking.metric_logger(run_id, after_step=logged_before)

        def publish_checkpoint(path: Path) -> None:
            storage.publish(path, storage.join(location, "checkpoints", path.name))

        distiller = Distiller(cfg, storage.local_copy(branch.train_path, scratch), log_metrics=log_metrics,
                              on_checkpoint=publish_checkpoint)
        started = time.perf_counter()
        try:
            distiller.setup()
            result = distiller.train()
        finally:
            distiller.close()  # shuts Ray down even when training raised
            log_metrics.flush()
        wall_s = time.perf_counter() - started
        # Which checkpoint the branch keeps (the evaluation and the registry take it), and why it ended early.
        mlflow.set_tags({TAG_KEPT_CHECKPOINT: result.checkpoint_dir.name,
                         TAG_STOPPED_BECAUSE: result.stopped_because or "ran every step"})
        history = [_plain_metrics(row) for row in result.history]
        if logged_before and distiller.start_step and history:
            # A retry: the steps up to its checkpoint were trained, and logged, by the failed attempt.
            history = tracking.logged_rows(run_id, history[0], distiller.start_step) + history
        curves_png = plot_curves(history, title=branch.label) if plot_curves is not None else b""
        if curves_png:
            plot = output_dir / "plots" / "training_curves.png"
            plot.parent.mkdir(parents=True, exist_ok=True)
            plot.write_bytes(curves_png)
            mlflow.log_artifact(str(plot), "plots")
        samples_dir = output_dir / "samples"
        if samples_dir.is_dir():
            mlflow.log_artifacts(str(samples_dir), "samples")
    return DistillResult(
        label=branch.label,
        run_id=run_id,
        checkpoint_dir=storage.join(location, "checkpoints", result.checkpoint_dir.name),
        steps=result.steps,
        history=history,
        curves_png=curves_png,
        wall_s=wall_s,
        resumed_from_step=distiller.start_step,
        stopped_because=result.stopped_because,
    )


def _own_last_checkpoint(location: str, scratch: Path) -> Path | None:
    """The newest complete checkpoint an earlier attempt of this task saved at `location` (a local copy), or None."""
    from pcsd_core.engine import checkpoint as ckpt

    if not storage.is_remote(location):
        return ckpt.latest_complete_checkpoint(location)
    checkpoints = storage.join(location, "checkpoints")
    steps = [name for name in storage.subfolders(checkpoints)
             if ckpt.STEP_FOLDER.fullmatch(name) and storage.is_published(storage.join(checkpoints, name))]
    if not steps:
        return None
    newest = max(steps, key=lambda name: int(ckpt.STEP_FOLDER.fullmatch(name).group(1)))
    return storage.local_copy(storage.join(checkpoints, newest), scratch)


def _user_resume_from(config: PCSDConfig, scratch: Path) -> Path | None:
    """`train.resume_from` as a local path (a checkpoint at a storage URI is downloaded first)."""
    if not config.train.resume_from:
        return None
    return storage.local_copy(config.train.resume_from, scratch)


def _plain_metrics(row: dict[str, Any]) -> dict[str, float]:
    """History rows as plain floats (tensors, numpy scalars) so they pickle and JSON-encode anywhere."""
    plain = {}
    for key, value in row.items():
        try:
            plain[key] = float(value)
        except (TypeError, ValueError):
            continue
    return plain
