"""Build one self-contained HTML report comparing the branches of a PCSD flow run, from MLflow.

The page holds: a table of branches (best one marked) with each held-out metric's 95% interval and the paired
test against the base model, the paired tests between every two branches (control arms), each arm's mean over
seeds with its Student-t interval (when the sweep has a `train.seed` axis), GSM8K accuracy before vs after per
branch against the swept hyperparameters, training curves overlaid across branches, the collapse diagnostics per
branch (first -> last step), and a per-token view of one example coloured by the KL of each response token.
Plots are inline SVG; the file has no external links, so it can be mailed, logged as an MLflow artifact or shown
in a Metaflow card as is.

    python -m dashboards.report --latest                      # latest flow run in sqlite:///mlflow.db
    python -m dashboards.report --flow-run-id 1718 --tracking-uri http://127.0.0.1:5000 --output r.html
"""

from __future__ import annotations

import argparse
import datetime
import html
from pathlib import Path

from mlflow.tracking import MlflowClient

from dashboards import plots
from dashboards.runs import BranchRun, Sweep, load_latest_samples, load_sweep
from pcsd_core import metric_names as names
from pcsd_core.eval.stats import Interval
from steps import contract
from steps.join import SEED_KEY, SeedGroup, group_by_arm

_STRICT, _FLEXIBLE = contract.ACCURACY_METRICS
TABLE_METRICS = (
    (contract.eval_metric("before", _STRICT), "strict before"),
    (contract.eval_metric("after", _STRICT), "strict after"),
    (contract.eval_metric("delta", _STRICT), "strict Δ"),
    (contract.eval_metric("before", _FLEXIBLE), "flexible before"),
    (contract.eval_metric("after", _FLEXIBLE), "flexible after"),
    (contract.eval_metric("delta", _FLEXIBLE), "flexible Δ"),
    (contract.PAIRED_PREFIX + "strict/difference", "strict vs base (paired)"),
    (contract.PAIRED_PREFIX + "strict/mcnemar_p", "McNemar p"),
    (contract.eval_metric("after", "answer_format_rate"), "#### format after"),
    (contract.eval_metric("after", "repetition_rate"), "repetition after"),
    (contract.eval_metric("after", "heldout_kl"), "held-out KL after"),
    (names.TRAIN_KL, "final train KL"),
)
PAIRED_COLUMNS = (("strict/difference", "strict A − B (95% CI)"), ("strict/mcnemar_p", "McNemar p (strict)"),
                  ("flexible/difference", "flexible A − B (95% CI)"), ("flexible/mcnemar_p", "McNemar p (flexible)"))
_COLLAPSE_LABELS = {
    names.ROLLOUT_REPETITION_RATE: "looping rollouts",
    names.TRAIN_RESPONSE_LEN: "response length (tokens)",
    names.TRAIN_STUDENT_ENTROPY: "student entropy",
    names.TRAIN_TEACHER_ENTROPY: "teacher entropy",
    names.TRAIN_LOSS_SHARE_TOP10PCT_TOKENS: "loss share of top 10% tokens",
}
COLLAPSE_COLUMNS = tuple((name, _COLLAPSE_LABELS[name]) for name in names.COLLAPSE_METRICS)  # a label for each
STYLE = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; max-width: 1300px; }
h1 { font-size: 1.5em; } h2 { border-bottom: 1px solid #ddd; padding-bottom: .2em; margin-top: 1.6em; }
table { border-collapse: collapse; font-size: .9em; }
th, td { border: 1px solid #ccc; padding: .3em .6em; text-align: right; }
th:first-child, td:first-child { text-align: left; }
tr.best { background: #e5f5e0; font-weight: bold; }
.grid { display: flex; flex-wrap: wrap; gap: 1em; }
figure { margin: 0; } .curve { flex: 0 1 640px; }
.table-wrap { overflow-x: auto; } svg { max-width: 100%; height: auto; }
.tokens { font-family: ui-monospace, monospace; white-space: pre-wrap; line-height: 1.9;
          border: 1px solid #ccc; padding: .8em; }
.tok { border-radius: 2px; } .meta { color: #555; font-size: .9em; }
"""


def build_report(
    tracking_uri: str | None = None,
    experiment: str = contract.DEFAULT_EXPERIMENT,
    flow_run_id: str | None = None,
    parent_run_id: str | None = None,
    output_path: str | Path | None = None,
) -> Path:
    """Write the HTML report of one flow run and return its path.

    Picks the parent run by `parent_run_id`, else by `flow_run_id` (tag `pcsd.flow_run_id`), else the latest
    flow run of `experiment`. `tracking_uri` defaults to $MLFLOW_TRACKING_URI, then the repo's mlflow.db.
    `output_path` defaults to `outputs/reports/<parent run name>.html`.
    """
    uri = tracking_uri or contract.tracking_uri()
    client = MlflowClient(tracking_uri=uri)
    sweep = load_sweep(client, experiment, flow_run_id=flow_run_id, parent_run_id=parent_run_id)
    example_branch, example = pick_example(client, sweep.branches, best_branch(sweep.branches))
    page = render_page(sweep, example_branch, example, load_paired_tests(client, sweep.parent_run_id))
    path = Path(output_path) if output_path else Path("outputs/reports") / f"{sweep.parent_name}.html"
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(page, encoding="utf-8")
    return path


def best_branch(branches: list[BranchRun]) -> BranchRun | None:
    """The contract's best branch (the join step's and the card's too); None when no branch was evaluated."""
    return contract.best_branch(branches, lambda branch: branch.metrics, lambda branch: branch.name)


def pick_example(
    client: MlflowClient, branches: list[BranchRun], preferred: BranchRun | None
) -> tuple[BranchRun | None, dict | None]:
    """The sample with the largest single-token KL from the latest step of `preferred` (else any branch)."""
    for branch in sorted(branches, key=lambda b: b is not preferred):
        samples = [s for s in load_latest_samples(client, branch.run_id) if s.get("tokens")]
        if samples:
            return branch, max(samples, key=lambda s: max(s["token_kl"], default=0.0))
    return None, None


def load_paired_tests(client: MlflowClient, parent_run_id: str) -> list[dict]:
    """The end step's paired tests between branches (`eval/paired_tests.json` on the parent run), or []."""
    import json
    import tempfile

    folder, _, name = contract.PAIRED_TESTS_ARTIFACT.rpartition("/")
    if not any(item.path.endswith(name) for item in client.list_artifacts(parent_run_id, folder)):
        return []
    with tempfile.TemporaryDirectory() as tmp:
        return json.loads(Path(client.download_artifacts(parent_run_id, contract.PAIRED_TESTS_ARTIFACT, tmp)).read_text())


def render_page(sweep: Sweep, example_branch: BranchRun | None, example: dict | None,
                paired_tests: list[dict] | None = None) -> str:
    """The whole HTML document."""
    curves = plots.plot_training_curves(sweep.branches)
    curve_html = "".join(f'<figure class="curve">{svg}</figure>' for _, svg in curves)
    if not curves:
        curve_html = "<p>No per-step training metrics were logged in these runs.</p>"
    when = datetime.datetime.now().strftime("%Y-%m-%d %H:%M")
    sections = [
        f"<h1>PCSD sweep report: {html.escape(sweep.parent_name)}</h1>",
        f'<p class="meta">experiment {html.escape(sweep.experiment_name)} · flow run '
        f"{html.escape(sweep.flow_run_id or '-')} · parent MLflow run {sweep.parent_run_id} · "
        f"{len(sweep.branches)} branch(es) · built {when}</p>",
        '<h2 id="branches">Branches</h2>',
        render_branch_table(sweep),
        '<h2 id="paired">Paired tests between branches (same test questions)</h2>',
        render_paired_tests(paired_tests or []),
        *render_seed_section(sweep),
        '<h2 id="eval">Evaluation: GSM8K accuracy before vs after</h2>',
        f'<figure id="eval-accuracy">{plots.plot_eval_accuracy(sweep.branches, sweep.varying_params)}</figure>',
        '<h2 id="curves">Training curves</h2>',
        f'<div class="grid">{curve_html}</div>',
        '<h2 id="collapse">Collapse diagnostics: first → last training step</h2>',
        render_collapse_table(sweep.branches),
        '<h2 id="tokens">Per-token view: where teacher and student disagree</h2>',
        render_token_section(example_branch, example),
    ]
    body = "\n".join(sections)
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>PCSD report {html.escape(sweep.parent_name)}</title><style>{STYLE}</style></head>"
        f"<body>\n{body}\n</body></html>\n"
    )


def render_branch_table(sweep: Sweep) -> str:
    """Branch name, swept params, eval metrics; the best branch's row is highlighted and starred."""
    best = best_branch(sweep.branches)
    header = ["branch", *sweep.varying_params, *(label for _, label in TABLE_METRICS), "status", "run id"]
    rows = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for branch in sweep.branches:
        is_best = branch is best
        name = html.escape(branch.name) + (" ★ best" if is_best else "")
        cells = [name, *(html.escape(branch.params.get(key, "")) for key in sweep.varying_params)]
        cells += [_format_with_interval(branch.metrics, metric) for metric, _ in TABLE_METRICS]
        cells += [html.escape(branch.status), f'<span title="{branch.run_id}">{branch.run_id[:8]}</span>']
        row_class = ' class="best"' if is_best else ""
        rows.append(f"<tr{row_class}>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    note = (f'<p class="meta">★ best = {contract.BEST_BRANCH_RULE}. [low, high] = 95% interval (Wilson for rates, '
            "bootstrap for means, paired bootstrap for differences on the same questions).</p>")
    return f'<div class="table-wrap"><table id="branch-table">{"".join(rows)}</table></div>{note}'


def _format(value: float | None) -> str:
    return "–" if value is None else f"{value:.4g}"


def _format_with_interval(values: dict, name: str) -> str:
    """`0.25 [0.1, 0.49]` when the metric has an interval (`<name>_low`, `<name>_high`), else the value."""
    low, high = (values.get(name + suffix) for suffix in contract.INTERVAL_SUFFIXES)
    text = _format(values.get(name))
    return text if low is None or high is None else f'{text} <span class="ci">[{low:.3g}, {high:.3g}]</span>'


def render_paired_tests(rows: list[dict]) -> str:
    """One row per pair of branches: the accuracy difference A − B with its interval, and McNemar's p."""
    if not rows:
        return "<p>No paired tests: a flow run with one branch compares it with the base model only (table above).</p>"
    header = ["A", "B", *(label for _, label in PAIRED_COLUMNS)]
    lines = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for row in rows:
        cells = [html.escape(row["a"]), html.escape(row["b"]), *(_format_with_interval(row, key) for key, _ in PAIRED_COLUMNS)]
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    note = ('<p class="meta">A − B &gt; 0 means A answered more questions right. An interval that holds 0, or '
            "p &ge; 0.05, is no evidence of a difference.</p>")
    return f'<div class="table-wrap"><table id="paired-tests">{"".join(lines)}</table></div>{note}'


def seed_groups(sweep: Sweep) -> list[SeedGroup]:
    """The evaluated branches grouped by arm over seeds, by the join's rule (`steps.join.group_by_arm`)."""
    strict = contract.ACCURACY_METRICS[0]
    needed = (contract.eval_metric("after", strict), contract.eval_metric("delta", strict))
    evaluated = [branch for branch in sweep.branches if all(name in branch.metrics for name in needed)]
    return group_by_arm([(sweep.sweep_point(branch), branch.metrics) for branch in evaluated])


def render_seed_section(sweep: Sweep) -> list[str]:
    """The "Arms over seeds" heading and table; nothing when the sweep has no `train.seed` axis."""
    if SEED_KEY not in sweep.swept_keys:
        return []
    heading = '<h2 id="seeds">Arms over seeds</h2>'
    groups = seed_groups(sweep)
    if not groups:
        return [heading, "<p>No branch of this seed sweep has been evaluated yet.</p>"]
    header = ["arm", "seeds", "strict after: mean over seeds [95% CI]", "strict Δ vs base: mean over seeds [95% CI]"]
    lines = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for group in groups:
        cells = [html.escape(group.arm), ", ".join(str(seed) for seed in group.seeds),
                 _format_interval(group.strict_after), _format_interval(group.strict_delta)]
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    note = ('<p class="meta">Each arm is a sweep point without its seed. [low, high] = Student-t 95% interval over '
            "the seeds (n − 1 degrees of freedom): it measures the spread between reruns, which the per-question "
            "tests above do not see. Two seeds give a wide interval (t = 12.7); one gives none.</p>")
    return [heading, f'<div class="table-wrap"><table id="seed-groups">{"".join(lines)}</table></div>{note}']


def _format_interval(interval: Interval) -> str:
    if interval.low != interval.low:  # NaN: one seed, no spread known
        return f'{_format(interval.estimate)} <span class="ci">[one seed]</span>'
    return f'{_format(interval.estimate)} <span class="ci">[{interval.low:.3g}, {interval.high:.3g}]</span>'


def render_collapse_table(branches: list[BranchRun]) -> str:
    """Per branch, each collapse diagnostic at its first and its last logged step."""
    logged = [branch for branch in branches if any(name in branch.curves for name, _ in COLLAPSE_COLUMNS)]
    if not logged:
        return "<p>No collapse diagnostics were logged in these runs.</p>"
    header = ["branch", *(label for _, label in COLLAPSE_COLUMNS)]
    lines = ["<tr>" + "".join(f"<th>{html.escape(h)}</th>" for h in header) + "</tr>"]
    for branch in logged:
        cells = [html.escape(branch.name)]
        for name, _ in COLLAPSE_COLUMNS:
            points = branch.curves.get(name)
            cells.append(f"{_format(points[0][1])} → {_format(points[-1][1])}" if points else "–")
        lines.append("<tr>" + "".join(f"<td>{cell}</td>" for cell in cells) + "</tr>")
    note = ('<p class="meta">A collapsing run shows more looping rollouts (the share of each step’s sampled '
            "responses that repeat, by the held-out repetition detector), responses shrinking or running to the "
            "length cap, student entropy falling toward 0, and the loss piling onto a few tokens (uniform loss gives "
            "a top-10% share of about 0.1, one token carrying it all gives 1). The curves are in the panels "
            "above.</p>")
    return f'<div class="table-wrap"><table id="collapse-table">{"".join(lines)}</table></div>{note}'


def render_token_section(branch: BranchRun | None, example: dict | None) -> str:
    """The coloured response, its colour legend, and the tokens of highest KL."""
    if example is None:
        return "<p>No samples/step_*.jsonl artifact was found in these runs, so there is no per-token view.</p>"
    token_kl = example["token_kl"]
    top = sorted(range(len(token_kl)), key=lambda i: token_kl[i], reverse=True)[:5]
    top_list = ", ".join(f"<code>{html.escape(repr(example['tokens'][i]))}</code> ({token_kl[i]:.3g})" for i in top)
    correct = {True: "correct", False: "wrong"}.get(example.get("correct"), "unscored")
    return (
        '<p class="meta">Each response token is coloured by KL(P_teacher || P_student) at that position. '
        "High KL concentrated on the final number means the privileged context leaked the answer; "
        "high KL spread over the reasoning steps means it is teaching the reasoning.</p>"
        f'<p class="meta">branch <b>{html.escape(branch.name)}</b> · step {example.get("step", "?")} · '
        f"response {correct} · the example with the largest single-token KL in the latest logged step</p>"
        f"<p><b>Question:</b> {html.escape(str(example.get('question', '')))}</p>"
        f'<div class="tokens" id="token-view">{plots.render_token_kl(example)}</div>'
        f'<figure id="kl-legend">{plots.plot_kl_colour_legend(max(token_kl, default=0.0))}</figure>'
        f"<p>Highest-KL tokens: {top_list}</p>"
    )


def main(argv: list[str] | None = None) -> Path:
    parser = argparse.ArgumentParser(description="Build the HTML comparison report of a PCSD flow run.")
    which = parser.add_mutually_exclusive_group(required=True)
    which.add_argument("--latest", action="store_true", help="the latest flow run of the experiment")
    which.add_argument("--flow-run-id", help="the Metaflow run id (MLflow tag pcsd.flow_run_id)")
    which.add_argument("--parent-run-id", help="the MLflow parent run id")
    parser.add_argument("--tracking-uri", default=None,
                        help=f"default $MLFLOW_TRACKING_URI or {contract.default_tracking_uri()}")
    parser.add_argument("--experiment", default=contract.DEFAULT_EXPERIMENT)
    parser.add_argument("--output", default=None, help="HTML path (default outputs/reports/<parent run>.html)")
    args = parser.parse_args(argv)
    path = build_report(args.tracking_uri, args.experiment, args.flow_run_id, args.parent_run_id, args.output)
    print(path.resolve())
    return path


if __name__ == "__main__":
    main()
