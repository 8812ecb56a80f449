"""Rebuild an evidence run's tables from MLflow's per-question tables alone, and check them against the run.

Every number in the evidence tables of benchmarks/README.md is recomputed here from the per-question tables the
evaluate step logged (`eval/before_examples.json`, `eval/after_examples.json` on each branch run), with the same
statistics the platform uses (`pcsd_core.eval.metrics`, `pcsd_core.eval.stats`), then compared with the metrics the
flow logged; a mismatch is printed and makes the exit status 1. Tables (markdown):

1. each model (the base, every branch): strict, flexible, `####` format, repetition, truncation (Wilson 95%),
   mean tokens (bootstrap 95%), held-out KL (the flow's metric: it is token-weighted, not a per-question mean);
2. each branch against the base model on the same questions: paired-bootstrap difference and exact McNemar p;
3. with a `train.seed` axis: each arm's mean over its seeds with a Student-t 95% interval over seeds (strict and
   flexible), and the first arm of the grid (the treatment) against each other arm, seed by seed, on the same
   questions (checked against the join's `eval/paired_tests.json`).

    python benchmarks/evidence_tables.py                      # the newest flow run in ./mlflow.db
    python benchmarks/evidence_tables.py --flow-run-id 1796680399117299
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

TOLERANCE = 1e-9


def percent(value: float) -> str:
    return f"{100 * value:.1f}%"


def rate_cell(summary: dict[str, float], name: str) -> str:
    return f"{percent(summary[name])} [{100 * summary[name + '_low']:.1f}, {100 * summary[name + '_high']:.1f}]"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tracking-uri", default=None, help="default: MLFLOW_TRACKING_URI, else ./mlflow.db")
    parser.add_argument("--experiment", default="pcsd")
    parser.add_argument("--flow-run-id", default=None, help="default: the newest flow run")
    args = parser.parse_args()

    import mlflow
    from mlflow.tracking import MlflowClient

    from dashboards.runs import load_sweep
    from pcsd_core.eval.metrics import ResponseScore, compare_paired, summarize_scores
    from pcsd_core.eval.stats import mean_over_seeds_interval
    from steps.contract import PAIRED_PREFIX, PARAM_SWEEP, eval_metric, examples_table, tracking_uri
    from steps.join import SEED_KEY, arm_label

    uri = args.tracking_uri or tracking_uri()
    mlflow.set_tracking_uri(uri)
    client = MlflowClient(uri)
    sweep = load_sweep(client, experiment=args.experiment, flow_run_id=args.flow_run_id)
    sweep_param = client.get_run(sweep.parent_run_id).data.params.get(PARAM_SWEEP, "")
    mismatches: list[str] = []

    def scores_of(run_id: str, phase: str) -> list[ResponseScore]:
        table = client.load_table(sweep.experiment_id, examples_table(phase), run_ids=[run_id])
        rows = table.sort_values("index").to_dict("records")
        return [ResponseScore(**{key: row[key] for key in ResponseScore.__dataclass_fields__}) for row in rows]

    def check(label: str, name: str, recomputed: float, logged: float | None) -> None:
        if logged is None or not math.isclose(recomputed, logged, rel_tol=0, abs_tol=TOLERANCE):
            mismatches.append(f"{label} {name}: recomputed {recomputed!r}, logged {logged!r}")

    branches = [b for b in sweep.branches if eval_metric("after", "gsm8k_accuracy_strict") in b.metrics]
    if not branches:
        print(f"flow run {sweep.flow_run_id}: no evaluated branch.")
        return 1
    print(f"flow run {sweep.flow_run_id} (parent run {sweep.parent_run_id}), {len(branches)} evaluated branches, "
          f"tracking {uri}\n")
    print("| model | strict | flexible | `####` format | repetition | truncated | mean tokens | held-out KL |")
    print("|---|---|---|---|---|---|---|---|")
    base = scores_of(branches[0].run_id, "before")
    rows = [("base (untrained)", base, branches[0], "before")] + [(b.name, scores_of(b.run_id, "after"), b, "after")
                                                                   for b in branches]
    # The base model was evaluated once, under the first grid point's config: the first seed of the sweep.
    grid_seeds = json.loads(sweep_param or "{}").get(SEED_KEY) or [branches[0].params.get(SEED_KEY, 0)]
    for label, scores, branch, phase in rows:
        seed = int(grid_seeds[0] if phase == "before" else branch.params.get(SEED_KEY, 0))
        summary = summarize_scores(scores, seed=seed)
        for name in ("accuracy_strict", "accuracy_flexible"):
            for suffix in ("", "_low", "_high"):
                check(label, name + suffix, summary[name + suffix],
                      branch.metrics.get(eval_metric(phase, "gsm8k_" + name + suffix)))
        for name in ("answer_format_rate", "repetition_rate", "truncation_rate", "mean_response_tokens"):
            for suffix in ("", "_low", "_high"):
                check(label, name + suffix, summary[name + suffix], branch.metrics.get(eval_metric(phase, name + suffix)))
        kl = branch.metrics.get(eval_metric(phase, "heldout_kl"), math.nan)
        print(f"| {label} | {rate_cell(summary, 'accuracy_strict')} | {rate_cell(summary, 'accuracy_flexible')} | "
              f"{rate_cell(summary, 'answer_format_rate')} | {rate_cell(summary, 'repetition_rate')} | "
              f"{rate_cell(summary, 'truncation_rate')} | {summary['mean_response_tokens']:.1f} "
              f"[{summary['mean_response_tokens_low']:.1f}, {summary['mean_response_tokens_high']:.1f}] | {kl:.3f} |")

    print("\n| branch − base (same questions) | strict [95% paired bootstrap] | McNemar p | flexible | McNemar p |")
    print("|---|---|---|---|---|")
    deltas: dict[str, dict[str, float]] = {}
    scores_by_branch = {branch.name: scores for _, scores, branch, _ in rows[1:]}
    for label, scores, branch, phase in rows[1:]:
        paired = compare_paired(scores, base, seed=int(branch.params.get(SEED_KEY, 0)))
        for key, value in paired.items():
            check(label, PAIRED_PREFIX + key, float(value), branch.metrics.get(PAIRED_PREFIX + key))
        cells = [f"{100 * paired[f'{m}/difference']:+.1f}% [{100 * paired[f'{m}/difference_low']:+.1f}, "
                 f"{100 * paired[f'{m}/difference_high']:+.1f}] | {paired[f'{m}/mcnemar_p']:.3g}"
                 for m in ("strict", "flexible")]
        print(f"| {label} | {' | '.join(cells)} |")
        for mode in ("strict", "flexible"):
            after = sum(getattr(s, f"correct_{mode}") for s in scores) / len(scores)
            deltas.setdefault(branch.name, {})[f"{mode} after"] = after
            deltas[branch.name][f"{mode} - base"] = after - sum(getattr(s, f"correct_{mode}") for s in base) / len(base)

    arms: dict[str, list[tuple[int, Any]]] = {}
    for _, _, branch, _ in rows[1:]:
        point = sweep.sweep_point(branch)
        if SEED_KEY in point:
            arms.setdefault(arm_label(point), []).append((int(point[SEED_KEY]), branch))
    if arms:
        columns = ("strict after", "strict - base", "flexible after", "flexible - base")
        print("\n| arm | seeds | " + " | ".join(f"{c}: mean over seeds [Student-t 95%]" for c in columns) + " |")
        print("|---|---|" + "---|" * len(columns))
        for arm, members in arms.items():
            cells = []
            for column in columns:
                interval = mean_over_seeds_interval([deltas[branch.name][column] for _, branch in members])
                sign = "+" if "base" in column else ""
                cells.append(f"{100 * interval.estimate:{sign}.1f}% [{100 * interval.low:{sign}.1f}, "
                             f"{100 * interval.high:{sign}.1f}]")
            print(f"| {arm} | {sorted(seed for seed, _ in members)} | {' | '.join(cells)} |")
        logged_pairs = {(row["a"], row["b"]): row for row in _paired_tests(client, sweep.parent_run_id)}
        treatment, *controls = list(arms)
        print(f"\n| {treatment} − control, same seed, same questions | seed | strict [95% paired bootstrap] | "
              "McNemar p | flexible | McNemar p |")
        print("|---|---|---|---|---|---|")
        for control in controls:
            for seed, treated in arms[treatment]:
                other = next((branch for s, branch in arms[control] if s == seed), None)
                if other is None:
                    continue
                paired = compare_paired(scores_by_branch[treated.name], scores_by_branch[other.name], seed=0)
                logged = logged_pairs.get((treated.name, other.name))
                for key, value in paired.items():
                    check(f"{treated.name} vs {other.name}", key, float(value),
                          None if logged is None else logged.get(key))
                cells = [f"{100 * paired[f'{m}/difference']:+.1f}% [{100 * paired[f'{m}/difference_low']:+.1f}, "
                         f"{100 * paired[f'{m}/difference_high']:+.1f}] | {paired[f'{m}/mcnemar_p']:.3g}"
                         for m in ("strict", "flexible")]
                print(f"| − {control} | {seed} | {' | '.join(cells)} |")

    if mismatches:
        print(f"\n{len(mismatches)} recomputed numbers differ from the logged ones:", *mismatches[:20], sep="\n  ")
        return 1
    print(f"\nEvery rate, interval and paired test above was recomputed from the per-question tables and equals the "
          f"metric the flow logged (tolerance {TOLERANCE}).")
    return 0


def _paired_tests(client, parent_run_id: str) -> list[dict[str, Any]]:
    """The join's every-pair tests (`eval/paired_tests.json` on the parent run); [] when absent."""
    from steps.contract import PAIRED_TESTS_ARTIFACT

    with tempfile.TemporaryDirectory() as folder:
        try:
            path = client.download_artifacts(parent_run_id, PAIRED_TESTS_ARTIFACT, folder)
        except Exception:  # an older run without the artifact: the pairs are printed, not checked
            return []
        return json.loads(Path(path).read_text())


if __name__ == "__main__":
    sys.exit(main())
