"""End step: close the flow's parent MLflow run with its summary and report, and print the results.

The parent run gets the best branch's evaluation metrics (`best/...`), the number of failed branches, the
registered model version as tags, and the HTML sweep report (`report/`). It is marked FAILED when every
branch failed, so a broken sweep stands out in the MLflow UI. The terminal gets the headline results
(accuracy before -> after, steps, time, the registered version) and the commands that show more.

    python -m steps.finish        # only the "where to look" commands (`make run` prints them after the flow)
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from mlflow.tracking import MlflowClient

from steps import contract
from steps import tracking
from steps.join import SweepSummary
from steps.register import RegisterResult


def finish(parent_run_id: str, summary: SweepSummary, registration: RegisterResult | None, pathspec: str,
           build_report: Callable[..., str | Path] | None = None) -> str:
    """Log the sweep summary and the report (`build_report(tracking_uri=, parent_run_id=)`, the flow passes the
    dashboards') to the parent run, close it, print the results; returns the report path ("" without one)."""
    client = tracking.client()
    metrics = {"sweep/failed_branches": float(len(summary.failed)), "sweep/branches": float(len(summary.outcomes))}
    if summary.best is not None:
        metrics.update({f"best/{name}": value for name, value in summary.best.evaluation.metrics.items()})
        client.set_tag(parent_run_id, contract.TAG_BEST_BRANCH, summary.best.label)
    if registration is not None:
        client.set_tag(parent_run_id, contract.TAG_REGISTERED_MODEL, registration.model_uri)
    tracking.log_metrics(parent_run_id, metrics)
    if summary.paired_tests:
        client.log_dict(parent_run_id, summary.paired_tests, contract.PAIRED_TESTS_ARTIFACT)
    report_path = _log_report(parent_run_id, build_report)
    tracking.finish_run(parent_run_id, "FINISHED" if summary.best is not None else "FAILED")
    print(results_summary(summary, registration))
    print(where_to_look(pathspec))
    return report_path


def results_summary(summary: SweepSummary, registration: RegisterResult | None) -> str:
    """The headline results of a flow run, one line per branch, for the terminal."""
    strict, flexible = contract.ACCURACY_METRICS
    lines = ["Results (GSM8K accuracy of the base model -> the distilled model, greedy):"]
    for outcome in summary.outcomes:
        if not outcome.succeeded:
            lines.append(f"  {outcome.label}: FAILED ({outcome.error[:120]})")
            continue
        metrics = outcome.evaluation.metrics
        cells = [f"{mode} {_fraction(metrics, 'before', name, outcome)} -> {_fraction(metrics, 'after', name, outcome)}"
                 for mode, name in (("strict", strict), ("flexible", flexible))]
        star = "  <- best" if summary.best is not None and outcome.label == summary.best.label else ""
        lines.append(f"  {outcome.label}: {', '.join(cells)}; {outcome.steps} steps in {outcome.train_s:.0f} s, "
                     f"final train KL {outcome.final_kl:.4f}{star}")
        if outcome.stopped_because:
            lines.append(f"      stopped early: {outcome.stopped_because}")
        vs_base = contract.PAIRED_PREFIX + "strict/"
        if vs_base + "difference" in metrics:
            lines.append(f"      strict vs base {metrics[vs_base + 'difference']:+.1%} "
                         f"[{metrics[vs_base + 'difference_low']:+.1%}, {metrics[vs_base + 'difference_high']:+.1%}] "
                         f"(paired bootstrap 95%), McNemar p={metrics[vs_base + 'mcnemar_p']:.3g}; held-out "
                         f"KL(teacher||student) {metrics.get(contract.eval_metric('before', 'heldout_kl'), float('nan')):.4f}"
                         f" -> {metrics.get(contract.eval_metric('after', 'heldout_kl'), float('nan')):.4f} nats/token")
    for group in summary.seed_groups:
        after, delta = group.strict_after, group.strict_delta
        lines.append(f"  arm {group.arm} over seeds {group.seeds}: strict after {after.estimate:.1%} "
                     f"[{after.low:.1%}, {after.high:.1%}], delta {delta.estimate:+.1%} [{delta.low:+.1%}, "
                     f"{delta.high:+.1%}] (mean, Student-t 95% over seeds)")
    if registration is not None:
        holder = f"holds alias '{registration.alias}'" if registration.is_champion else \
            f"not promoted to '{registration.alias}'"
        lines.append(f"  registered {registration.model_uri} ({holder}: {registration.reason})")
    return "\n".join(lines)


def _fraction(metrics: dict[str, float], phase: str, name: str, outcome) -> str:
    value = metrics[contract.eval_metric(phase, name)]
    count = outcome.evaluation.num_examples
    return f"{round(value * count)}/{count} ({value:.1%})" if count else f"{value:.3f}"


def where_to_look(pathspec: str = "") -> str:
    """The commands that show a finished run: the MLflow UI and the Metaflow cards."""
    # `card view end` alone shows the latest run's card.
    run = f"{pathspec.split('/')[1]}/" if pathspec.count("/") >= 1 else ""
    return "\n".join([
        "Done. Where to look:",
        f"  MLflow UI:       mlflow ui --backend-store-uri {tracking.tracking_uri()}",
        f"  Metaflow cards:  python flows/pcsd_flow.py card view {run}end   (also {run}join, {run}distill)",
        "  Sweep report:    python -m dashboards.report --latest",
    ])  # fmt: skip


def log_report_to_mlflow(parent_run_id: str, html_path: str | Path, tracking_uri: str | None = None) -> str:
    """Upload `html_path` to `report/<file name>` of run `parent_run_id`; returns that artifact path."""
    path = Path(html_path)
    if not path.is_file():
        raise ValueError(f"html_path ({str(path)!r}) is not a file; build it first with dashboards.report.build_report.")
    MlflowClient(tracking_uri=tracking_uri).log_artifact(parent_run_id, str(path), artifact_path="report")
    return f"report/{path.name}"


def _log_report(parent_run_id: str, build_report: Callable[..., str | Path] | None) -> str:
    """The HTML sweep report, logged under `report/` of the parent run ("" if there is none or it cannot be built)."""
    if build_report is None:
        return ""
    try:
        path = build_report(tracking_uri=tracking.tracking_uri(), parent_run_id=parent_run_id)
        log_report_to_mlflow(parent_run_id, path, tracking_uri=tracking.tracking_uri())
    except Exception as error:  # the report is a convenience: a failure must not lose the run's results
        print(f"warning: sweep report not built: {error}")
        return ""
    return str(Path(path).resolve())  # the card and the Metaflow artifact outlive the task's cwd


if __name__ == "__main__":
    print(where_to_look())
