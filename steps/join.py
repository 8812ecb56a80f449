"""Join step: collect the sweep branches' outcomes, skip the failed ones and name the best.

A branch fails when its distill or evaluate task raised (Metaflow's `@catch` stores the exception); the
others' results are kept. The best branch has the highest headline metric (strict GSM8K accuracy after
distillation), ties broken by the flexible accuracy, then by label order.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

HEADLINE_METRIC = "eval/gsm8k_accuracy_strict"
TIEBREAK_METRIC = "eval/gsm8k_accuracy_flexible"


@dataclass
class BranchOutcome:
    label: str
    run_id: str  # the branch's child MLflow run ("" when it failed before creating one)
    evaluation: Any = None  # steps.evaluate.BranchEvaluation, None when the branch failed
    error: str = ""
    curves_png: str = ""  # the branch's training-curve plot, when it trained

    @property
    def succeeded(self) -> bool:
        return self.evaluation is not None


@dataclass
class SweepSummary:
    outcomes: list[BranchOutcome]
    best: BranchOutcome | None
    failed: list[str] = field(default_factory=list)

    def table(self) -> list[list[str]]:
        """Rows for cards and logs: label, strict before/after/delta, status."""
        rows = []
        for outcome in self.outcomes:
            metrics = outcome.evaluation.metrics if outcome.succeeded else {}
            cells = [f"{metrics[name]:.3f}" if name in metrics else "-" for name in (
                "eval/before/gsm8k_accuracy_strict", "eval/after/gsm8k_accuracy_strict",
                "eval/delta/gsm8k_accuracy_strict", "eval/after/gsm8k_accuracy_flexible")]  # fmt: skip
            best = self.best is not None and outcome.label == self.best.label
            status = "best" if best else ("ok" if outcome.succeeded else f"failed: {outcome.error[:80]}")
            rows.append([outcome.label, *cells, status])
        return rows


TABLE_HEADERS = ["branch", "strict before", "strict after", "strict delta", "flexible after", "status"]


def summarize_sweep(outcomes: list[BranchOutcome]) -> SweepSummary:
    """Keep every outcome, name the best successful one (None when all failed)."""
    succeeded = [outcome for outcome in outcomes if outcome.succeeded]
    best = None
    if succeeded:
        best = max(
            succeeded,
            key=lambda o: (o.evaluation.metrics[HEADLINE_METRIC], o.evaluation.metrics[TIEBREAK_METRIC]),
        )
    return SweepSummary(outcomes=outcomes, best=best, failed=[o.label for o in outcomes if not o.succeeded])


def outcome_of(branch: Any, trained: Any, evaluation: Any, failures: list[Any]) -> BranchOutcome:
    """One branch's outcome from what its tasks stored (any of them may be missing after a failure)."""
    errors = [str(failure) for failure in failures if failure is not None]
    return BranchOutcome(
        label=getattr(branch, "label", "unknown"),
        run_id=getattr(trained, "run_id", ""),
        evaluation=None if errors else evaluation,
        error="; ".join(errors),
        curves_png=getattr(trained, "curves_png", ""),
    )
