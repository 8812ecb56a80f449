"""Distill step on the tiny model: a child run under the parent, per-step metrics, artifacts, a loadable checkpoint."""

from __future__ import annotations

import pytest
import yaml
from mlflow.tracking import MlflowClient

from pcsd_core.data.prepare import prepare_dataset
from steps import tracking
from dashboards.plots import training_curves_png
from steps.distill import distill
from steps.plan import plan_run

STEPS = 2


def make_branch(tmp_path, model_dir, data_dir, **train):
    preset = {
        "model": {"name": str(model_dir)},
        "data": {"path": str(data_dir), "max_train_rows": 4, "max_test_rows": 2},
        "rollout": {"n": 2, "max_response_tokens": 6, "batch_size": 4},
        "train": {"total_training_steps": STEPS, "prompts_per_step": 2, "mini_batch_size": 4, "micro_batch_size": 2,
                  "lr": 1e-3, "device": "cpu", "output_dir": str(tmp_path / "outputs"), **train},
    }  # fmt: skip
    branch = plan_run(preset, flow_run_id="42", env={}).branches[0]
    prepared = prepare_dataset(branch.config.data, tmp_path / "data")
    branch.train_path, branch.test_path, branch.data_stats = str(prepared.train_path), str(prepared.test_path), prepared.stats
    return branch


@pytest.fixture()
def branch(tmp_path, tiny_model_dir, gsm8k_dir):
    return make_branch(tmp_path, tiny_model_dir, gsm8k_dir)


def test_a_branch_config_is_parsed_once_in_its_life_from_plan_to_distill(tmp_path, tiny_model_dir, gsm8k_dir,
                                                                         monkeypatch):
    """The plan task parses the preset once for every branch of a sweep; the distill task parses nothing: the
    branch's config arrives built and frozen, and only its paths are replaced."""
    from pcsd_core.config import loader

    parses = []
    real_parse = loader.config_from_dict
    monkeypatch.setattr(loader, "config_from_dict", lambda *args, **kwargs: parses.append(args) or real_parse(*args, **kwargs))
    branch = make_branch(tmp_path, tiny_model_dir, gsm8k_dir, total_training_steps=1)
    assert len(parses) == 1  # the plan task
    sweep = plan_run({"model": {"name": str(tiny_model_dir)}, "train": {"device": "cpu", "output_dir": str(tmp_path)}},
                     flow_run_id="7", env={}, sweep='{"train.lr": [1e-5, "2e-5"], "train.seed": [1, 2]}')
    assert len(sweep.branches) == 4 and len(parses) == 2  # four branches, one more parse
    assert [b.config.train.lr for b in sweep.branches] == [1e-5, 1e-5, 2e-5, 2e-5]  # a sweep's text is typed once
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'mlflow.db'}")
    parent_id = tracking.start_parent_run("42", "PCSDFlow/42/start/1", {"a": 1})
    distill(branch, parent_run_id=parent_id, flow_run_id="42", pathspec="PCSDFlow/42/distill/3")
    assert len(parses) == 2  # the distill task


def test_distill_logs_a_nested_run_with_per_step_metrics_and_artifacts(branch, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    parent_id = tracking.start_parent_run("42", "PCSDFlow/42/start/1", {"a": 1})
    result = distill(branch, parent_run_id=parent_id, flow_run_id="42", pathspec="PCSDFlow/42/distill/3",
                     plot_curves=training_curves_png)

    client = MlflowClient(uri)
    child = client.get_run(result.run_id)
    assert child.data.tags["mlflow.parentRunId"] == parent_id
    assert child.data.tags["pcsd.branch"] == child.info.run_name == "base"
    assert child.data.tags["pcsd.metaflow_pathspec"] == "PCSDFlow/42/distill/3"
    assert child.info.status == "FINISHED"
    assert child.data.params["train.total_training_steps"] == str(STEPS)
    assert child.data.params["model.name"] == branch.config.model.name

    history = client.get_metric_history(result.run_id, "train/loss")
    assert [m.step for m in history] == [1, 2]
    assert [m.value for m in history] == pytest.approx([row["train/loss"] for row in result.history])
    assert result.steps == STEPS and len(result.history) == STEPS

    artifacts = {a.path for a in client.list_artifacts(result.run_id, "config")}
    artifacts |= {a.path for a in client.list_artifacts(result.run_id, "plots")}
    artifacts |= {a.path for a in client.list_artifacts(result.run_id, "samples")}
    assert {"config/resolved_config.yaml", "plots/training_curves.png"} <= artifacts
    assert any(path.startswith("samples/step_") for path in artifacts)
    import mlflow

    local = mlflow.artifacts.download_artifacts(run_id=result.run_id, artifact_path="config/resolved_config.yaml")
    logged_config = yaml.safe_load(open(local).read())
    assert logged_config == branch.config.to_dict()

    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(result.checkpoint_dir)  # the checkpoint is a loadable HF model


def test_a_failing_distill_marks_its_child_run_failed(branch, tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    parent_id = tracking.start_parent_run("43", "PCSDFlow/43/start/1", {})
    branch.train_path = str(tmp_path / "missing.parquet")
    with pytest.raises(Exception, match="missing.parquet"):
        distill(branch, parent_run_id=parent_id, flow_run_id="43", pathspec="PCSDFlow/43/distill/3")
    client = MlflowClient(uri)
    (child,) = client.search_runs([client.get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert child.info.status == "FAILED"


def test_training_curves_png_is_a_png_even_for_missing_metrics():
    png = training_curves_png([{"train/loss": 1.0, "train/kl": 0.5}, {"train/loss": 0.8, "train/kl": 0.4}], title="t")
    assert png.startswith(b"\x89PNG")
    assert training_curves_png([]).startswith(b"\x89PNG")


def test_a_retry_after_a_dead_ray_worker_continues_from_the_last_checkpoint_in_the_same_run(
        tmp_path, tiny_model_dir, gsm8k_dir, monkeypatch):
    """What the flow's @retry does after a Ray worker dies: the failed attempt names the rank within seconds; the
    next attempt reopens the branch's MLflow run, downloads the last checkpoint from the storage URI and continues
    from it, and no step appears twice in the metric history."""
    import time

    import ray

    from pcsd_core.engine.trainer import Distiller
    from steps import storage

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    branch = make_branch(tmp_path, tiny_model_dir, gsm8k_dir, total_training_steps=4, checkpoint_every=2,
                         use_ray=True, num_workers=1, output_dir=f"file://{tmp_path / 'store'}")
    parent_id = tracking.start_parent_run("42", "PCSDFlow/42/start/1", {})
    original_step, killed = Distiller._train_step, []

    def step_after_a_worker_death(self, step):
        if step == 3 and not killed:  # steps 1-3 are logged, the checkpoint is at step 2
            ray.kill(self.workers.workers[0])
            killed.append(time.perf_counter())
        return original_step(self, step)

    monkeypatch.setattr(Distiller, "_train_step", step_after_a_worker_death)
    with pytest.raises(RuntimeError, match=r"train worker rank 0 on node \S+ .*died"):
        distill(branch, parent_run_id=parent_id, flow_run_id="42", pathspec="PCSDFlow/42/distill/3")
    assert time.perf_counter() - killed[0] < 120  # failed, not hung until the 12-hour timeout
    client = MlflowClient(uri)
    (child,) = client.search_runs([client.get_run(parent_id).info.experiment_id], f"tags.mlflow.parentRunId = '{parent_id}'")
    assert child.info.status == "FAILED"
    assert [m.step for m in client.get_metric_history(child.info.run_id, "train/loss")] == [1, 2, 3]

    result = distill(branch, parent_run_id=parent_id, flow_run_id="42", pathspec="PCSDFlow/42/distill/3")

    assert result.resumed_from_step == 2 and result.steps == 4
    assert result.run_id == child.info.run_id and client.get_run(result.run_id).info.status == "FINISHED"
    losses = client.get_metric_history(result.run_id, "train/loss")
    assert [m.step for m in losses] == [1, 2, 3, 4]
    # The card's history covers every step too: 1-2 from the failed attempt (as logged), 3-4 from this one.
    assert len(result.history) == 4
    assert [row["train/loss"] for row in result.history[:2]] == pytest.approx([m.value for m in losses[:2]])
    assert [row["train/loss"] for row in result.history[3:]] == pytest.approx([losses[3].value])
    assert result.checkpoint_dir == storage.join(branch.config.train.output_dir, "checkpoints", "step_000004")
    assert storage.is_published(result.checkpoint_dir)
