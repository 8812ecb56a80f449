"""The evaluation algorithm: greedy answers of a model to held-out questions, scored, with held-out metrics.

Greedy decoding of the student prompt (question only) through the same rollout engine the trainer uses, on the
first `eval.num_examples` test questions. Answers are scored with `pcsd_core.eval.scoring`: strict needs the
"#### <number>" format, flexible takes the last number. Held-out metrics with 95% intervals come from
`pcsd_core.eval.metrics`, and the held-out KL(teacher || student) with each question's true solution.

    from pcsd_core.eval.evaluation import evaluate_model
    result = evaluate_model("smollm2-135m", "outputs/data/test.parquet", cfg)
    result.accuracy_strict, result.examples[0]["response"]
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pcsd_core import metric_names as names
from pcsd_core.config.schema import EvalConfig, ModelConfig, PCSDConfig
from pcsd_core.data.prepare import load_prompt_records, load_solutions
from pcsd_core.data.prompts import render_prompt_ids
from pcsd_core.errors import DataValidationError
from pcsd_core.eval.metrics import ResponseScore, heldout_kl, score_responses, summarize_scores
from pcsd_core.eval.scoring import extract_answer
from pcsd_core.models import load_tokenizer, resolve_model
from pcsd_core.rollout.base import Generation, RolloutEngine, SamplingParams

TABLE_COLUMNS = (
    "index", "question", "response", "extracted_strict", "extracted_flexible", "ground_truth", "correct_strict",
    "correct_flexible", "has_answer_line", "degenerate", "length_tokens", "truncated", "heldout_kl",
)  # fmt: skip
SCORE_FIELDS = ("correct_strict", "correct_flexible", "has_answer_line", "degenerate", "length_tokens", "truncated")


@dataclass
class Evaluation:
    model_path: str
    num_examples: int
    accuracy_strict: float
    accuracy_flexible: float
    examples: list[dict[str, Any]]  # one row per question, keys = TABLE_COLUMNS
    # Held-out metrics with 95% intervals (`summarize_scores`) and the held-out KL.
    summary: dict[str, float] = field(default_factory=dict)

    def scores(self) -> list[ResponseScore]:
        """Per-question `ResponseScore`s, for paired comparisons on the same questions."""
        return [ResponseScore(**{name: row[name] for name in SCORE_FIELDS}) for row in self.examples]


def evaluate_model(model_path: str, test_path: str | Path, cfg: PCSDConfig, engine: RolloutEngine | None = None,
             progress: Callable[[dict[str, float], int], None] | None = None, label: str = "") -> Evaluation:
    """Greedy GSM8K accuracy and held-out metrics of `model_path` (alias, hub id or folder) on the test parquet.

    Questions go through the engine a batch at a time (longest first, so padding stays small and the ETA errs
    high), each batch printing questions done, tokens/s and ETA, and calling `progress(metrics, questions_done)`
    (the steps pass one that logs to MLflow).

    Like the trainer, evaluation reads several sections of the run config (`eval`, `model`, `rollout` for the
    engine, `data.teacher_template` and `train.device`/`seed`); the parts it builds get only theirs."""
    records = load_prompt_records(test_path)
    if cfg.eval.num_examples:
        records = records[: cfg.eval.num_examples]
    if not records:
        raise DataValidationError(f"evaluation: {test_path} holds no test questions; check data.max_test_rows and data.path.")
    source = resolve_model(model_path)
    tokenizer = load_tokenizer(source, trust_remote_code=cfg.model.trust_remote_code)
    own_engine = engine is None
    engine = engine or _make_engine(cfg, source)
    try:
        answers = answer_greedily(engine, tokenizer, records, cfg.eval, progress, label or Path(str(model_path)).name)
        # The teacher sees each question's TRUE solution, whatever context this run trained with (control arms).
        kl_rows = min(cfg.eval.heldout_kl_questions or len(records), len(records))
        kl = _heldout_kl(source, tokenizer, records[:kl_rows], load_solutions(test_path)[:kl_rows],
                         answers.response_ids[:kl_rows], model=cfg.model, device=cfg.train.device,
                         teacher_template=cfg.data.teacher_template, batch_size=cfg.eval.batch_size)
    finally:
        if own_engine:
            engine.close()
    responses, scores = answers.responses, answers.scores
    row_kls = kl.per_response + [float("nan")] * (len(records) - len(kl.per_response))  # NaN: not computed
    examples = [{**_example_row(record, response), **asdict(score), "heldout_kl": row_kl}
                for record, response, score, row_kl in zip(records, responses, scores, row_kls)]  # fmt: skip
    return Evaluation(
        model_path=str(model_path),
        num_examples=len(examples),
        accuracy_strict=sum(row["correct_strict"] for row in examples) / len(examples),
        accuracy_flexible=sum(row["correct_flexible"] for row in examples) / len(examples),
        examples=examples,
        summary={**summarize_scores(scores, seed=cfg.train.seed), "heldout_kl": kl.mean_per_token,
                 "heldout_kl_questions": float(len(kl.per_response))},
    )


@dataclass
class GreedyAnswers:
    response_ids: list[list[int]]
    responses: list[str]  # decoded, special tokens skipped
    scores: list[ResponseScore]  # one per question, in question order


def answer_greedily(engine: RolloutEngine, tokenizer, records, eval_cfg: EvalConfig,
                    progress: Callable[[dict[str, float], int], None] | None = None, label: str = "") -> GreedyAnswers:
    """Greedy answers of the engine's current weights to `records`' student prompts, scored; the final evaluation
    and the validation during training (`pcsd_core.eval.validation`) both answer through this."""
    prompt_ids = [render_prompt_ids(tokenizer, record.student_messages) for record in records]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=eval_cfg.max_new_tokens,
                              stop_at_answer=eval_cfg.stop_at_answer)
    generations = _generate_with_progress(engine, prompt_ids, sampling, eval_cfg.batch_size, progress, label)
    response_ids = [list(g.response_ids) for g in generations]
    responses = [tokenizer.decode(ids, skip_special_tokens=True) for ids in response_ids]
    scores = score_responses(responses, response_ids, [r.ground_truth for r in records],
                             max_new_tokens=eval_cfg.max_new_tokens, finished=[g.finished for g in generations])
    return GreedyAnswers(response_ids=response_ids, responses=responses, scores=scores)


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
        metrics = {names.EVAL_PROGRESS_QUESTIONS: float(done), names.EVAL_PROGRESS_TOKENS_PER_S: tokens / elapsed}
        eta_s = elapsed / done * (len(order) - done)
        print(f"[eval {label}] {done}/{len(order)} questions, {metrics[names.EVAL_PROGRESS_TOKENS_PER_S]:.0f} tok/s, "
              f"ETA {eta_s:.0f} s", flush=True)
        if progress is not None:
            progress(metrics, done)
    return [Generation(prompt_index=i, response_ids=generations[i].response_ids, finished=generations[i].finished)
            for i in range(len(prompt_ids))]


def _heldout_kl(model_path: str, tokenizer, records, solutions, response_ids, *, model: ModelConfig, device: str,
                teacher_template: str, batch_size: int):
    """KL(teacher || student) per token on the greedy answers, scored by the model as the trainer holds it.

    A transformers model of `model_path` in model.dtype on the training device (what the actor's forward runs),
    loaded here, whatever the engine: SGLang keeps its weights to itself, and the HF engine's model would tie the
    number to one engine. So the HF and SGLang paths give the same KL for the same answers.
    """
    from pcsd_core.models import load_model, resolve_device

    lm = load_model(model_path, dtype=model.dtype, device=resolve_device(device),
                    attn_implementation=model.attn_implementation, trust_remote_code=model.trust_remote_code)
    lm.eval()
    return heldout_kl(lm, tokenizer, [r.student_messages for r in records], solutions, response_ids,
                      teacher_template=teacher_template, batch_size=batch_size)


def _example_row(record: Any, response: str) -> dict[str, Any]:
    """A question's row apart from its scores (correctness and the rest come from `score_responses`)."""
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

    return create_rollout_engine(cfg.rollout, cfg.model, model_path, device=cfg.train.device, seed=cfg.train.seed,
                                 batch_size=cfg.eval.batch_size, syncs_weights=False)
