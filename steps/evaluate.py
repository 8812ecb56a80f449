"""Evaluate step: GSM8K accuracy (strict and flexible) of a model, before and after distillation.

Greedy decoding of the student prompt (question only) through the same rollout engine the trainer uses,
on the first `eval.num_examples` test questions. Answers are scored with `pcsd_core.scoring`: strict needs
the "#### <number>" format, flexible takes the last number. Every branch reports its delta against the base
model; the base model is evaluated once per distinct (model, data, eval) setting, in the flow's
`evaluate_base` step (`evaluate_base_models`), and shared by branches.

    from steps.evaluate import evaluate
    result = evaluate("smollm2-135m", "outputs/data/test.parquet", cfg)
    result.accuracy_strict, result.examples[0]["response"]
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pcsd_core.config import PCSDConfig
from pcsd_core.rollout.base import Generation, RolloutEngine, SamplingParams
from pcsd_core.tracking_contract import ACCURACY_METRICS, PAIRED_PREFIX, eval_metric
from steps import storage, tracking
from steps.plan import Branch

TABLE_COLUMNS = (
    "index", "question", "response", "extracted_strict", "extracted_flexible", "ground_truth", "correct_strict",
    "correct_flexible", "has_answer_line", "degenerate", "length_tokens", "truncated", "heldout_kl",
)  # fmt: skip
SCORE_FIELDS = ("correct_strict", "correct_flexible", "has_answer_line", "degenerate", "length_tokens", "truncated")


@dataclass
class EvalResult:
    model_path: str
    num_examples: int
    accuracy_strict: float
    accuracy_flexible: float
    examples: list[dict[str, Any]]  # one row per question, keys = TABLE_COLUMNS
    # Held-out metrics with 95% intervals (`pcsd_core.eval_metrics.summarize_scores`) and the held-out KL.
    summary: dict[str, float] = field(default_factory=dict)

    def metrics(self, phase: str) -> dict[str, float]:
        """`eval/<phase>/gsm8k_accuracy_strict` and `_flexible` (with `_low`/`_high` intervals), and the
        held-out metrics `eval/<phase>/<name>` (`repetition_rate`, `heldout_kl`, ...)."""
        strict, flexible = ACCURACY_METRICS
        metrics = {eval_metric(phase, strict): self.accuracy_strict, eval_metric(phase, flexible): self.accuracy_flexible}
        for key, value in self.summary.items():
            name = f"gsm8k_{key}" if key.startswith("accuracy_") else key  # accuracy_strict_low -> gsm8k_accuracy_...
            metrics.setdefault(eval_metric(phase, name), float(value))
        return metrics

    def scores(self) -> list:
        """Per-question `eval_metrics.ResponseScore`s, for paired comparisons on the same questions."""
        from pcsd_core.eval_metrics import ResponseScore

        return [ResponseScore(**{name: row[name] for name in SCORE_FIELDS}) for row in self.examples]

    def save(self, location: str | Path) -> str:
        """Write to a local path or a storage URI (`steps.storage`), where any later step can read it."""
        storage.write_text(location, json.dumps(asdict(self), indent=1))
        return str(location)

    @classmethod
    def load(cls, location: str | Path) -> EvalResult:
        return cls(**json.loads(storage.read_text(location)))


def evaluate(model_path: str, test_path: str | Path, cfg: PCSDConfig, engine: RolloutEngine | None = None,
             progress: Callable[[dict[str, float], int], None] | None = None, label: str = "") -> EvalResult:
    """Greedy GSM8K accuracy and held-out metrics of `model_path` (alias, hub id or folder) on the test parquet.

    Questions go through the engine a batch at a time (longest first, so padding stays small and the ETA errs
    high), each batch printing questions done, tokens/s and ETA, and calling `progress(metrics, questions_done)`
    (the steps pass one that logs to MLflow)."""
    from pcsd_core.data import load_prompt_records, load_solutions
    from pcsd_core.eval_metrics import score_responses, summarize_scores
    from pcsd_core.models import load_tokenizer, resolve_model
    from pcsd_core.prompts import render_prompt_ids

    records = load_prompt_records(test_path)
    if cfg.eval.num_examples:
        records = records[: cfg.eval.num_examples]
    if not records:
        raise ValueError(f"evaluation: {test_path} holds no test questions; check data.max_test_rows and data.path.")
    source = resolve_model(model_path)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    prompt_ids = [render_prompt_ids(tokenizer, record.student_messages) for record in records]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=cfg.eval.max_new_tokens,
                              stop_at_answer=cfg.eval.stop_at_answer)
    own_engine = engine is None
    engine = engine or _make_engine(cfg, source)
    try:
        generations = _generate_with_progress(engine, prompt_ids, sampling, cfg.eval.batch_size, progress,
                                              label or Path(str(model_path)).name)
        response_ids = [list(g.response_ids) for g in generations]
        # The teacher sees each question's TRUE solution, whatever context this run trained with (control arms).
        kl_rows = min(cfg.eval.heldout_kl_questions or len(records), len(records))
        kl = _heldout_kl(engine, tokenizer, records[:kl_rows], load_solutions(test_path)[:kl_rows],
                         response_ids[:kl_rows], cfg)
    finally:
        if own_engine:
            engine.close()
    responses = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
    scores = score_responses(responses, response_ids, [r.ground_truth for r in records],
                             max_new_tokens=cfg.eval.max_new_tokens, finished=[g.finished for g in generations])
    row_kls = kl.per_response + [float("nan")] * (len(records) - len(kl.per_response))  # NaN: not computed
    examples = [{**_example_row(record, response), **asdict(score), "heldout_kl": row_kl}
                for record, response, score, row_kl in zip(records, responses, scores, row_kls)]  # fmt: skip
    return EvalResult(
        model_path=str(model_path),
        num_examples=len(examples),
        accuracy_strict=sum(row["correct_strict"] for row in examples) / len(examples),
        accuracy_flexible=sum(row["correct_flexible"] for row in examples) / len(examples),
        examples=examples,
        summary={**summarize_scores(scores, seed=cfg.train.seed), "heldout_kl": kl.mean_per_token,
                 "heldout_kl_questions": float(len(kl.per_response))},
    )


def _generate_with_progress(engine: RolloutEngine, prompt_ids: list[list[int]], sampling: SamplingParams,
                            batch_size: int, progress, label: str) -> list:
    """One greedy response per prompt, in prompt order, generated batch by batch with a progress line each."""
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    generations: dict[int, Any] = {}
    started, tokens = time.perf_counter(), 0
    for start in range(0, len(order), batch_size):
        batch = order[start : start + batch_size]
        for index, generation in zip(batch, engine.generate([prompt_ids[i] for i in batch], 1, sampling)):
            generations[index] = generation
            tokens += len(generation.response_ids)
        done, elapsed = len(generations), time.perf_counter() - started
        metrics = {"eval/progress/questions_done": float(done), "eval/progress/tokens_per_s": tokens / elapsed}
        eta_s = elapsed / done * (len(order) - done)
        print(f"[eval {label}] {done}/{len(order)} questions, {metrics['eval/progress/tokens_per_s']:.0f} tok/s, "
              f"ETA {eta_s:.0f} s", flush=True)
        if progress is not None:
            progress(metrics, done)
    return [Generation(prompt_index=i, response_ids=generations[i].response_ids, finished=generations[i].finished)
            for i in range(len(prompt_ids))]


def _heldout_kl(engine, tokenizer, records, solutions, response_ids, cfg: PCSDConfig):
    """KL(teacher || student) per token on the greedy answers, with the model the engine generated with."""
    from pcsd_core.eval_metrics import HeldoutKL, heldout_kl

    model = getattr(engine, "model", None)  # the HF engine's model; SGLang keeps its weights to itself
    if model is None:
        return HeldoutKL(mean_per_token=float("nan"), per_response=[float("nan")] * len(records), num_tokens=0)
    return heldout_kl(model, tokenizer, [r.student_messages for r in records], solutions, response_ids,
                      teacher_template=cfg.data.teacher_template, batch_size=cfg.eval.batch_size)


def log_evaluation(run_id: str, result: EvalResult, phase: str) -> None:
    """Log `eval/<phase>/...` metrics and the per-example table `eval/<phase>_examples.json` to a run."""
    import mlflow

    mlflow.set_tracking_uri(tracking.tracking_uri())
    tracking.log_metrics(run_id, result.metrics(phase))
    table = {column: [row[column] for row in result.examples] for column in TABLE_COLUMNS}
    mlflow.log_table(data=table, artifact_file=f"eval/{phase}_examples.json", run_id=run_id)


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
    from pcsd_core.eval_metrics import compare_paired

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


def _example_row(record: Any, response: str) -> dict[str, Any]:
    """A question's row apart from its scores (correctness and the rest come from `score_responses`)."""
    from pcsd_core.scoring import extract_answer

    return {
        "index": record.index,
        "question": record.question,
        "response": response,
        "extracted_strict": extract_answer(response, mode="strict"),
        "extracted_flexible": extract_answer(response, mode="flexible"),
        "ground_truth": record.ground_truth,
    }


def _make_engine(cfg: PCSDConfig, model_path: str) -> RolloutEngine:
    """The configured rollout engine, with the HF engine's batches sized by eval.batch_size."""
    from pcsd_core.rollout import create_rollout_engine

    return create_rollout_engine(cfg, model_path, batch_size=cfg.eval.batch_size)
