"""Read one PCSD sweep out of MLflow: the parent run, its branch runs, their metrics, params and samples.

The layout is the tracking contract (`steps.contract`): one parent run per flow run (tag `pcsd.flow_run_id`), one
nested child run per sweep branch (tags `pcsd.branch`, `mlflow.parentRunId`), per-step `train/*` metrics,
`eval/*` metrics, the flattened config as params and `samples/step_*.jsonl` artifacts. Works against any
tracking URI the MLflow client accepts (a SQLite file, a folder, a server).

    from dashboards.runs import load_sweep
    sweep = load_sweep(MlflowClient("sqlite:///mlflow.db"), experiment="pcsd")   # the latest flow run
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from mlflow.entities import Run
from mlflow.tracking import MlflowClient

from steps.contract import (CURVE_METRICS, DEFAULT_EXPERIMENT, PARAM_SWEEP, TAG_BRANCH, TAG_FLOW_RUN_ID,
                            TAG_PARENT_RUN)

# Params that differ between branches without being hyperparameters (each branch writes its own folder).
NON_HYPERPARAMETERS = frozenset({"train.output_dir", "train.resume_from"})


@dataclass
class BranchRun:
    """One sweep branch: an MLflow child run (or the parent itself when the flow ran a single config)."""

    run_id: str
    name: str
    status: str
    params: dict[str, str]
    metrics: dict[str, float]  # the last value of every metric
    curves: dict[str, list[tuple[int, float]]]  # metric name -> [(step, value)] sorted by step


@dataclass
class Sweep:
    """A flow run as the report sees it."""

    experiment_name: str
    experiment_id: str
    parent_run_id: str
    parent_name: str
    flow_run_id: str
    branches: list[BranchRun]
    varying_params: list[str] = field(default_factory=list)
    swept_keys: list[str] = field(default_factory=list)  # the sweep grid's keys, in grid order

    def sweep_point(self, branch: BranchRun) -> dict[str, str]:
        """The branch's values of the swept keys (param strings): the overrides its label was built from."""
        return {key: branch.params[key] for key in self.swept_keys if key in branch.params}


def load_sweep(
    client: MlflowClient,
    experiment: str = DEFAULT_EXPERIMENT,
    flow_run_id: str | None = None,
    parent_run_id: str | None = None,
) -> Sweep:
    """Find the parent run (by id, by flow run id, or the latest) and load its branch runs."""
    exp = client.get_experiment_by_name(experiment)
    if exp is None:
        names = sorted(e.name for e in client.search_experiments())
        raise ValueError(
            f"experiment ({experiment!r}) does not exist in this tracking store; known experiments: {names}. "
            "Pass --experiment with one of them, or point --tracking-uri at the store the flow wrote to."
        )
    parent = _find_parent(client, exp.experiment_id, flow_run_id, parent_run_id)
    children = _search_all(client, exp.experiment_id, f"tags.`{TAG_PARENT_RUN}` = '{parent.info.run_id}'")
    # A flow run without a sweep may log straight into the parent run; it is then the only branch.
    branch_runs = sorted(children, key=lambda run: run.info.start_time) or [parent]
    branches = [_load_branch(client, run) for run in branch_runs]
    varying_params = find_varying_params(branches)
    return Sweep(
        experiment_name=exp.name,
        experiment_id=exp.experiment_id,
        parent_run_id=parent.info.run_id,
        parent_name=parent.info.run_name or parent.info.run_id,
        flow_run_id=parent.data.tags.get(TAG_FLOW_RUN_ID, ""),
        branches=branches,
        varying_params=varying_params,
        swept_keys=find_swept_keys(parent.data.params, varying_params),
    )


def _find_parent(client: MlflowClient, experiment_id: str, flow_run_id: str | None, parent_run_id: str | None) -> Run:
    if parent_run_id:
        return client.get_run(parent_run_id)
    query = f"tags.`{TAG_FLOW_RUN_ID}` = '{flow_run_id}'" if flow_run_id else ""
    runs = _search_all(client, experiment_id, query, order_by=["attributes.start_time DESC"])
    # Parents carry the flow-run tag and no parent tag; with no flow run id the newest such run wins.
    parents = [run for run in runs if TAG_PARENT_RUN not in run.data.tags and TAG_FLOW_RUN_ID in run.data.tags]
    if not parents:
        which = f"with tag {TAG_FLOW_RUN_ID}={flow_run_id!r}" if flow_run_id else f"tagged {TAG_FLOW_RUN_ID}"
        raise ValueError(
            f"no parent run {which} in experiment id {experiment_id}; run the flow first "
            "(python flows/pcsd_flow.py run) or pass --parent-run-id."
        )
    return parents[0]


def _search_all(client: MlflowClient, experiment_id: str, query: str, order_by: list[str] | None = None) -> list[Run]:
    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], query, max_results=1000, order_by=order_by, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _load_branch(client: MlflowClient, run: Run) -> BranchRun:
    curves = {}
    for key in CURVE_METRICS:
        if key in run.data.metrics:
            history = client.get_metric_history(run.info.run_id, key)
            curves[key] = sorted((m.step, m.value) for m in history)
    return BranchRun(
        run_id=run.info.run_id,
        name=run.data.tags.get(TAG_BRANCH) or run.info.run_name or run.info.run_id,
        status=run.info.status,
        params=dict(run.data.params),
        metrics=dict(run.data.metrics),
        curves=curves,
    )


def find_varying_params(branches: list[BranchRun]) -> list[str]:
    """Param names whose values differ across branches: the sweep's hyperparameters."""
    keys = sorted({key for branch in branches for key in branch.params} - NON_HYPERPARAMETERS)
    return [key for key in keys if len({branch.params.get(key) for branch in branches}) > 1]


def find_swept_keys(parent_params: dict[str, str], varying_params: list[str]) -> list[str]:
    """The sweep grid's keys in grid order (the order of the branch labels), from the parent run's sweep param;
    the params that vary across branches when that param is missing or was cut to MLflow's length limit."""
    try:
        grid = json.loads(parent_params.get(PARAM_SWEEP) or "{}")
    except json.JSONDecodeError:
        grid = {}
    return list(grid) if isinstance(grid, dict) and grid else list(varying_params)


def load_latest_samples(client: MlflowClient, run_id: str) -> list[dict]:
    """The per-token samples of the run's last logged step (`samples/step_*.jsonl`), or [] if none."""
    files = [f.path for f in client.list_artifacts(run_id, "samples") if f.path.endswith(".jsonl")]
    if not files:
        return []
    with tempfile.TemporaryDirectory() as tmp:
        local = Path(client.download_artifacts(run_id, max(files), tmp))
        lines = local.read_text(encoding="utf-8").splitlines()
    return [json.loads(line) for line in lines if line.strip()]
