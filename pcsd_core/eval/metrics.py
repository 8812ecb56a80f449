"""Held-out metrics of one evaluated model, and paired comparisons of two, as pure functions.

    from pcsd_core.eval.metrics import score_responses, summarize_scores, compare_paired, heldout_kl
    scores = score_responses(texts, response_ids, ground_truths, max_new_tokens=256, finished=finished)
    summarize_scores(scores)        # {"accuracy_strict": .., "accuracy_strict_low": .., "repetition_rate": .., ...}
    compare_paired(after, before)   # {"strict/difference": .., "strict/mcnemar_p": .., ...}
    heldout_kl(model, tokenizer, student_messages, solutions, response_ids, teacher_template=...).mean_per_token

Per response (`ResponseScore`):
- **correct_strict / correct_flexible**: `pcsd_core.eval.scoring.is_correct` in each mode.
- **has_answer_line**: the response holds a `#### <number>` line, i.e. scoring's strict regex finds a number
  (`extract_answer(text, "strict") is not None`), right or wrong.
- **degenerate**: the response loops: a line three times in a row or a long token loop (`is_degenerate`).
- **length_tokens**: response tokens, EOS included when produced.
- **truncated**: the response was cut at `max_new_tokens` without finishing (no EOS and, with stop-at-answer,
  no completed answer line). Given the engine's `finished` flags this is exact; without them, a response of
  `max_new_tokens` tokens counts as truncated (one that ends with EOS exactly at the limit too).

Rates come with Wilson 95% intervals, the mean length with a percentile-bootstrap one (`pcsd_core.eval.stats`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from pcsd_core.eval import stats
from pcsd_core.engine.distillation_module import DistillationModule
from pcsd_core.engine.batch import pad_rows
from pcsd_core.loss.distillation import hidden_state_distillation_loss
from pcsd_core.loss.spec import LossSpec
from pcsd_core.data.prompts import Messages, build_prompt_pair
from pcsd_core.eval.scoring import extract_answer, is_correct

# A response is degenerate when it repeats (see `is_degenerate`):
MIN_REPEATED_LINES = 3  # the same non-blank line this many times in a row, or
MIN_LOOP_TOKENS = 48  # a block of tokens copied back to back (>= 3 copies) over at least this many tokens


@dataclass(frozen=True)
class ResponseScore:
    correct_strict: bool
    correct_flexible: bool
    has_answer_line: bool
    degenerate: bool
    length_tokens: int
    truncated: bool


def is_degenerate(text: str, token_ids: Sequence[int]) -> bool:
    """Whether a response loops. Two rules, either suffices:

    1. **Repeated line**: the same non-blank line (compared stripped) `MIN_REPEATED_LINES` (3) times in a row,
       the last one possibly unterminated: `#### 16\\n#### 16\\n#### 16`, a sentence written three times.
    2. **Token loop**: a block of p >= 1 tokens copied back to back, at least 3 copies (the last may be cut
       short), over a stretch of at least `MIN_LOOP_TOKENS` (48) tokens: loops without newlines, such as
       "so the answer is 5 so the answer is 5 ..." running to max_new_tokens.

    Step-by-step arithmetic is not flagged: GSM8K reference solutions repeat short blocks ("20 + 20 + 20 + 20",
    "1 plus 1 plus 1 plus 1") and sometimes a line twice, but never 48 tokens of one block or a line three
    times (the test checks 2,000 of them: none is flagged).
    """
    lines = [line.strip() for line in text.split("\n")]
    lines = [line for line in lines if line]
    for start in range(len(lines) - MIN_REPEATED_LINES + 1):
        if len(set(lines[start : start + MIN_REPEATED_LINES])) == 1:
            return True
    ids = np.asarray(token_ids, dtype=np.int64)
    for period in range(1, (len(ids) - 1) // 2 + 1):
        # same[i]: token i equals token i + period; a run of r Trues is a p-periodic stretch of r + p tokens.
        same = ids[period:] == ids[:-period]
        if _longest_true_run(same) >= max(period + 1, MIN_LOOP_TOKENS - period):
            return True
    return False


def _longest_true_run(flags: np.ndarray) -> int:
    if not flags.any():
        return 0
    edges = np.diff(np.concatenate(([0], flags.astype(np.int8), [0])))
    starts, stops = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
    return int((stops - starts).max())


def score_responses(
    texts: Sequence[str], response_ids: Sequence[Sequence[int]], ground_truths: Sequence[str], *, max_new_tokens: int,
    finished: Sequence[bool] | None = None,
) -> list[ResponseScore]:
    """One `ResponseScore` per response (decoded text, its token ids, the question's ground-truth number)."""
    columns = {"response_ids": len(response_ids), "ground_truths": len(ground_truths)}
    if finished is not None:
        columns["finished"] = len(finished)
    if any(count != len(texts) for count in columns.values()):
        raise ValueError(f"score_responses: texts ({len(texts)}) and {columns} must be equally long (one per question).")
    scores = []
    for index, (text, ids, truth) in enumerate(zip(texts, response_ids, ground_truths)):
        truncated = len(ids) >= max_new_tokens if finished is None else not finished[index]
        scores.append(ResponseScore(
            correct_strict=is_correct(text, truth, "strict"),
            correct_flexible=is_correct(text, truth, "flexible"),
            has_answer_line=extract_answer(text, "strict") is not None,
            degenerate=is_degenerate(text, ids),
            length_tokens=len(ids),
            truncated=truncated,
        ))  # fmt: skip
    return scores


RATES = {
    "accuracy_strict": "correct_strict",
    "accuracy_flexible": "correct_flexible",
    "answer_format_rate": "has_answer_line",
    "repetition_rate": "degenerate",
    "truncation_rate": "truncated",
}


def summarize_scores(
    scores: Sequence[ResponseScore], *, confidence: float = 0.95, num_resamples: int = 10000, seed: int = 0
) -> dict[str, float]:
    """Each rate with its Wilson interval (`<name>`, `<name>_low`, `<name>_high`), the mean response length
    with its bootstrap interval (`mean_response_tokens*`) and `num_questions`."""
    if not scores:
        raise ValueError("summarize_scores needs at least one scored response.")
    summary: dict[str, float] = {"num_questions": len(scores)}
    for name, field_name in RATES.items():
        interval = stats.wilson_interval(sum(getattr(s, field_name) for s in scores), len(scores), confidence)
        summary.update(_interval_entries(name, interval))
    lengths = [s.length_tokens for s in scores]
    length_interval = stats.bootstrap_mean_interval(lengths, num_resamples=num_resamples, confidence=confidence, seed=seed)
    summary.update(_interval_entries("mean_response_tokens", length_interval))
    return summary


def _interval_entries(name: str, interval: stats.Interval) -> dict[str, float]:
    return {name: interval.estimate, f"{name}_low": interval.low, f"{name}_high": interval.high}


def compare_paired(
    a: Sequence[ResponseScore], b: Sequence[ResponseScore], *, confidence: float = 0.95, num_resamples: int = 10000,
    seed: int = 0,
) -> dict[str, float]:
    """Model A against model B on the same questions (same order), strict and flexible:
    `<mode>/difference` (accuracy A - B) with its paired-bootstrap interval (`_low`, `_high`), the exact McNemar
    `<mode>/mcnemar_p`, and the discordant counts `<mode>/only_a`, `<mode>/only_b`."""
    comparison: dict[str, float] = {}
    for mode in ("strict", "flexible"):
        a_correct = [getattr(score, f"correct_{mode}") for score in a]
        b_correct = [getattr(score, f"correct_{mode}") for score in b]
        difference = stats.paired_bootstrap_difference(
            a_correct, b_correct, num_resamples=num_resamples, confidence=confidence, seed=seed
        )
        test = stats.mcnemar_exact(a_correct, b_correct)
        comparison.update(_interval_entries(f"{mode}/difference", difference))
        comparison.update({f"{mode}/mcnemar_p": test.p_value, f"{mode}/only_a": test.only_a, f"{mode}/only_b": test.only_b})
    return comparison


# ---- held-out KL(teacher || student) ----------------------------------------------------------------


@dataclass(frozen=True)
class HeldoutKL:
    mean_per_token: float  # over all response tokens of all responses (token mean)
    per_response: list[float]  # each response's mean over its tokens; NaN for an empty response
    num_tokens: int


@torch.no_grad()
def heldout_kl(
    model: Any, tokenizer: Any, student_messages: Sequence[Messages], solutions: Sequence[str],
    response_ids: Sequence[Sequence[int]], *, teacher_template: str, divergence: str = "forward_kl", batch_size: int = 8,
) -> HeldoutKL:
    """Mean per-token KL(teacher || student) on given responses (the student's own greedy answers to test
    questions), the teacher prompt carrying each question's TRUE solution (`solutions`, e.g.
    `data.load_solutions`), whatever privileged context the run trained with.

    Both prompts score the same response token ids (`prompts.py`) through the trainer's own passes: the actor's
    `DistillationModule` gives the final hidden states at the response positions, and the trainer's chunked loss
    (`hidden_state_distillation_loss`, every token weighted 1) turns them into per-token divergences, so memory
    does not grow with (B, T, V) and the held-out number is the training objective's. `divergence` is any of
    `pcsd_core.loss.spec.DIVERGENCES` (forward_kl = KL(P_teacher || P_student)).
    """
    if not len(student_messages) == len(solutions) == len(response_ids):
        raise ValueError(
            f"heldout_kl: student_messages ({len(student_messages)}), solutions ({len(solutions)}) and response_ids "
            f"({len(response_ids)}) must be equally long (one per question)."
        )
    if batch_size < 1:
        raise ValueError(f"heldout_kl: batch_size ({batch_size}) must be >= 1.")
    scorer = DistillationModule(model, LossSpec(divergence=divergence), compute_dtype=model.dtype)
    per_token: list[torch.Tensor] = []
    for start in range(0, len(response_ids), batch_size):
        stop = start + batch_size
        pairs = [build_prompt_pair(tokenizer, messages, solution, teacher_template)
                 for messages, solution in zip(student_messages[start:stop], solutions[start:stop])]  # fmt: skip
        responses = [list(ids) for ids in response_ids[start:stop]]
        student_hidden = _response_hidden(scorer, [pair.student_ids for pair in pairs], responses, tokenizer.pad_token_id)
        teacher_hidden = _response_hidden(scorer, [pair.teacher_ids for pair in pairs], responses, tokenizer.pad_token_id)
        every_token = torch.ones(len(student_hidden), device=student_hidden.device)
        divergences = hidden_state_distillation_loss(student_hidden, teacher_hidden, scorer.lm_head_weight(),
                                                     every_token, spec=scorer.loss_spec).per_token
        per_token.append(divergences.double().cpu())
    values = torch.cat(per_token).double()  # (N,) every response token, response after response
    lengths = [len(ids) for ids in response_ids]
    per_response = [piece.mean().item() if len(piece) else float("nan") for piece in torch.split(values, lengths)]
    mean = values.mean().item() if len(values) else float("nan")
    return HeldoutKL(mean_per_token=mean, per_response=per_response, num_tokens=len(values))


def _response_hidden(scorer: DistillationModule, prompts: list[list[int]], responses: list[list[int]],
                     pad_id: int) -> torch.Tensor:
    """Final hidden states at the positions that predict the response tokens: (N, H), row after row."""
    device = next(scorer.parameters()).device
    inputs = pad_rows(prompts, responses, pad_id)
    return scorer(inputs.input_ids.to(device), inputs.attention_mask.to(device), None,
                  inputs.response_positions.to(device))
