"""End to end: a real tiny CPU flow run (2-branch sweep) fills the store; the server, UI and report show it.

The flow run (`tiny_flow_run` in tests/conftest.py: a random 2-layer Llama, 2 steps per branch, 4 GSM8K rows)
is shared with tests/flows/test_flow.py, so the flow runs once per session.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from browser import (
    VisibleText,
    assert_no_error_banner,
    find_chromium,
    get_json,
    post_json,
    render,
    running_mlflow_server,
)

# A real `mlflow server` and headless Chromium: `pytest -m "not ui"` skips them locally; CI runs them.
pytestmark = pytest.mark.ui

BRANCH_NAMES = ["lr=0.0001", "lr=0.001"]
CURVE_METRICS = ("train/loss", "train/kl", "train/teacher_entropy", "train/response_len", "perf/tokens_per_s")
EVAL_METRICS = ("eval/before/gsm8k_accuracy_strict", "eval/after/gsm8k_accuracy_flexible")


def test_server_ui_and_report_over_a_real_flow_run(tiny_flow_run, tmp_path):
    flow_store = tiny_flow_run.tracking_uri
    with running_mlflow_server(flow_store, tmp_path) as base_url:
        experiments = post_json(f"{base_url}/api/2.0/mlflow/experiments/search", {"max_results": 100})
        experiment_id = next(e["experiment_id"] for e in experiments["experiments"] if e["name"] == "pcsd")
        runs = post_json(f"{base_url}/api/2.0/mlflow/runs/search", {"experiment_ids": [experiment_id]})["runs"]
        parents = [r for r in runs if r["info"]["run_name"].startswith("pcsd-")]
        assert len(parents) == 1, [r["info"]["run_name"] for r in runs]
        parent_id = parents[0]["info"]["run_id"]
        children = {r["info"]["run_name"]: r for r in runs if r is not parents[0]}
        assert sorted(children) == BRANCH_NAMES
        for run in children.values():
            tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
            assert tags["mlflow.parentRunId"] == parent_id
            metrics = {metric["key"]: metric for metric in run["data"]["metrics"]}
            assert set(CURVE_METRICS + EVAL_METRICS) <= set(metrics), sorted(metrics)
            assert metrics["train/loss"]["step"] == 2
        # The flow's last step logged the sweep report under report/ of the parent run.
        listed = get_json(f"{base_url}/api/2.0/mlflow/artifacts/list", {"run_id": parent_id, "path": "report"})
        report_files = [f["path"] for f in listed.get("files", [])]
        assert len(report_files) == 1 and report_files[0].endswith(".html"), listed

        chromium = find_chromium()
        if chromium is None:
            pytest.skip("no Chromium binary on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")
        ids = json.dumps([children[name]["info"]["run_id"] for name in BRANCH_NAMES], separators=(",", ":"))
        compare_url = f'{base_url}/#/compare-runs?runs={ids}&experiments=["{experiment_id}"]'
        dom, _ = render(chromium, compare_url, tmp_path, "flow-compare")
        text = VisibleText.of(dom)
        assert_no_error_banner(text, compare_url)
        # Metric values were checked over REST above; the page must line the branches up by name and param.
        missing = [name for name in [*BRANCH_NAMES, "train.lr"] if name not in text]
        assert not missing, f"{missing} missing from the compare page: {text[:1500]}"

    from mlflow.tracking import MlflowClient

    report = Path(MlflowClient(flow_store).download_artifacts(parent_id, report_files[0], str(tmp_path)))
    dom, screenshot = render(chromium, report.as_uri(), tmp_path, "flow-report", virtual_time_ms=2000)
    text = VisibleText.of(dom)
    missing = [name for name in [*BRANCH_NAMES, "Training loss", "Per-token view", "Highest-KL tokens"] if name not in text]
    assert not missing, f"{missing} missing from the flow's report: {text[:1500]}"
    assert screenshot.stat().st_size > 50_000
