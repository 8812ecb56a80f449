"""LoRA in the Distiller loop: adapter-only weight sync, adapter checkpoints that resume exactly and load as a
merged model, and bad LoRA settings refused before any weights load."""

from __future__ import annotations

import json

import pytest
import torch

from pcsd_core.engine import lora
from pcsd_core.engine import trainer as trainer_module
from pcsd_core.errors import ConfigError
from pcsd_core.models import load_model
from test_trainer import run, tiny_config, train_parquet  # noqa: F401 (a fixture)

LORA = {"model.lora_rank": 4, "model.lora_alpha": 8.0, "train.lr": 1e-2}
PROMPT = torch.tensor([[1, 400, 500, 600, 700, 42]])


def test_engine_logits_equal_the_actors_after_an_adapter_sync(tiny_model_dir, train_parquet, tmp_path):
    synced = []
    distiller, _ = run(tiny_config(tiny_model_dir, tmp_path / "run", **LORA, **{"train.total_training_steps": 1}),
                       train_parquet)
    try:
        original = distiller.engine.update_weights
        actor_lm = distiller.workers.actor.student.lm
        with torch.no_grad():
            expected = actor_lm(input_ids=PROMPT).logits
            base = load_model(str(tiny_model_dir))(input_ids=PROMPT).logits
            got = distiller.engine.model(input_ids=PROMPT).logits
        assert not torch.allclose(expected, base, atol=1e-4)  # the adapter moved the policy off the base
        torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)

        distiller.engine.update_weights = lambda items: original(synced.extend(items) or synced)
        distiller._sync_weights()
        adapter_names = {name for name, _ in distiller.workers.actor.adapter_items()}
        assert {piece.name for piece in synced} == adapter_names  # the adapter alone crosses, never the base
        sent = sum(piece.tensor.numel() * piece.tensor.element_size() for piece in synced)
        model_bytes = sum(p.numel() * p.element_size() for p in load_model(str(tiny_model_dir)).parameters())
        assert sent < model_bytes / 20
    finally:
        distiller.close()


def test_checkpoint_holds_the_adapter_and_loads_as_the_merged_model(tiny_model_dir, train_parquet, tmp_path):
    distiller, result = run(tiny_config(tiny_model_dir, tmp_path / "run", **LORA, **{"train.total_training_steps": 1}),
                            train_parquet)
    try:
        with torch.no_grad():
            expected = distiller.workers.actor.student.lm(input_ids=PROMPT).logits
    finally:
        distiller.close()
    folder = result.checkpoint_dir
    assert (folder / "adapter_model.safetensors").is_file() and not (folder / "model.safetensors").exists()
    base = json.loads((folder / "base_model.json").read_text())
    assert base["source"] == str(tiny_model_dir) and base["sha256"]["model.safetensors"]
    from peft import PeftModel

    adapted = PeftModel.from_pretrained(load_model(str(tiny_model_dir)), folder)  # peft's own loader
    merged = load_model(str(folder))  # what evaluation loads: base + adapter, merged
    with torch.no_grad():
        torch.testing.assert_close(adapted(input_ids=PROMPT).logits, expected, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(merged(input_ids=PROMPT).logits, expected, rtol=1e-4, atol=1e-4)


def test_lora_resume_continues_with_the_same_loss(tiny_model_dir, train_parquet, tmp_path):
    """3 steps straight == 2 steps, resume from the step-2 checkpoint, 1 more: same loss, adapters, samples."""
    overrides = {**LORA, "train.total_training_steps": 3, "train.checkpoint_every": 2, "train.teacher_mode": "ema"}
    straight_log: list = []
    straight, _ = run(tiny_config(tiny_model_dir, tmp_path / "straight", **overrides), train_parquet, straight_log)
    straight.close()
    first, _ = run(tiny_config(tiny_model_dir, tmp_path / "resumed", **overrides), train_parquet, stop_after_step=2)
    first.close()
    resumed_log: list = []
    resumed_cfg = tiny_config(tiny_model_dir, tmp_path / "resumed", **overrides,
                              **{"train.resume_from": str(tmp_path / "resumed" / "checkpoints" / "step_000002")})
    resumed, _ = run(resumed_cfg, train_parquet, resumed_log)
    resumed.close()
    assert [step for step, _ in resumed_log] == [3]
    assert resumed_log[0][1]["train/loss"] == pytest.approx(straight_log[2][1]["train/loss"], rel=1e-5)
    from safetensors.torch import load_file

    for name in ("adapter_model.safetensors", "teacher.safetensors"):
        a, b = load_file(tmp_path / "straight" / "final" / name), load_file(tmp_path / "resumed" / "final" / name)
        assert a.keys() == b.keys()
        for key in a:
            torch.testing.assert_close(b[key], a[key], rtol=0, atol=1e-6, msg=key)
    step = "samples/step_000003.jsonl"
    assert (tmp_path / "straight" / step).read_text() == (tmp_path / "resumed" / step).read_text()


def test_resume_onto_another_base_is_refused(tiny_model_dir, train_parquet, tmp_path):
    import shutil

    first, _ = run(tiny_config(tiny_model_dir, tmp_path / "run", **LORA, **{"train.total_training_steps": 1}),
                   train_parquet)
    first.close()
    other = tmp_path / "other_base"
    shutil.copytree(tiny_model_dir, other)
    model = load_model(str(other))
    with torch.no_grad():
        model.model.norm.weight.add_(1.0)
    model.save_pretrained(other)
    cfg = tiny_config(other, tmp_path / "run2", **LORA, **{"train.resume_from": str(tmp_path / "run" / "final")})
    with pytest.raises(ConfigError, match=r"^train.resume_from .*differ"):
        run(cfg, train_parquet)


@pytest.mark.parametrize("targets", ["q_proj,qkv", "c_attn"])
def test_bad_lora_targets_are_refused_before_any_weights_load(tiny_model_dir, train_parquet, tmp_path, monkeypatch,
                                                               targets):
    def no_load(*args, **kwargs):
        raise AssertionError("weights were loaded before the LoRA settings were checked")

    monkeypatch.setattr(trainer_module, "build_train_workers", no_load)
    monkeypatch.setattr(lora, "add_lora", no_load)
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", **LORA, **{"model.lora_target_modules": targets})
    distiller = trainer_module.Distiller(cfg, train_parquet)
    with pytest.raises(ConfigError, match=r"^model.lora_target_modules"):
        distiller.setup()
