"""Fill a tracking store with the real MLflow client in the flow's layout: one parent, two sweep branches.

Shared by the dashboard tests (imported as `dashboard_store`; the conftest turns it into a fixture)."""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import json
import time
from pathlib import Path

from mlflow.entities import Metric, Param
from mlflow.tracking import MlflowClient

from pcsd_core.config.schema import PCSDConfig

FLOW_RUN_ID = "1234"
BRANCHES = {
    "lr=1e-05,divergence=forward_kl": {"train.lr": 1e-05, "loss.divergence": "forward_kl"},
    "lr=0.0001,divergence=reverse_kl": {"train.lr": 1e-04, "loss.divergence": "reverse_kl"},
}
# Final eval metrics per branch; the second branch is the best (higher strict accuracy after).
EVAL = {
    "lr=1e-05,divergence=forward_kl": {"before_strict": 0.25, "after_strict": 0.375, "before_flex": 0.5, "after_flex": 0.5},
    "lr=0.0001,divergence=reverse_kl": {"before_strict": 0.25, "after_strict": 0.5, "before_flex": 0.5, "after_flex": 0.625},
}
# The end step's paired test between the two branches (A = the best branch).
PAIRED_TEST = {"strict/difference": 0.125, "strict/difference_low": -0.25, "strict/difference_high": 0.375,
               "strict/mcnemar_p": 0.6875, "flexible/difference": 0.125, "flexible/difference_low": -0.125,
               "flexible/difference_high": 0.375, "flexible/mcnemar_p": 1.0}
SAMPLE_TOKENS = ["Tom", " has", " 3", " apples", " <b>", " so", " ####", " 42"]
SAMPLE_KL = [0.01, 0.02, 0.4, 0.05, 0.0, 0.1, 0.3, 2.5]


def _eval_metrics(values: dict[str, float], step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    named = {
        "eval/before/gsm8k_accuracy_strict": values["before_strict"],
        "eval/after/gsm8k_accuracy_strict": values["after_strict"],
        "eval/delta/gsm8k_accuracy_strict": values["after_strict"] - values["before_strict"],
        "eval/before/gsm8k_accuracy_flexible": values["before_flex"],
        "eval/after/gsm8k_accuracy_flexible": values["after_flex"],
        "eval/delta/gsm8k_accuracy_flexible": values["after_flex"] - values["before_flex"],
        "eval/gsm8k_accuracy_strict": values["after_strict"],
        "eval/gsm8k_accuracy_flexible": values["after_flex"],
        # 95% intervals and the paired test against the base model, as steps/evaluate.py logs them.
        "eval/after/gsm8k_accuracy_strict_low": values["after_strict"] - 0.2,
        "eval/after/gsm8k_accuracy_strict_high": values["after_strict"] + 0.2,
        "eval/vs_base/strict/difference": values["after_strict"] - values["before_strict"],
        "eval/vs_base/strict/difference_low": -0.125,
        "eval/vs_base/strict/difference_high": 0.5,
        "eval/vs_base/strict/mcnemar_p": 0.5,
    }
    return [Metric(key, value, now, step) for key, value in named.items()]


def _train_metrics(branch_index: int, step: int) -> list[Metric]:
    now = int(time.time() * 1000)
    scale = 1.0 + branch_index
    named = {
        "train/loss": scale / step,
        "train/kl": 0.5 * scale / step,
        "train/teacher_entropy": 1.0 + 0.1 * step * scale,
        "train/student_entropy": 1.5 + 0.05 * step * scale,
        "train/response_len": 20.0 + step * scale,
        "perf/tokens_per_s": 100.0 * scale,
        "rollout/accuracy": 0.1 * step,
        "rollout/repetition_rate": 0.125 * step * scale,
        "train/loss_share_top10pct_tokens": 0.1 + 0.2 * step / scale,
    }
    return [Metric(key, value, now, step) for key, value in named.items()]


def fill_store(tracking_uri: str, workdir: Path) -> dict[str, str]:
    """Log the parent and branch runs; returns {'parent': id, <branch name>: id}."""
    client = MlflowClient(tracking_uri=tracking_uri)
    # An explicit artifact folder: the default would be ./mlruns of the current directory.
    experiment_id = client.create_experiment("pcsd", artifact_location=(workdir / "artifacts").as_uri())
    parent_tags = {"pcsd.flow_run_id": FLOW_RUN_ID, "pcsd.metaflow_pathspec": f"PCSDFlow/{FLOW_RUN_ID}"}
    parent = client.create_run(experiment_id, run_name=f"pcsd-{FLOW_RUN_ID}", tags=parent_tags)
    ids = {"parent": parent.info.run_id}
    for index, (name, overrides) in enumerate(BRANCHES.items()):
        tags = {"mlflow.parentRunId": parent.info.run_id, "pcsd.branch": name, "pcsd.flow_run_id": FLOW_RUN_ID}
        run = client.create_run(experiment_id, run_name=name, tags=tags)
        config = config_from_dict({}, overrides={**overrides, "train.output_dir": f"outputs/b{index}"})
        params = [Param(key, str(value)) for key, value in config.to_flat_dict().items()]
        metrics = [m for step in (1, 2, 3) for m in _train_metrics(index, step)] + _eval_metrics(EVAL[name], 3)
        client.log_batch(run.info.run_id, metrics=metrics, params=params)
        samples = workdir / "samples" / f"b{index}" / "step_000002.jsonl"
        samples.parent.mkdir(parents=True)
        example = {"step": 2, "question": "How many apples?", "response": "".join(SAMPLE_TOKENS),
                   "tokens": SAMPLE_TOKENS, "token_kl": SAMPLE_KL, "correct": True}
        samples.write_text(json.dumps(example) + "\n", encoding="utf-8")
        client.log_artifact(run.info.run_id, str(samples), artifact_path="samples")
        client.set_terminated(run.info.run_id)
        ids[name] = run.info.run_id
    first, second = BRANCHES
    client.log_dict(parent.info.run_id, [PAIRED_TEST | {"a": second, "b": first}], "eval/paired_tests.json")
    client.set_terminated(parent.info.run_id)
    return ids
