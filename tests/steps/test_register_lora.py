"""Register step, LoRA runs: the adapter checkpoint is logged as a PEFT model that loads back through MLflow and
scores as the checkpoint does, or, with register.merge_adapter, as the merged model."""

from __future__ import annotations

import mlflow
import pytest
import torch

from pcsd_core.engine.lora import add_lora, adapter_items
from pcsd_core.models import load_model
from steps import tracking
from steps.register import TAG_LORA, register

PROMPT = torch.tensor([[1, 400, 500, 600, 700, 42]])


@pytest.fixture()
def adapter_checkpoint(tmp_path, tiny_model_dir, smollm2_tokenizer):
    """A LoRA checkpoint as the trainer writes it, with a non-zero adapter, and that adapter's logits."""
    from pcsd_core.config.loader import config_from_dict
    from pcsd_core.engine import checkpoint as ckpt
    from pcsd_core.engine.lora import lora_config

    cfg = config_from_dict({"model": {"lora_rank": 4, "lora_alpha": 8.0}})
    model = add_lora(load_model(str(tiny_model_dir)), cfg.model)
    generator = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for _, tensor in adapter_items(model):
            tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.1)
        expected = model(input_ids=PROMPT).logits
    path = ckpt.save_checkpoint(tmp_path / "run", 1, model_source=str(tiny_model_dir),
                                model_state={name: t.clone() for name, t in adapter_items(model)},
                                tokenizer=smollm2_tokenizer, training_state={"optimizer": {}, "scheduler": {}},
                                trainer_state={"seed": 0, "num_records": 1},
                                adapter_config=lora_config(cfg.model, str(tiny_model_dir)),
                                base_model=ckpt.base_model_reference(str(tiny_model_dir), str(tiny_model_dir)))
    return path, expected


def _source_run() -> str:
    return tracking.client().create_run(tracking.setup_tracking("register-test"), run_name="branch").info.run_id


def test_a_registered_adapter_loads_back_through_mlflow_and_scores_as_the_checkpoint(store, adapter_checkpoint):
    from peft import PeftModel

    path, expected = adapter_checkpoint
    result = register(path, model="smollm2-135m", dataset="openai/gsm8k", metric_value=0.1, flow_run_id="1",
                      source_run_id=_source_run())
    version = tracking.client().get_model_version(result.name, result.version)
    assert version.tags[TAG_LORA] == "adapter"
    local = mlflow.artifacts.download_artifacts(result.model_uri)
    assert "model.safetensors" not in {p.name for p in __import__("pathlib").Path(local).rglob("*")}  # adapter only
    loaded = mlflow.transformers.load_model(result.model_uri, return_type="components")["model"]
    assert isinstance(loaded, PeftModel)
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=PROMPT).logits, expected, rtol=1e-5, atol=1e-5)


def test_register_merge_adapter_logs_the_merged_model(store, adapter_checkpoint):
    path, expected = adapter_checkpoint
    result = register(path, model="smollm2-135m", dataset="openai/gsm8k", metric_value=0.1, flow_run_id="1",
                      source_run_id=_source_run(), merge_adapter=True)
    assert tracking.client().get_model_version(result.name, result.version).tags[TAG_LORA] == "merged"
    loaded = mlflow.transformers.load_model(result.model_uri, return_type="components")["model"]
    assert not hasattr(loaded, "peft_config")  # a plain transformers model: no peft needed to serve it
    with torch.no_grad():
        torch.testing.assert_close(loaded(input_ids=PROMPT).logits, expected, rtol=1e-4, atol=1e-4)
