"""The whole flow on CPU: a tiny model, 2 sweep branches, then checks with Metaflow's and MLflow's own clients.

This is the proof the product works: preprocess -> distill (foreach) -> evaluate -> join -> register -> end,
with the parent and child MLflow runs, per-step metrics, eval metrics, artifacts, cards and a registered
model version whose `champion` alias sits on the better branch. Metaflow's datastore and the MLflow store
live in tmp_path.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[2]
STEPS = 2
LEARNING_RATES = [1.0e-4, 1.0e-3]


def _tiny_preset(tmp_path: Path, model_dir: Path, gsm8k_dir: Path) -> Path:
    preset = {
        "model": {"name": str(model_dir)},
        "data": {"path": str(gsm8k_dir), "max_train_rows": 4, "max_test_rows": 4},
        "rollout": {"n": 2, "max_response_tokens": 8, "batch_size": 4},
        "train": {"total_training_steps": STEPS, "prompts_per_step": 2, "mini_batch_size": 4,
                  "micro_batch_size": 2, "device": "cpu", "output_dir": str(tmp_path / "outputs")},
        "eval": {"num_examples": 4, "max_new_tokens": 8, "batch_size": 4},
        "sweep": {"train.lr": LEARNING_RATES},
    }  # fmt: skip
    path = tmp_path / "tiny.yaml"
    path.write_text(yaml.safe_dump(preset))
    return path


@pytest.fixture()
def flow_run(tmp_path, tiny_model_dir, gsm8k_dir, monkeypatch):
    """Run the flow once in a subprocess; return (metaflow Run, MlflowClient)."""
    datastore = tmp_path / "metaflow"
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    env = {
        **os.environ,
        "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(datastore),
        "METAFLOW_CARD_LOCALROOT": str(datastore / "cards"),
        "MLFLOW_TRACKING_URI": uri,
        "METAFLOW_USER": "pcsd-tests",
        "HF_HUB_OFFLINE": "1",
        "OMP_NUM_THREADS": "1",  # two branches share the cores
    }
    for variable in ("MODEL_PATH", "DATA_PATH", "TOTAL_STEPS", "ACTOR_NUM_GPUS", "ROLLOUT_NUM_GPUS"):
        env.pop(variable, None)
    run_id_file = tmp_path / "run_id"
    command = [sys.executable, str(REPO_ROOT / "flows" / "pcsd_flow.py"), "--no-pylint",
               "--config", "config", str(_tiny_preset(tmp_path, tiny_model_dir, gsm8k_dir)),
               "run", "--run-id-file", str(run_id_file)]  # fmt: skip
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=600)
    (tmp_path / "flow.log").write_text(completed.stdout + completed.stderr)  # kept for debugging
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    assert "mlflow ui --backend-store-uri" in completed.stdout + completed.stderr

    from metaflow import Run, namespace
    from metaflow.plugins.datastores.local_storage import LocalStorage

    # The client reads the datastore roots once at import; point it at this test's datastore.
    monkeypatch.setattr(LocalStorage, "SYSROOT_VAR", str(datastore))
    monkeypatch.setattr(LocalStorage, "datastore_root", None)
    namespace(None)
    return Run(f"PCSDFlow/{run_id_file.read_text().strip()}"), MlflowClient(tracking_uri=uri), tmp_path


def test_flow_runs_end_to_end_and_is_tracked(flow_run):
    run, client, run_dir = flow_run
    assert run.successful

    # --- Metaflow sees the run, its small artifacts and cards.
    parent_id = run["start"].task.data.mlflow_run_id
    summary = run["join"].task.data.summary
    registration = run["register"].task.data.registration
    assert len(summary.outcomes) == 2 and not summary.failed and summary.best is not None
    assert registration is not None and registration.is_champion
    # Cards are rendered HTML files in the run's datastore (the card client would need its root re-read).
    cards = {step: list(run_dir.rglob(f"runs/{run.id}/steps/{step}/tasks/*/cards/*.html")) for step in
             ("distill", "join", "end")}  # fmt: skip
    assert len(cards["distill"]) == 2 and cards["join"] and cards["end"]
    assert "GSM8K accuracy before and after" in _card_text(cards["end"][0])

    # --- MLflow: the parent run, linked both ways.
    parent = client.get_run(parent_id)
    assert parent.info.run_name == f"pcsd-{run.id}"
    assert parent.data.tags["pcsd.flow_run_id"] == run.id
    assert parent.data.tags["pcsd.metaflow_pathspec"] == f"PCSDFlow/{run.id}/start/{run['start'].task.id}"
    assert parent.info.status == "FINISHED"
    assert "eval/before/gsm8k_accuracy_strict" in parent.data.metrics

    # --- Two nested child runs, one per branch, with per-step and eval metrics and artifacts.
    children = client.search_runs([parent.info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert sorted(float(child.data.params["train.lr"]) for child in children) == LEARNING_RATES
    for child in children:
        assert child.data.tags["pcsd.branch"] == child.info.run_name
        assert child.data.tags["pcsd.flow_run_id"] == run.id
        loss_history = client.get_metric_history(child.info.run_id, "train/loss")
        assert [metric.step for metric in loss_history] == list(range(1, STEPS + 1))
        for name in ("train/kl", "rollout/accuracy", "perf/tokens_per_s", "time/step_s"):
            assert len(client.get_metric_history(child.info.run_id, name)) == STEPS, name
        metrics = child.data.metrics
        for phase in ("before", "after", "delta"):
            assert f"eval/{phase}/gsm8k_accuracy_strict" in metrics and f"eval/{phase}/gsm8k_accuracy_flexible" in metrics
        assert metrics["eval/delta/gsm8k_accuracy_strict"] == pytest.approx(
            metrics["eval/after/gsm8k_accuracy_strict"] - metrics["eval/before/gsm8k_accuracy_strict"]
        )
        artifacts = _artifact_paths(client, child.info.run_id)
        assert {"config/resolved_config.yaml", "eval/before_examples.json", "eval/after_examples.json",
                "plots/training_curves.png"} <= artifacts  # fmt: skip
        assert any(path.startswith("samples/") and path.endswith(".jsonl") for path in artifacts)

    # --- The registered version holds `champion` and comes from the better branch.
    best_strict = max(child.data.metrics["eval/gsm8k_accuracy_strict"] for child in children)
    champion = client.get_model_version_by_alias(registration.name, "champion")
    champion_run = client.get_run(champion.run_id)
    assert champion_run.data.tags["mlflow.parentRunId"] == parent_id
    assert champion_run.data.metrics["eval/gsm8k_accuracy_strict"] == best_strict
    assert champion.tags["pcsd.branch"] == summary.best.label == champion_run.info.run_name
    assert champion.tags["pcsd.flow_run_id"] == run.id


def _card_text(path: Path) -> str:
    """The card's components, which the HTML embeds as base64 JSON."""
    import base64
    import re

    payload = re.search(r'__MF_DATA__\["[^"]+"\]\s*=\s*"([^"]+)"', path.read_text())
    return base64.b64decode(payload.group(1)).decode("utf-8") if payload else ""


def _artifact_paths(client: MlflowClient, run_id: str, path: str = "") -> set[str]:
    found = set()
    for item in client.list_artifacts(run_id, path):
        found |= _artifact_paths(client, run_id, item.path) if item.is_dir else {item.path}
    return found
