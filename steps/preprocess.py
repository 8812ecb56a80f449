"""Preprocess step: GSM8K (hub or local folder) -> train/test parquet with privileged context, plus stats.

    from steps.preprocess import preprocess, preprocess_branches
    result = preprocess(cfg, "outputs/data")          # PreparedData(train_path, test_path, stats)
    branches = preprocess_branches(plan, parent_run_id)   # the flow's step: once per distinct data section

or from a shell: `python -m cli.preprocess` (cli/preprocess.py).

When an MLflow run is active (the flow opens one), the stats are logged to it: numbers as metrics and text
as params, under `data/<key>` (e.g. `data/train/rows`, `data/train/teacher_prompt_tokens_p90`), and the
whole stats dict as the artifact `data/stats.json`. This step never starts a run itself.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from pcsd_core.config.schema import PCSDConfig
from pcsd_core.data.prepare import PreparedData, prepare_dataset
from pcsd_core.errors import HubUnreachableError
from pcsd_core.models import load_tokenizer
from steps import storage, tracking
from steps.plan import Branch, RunPlan

STATS_ARTIFACT = "data/stats.json"
# Where offline users find the data: the flow's knob and the reference's variable, and the bundled copy.
OFFLINE_DATA_HINT = ("Offline, pass --data-path DIR to the flow or to `python -m cli.preprocess` (or set DATA_PATH=DIR); "
                     "this repository's README uses the bundled copy ../shared/data/gsm8k.")


def preprocess(cfg: PCSDConfig, output_dir: str | Path) -> PreparedData:
    """Prepare the parquet files for `cfg.data` in `output_dir`; log stats to the active MLflow run, if any."""
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    try:
        prepared = prepare_dataset(cfg.data, output_dir, tokenizer=tokenizer)
    except HubUnreachableError as error:
        raise HubUnreachableError(f"{error} {OFFLINE_DATA_HINT}") from None
    _log_stats_to_active_run(prepared.stats)
    return prepared


def preprocess_branches(plan: RunPlan, parent_run_id: str) -> list[Branch]:
    """Preprocess once per distinct data section and point every branch at its parquet files."""
    prepared: dict[str, PreparedData] = {}
    datasets = len({branch.data_key for branch in plan.branches})
    print(f"[preprocess] {datasets} dataset(s) for {len(plan.branches)} branch(es) -> {plan.output_root}", flush=True)
    with storage.scratch() as scratch:
        for branch in plan.branches:
            location = storage.join(plan.output_root, "data", branch.data_key)
            if branch.data_key not in prepared:
                output_dir = storage.workspace(location, scratch)
                if not prepared:  # the parent run shows the first dataset's stats (one set of params per run)
                    with tracking.open_run(parent_run_id, system_metrics=False, end=False):  # the end step ends it
                        prepared[branch.data_key] = preprocess(branch.config, output_dir)
                else:
                    prepared[branch.data_key] = preprocess(branch.config, output_dir)
                storage.publish(output_dir, location)
            result = prepared[branch.data_key]
            branch.train_path = storage.join(location, result.train_path.name)
            branch.test_path = storage.join(location, result.test_path.name)
            branch.data_stats = dict(result.stats)
    return plan.branches


def _log_stats_to_active_run(stats: dict[str, Any]) -> None:
    import mlflow

    if mlflow.active_run() is None:
        return
    numbers = {key: value for key, value in stats.items() if isinstance(value, (int, float))}
    texts = {key: value for key, value in stats.items() if key not in numbers}
    mlflow.log_metrics({f"data/{key}": float(value) for key, value in numbers.items()})
    mlflow.log_params({f"data/{key}": str(value) for key, value in texts.items()})
    mlflow.log_dict(stats, STATS_ARTIFACT)
