"""Evaluate step: GSM8K accuracy (strict and flexible) of a model, before and after distillation.

The algorithm is `pcsd_core.eval.evaluation` (greedy answers, scores, held-out metrics); this step names the
metrics by phase, logs them and the per-example table to MLflow, and stores results. Every branch reports its delta against the base
model; the base model is evaluated once per distinct (model, data, eval) setting, in the flow's
`evaluate_base` step (`evaluate_base_models`), and shared by branches.

    from steps.evaluate import evaluate
    result = evaluate("smollm2-135m", "outputs/data/test.parquet", cfg)
    result.accuracy_strict, result.examples[0]["response"]
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path

from pcsd_core.config.schema import PCSDConfig
from pcsd_core.eval.evaluation import TABLE_COLUMNS, Evaluation, evaluate_model
from pcsd_core.eval.metrics import compare_paired
from pcsd_core.rollout.base import RolloutEngine
from steps.contract import ACCURACY_METRICS, PAIRED_PREFIX, eval_metric, examples_table
from steps import storage, tracking
from steps.plan import Branch

@dataclass
class EvalResult(Evaluation):
    """An evaluation as the flow keeps it: named metrics per phase, stored where every step can read it."""

    def metrics(self, phase: str) -> dict[str, float]:
        """`eval/<phase>/gsm8k_accuracy_strict` and `_flexible` (with `_low`/`_high` intervals), and the
        held-out metrics `eval/<phase>/<name>` (`repetition_rate`, `heldout_kl`, ...)."""
        strict, flexible = ACCURACY_METRICS
        metrics = {eval_metric(phase, strict): self.accuracy_strict, eval_metric(phase, flexible): self.accuracy_flexible}
        for key, value in self.summary.items():
            name = f"gsm8k_{key}" if key.startswith("accuracy_") else key  # accuracy_strict_low -> gsm8k_accuracy_...
            metrics.setdefault(eval_metric(phase, name), float(value))
        return metrics

    def save(self, location: str | Path) -> str:
        """Write to a local path or a storage URI (`steps.storage`), where any later step can read it."""
        storage.write_text(location, json.dumps(asdict(self), indent=1))
        return str(location)

    @classmethod
    def load(cls, location: str | Path) -> EvalResult:
        return cls(**json.loads(storage.read_text(location)))


def evaluate(model_path: str, test_path: str | Path, cfg: PCSDConfig, engine: RolloutEngine | None = None,
             progress: Callable[[dict[str, float], int], None] | None = None, label: str = "") -> EvalResult:
    """`pcsd_core.eval.evaluation.evaluate_model`, as an `EvalResult` the steps log and store."""
    return EvalResult(**vars(evaluate_model(model_path, test_path, cfg, engine, progress, label)))


def log_evaluation(run_id: str, result: EvalResult, phase: str) -> None:
    """Log `eval/<phase>/...` metrics and the per-example table `eval/<phase>_examples.json` to a run."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    tracking.log_metrics(run_id, result.metrics(phase))
    table = {column: [row[column] for row in result.examples] for column in TABLE_COLUMNS}
    mlflow.log_table(data=table, artifact_file=examples_table(phase), run_id=run_id)


@dataclass(frozen=True)
class BaseModelEvaluation:
    """The base model's evaluation, shared by the branches with the same model, data and eval settings."""

    result_path: str  # EvalResult JSON (per-example table included): a local path or a storage URI
    metrics: dict[str, float]  # eval/before/*


def evaluate_base_models(branches: list[Branch], parent_run_id: str,
                         output_root: str) -> dict[str, BaseModelEvaluation]:
    """Evaluate each distinct base model once; {Branch.base_model_key: its evaluation}."""
    evaluations: dict[str, BaseModelEvaluation] = {}
    for branch in branches:
        if branch.base_model_key in evaluations:
            continue
        cfg = branch.config
        with storage.scratch() as scratch:
            result = evaluate(cfg.model.name, storage.local_copy(branch.test_path, scratch), cfg,
                              progress=tracking.metric_logger(parent_run_id), label=f"base model {cfg.model.name}")
        path = result.save(storage.join(output_root, "base_model_eval", f"{branch.base_model_key}.json"))
        if not evaluations:  # the parent run shows the first branch's base model
            log_evaluation(parent_run_id, result, "before")
        evaluations[branch.base_model_key] = BaseModelEvaluation(result_path=path, metrics=result.metrics("before"))
    return evaluations


@dataclass
class BranchEvaluation:
    label: str
    run_id: str
    checkpoint_dir: str
    metrics: dict[str, float]  # eval/before/*, eval/after/*, eval/delta/* and the headline eval/*
    num_examples: int = 0  # test questions scored
    result_path: str = ""  # the distilled model's EvalResult JSON (per-question scores for paired tests), path or URI


def evaluate_branch(branch: Branch, checkpoint_dir: str, run_id: str, base: BaseModelEvaluation) -> BranchEvaluation:
    """Evaluate a branch's distilled checkpoint (a local folder or a storage URI) and log before, after, delta and
    both tables to its run."""
    import torch

    torch.set_num_threads(branch.threads())
    before = EvalResult.load(base.result_path)
    with storage.scratch() as scratch:
        local_checkpoint = storage.local_copy(checkpoint_dir, scratch)
        after = evaluate(str(local_checkpoint), storage.local_copy(branch.test_path, scratch), branch.config,
                         progress=tracking.metric_logger(run_id), label=branch.label)
    after.model_path = str(checkpoint_dir)
    metrics = {**before.metrics("before"), **after.metrics("after")}
    for name in ACCURACY_METRICS:
        metrics[eval_metric("delta", name)] = metrics[eval_metric("after", name)] - metrics[eval_metric("before", name)]
        metrics[eval_metric("", name)] = metrics[eval_metric("after", name)]
    paired = compare_paired(after.scores(), before.scores(), seed=branch.config.train.seed)  # a = after, b = base
    metrics.update({PAIRED_PREFIX + key: float(value) for key, value in paired.items()})
    log_evaluation(run_id, before, "before")
    log_evaluation(run_id, after, "after")
    tracking.log_metrics(run_id, metrics)
    after_path = after.save(storage.join(branch.config.train.output_dir, "eval", "after.json"))
    return BranchEvaluation(label=branch.label, run_id=run_id, checkpoint_dir=str(checkpoint_dir), metrics=metrics,
                            num_examples=after.num_examples, result_path=after_path)


