"""The whole flow on CPU: a tiny model, 2 sweep branches, then checks with Metaflow's and MLflow's own clients.

This is the proof the product works: preprocess -> distill (foreach) -> evaluate -> join -> register -> end,
with the parent and child MLflow runs, per-step metrics, eval metrics, artifacts, cards and a registered
model version from the better branch, not crowned `champion` (no significant gain on 4 questions). Metaflow's datastore and the MLflow store
live in tmp_path.
"""

from __future__ import annotations

from pathlib import Path

import pytest
from mlflow.tracking import MlflowClient

STEPS = 2  # the shared run's `train.total_training_steps` and sweep (tests/conftest.py, checked below)
LEARNING_RATES = [1.0e-4, 1.0e-3]


@pytest.fixture(scope="module")
def flow_run(tiny_flow_run):
    """The shared tiny flow run, seen through (metaflow Run, MlflowClient, its folder)."""
    assert (tiny_flow_run.steps, list(tiny_flow_run.learning_rates)) == (STEPS, LEARNING_RATES)
    from metaflow import Run, namespace
    from metaflow.plugins.datastores.local_storage import LocalStorage

    with pytest.MonkeyPatch.context() as patch:
        # The client reads the datastore roots once at import; point it at this run's datastore.
        patch.setattr(LocalStorage, "SYSROOT_VAR", str(tiny_flow_run.datastore))
        patch.setattr(LocalStorage, "datastore_root", None)
        namespace(None)
        yield (Run(f"PCSDFlow/{tiny_flow_run.run_id}"), MlflowClient(tracking_uri=tiny_flow_run.tracking_uri),
               tiny_flow_run.root)


def test_flow_runs_end_to_end_and_is_tracked(flow_run):
    run, client, run_dir = flow_run
    assert run.successful

    # --- Metaflow sees the run, its small artifacts and cards.
    parent_id = run["start"].task.data.mlflow_run_id
    summary = run["join"].task.data.summary
    registration = run["register"].task.data.registration
    assert len(summary.outcomes) == 2 and not summary.failed and summary.best is not None
    # 4 test questions cannot show a significant gain (McNemar p >= 0.125), so the version is registered for
    # lineage and the champion alias stays off it (register.promote_if 'significant_gain', the default).
    assert registration is not None and not registration.is_champion
    assert registration.reason.startswith("no significant gain over the base model at alpha 0.05: strict accuracy")
    # Cards are rendered HTML files in the run's datastore (the card client would need its root re-read).
    cards = {step: list(run_dir.rglob(f"runs/{run.id}/steps/{step}/tasks/*/cards/*.html")) for step in
             ("distill", "join", "end")}  # fmt: skip
    assert len(cards["distill"]) == 2 and cards["join"] and cards["end"]
    end_card = _card_text(cards["end"][0])
    assert "GSM8K accuracy before and after" in end_card
    report_path = run["end"].task.data.report_path
    assert report_path.endswith(".html") and Path(report_path).is_file() and report_path in end_card

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
        for name in ("train/kl", "rollout/accuracy", "perf/tokens_per_s", "time/step_s", "rollout/repetition_rate",
                     "train/loss_share_top10pct_tokens"):
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

    # --- The registered version comes from the better branch and says why it is not the champion.
    best_strict = max(child.data.metrics["eval/gsm8k_accuracy_strict"] for child in children)
    version = client.get_model_version(registration.name, registration.version)
    version_run = client.get_run(version.run_id)
    assert version_run.data.tags["mlflow.parentRunId"] == parent_id
    assert version_run.data.metrics["eval/gsm8k_accuracy_strict"] == best_strict
    assert version.tags["pcsd.branch"] == summary.best.label == version_run.info.run_name
    assert version.tags["pcsd.flow_run_id"] == run.id
    assert version.tags["pcsd.promotion"] == registration.reason
    assert version.aliases == []


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


def test_the_end_of_the_run_prints_the_headline_results(flow_run):
    """Not only where to look: accuracy before -> after with the question count, vs-base test, steps, time, registry."""
    import re

    run, client, run_dir = flow_run
    log = (run_dir / "flow.log").read_text()
    assert "Results (GSM8K accuracy of the base model -> the distilled model, greedy):" in log
    summary = run["join"].task.data.summary
    for outcome in summary.outcomes:
        line = next(line for line in log.splitlines() if f"{outcome.label}: strict " in line)
        metrics = outcome.evaluation.metrics
        before, after = (round(metrics[f"eval/{phase}/gsm8k_accuracy_strict"] * 4) for phase in ("before", "after"))
        assert f"strict {before}/4 " in line and f"-> {after}/4 " in line
        assert re.search(rf"{STEPS} steps in \d+ s, final train KL \d+\.\d{{4}}", line)
    assert re.search(r"strict vs base [+-]\d+\.\d% \[[+-]\d+\.\d%, [+-]\d+\.\d%\] \(paired bootstrap 95%\), McNemar p=", log)
    registration = run["register"].task.data.registration
    assert f"registered {registration.model_uri} (not promoted to 'champion': no significant gain over the base " \
           "model at alpha 0.05: strict accuracy" in log


def test_steps_share_nothing_but_the_storage_uri(flow_run):
    """train.output_dir is a file:// URI (object storage's stand-in): every file a step hands on is published there,
    and each step's local scratch folder is gone when it ends, so evaluate, join and register read only the store."""
    from steps import storage

    run, client, run_dir = flow_run
    store = run_dir / "store" / run.id
    summary = run["join"].task.data.summary
    for outcome in summary.outcomes:
        checkpoint = outcome.evaluation.checkpoint_dir
        assert checkpoint.startswith(f"file://{store}/") and storage.is_published(checkpoint)
        assert (Path(checkpoint.removeprefix("file://")) / "model.safetensors").is_file()
        assert outcome.evaluation.result_path.startswith("file://") and outcome.curves_png.startswith(b"\x89PNG")
    assert list(store.glob("data/*/_PUBLISHED.json")) and list(store.glob("base_model_eval/*.json"))
    # Nothing a step wrote stayed on "its" disk: no scratch folder left, no weights or data outside the store.
    assert not list((run_dir / "tmp").glob("pcsd-scratch-*"))
    mlflow_artifacts = run_dir / "mlruns"  # where register copies the model: MLflow's own store
    for pattern in ("*.safetensors", "*.parquet", "after.json"):
        strays = [p for p in run_dir.rglob(pattern) if store not in p.parents and mlflow_artifacts not in p.parents]
        assert not strays, strays
    registration = run["register"].task.data.registration
    registered = client.get_model_version(registration.name, registration.version)
    logged_model = registered.source.removeprefix("models:/")  # the registered version's own copy of the weights
    assert list(mlflow_artifacts.rglob(f"{logged_model}/artifacts/model/model.safetensors"))


def test_the_preset_sizes_the_distill_and_evaluate_tasks(flow_run):
    """The preset's `resources:` reach the steps' @resources (what --with kubernetes/batch request); the rest is
    derived from the config (no GPUs on this CPU preset), as the start step reports."""
    run, client, run_dir = flow_run
    log = (run_dir / "flow.log").read_text()
    assert "distill tasks ask compute backends for cpu=3 memory=5000 MB gpu=0" in log
    assert "evaluate tasks ask compute backends for cpu=4 memory=6000 MB gpu=0" in log
