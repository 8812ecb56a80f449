"""Join step: failed branches are kept but skipped; the best follows the tracking contract, as the report does."""

from __future__ import annotations

import math
import random

import pytest

from dashboards.report import best_branch as report_best_branch
from dashboards.runs import BranchRun
from pcsd_core.config.schema import PCSDConfig
from steps.distill import DistillResult
from steps.evaluate import BranchEvaluation
from steps.join import outcome_of, summarize_sweep
from steps.plan import Branch


def _metrics(strict: float, flexible: float) -> dict[str, float]:
    return {"eval/gsm8k_accuracy_strict": strict, "eval/gsm8k_accuracy_flexible": flexible,
            "eval/after/gsm8k_accuracy_strict": strict, "eval/after/gsm8k_accuracy_flexible": flexible}


def _outcome(label, strict=None, flexible=0.0, failure=None):
    branch = Branch(label=label, overrides={}, config=PCSDConfig())
    trained = DistillResult(label=label, run_id=f"run-{label}", checkpoint_dir="/ckpt", steps=2,
                            history=[{"train/kl": 0.5}, {"train/kl": 0.25}], curves_png="", wall_s=3.0)
    evaluation = None if strict is None else BranchEvaluation(label, f"run-{label}", "/ckpt", _metrics(strict, flexible))
    return outcome_of(branch, trained, evaluation, [failure, None])


def test_best_is_highest_strict_then_flexible_and_failures_are_skipped():
    outcomes = [
        _outcome("a", 0.25, 0.5),
        _outcome("b", 0.50, 0.5),
        _outcome("c", 0.50, 0.75),
        _outcome("d", 0.90, 0.9, failure=RuntimeError("evaluate crashed")),  # evaluated, then failed: skipped
        outcome_of(None, None, None, [RuntimeError("out of memory"), None]),  # failed before storing anything
    ]
    summary = summarize_sweep(outcomes)
    assert summary.best.label == "c" and summary.best.run_id == "run-c"
    assert (summary.best.steps, summary.best.train_s, summary.best.final_kl) == (2, 3.0, 0.25)
    assert summary.failed == ["d", "unknown"]
    rows = {row[0]: row for row in summary.table()}
    assert rows["c"][-1] == "best" and rows["a"][-1] == "ok" and rows["d"][-1].startswith("failed: evaluate crashed")


def test_all_failed_means_no_best():
    summary = summarize_sweep([_outcome("a", failure=ValueError("bad"))])
    assert summary.best is None and summary.failed == ["a"]


def test_card_and_report_name_the_same_best_branch_on_a_tie():
    """The join orders branches as the foreach did, the report by MLflow start time; a tie must not depend on it.

    Once the join took the first of the tied branches in foreach order and the report the first in start-time
    order, so the card and the HTML report could crown different champions.
    """
    scores = {"lr=3e-05": (0.5, 0.75), "lr=1e-05": (0.5, 0.75), "lr=1e-06": (0.5, 0.5), "lr=1e-04": (0.25, 0.9)}
    expected = "lr=1e-05"  # tied on both accuracies with lr=3e-05; the label breaks the tie
    generator = random.Random(0)
    for _ in range(10):
        labels = list(scores)
        generator.shuffle(labels)
        join_best = summarize_sweep([_outcome(label, *scores[label]) for label in labels]).best.label
        generator.shuffle(labels)
        report_branches = [BranchRun(run_id=label, name=label, status="FINISHED", params={},
                                        metrics=_metrics(*scores[label]), curves={}) for label in labels]
        assert join_best == report_best_branch(report_branches).name == expected


def test_every_pair_of_evaluated_branches_is_compared_on_the_same_questions(tmp_path):
    from steps.evaluate import EvalResult

    def saved(label, correct):
        rows = [{"correct_strict": c, "correct_flexible": c, "has_answer_line": c, "degenerate": False,
                 "length_tokens": 5, "truncated": False} for c in correct]
        result = EvalResult(model_path=label, num_examples=len(rows), accuracy_strict=sum(correct) / len(rows),
                            accuracy_flexible=sum(correct) / len(rows), examples=rows)
        return str(result.save(tmp_path / f"{label}.json"))

    outcomes = [_outcome(label, 0.5, 0.5) for label in ("solution", "shuffled", "answer_only")]
    answers = {"solution": [True] * 8 + [False] * 2, "shuffled": [True] * 3 + [False] * 7,
               "answer_only": [True] * 5 + [False] * 5}
    for outcome in outcomes:
        outcome.evaluation.result_path = saved(outcome.label, answers[outcome.label])
    rows = summarize_sweep(outcomes).paired_tests
    assert [(row["a"], row["b"]) for row in rows] == [("solution", "shuffled"), ("solution", "answer_only"),
                                                      ("shuffled", "answer_only")]
    first = rows[0]
    assert first["strict/difference"] == 0.5 and (first["strict/only_a"], first["strict/only_b"]) == (5, 0)
    assert first["strict/mcnemar_p"] == 0.0625  # exact two-sided binomial, 5 discordant pairs all one way


def test_branches_are_grouped_by_arm_over_seeds_with_a_student_t_interval():
    """A sweep over arms x seeds: each arm's mean over its seeds, with the t-interval scipy gives for those values."""
    import numpy as np
    import pytest
    from scipy import stats

    from steps.finish import results_summary

    def seeded(arm: str, seed: int, after: float, before: float = 0.1, failed: bool = False):
        overrides = {"data.privileged_context": arm, "train.seed": seed}
        metrics = {**_metrics(after, after), "eval/before/gsm8k_accuracy_strict": before,
                   "eval/before/gsm8k_accuracy_flexible": before,
                   "eval/delta/gsm8k_accuracy_strict": after - before}
        evaluation = BranchEvaluation(arm, f"run-{arm}-{seed}", "/ckpt", metrics)
        branch = Branch(label=f"privileged_context={arm},seed={seed}", overrides=overrides, config=PCSDConfig())
        return outcome_of(branch, None, evaluation, [RuntimeError("crashed") if failed else None])

    outcomes = [seeded("solution", 0, 0.30), seeded("shuffled", 0, 0.20), seeded("solution", 1, 0.40),
                seeded("shuffled", 1, 0.10), seeded("solution", 2, 0.35), seeded("shuffled", 2, 0.9, failed=True)]
    groups = summarize_sweep(outcomes).seed_groups
    assert [(g.arm, g.seeds) for g in groups] == [("privileged_context=solution", [0, 1, 2]),
                                                  ("privileged_context=shuffled", [0, 1])]  # the failed seed is out
    for group, values in zip(groups, ([0.30, 0.40, 0.35], [0.20, 0.10])):
        low, high = stats.t.interval(0.95, len(values) - 1, loc=np.mean(values), scale=stats.sem(values))
        assert group.strict_after.estimate == pytest.approx(np.mean(values))
        assert (group.strict_after.low, group.strict_after.high) == pytest.approx((low, high), rel=1e-9)
        assert group.strict_delta.estimate == pytest.approx(np.mean(values) - 0.1)
    summary = summarize_sweep(outcomes)
    text = results_summary(summary, None)
    assert "arm privileged_context=solution over seeds [0, 1, 2]: strict after 35.0% [" in text
    # No seed axis, no groups.
    assert summarize_sweep([_outcome("a", 0.2), _outcome("b", 0.3)]).seed_groups == []


# Student-t 0.975 quantiles from a printed table (df = 1, 2): the 95% interval's multiplier over seeds.
T_TABLE_975 = {1: 12.706, 2: 4.303}


def _t_interval(values: list[float]) -> tuple[float, float, float]:
    """mean -+ t(0.975, n - 1) * s / sqrt(n), s the sample standard deviation, from the table value."""
    n = len(values)
    mean = sum(values) / n
    s = (sum((v - mean) ** 2 for v in values) / (n - 1)) ** 0.5
    half = T_TABLE_975[n - 1] * s / n**0.5
    return mean, mean - half, mean + half


def test_group_by_arm_takes_sweep_points_as_mlflow_params_and_matches_a_t_table():
    """The report's input: param strings (seed '0'), arms in first-seen order, a branch without a seed left out."""
    from steps.join import group_by_arm

    def point(context: str, seed: str | None, after: float, before: float = 0.25):
        overrides = {"data.privileged_context": context, **({"train.seed": seed} if seed is not None else {})}
        return overrides, {"eval/after/gsm8k_accuracy_strict": after, "eval/delta/gsm8k_accuracy_strict": after - before}

    groups = group_by_arm([point("shuffled", "0", 0.20), point("solution", "0", 0.30), point("solution", "1", 0.45),
                           point("shuffled", "1", 0.25), point("solution", "2", 0.36), point("none", None, 0.9)])
    assert [(g.arm, g.seeds) for g in groups] == [("privileged_context=shuffled", [0, 1]),
                                                  ("privileged_context=solution", [0, 1, 2])]
    for group, after in zip(groups, ([0.20, 0.25], [0.30, 0.45, 0.36])):
        interval = group.strict_after
        assert (interval.estimate, interval.low, interval.high) == pytest.approx(_t_interval(after), abs=2e-4)
        delta = group.strict_delta
        assert (delta.estimate, delta.low, delta.high) == pytest.approx(_t_interval([a - 0.25 for a in after]), abs=2e-4)
    # One seed: the mean, and no interval (no spread is known).
    (single,) = group_by_arm([point("solution", "3", 0.5)])
    assert single.strict_after.estimate == 0.5 and math.isnan(single.strict_after.low)
