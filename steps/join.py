"""Join step: collect the sweep branches' outcomes, skip the failed ones and name the best.

A branch fails when its distill or evaluate task raised (Metaflow's `@catch` stores the exception); the
others' results are kept. The best branch follows the tracking contract's rule
(`steps.contract.best_branch`), the same one the HTML report applies. Every pair of evaluated
branches is compared on the same test questions (paired bootstrap interval of the accuracy difference, exact
McNemar test): the treatment-vs-control answer of a sweep over control arms.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from pcsd_core.eval.stats import Interval, mean_over_seeds_interval
from pcsd_core.metric_names import TRAIN_KL
from steps import contract
from steps.distill import DistillResult
from steps.evaluate import BranchEvaluation, EvalResult
from steps.plan import Branch, branch_label

_STRICT, _FLEXIBLE = contract.ACCURACY_METRICS
TABLE_METRICS = (
    contract.eval_metric("before", _STRICT), contract.eval_metric("after", _STRICT),
    contract.eval_metric("delta", _STRICT), contract.eval_metric("after", _FLEXIBLE),
)  # fmt: skip
TABLE_HEADERS = ["branch", "strict before", "strict after", "strict delta", "flexible after", "status"]


@dataclass
class BranchOutcome:
    label: str
    run_id: str  # the branch's child MLflow run ("" when it failed before creating one)
    evaluation: BranchEvaluation | None = None  # None when the branch failed
    error: str = ""
    curves_png: bytes = b""  # the branch's training-curve plot (PNG), when it trained
    config: Any = None  # the branch's PCSDConfig, when known
    steps: int = 0  # training steps run
    train_s: float = 0.0  # wall time of the training
    final_kl: float = float("nan")  # train/kl of the last step
    overrides: dict[str, Any] = field(default_factory=dict)  # the branch's sweep point
    stopped_because: str = ""  # why training ended early (a collapse stop), or ""

    @property
    def succeeded(self) -> bool:
        return self.evaluation is not None


SEED_KEY = "train.seed"


@dataclass(frozen=True)
class SeedGroup:
    """One arm (a sweep point without its seed) over the seeds it ran with."""

    arm: str
    seeds: list[int]
    strict_after: Interval  # mean over seeds of the strict accuracy after training, 95% t-interval over seeds
    strict_delta: Interval  # the same for after - before


def arm_label(overrides: Mapping[str, Any]) -> str:
    """The branch label without its seed: the arm a seed sweep repeats ('lr=1e-05,train.seed=1' -> 'lr=1e-05')."""
    return branch_label({key: value for key, value in overrides.items() if key != SEED_KEY})


def seed_groups(outcomes: list[BranchOutcome]) -> list[SeedGroup]:
    """Group the evaluated branches by arm, when the sweep has a `train.seed` axis; arms in first-seen order."""
    return group_by_arm([(o.overrides, o.evaluation.metrics) for o in outcomes if o.succeeded])


def group_by_arm(branches: Iterable[tuple[Mapping[str, Any], Mapping[str, float]]]) -> list[SeedGroup]:
    """Evaluated branches, each as (sweep point, eval metrics), grouped by `arm_label`: those whose sweep point
    has `train.seed`; arms in first-seen order. The one grouping rule of the join (its outcomes) and the report
    (MLflow runs, whose seeds are param strings)."""
    arms: dict[str, list[tuple[Mapping[str, Any], Mapping[str, float]]]] = {}
    for overrides, metrics in branches:
        if SEED_KEY in overrides:
            arms.setdefault(arm_label(overrides), []).append((overrides, metrics))
    strict = contract.ACCURACY_METRICS[0]
    after, delta = contract.eval_metric("after", strict), contract.eval_metric("delta", strict)
    return [SeedGroup(arm=arm, seeds=[int(overrides[SEED_KEY]) for overrides, _ in members],
                      strict_after=mean_over_seeds_interval([metrics[after] for _, metrics in members]),
                      strict_delta=mean_over_seeds_interval([metrics[delta] for _, metrics in members]))
            for arm, members in arms.items()]


@dataclass
class SweepSummary:
    outcomes: list[BranchOutcome]
    best: BranchOutcome | None
    failed: list[str] = field(default_factory=list)
    # One row per pair of evaluated branches: {"a", "b", "strict/difference", ..., "strict/mcnemar_p", ...}.
    paired_tests: list[dict[str, Any]] = field(default_factory=list)
    # Arms swept over `train.seed`: each arm's mean over its seeds with a Student-t interval over seeds.
    seed_groups: list[SeedGroup] = field(default_factory=list)

    def table(self) -> list[list[str]]:
        """Rows for cards and logs: label, strict before/after/delta, flexible after, status."""
        rows = []
        for outcome in self.outcomes:
            metrics = outcome.evaluation.metrics if outcome.succeeded else {}
            cells = [f"{metrics[name]:.3f}" if name in metrics else "-" for name in TABLE_METRICS]
            best = self.best is not None and outcome.label == self.best.label
            status = "best" if best else ("ok" if outcome.succeeded else f"failed: {outcome.error[:80]}")
            rows.append([outcome.label, *cells, status])
        return rows


def summarize_sweep(outcomes: list[BranchOutcome]) -> SweepSummary:
    """Keep every outcome, name the best successful one (None when all failed)."""
    best = contract.best_branch(
        [outcome for outcome in outcomes if outcome.succeeded],
        metrics_of=lambda outcome: outcome.evaluation.metrics,
        label_of=lambda outcome: outcome.label,
    )
    return SweepSummary(outcomes=outcomes, best=best, failed=[o.label for o in outcomes if not o.succeeded],
                        paired_tests=paired_tests([outcome for outcome in outcomes if outcome.succeeded]),
                        seed_groups=seed_groups(outcomes))


def paired_tests(outcomes: list[BranchOutcome], seed: int = 0) -> list[dict[str, Any]]:
    """Every pair of evaluated branches on the same questions (A - B), from their saved per-question scores."""
    from pcsd_core.eval.metrics import compare_paired

    scored = [(o.label, EvalResult.load(o.evaluation.result_path).scores())
              for o in outcomes if o.evaluation.result_path]  # fmt: skip
    rows = []
    for index, (label_a, scores_a) in enumerate(scored):
        for label_b, scores_b in scored[index + 1:]:
            if len(scores_a) == len(scores_b):
                rows.append({"a": label_a, "b": label_b, **compare_paired(scores_a, scores_b, seed=seed)})
    return rows


def outcome_of(branch: Branch | None, trained: DistillResult | None, evaluation: BranchEvaluation | None,
               failures: list[Any]) -> BranchOutcome:
    """One branch's outcome from what its tasks stored (any of them may be missing after a failure)."""
    errors = [str(failure) for failure in failures if failure is not None]
    outcome = BranchOutcome(
        label=branch.label if branch is not None else "unknown",
        run_id="",
        evaluation=None if errors else evaluation,
        error="; ".join(errors),
        config=branch.config if branch is not None else None,
        overrides=dict(branch.overrides) if branch is not None else {},
    )
    if trained is not None:
        outcome.run_id, outcome.curves_png = trained.run_id, trained.curves_png
        outcome.steps, outcome.train_s = trained.steps, trained.wall_s
        outcome.stopped_because = trained.stopped_because
        if trained.history:
            outcome.final_kl = trained.history[-1].get(TRAIN_KL, float("nan"))
    return outcome
