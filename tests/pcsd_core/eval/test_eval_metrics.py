"""Held-out metrics: the loop detector against a brute-force definition and real GSM8K solutions, per-response
scores, summaries and paired comparisons against statsmodels, and heldout_kl against a float64 naive KL."""

from __future__ import annotations

import itertools
import json
import math

import numpy as np
import pytest
import torch
from statsmodels.stats.contingency_tables import mcnemar as statsmodels_mcnemar
from statsmodels.stats.proportion import proportion_confint

from pcsd_core.config.schema import GSM8K_INSTRUCTION
from pcsd_core.data.prompts import DEFAULT_TEACHER_TEMPLATE
from pcsd_core.eval.metrics import (
    MIN_LOOP_TOKENS,
    ResponseScore,
    compare_paired,
    heldout_kl,
    is_degenerate,
    score_responses,
    summarize_scores,
)
from pcsd_core.data.prompts import build_prompt_pair, build_student_messages


def _brute_force_token_loop(ids: list[int]) -> bool:
    """Rule 2 read literally: from some start, a block of p tokens, then copies of it token by token; a loop
    when the copying reaches 2 * p + 1 tokens (a third copy begun) and MIN_LOOP_TOKENS tokens."""
    for start, period in itertools.product(range(len(ids)), range(1, len(ids) + 1)):
        stretch = period
        while start + stretch < len(ids) and ids[start + stretch] == ids[start + stretch - period]:
            stretch += 1
        if start + period <= len(ids) and stretch >= 2 * period + 1 and stretch >= MIN_LOOP_TOKENS:
            return True
    return False


def test_token_loop_rule_matches_the_brute_force_definition():
    generator = np.random.default_rng(0)
    for trial in range(300):
        length = int(generator.integers(0, 90))
        ids = generator.integers(0, 3 if trial % 2 else 2, size=length).tolist()
        if trial % 3 == 0 and length > 4:  # plant a loop of 2-12 copies
            period = int(generator.integers(1, 20))
            ids = ids[:3] + ids[3 : 3 + period] * int(generator.integers(2, 13)) + ids[3:]
        ids = [token + 10 for token in ids]  # the text is blank: only the token rule can fire
        assert is_degenerate("", ids) == _brute_force_token_loop(ids), ids


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


@pytest.mark.parametrize(
    ("text", "degenerate"),
    [
        ("#### 16\n#### 16\n#### 16", True),
        ("She has 16 eggs.\n#### 16\n\n#### 16\n#### 16 ", True),  # blank lines and spaces do not break it
        ("So the answer is 5.\n" * 3, True),
        ("so the answer is 5 " * 12, True),  # no newline: the token rule
        ("The total is" + " 0" * 30, True),  # " 0" is 2 tokens: a 60-token run
        ("#### 16\n#### 16", False),
        ("#### 16", False),
        ("Janet has 16 eggs. She eats 3 and bakes 4, so 16 - 3 - 4 = 9 are left.\n9 * 2 = 18 dollars.\n#### 18", False),
        ("1 + 1 = 2\n2 + 2 = 4\n4 + 4 = 8\n8 + 8 = 16\n#### 16", False),
        ("He needs 20 + 20 + 20 + 20 + 20 = 100 bricks.\n#### 100", False),
    ],
)
def test_loop_detector_on_text(smollm2_tokenizer, text, degenerate):
    assert is_degenerate(text, _ids(smollm2_tokenizer, text)) == degenerate


def test_no_gsm8k_reference_solution_is_flagged(smollm2_tokenizer, gsm8k_dir):
    answers = [json.loads(line)["answer"] for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()[:2000]]
    flagged = [answer for answer in answers if is_degenerate(answer, _ids(smollm2_tokenizer, answer))]
    assert flagged == []


def test_score_responses_fields():
    texts = ["3 + 4 = 7\n#### 7", "The answer is 7.", "#### 8\n#### 8\n#### 8", "#### ."]
    ids = [[1, 2, 3], [4, 5], [9, 8, 7, 6] * 3, list(range(10))]  # the ids only count here (short of a token loop)
    scores = score_responses(texts, ids, ["7", "7", "7", "7"], max_new_tokens=10, finished=[True, True, True, False])
    assert scores[0] == ResponseScore(True, True, True, False, 3, False)
    assert scores[1] == ResponseScore(False, True, False, False, 2, False)
    assert scores[2] == ResponseScore(False, False, True, True, 12, False)
    assert scores[3] == ResponseScore(False, False, False, False, 10, True)
    # Without the engine's flags, a response that reached max_new_tokens counts as truncated.
    assert [s.truncated for s in score_responses(texts, ids, ["7"] * 4, max_new_tokens=10)] == [False, False, True, True]
    with pytest.raises(ValueError, match=r"texts \(4\) and .*'ground_truths': 3"):
        score_responses(texts, ids, ["7"] * 3, max_new_tokens=10)


def _scores(correct: list[bool]) -> list[ResponseScore]:
    return [ResponseScore(c, c, c, False, 10 + i % 7, False) for i, c in enumerate(correct)]


def test_summary_rates_and_intervals():
    correct = [i % 5 == 0 for i in range(200)]  # 40 / 200
    summary = summarize_scores(_scores(correct))
    low, high = proportion_confint(40, 200, method="wilson")
    assert summary["num_questions"] == 200
    assert (summary["accuracy_strict"], summary["accuracy_strict_low"], summary["accuracy_strict_high"]) == pytest.approx((0.2, low, high))
    assert summary["repetition_rate"] == 0 and summary["truncation_rate"] == 0
    assert summary["mean_response_tokens"] == pytest.approx(np.mean([10 + i % 7 for i in range(200)]))
    assert summary["mean_response_tokens_low"] < summary["mean_response_tokens"] < summary["mean_response_tokens_high"]


def test_compare_paired_against_statsmodels():
    a = [i % 4 == 0 for i in range(200)]  # 50 right
    b = [i % 10 == 0 for i in range(200)]  # 20 right, 10 of them where a is right too
    comparison = compare_paired(_scores(a), _scores(b))
    assert comparison["strict/only_a"] == 40 and comparison["strict/only_b"] == 10
    assert comparison["strict/mcnemar_p"] == pytest.approx(statsmodels_mcnemar([[10, 40], [10, 140]], exact=True).pvalue)
    assert comparison["strict/difference"] == pytest.approx(0.15)
    assert 0 < comparison["strict/difference_low"] < 0.15 < comparison["strict/difference_high"]


def _naive_kls(model64, prompt: list[int], response: list[int], teacher_prompt: list[int]) -> tuple[list[float], list[float]]:
    """KL(teacher || student) and KL(student || teacher) per response token, float64, one unpadded sequence each."""
    def log_probs(prefix):
        logits = model64(torch.tensor([prefix + response])).logits[0, len(prefix) - 1 : len(prefix) - 1 + len(response)]
        return torch.log_softmax(logits, -1)

    student, teacher = log_probs(prompt), log_probs(teacher_prompt)
    forward = (teacher.exp() * (teacher - student)).sum(-1)
    reverse = (student.exp() * (student - teacher)).sum(-1)
    return forward.tolist(), reverse.tolist()


def test_heldout_kl_matches_a_float64_naive_computation(tiny_model_dir, smollm2_tokenizer, gsm8k_dir):
    """On the tiny random model the prompts change predictions little (KL ~ 1e-3), so the check is absolute:
    float32 against float64 within 1e-6, far below the ~1e-3 values (a position shifted by one would miss).
    Forward and reverse KL differ by less than float32 resolution here; losses tests cover their direction."""
    from transformers import AutoModelForCausalLM

    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()[:3]]
    messages = [build_student_messages(row["question"], GSM8K_INSTRUCTION) for row in rows]
    solutions = [row["answer"] for row in rows]
    generator = torch.Generator().manual_seed(0)
    responses = [torch.randint(0, len(smollm2_tokenizer), (length,), generator=generator).tolist() for length in (7, 0, 12)]
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    model64 = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float64)
    results = {
        divergence: heldout_kl(model, smollm2_tokenizer, messages, solutions, responses,
                               teacher_template=DEFAULT_TEACHER_TEMPLATE, batch_size=2, divergence=divergence)
        for divergence in ("forward_kl", "reverse_kl")
    }  # fmt: skip
    expected = {"forward_kl": [], "reverse_kl": []}
    with torch.no_grad():
        for message, solution, response in zip(messages, solutions, responses):
            pair = build_prompt_pair(smollm2_tokenizer, message, solution, DEFAULT_TEACHER_TEMPLATE)
            forward, reverse = _naive_kls(model64, pair.student_ids, response, pair.teacher_ids) if response else ([], [])
            expected["forward_kl"].append(forward)
            expected["reverse_kl"].append(reverse)
    for divergence, result in results.items():
        flat = [value for values in expected[divergence] for value in values]
        assert result.num_tokens == 19
        assert result.mean_per_token == pytest.approx(np.mean(flat), abs=1e-6)
        assert result.per_response[0] == pytest.approx(np.mean(expected[divergence][0]), abs=1e-6)
        assert math.isnan(result.per_response[1])
        assert result.per_response[2] == pytest.approx(np.mean(expected[divergence][2]), abs=1e-6)
    assert results["forward_kl"].mean_per_token > 1e-4  # the solution in the teacher prompt changes predictions
