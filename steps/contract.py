"""The tracking contract: where runs go, how they are tagged, what metrics are called, which branch is best.

The steps write MLflow runs by these names and the dashboards read them back by the same names, so both import
them from here (DESIGN.md "Tracking contract"). Nothing here talks to MLflow: these are names and one rule.

- One parent run per flow run (tag `pcsd.flow_run_id`), one nested child run per sweep branch (tags
  `mlflow.parentRunId`, `pcsd.branch`).
- Per-step metrics under stable names (`train/loss`, `perf/tokens_per_s`, ...); evaluation metrics as
  `eval/<phase>/<name>` with phase `before` (base model), `after` (distilled) or `delta` (after - before), and
  the headline `eval/<name>` (= after).
- The best branch: highest strict accuracy after training, then flexible accuracy, then the branch label in
  alphabetical order, so every reader (join step, card, HTML report) names the same champion on a tie.
"""

from __future__ import annotations

import math
import os
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import TypeVar

# The metric names themselves are the engine's (per-step curves, held-out metrics); the contract adds the phases.
from pcsd_core.metric_names import (ACCURACY_METRICS, CURVE_METRICS, HELDOUT_METRICS,  # noqa: F401
                                    INTERVAL_SUFFIXES)

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_EXPERIMENT = "pcsd"

# ---- tags ---------------------------------------------------------------------------------------------
TAG_PARENT_RUN = "mlflow.parentRunId"  # MLflow's own nesting tag
TAG_RUN_NAME = "mlflow.runName"
TAG_FLOW_RUN_ID = "pcsd.flow_run_id"
TAG_PATHSPEC = "pcsd.metaflow_pathspec"
TAG_BRANCH = "pcsd.branch"
TAG_BEST_BRANCH = "pcsd.best_branch"  # on the parent run
TAG_REGISTERED_MODEL = "pcsd.registered_model"  # on the parent run: models:/<name>/<version>
TAG_EVAL_METRIC = "pcsd.eval_metric"  # on a registered model version: the metric that ranked it
TAG_EVAL_VALUE = "pcsd.eval_value"
TAG_PROMOTION = "pcsd.promotion"  # on a registered model version: why the champion alias moved to it, or why not
TAG_KEPT_CHECKPOINT = "pcsd.kept_checkpoint"  # on a branch run: the checkpoint evaluated and registered
TAG_STOPPED_BECAUSE = "pcsd.stopped_because"  # on a branch run: why training ended early, or "ran every step"

# ---- params -------------------------------------------------------------------------------------------
PARAM_SWEEP = "sweep"  # on the parent run: the sweep grid as JSON, '{"train.lr": [1e-05, 3e-05]}'; "" without one

# ---- metrics ------------------------------------------------------------------------------------------
EVAL_PHASES = ("before", "after", "delta")


def eval_metric(phase: str, name: str) -> str:
    """'eval/after/gsm8k_accuracy_strict'; phase '' gives the headline 'eval/gsm8k_accuracy_strict'."""
    if phase and phase not in EVAL_PHASES:
        raise ValueError(f"evaluation phase ({phase!r}) must be one of {EVAL_PHASES} or '' (the headline).")
    return f"eval/{phase}/{name}" if phase else f"eval/{name}"


HEADLINE_METRIC = eval_metric("", "gsm8k_accuracy_strict")  # what the registry ranks versions by
# A distilled model against the base model on the same questions (paired): `eval/vs_base/<mode>/<statistic>`,
# statistics `difference` (+ interval), `mcnemar_p`, `only_a` (right only after training), `only_b` (only before).
PAIRED_PREFIX = "eval/vs_base/"
def examples_table(phase: str) -> str:
    """The per-question table of an evaluated model on its run: 'eval/after_examples.json'."""
    if phase not in EVAL_PHASES:
        raise ValueError(f"evaluation phase ({phase!r}) must be one of {EVAL_PHASES}.")
    return f"eval/{phase}_examples.json"


PAIRED_TESTS_ARTIFACT = "eval/paired_tests.json"  # on the parent run: every pair of branches, same statistics
BEST_BRANCH_RULE = "highest strict accuracy after training, then flexible accuracy, then branch label (A-Z)"


def tracking_uri() -> str:
    """`MLFLOW_TRACKING_URI` when set, else `sqlite:///<repo>/mlflow.db` (absolute, so every task agrees)."""
    return os.environ.get("MLFLOW_TRACKING_URI") or default_tracking_uri()


def default_tracking_uri() -> str:
    return f"sqlite:///{REPO_ROOT / 'mlflow.db'}"


# ---- the best branch ----------------------------------------------------------------------------------
Candidate = TypeVar("Candidate")


def best_branch(
    candidates: Iterable[Candidate],
    metrics_of: Callable[[Candidate], Mapping[str, float] | None],
    label_of: Callable[[Candidate], str],
) -> Candidate | None:
    """The best evaluated candidate by BEST_BRANCH_RULE; None when none has an after-training accuracy."""
    strict, flexible = (eval_metric("after", name) for name in ACCURACY_METRICS)

    def value(metrics: Mapping[str, float], name: str) -> float:
        number = metrics.get(name, math.nan)
        return -math.inf if number is None or math.isnan(number) else float(number)

    ranked = [(c, metrics_of(c) or {}) for c in candidates]
    evaluated = [(c, metrics) for c, metrics in ranked if value(metrics, strict) > -math.inf]
    if not evaluated:
        return None
    best, _ = min(evaluated, key=lambda item: (-value(item[1], strict), -value(item[1], flexible), label_of(item[0])))
    return best
