"""Register step against a real SQLite MLflow store: idempotence for a retried step and the champion alias."""

from __future__ import annotations

from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient

from steps import tracking
from steps.register import CHAMPION_ALIAS, register, registered_model_name


@pytest.fixture()
def store(tmp_path, monkeypatch):
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "artifacts"))
    tracking.setup_tracking("register-test")
    return MlflowClient(tracking_uri=uri)


def _source_run() -> str:
    run = tracking.client().create_run(tracking.setup_tracking("register-test"), run_name="branch")
    return run.info.run_id


def test_registered_model_name_is_a_slug_of_model_and_dataset():
    assert registered_model_name("smollm2-135m", "openai/gsm8k") == "pcsd-smollm2-135m-gsm8k"
    assert registered_model_name("/data/ckpt/DeepSeek_Math-7B/", "/data/gsm8k") == "pcsd-deepseek-math-7b-gsm8k"


def test_register_is_idempotent_and_moves_champion_only_on_improvement(store, tiny_model_dir):
    common = dict(model="smollm2-135m", dataset="openai/gsm8k")
    first = register(tiny_model_dir, metric_value=0.25, flow_run_id="1", source_run_id=_source_run(), **common)
    name = first.name
    assert (first.version, first.is_champion, first.already_registered) == ("1", True, False)
    # The model and tokenizer files (in model.dtype, float32 here), with pinned requirements.
    local = Path(mlflow.artifacts.download_artifacts(first.model_uri))
    files = {path.name for path in local.rglob("*")}
    assert {"MLmodel", "model.safetensors", "tokenizer.json"} <= files
    requirements = (local / "requirements.txt").read_text()
    assert "torch==" in requirements and "transformers==" in requirements

    # A retried register step of the same flow run finds its version instead of registering again.
    retry = register(tiny_model_dir, metric_value=0.25, flow_run_id="1", source_run_id=_source_run(), **common)
    assert (retry.version, retry.already_registered) == ("1", True)
    assert len(store.search_model_versions(f"name = '{name}'")) == 1

    worse = register(tiny_model_dir, metric_value=0.10, flow_run_id="2", source_run_id=_source_run(), **common)
    assert (worse.version, worse.is_champion) == ("2", False)
    assert str(store.get_model_version_by_alias(name, CHAMPION_ALIAS).version) == "1"

    tie = register(tiny_model_dir, metric_value=0.25, flow_run_id="3", source_run_id=_source_run(), **common)
    assert not tie.is_champion  # a tie does not dethrone the holder

    better = register(tiny_model_dir, metric_value=0.50, flow_run_id="4", source_run_id=_source_run(), **common)
    assert better.is_champion
    champion = store.get_model_version_by_alias(name, CHAMPION_ALIAS)
    assert str(champion.version) == better.version == "4"
    assert champion.tags["pcsd.flow_run_id"] == "4" and float(champion.tags["pcsd.eval_value"]) == 0.5


def test_register_rejects_a_folder_without_a_checkpoint(store, tmp_path):
    with pytest.raises(FileNotFoundError, match="config.json"):
        register(tmp_path, model="m", dataset="d", metric_value=0.0, flow_run_id="1", source_run_id="x")


def test_a_checkpoint_at_a_storage_uri_is_downloaded_once_and_not_again_on_a_retry(store, tiny_model_dir, tmp_path,
                                                                                   monkeypatch):
    from steps import storage

    location = f"file://{tmp_path / 'store' / 'checkpoints' / 'step_000004'}"
    common = dict(model="smollm2-135m", dataset="openai/gsm8k", metric_value=0.25, flow_run_id="7")
    with pytest.raises(FileNotFoundError, match="holds no published checkpoint"):
        register(location, source_run_id=_source_run(), **common)  # nothing published there yet
    storage.publish(tiny_model_dir, location)
    downloads, real_local_copy = [], storage.local_copy
    monkeypatch.setattr(storage, "local_copy", lambda *args: downloads.append(args[0]) or real_local_copy(*args))

    first = register(location, source_run_id=_source_run(), **common)
    local = Path(mlflow.artifacts.download_artifacts(first.model_uri))
    assert {"model.safetensors", "config.json"} <= {path.name for path in local.rglob("*")}
    retry = register(location, source_run_id=_source_run(), **common)
    assert (retry.version, retry.already_registered) == (first.version, True)
    assert downloads == [location]  # the retried step found its version without downloading the weights again


def test_the_registry_gets_the_model_in_model_dtype_without_training_state(store, tiny_model_dir, tmp_path):
    """A bf16 run's checkpoint holds float32 masters and the optimizer state; the registered model is the weights
    cast to bf16 on the sending side (what the run evaluated), and none of the training state."""
    import shutil

    import torch
    from safetensors import safe_open

    checkpoint = tmp_path / "step_000004"
    shutil.copytree(tiny_model_dir, checkpoint)
    torch.save({"optimizer": {}}, checkpoint / "training_state.pt")
    result = register(checkpoint, model="smollm2-135m", dataset="openai/gsm8k", metric_value=0.25, flow_run_id="1",
                      source_run_id=_source_run(), dtype="bfloat16")
    local = Path(mlflow.artifacts.download_artifacts(result.model_uri))
    files = {path.name: path for path in local.rglob("*")}
    assert "training_state.pt" not in files and "tokenizer.json" in files
    with safe_open(files["model.safetensors"], framework="pt") as registered, \
            safe_open(checkpoint / "model.safetensors", framework="pt") as saved:
        assert set(registered.keys()) <= set(saved.keys())
        for name in registered.keys():
            assert torch.equal(registered.get_tensor(name), saved.get_tensor(name).to(torch.bfloat16)), name
