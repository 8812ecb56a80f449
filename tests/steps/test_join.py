"""Join step: failed branches are kept but skipped, the best is the highest strict accuracy after training."""

from __future__ import annotations

from types import SimpleNamespace

from steps.evaluate import BranchEvaluation
from steps.join import outcome_of, summarize_sweep


def _evaluation(label: str, strict: float, flexible: float) -> BranchEvaluation:
    metrics = {"eval/gsm8k_accuracy_strict": strict, "eval/gsm8k_accuracy_flexible": flexible}
    return BranchEvaluation(label=label, run_id=f"run-{label}", checkpoint_dir="/ckpt", metrics=metrics)


def _outcome(label, strict=None, flexible=0.0, failure=None):
    branch, trained = SimpleNamespace(label=label), SimpleNamespace(run_id=f"run-{label}", curves_png="")
    evaluation = None if strict is None else _evaluation(label, strict, flexible)
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
    assert summary.failed == ["d", "unknown"]
    rows = {row[0]: row for row in summary.table()}
    assert rows["c"][-1] == "best" and rows["a"][-1] == "ok" and rows["d"][-1].startswith("failed: evaluate crashed")


def test_all_failed_means_no_best():
    summary = summarize_sweep([_outcome("a", failure=ValueError("bad"))])
    assert summary.best is None and summary.failed == ["a"]
