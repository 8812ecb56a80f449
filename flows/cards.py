"""Metaflow card contents for the PCSD flow: training curves and before/after GSM8K accuracy.

Kept beside the flow (cards are Metaflow's; `steps/` never imports Metaflow). The inputs are the small
results the steps return, the distill step's curve PNG included (as bytes: the join may run on another machine).
"""

from __future__ import annotations

from metaflow.cards import Image, Markdown, Table

from pcsd_core.metric_names import COLLAPSE_METRICS


def training_card(trained) -> list:
    """The distill card: the branch label, its training curves, its collapse diagnostics and the last step's
    metrics."""
    last = trained.history[-1] if trained.history else {}
    rows = [[name, f"{value:.4g}"] for name, value in sorted(last.items())]
    return [
        Markdown(f"## Branch `{trained.label}`: {trained.steps} steps\nMLflow run `{trained.run_id}`"),
        Image(trained.curves_png, label="training curves"),
        Markdown("### Collapse diagnostics"),
        Table(collapse_rows(trained.history), headers=["metric", "first step", "last step"]),
        Markdown("### Last step"),
        Table(rows, headers=["metric", "value"]),
    ]


def collapse_rows(history: list[dict[str, float]]) -> list[list[str]]:
    """Each collapse diagnostic the history holds, at its first and its last step: a run that collapses shows
    more looping rollouts, shorter responses, lower entropy, loss on fewer tokens."""
    rows = []
    for name in COLLAPSE_METRICS:
        values = [row[name] for row in history if name in row]
        if values:
            rows.append([name, f"{values[0]:.4g}", f"{values[-1]:.4g}"])
    return rows


def sweep_card(summary, headers: list[str], registration=None, report_path: str = "") -> list:
    """The join/end card: every branch's before/after accuracy, the best one, failures, the registry, the report."""
    components = [Markdown("## GSM8K accuracy before and after distillation"), Table(summary.table(), headers=headers)]
    if summary.best is not None:
        components.append(Markdown(f"Best branch: **{summary.best.label}** (MLflow run `{summary.best.run_id}`)"))
    for outcome in summary.outcomes:
        if outcome.curves_png:
            components.append(Image(outcome.curves_png, label=outcome.label))
    if registration is not None:
        champion = "champion" if registration.is_champion else "not champion"
        components.append(Markdown(f"Registered `{registration.model_uri}` ({champion}: {registration.reason})"))
    if report_path:
        components.append(Markdown(f"Sweep report (plots, per-token KL view): `{report_path}`, also under "
                                   "`report/` of the parent MLflow run"))
    return components

