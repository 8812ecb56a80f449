"""Validation during training: greedy answers to held-out questions, scored like the final evaluation, and the
rule that picks the checkpoint a branch keeps.

The trainer (`pcsd_core.engine.trainer`) validates every `train.validate_every` steps, before the first step and
after the last, through its own rollout engine (which holds the policy's current weights) on
`eval.validation_questions` questions held out from the END of the train split (`split_validation_records`):
never trained on, and disjoint from the test split the final evaluation scores, so picking a checkpoint by them
does not peek at the test set. Metrics are those of the final evaluation (`summarize_scores`: accuracies, answer
format, repetition, truncation, mean length, with 95% intervals) under `val/`; the held-out KL is not computed
here (it needs a second model load per validation).

    validation = validate(engine, tokenizer, records, cfg.eval, step=8, seed=cfg.train.seed)
    validation.metrics()          # {"val/accuracy_strict": .., "val/repetition_rate": .., ...}
    best_validation(history, "accuracy_strict").step
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from pcsd_core.config.schema import EvalConfig
from pcsd_core.errors import DataValidationError
from pcsd_core.eval.evaluation import answer_greedily
from pcsd_core.eval.metrics import summarize_scores
from pcsd_core.metric_names import ANSWER_FORMAT_RATE, REPETITION_RATE, VALIDATION_PREFIX


@dataclass(frozen=True)
class Validation:
    step: int  # training steps done when the answers were given (0: the initial model)
    summary: dict[str, float]  # `summarize_scores` of the answers

    def metrics(self) -> dict[str, float]:
        return {VALIDATION_PREFIX + name: value for name, value in self.summary.items()}


def split_validation_records(records: Sequence[Any], validation_questions: int) -> tuple[list[Any], list[Any]]:
    """(train records, validation records): the last `validation_questions` records are held out."""
    if validation_questions >= len(records):
        raise DataValidationError(
            f"eval.validation_questions ({validation_questions}) holds out questions from the end of the train split, "
            f"which has {len(records)}; none would be left to train on. Lower eval.validation_questions or raise "
            "data.max_train_rows.")
    cut = len(records) - validation_questions
    return list(records[:cut]), list(records[cut:])


def validate(engine, tokenizer, records: Sequence[Any], eval_cfg: EvalConfig, *, step: int, seed: int) -> Validation:
    """Greedy answers of the engine's current weights to `records`, summarised like the final evaluation's."""
    answers = answer_greedily(engine, tokenizer, records, eval_cfg, label=f"validation after step {step}")
    return Validation(step=step, summary=summarize_scores(answers.scores, seed=seed))


def ranking_key(summary: dict[str, float], keep_best_by: str) -> tuple[float, float, float]:
    """Larger is better: the chosen metric, then the answer-format rate, then a lower repetition rate."""
    return summary[keep_best_by], summary[ANSWER_FORMAT_RATE], -summary[REPETITION_RATE]


def best_validation(history: Sequence[Validation], keep_best_by: str) -> Validation:
    """The validation whose checkpoint a branch keeps: highest `ranking_key`, the earliest step on a tie."""
    if not history:
        raise ValueError("best_validation needs at least one validation.")
    best = history[0]
    for validation in history[1:]:
        if ranking_key(validation.summary, keep_best_by) > ranking_key(best.summary, keep_best_by):
            best = validation
    return best
