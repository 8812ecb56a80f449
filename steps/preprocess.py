"""Preprocess step: GSM8K (hub or local folder) -> train/test parquet with privileged context, plus stats.

    from steps.preprocess import preprocess, preprocess_branches
    result = preprocess(cfg, "outputs/data")          # PreprocessResult(train_path, test_path, stats)
    branches = preprocess_branches(plan, parent_run_id)   # the flow's step: once per distinct data section

or from a shell:

    python -m steps.preprocess --config configs/cpu_smollm2.yaml --output-dir outputs/data [--data-path DIR]

When an MLflow run is active (the flow opens one), the stats are logged to it: numbers as metrics and text
as params, under `data/<key>` (e.g. `data/train/rows`, `data/train/teacher_prompt_tokens_p90`), and the
whole stats dict as the artifact `data/stats.json`. This step never starts a run itself.
"""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pcsd_core.config import PCSDConfig
from pcsd_core.data import prepare_dataset
from pcsd_core.models import load_tokenizer
from steps import storage, tracking
from steps.plan import Branch, RunPlan

STATS_ARTIFACT = "data/stats.json"


@dataclass(frozen=True)
class PreprocessResult:
    train_path: Path
    test_path: Path
    stats: dict[str, Any]


def preprocess(cfg: PCSDConfig, output_dir: str | Path) -> PreprocessResult:
    """Prepare the parquet files for `cfg.data` in `output_dir`; log stats to the active MLflow run, if any."""
    tokenizer = load_tokenizer(cfg.model.name, trust_remote_code=cfg.model.trust_remote_code)
    prepared = prepare_dataset(cfg.data, output_dir, tokenizer=tokenizer)
    _log_stats_to_active_run(prepared.stats)
    return PreprocessResult(prepared.train_path, prepared.test_path, prepared.stats)


def preprocess_branches(plan: RunPlan, parent_run_id: str) -> list[Branch]:
    """Preprocess once per distinct data section and point every branch at its parquet files."""
    prepared: dict[str, PreprocessResult] = {}
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--config", required=True, help="YAML preset (configs/*.yaml)")
    parser.add_argument("--output-dir", required=True, help="folder for train.parquet and test.parquet")
    parser.add_argument("--data-path", default=None, help="local GSM8K-style folder (overrides data.path)")
    args = parser.parse_args(argv)
    overrides = {} if args.data_path is None else {"data.path": args.data_path}
    cfg = PCSDConfig.from_yaml(args.config, overrides)  # a sweep preset prepares its base config's data
    result = preprocess(cfg, args.output_dir)
    print(json.dumps({"train_path": str(result.train_path), "test_path": str(result.test_path), **result.stats}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
