"""A real MLflow server over a filled store: its REST API, its UI and the report, rendered in headless Chromium.

The server runs on a free loopback port from a temp folder and is killed in teardown. Chromium is Debian's
`chromium` package (`.ci/run` installs it when absent); the browser part is skipped, with the reason, only
when no Chromium binary can be found.
"""

from __future__ import annotations

import json

import pytest
from browser import (
    EXPECTED_METRICS,
    VisibleText,
    assert_no_error_banner,
    find_chromium,
    post_json,
    render,
    running_mlflow_server,
)
from dashboard_store import BRANCHES, EVAL, FLOW_RUN_ID

from dashboards.report import build_report

# A real `mlflow server` and headless Chromium: `pytest -m "not ui"` skips them locally; CI runs them.
pytestmark = pytest.mark.ui


@pytest.fixture(scope="module")
def mlflow_server(filled_store, tmp_path_factory):
    """(base URL, run ids) of `mlflow server` over the filled store."""
    uri, ids = filled_store
    with running_mlflow_server(uri, tmp_path_factory.mktemp("mlflow_server")) as base_url:
        yield base_url, ids


def test_rest_api_returns_parent_and_branch_runs_with_metrics(mlflow_server):
    base_url, ids = mlflow_server
    experiments = post_json(f"{base_url}/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
    experiment_id = next(e["experiment_id"] for e in experiments if e["name"] == "pcsd")
    found = post_json(
        f"{base_url}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [experiment_id], "filter": f"tags.`pcsd.flow_run_id` = '{FLOW_RUN_ID}'", "max_results": 100},
    )["runs"]
    by_name = {run["info"]["run_name"]: run for run in found}
    assert set(by_name) == {f"pcsd-{FLOW_RUN_ID}", *BRANCHES}
    assert by_name[f"pcsd-{FLOW_RUN_ID}"]["info"]["run_id"] == ids["parent"]
    for name in BRANCHES:
        run = by_name[name]
        tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == ids["parent"] and tags["pcsd.branch"] == name
        metrics = {metric["key"]: metric for metric in run["data"]["metrics"]}
        assert set(EXPECTED_METRICS) <= set(metrics)
        assert metrics["eval/after/gsm8k_accuracy_strict"]["value"] == pytest.approx(EVAL[name]["after_strict"])
        assert metrics["train/loss"]["step"] == 3  # the latest of the per-step values


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium binary on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")
    return path




def test_mlflow_ui_renders_the_sweep(mlflow_server, chromium, tmp_path):
    base_url, ids = mlflow_server
    # The experiment's runs page lists the parent (branches are nested under it, collapsed).
    experiment_id = post_json(f"{base_url}/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
    experiment_id = next(e["experiment_id"] for e in experiment_id if e["name"] == "pcsd")
    runs_url = f"{base_url}/#/experiments/{experiment_id}/runs"
    dom, _ = render(chromium, runs_url, tmp_path, "experiment")
    text = VisibleText.of(dom)
    assert_no_error_banner(text, runs_url)
    assert f"pcsd-{FLOW_RUN_ID}" in text and "3 matching runs" in text
    # The compare view lines the branches up by name, with the swept params and the metric names.
    branch_ids = json.dumps([ids[name] for name in BRANCHES], separators=(",", ":"))
    compare_url = f"{base_url}/#/compare-runs?runs={branch_ids}&experiments=[\"{experiment_id}\"]"
    dom, _ = render(chromium, compare_url, tmp_path, "compare")
    text = VisibleText.of(dom)
    assert_no_error_banner(text, compare_url)
    # MLflow's compare table lists a limited number of metric rows, in name order (here up to rollout/*): the
    # per-step train/* curves sit below its cut, and train/loss is named by the chart's metric picker instead.
    for expected in (*BRANCHES, "train.lr", "loss.divergence", "train/loss", "eval/after/gsm8k_accuracy_strict",
                     "perf/tokens_per_s", "rollout/repetition_rate"):
        assert expected in text, f"{expected!r} missing from the compare page: {text[:1500]}"


def test_error_check_catches_a_real_error_page(mlflow_server, chromium, tmp_path):
    base_url, _ = mlflow_server
    url = f"{base_url}/#/experiments/987654/runs"
    dom, _ = render(chromium, url, tmp_path, "missing", virtual_time_ms=8000)
    with pytest.raises(AssertionError, match="shows an error"):
        assert_no_error_banner(VisibleText.of(dom), url)


def test_report_renders_in_chromium(mlflow_server, chromium, tmp_path):
    base_url, _ = mlflow_server
    # The report is built through the server's REST API, as a user pointing at a shared server would.
    path = build_report(tracking_uri=base_url, output_path=tmp_path / "report.html")
    dom, screenshot = render(chromium, path.as_uri(), tmp_path, "report", virtual_time_ms=2000)
    text = VisibleText.of(dom)
    assert_no_error_banner(text, path.as_uri())
    for expected in (f"PCSD sweep report: pcsd-{FLOW_RUN_ID}", *BRANCHES, "Training loss", "★ best", "####"):
        assert expected in text
    # Arms side by side with their 95% intervals, and the paired test between them.
    assert "0.5 [0.3, 0.7]" in text and "strict vs base (paired)" in text  # the best branch's strict after
    assert "Paired tests between branches" in text and "0.125 [-0.25, 0.375]" in text and "0.6875" in text
    assert screenshot.stat().st_size > 50_000  # charts, not a blank page
