"""Model recipes: the 7B preset takes the reference's optimizer steps per batch; a GPU recipe on CPU stops at once."""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict, load_config
import subprocess
import sys
import time
from pathlib import Path

import pytest

from pcsd_core.config.schema import PCSDConfig
from pcsd_core.models import MODEL_RECIPES, HardwareError, check_hardware, recipe_for, recipe_preset
from cli.verl_keys import translate

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESET_7B = REPO_ROOT / "configs" / "gpu_gsm8k_7b.yaml"

# The reference's documented defaults (../shared/reference/pcsd_verl_example_README.md, "Adjusting Training
# Hyperparameters"): "PPO Epochs: Number of gradient steps per batch (default: 1)" and "Mini-batch Size: Size of
# mini-batches for training (default: 16)". verl's actor.ppo_mini_batch_size counts PROMPTS (verl multiplies it by
# rollout.n before splitting a batch). The README does not give data.train_batch_size, so the check below runs
# over several batch sizes, the preset's own among them (verl's default is 1024).
REFERENCE_PPO_MINI_BATCH_PROMPTS = 16
REFERENCE_PPO_EPOCHS = 1


def reference_steps_per_batch(train_batch_size_prompts: int) -> float:
    return train_batch_size_prompts / REFERENCE_PPO_MINI_BATCH_PROMPTS * REFERENCE_PPO_EPOCHS


def our_steps_per_batch(cfg: PCSDConfig) -> float:
    """Optimizer steps per rollout batch, from what the trainer does: responses / mini-batch, times epochs."""
    return cfg.train.prompts_per_step * cfg.rollout.n / cfg.train.mini_batch_size * cfg.train.ppo_epochs


def test_7b_preset_takes_the_reference_steps_per_batch():
    preset = load_config(PRESET_7B)
    assert our_steps_per_batch(preset) == reference_steps_per_batch(preset.train.prompts_per_step) == 1


@pytest.mark.parametrize("train_batch_size", [16, 32, 64, 1024])
def test_reference_arguments_translate_to_the_same_steps_per_batch(train_batch_size):
    args = [f"data.train_batch_size={train_batch_size}",
            f"actor_rollout_ref.actor.ppo_mini_batch_size={REFERENCE_PPO_MINI_BATCH_PROMPTS}",
            f"actor_rollout_ref.actor.ppo_epochs={REFERENCE_PPO_EPOCHS}"]
    preset = load_config(PRESET_7B)
    cfg = config_from_dict(preset.to_dict(), translate(args, preset))
    assert our_steps_per_batch(cfg) == reference_steps_per_batch(train_batch_size)
    assert cfg.train.mini_batch_size == load_config(PRESET_7B).train.mini_batch_size


def test_every_recipe_preset_loads_and_names_its_model():
    for alias, recipe in MODEL_RECIPES.items():
        preset = recipe_preset(alias)
        assert preset == str(REPO_ROOT / recipe.preset)
        assert load_config(preset).model.name == alias
    assert recipe_preset("deepseek-ai/deepseek-math-7b-base") == str(PRESET_7B)  # the hub id of the alias
    assert recipe_preset("/some/local/checkpoint") is None and recipe_for("Qwen/Qwen2.5-0.5B") is None


def test_7b_on_this_cpu_machine_stops_at_once_with_the_way_out():
    """The headline command's config (7B alias on the CPU preset) and the 7B preset itself, on a CPU machine."""
    import torch

    if torch.cuda.device_count() >= 8:
        pytest.skip("this machine has the GPUs the 7B recipe needs")
    cpu_preset = load_config(REPO_ROOT / "configs" / "cpu_smollm2.yaml",
                                      overrides={"model.name": "deepseek-math-7b-base"})
    for cfg in (cpu_preset, load_config(PRESET_7B)):
        started = time.perf_counter()
        with pytest.raises(HardwareError) as caught:
            check_hardware(cfg)
        assert time.perf_counter() - started < 1.0
        message = str(caught.value)
        assert "'deepseek-math-7b-base' needs 8 CUDA GPU(s) with >= 40 GB each" in message
        # The library names the way out as presets; the flow's start step adds the commands (tests/steps/test_plan.py).
        assert "the embedded CPU default (model smollm2-135m, preset configs/cpu_smollm2.yaml)" in message
        assert "configs/gpu_gsm8k_7b.yaml" in message
    check_hardware(load_config(REPO_ROOT / "configs" / "cpu_smollm2.yaml"))  # the CPU default passes


def test_gpu_machine_answers():
    preset = load_config(PRESET_7B)
    check_hardware(preset, visible_gpus=8, gpu_memory_gb=[80.0] * 8)
    with pytest.raises(HardwareError, match=r"too small here: cuda:0 24 GB, cuda:1 24 GB"):
        check_hardware(preset, visible_gpus=8, gpu_memory_gb=[24.0, 24.0] + [80.0] * 6)
    with pytest.raises(HardwareError, match=r"needs 8 CUDA GPU\(s\).*this machine has 4 visible"):
        check_hardware(preset, visible_gpus=4, gpu_memory_gb=[80.0] * 4)
    smaller = load_config(PRESET_7B, overrides={"train.num_workers": 2, "rollout.num_gpus": 2})
    check_hardware(smaller, visible_gpus=4, gpu_memory_gb=[80.0] * 4)  # the layout given, not the preset's
    on_cpu = config_from_dict({}, {"model.name": "deepseek-math-7b-base", "train.device": "cpu"})
    with pytest.raises(HardwareError, match="does not put it on GPUs"):
        check_hardware(on_cpu, visible_gpus=8, gpu_memory_gb=[80.0] * 8)


def test_refusal_in_a_fresh_process_takes_seconds_and_downloads_nothing(tmp_path):
    """Import + config + check, as the flow's first step does it, with the hub unreachable: < 10 s."""
    code = ("from pcsd_core.config.loader import config_from_dict\nfrom pcsd_core.models import check_hardware\n"
            "check_hardware(config_from_dict({}, {'model.name': 'deepseek-math-7b-base'}))\n")
    started = time.perf_counter()
    completed = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, capture_output=True, text=True,
                               env={"PATH": "/usr/bin:/bin", "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path),
                                    "CUDA_VISIBLE_DEVICES": ""}, timeout=60)
    assert time.perf_counter() - started < 10
    assert completed.returncode != 0 and "HardwareError" in completed.stderr
    assert "needs 8 CUDA GPU(s) with >= 40 GB each" in completed.stderr
    assert not (tmp_path / ".cache" / "huggingface").exists()


def test_the_7b_recipe_says_what_each_mode_needs():
    """Full fine-tuning: 8 GPUs of >= 40 GB, and the refusal names the LoRA way; LoRA: one GPU of >= 80 GB."""
    lora_preset = load_config(REPO_ROOT / "configs" / "gpu_gsm8k_7b_lora.yaml")
    assert lora_preset.model.lora_rank == 16 and lora_preset.train.num_workers == 1
    assert lora_preset.rollout.placement == "colocated"
    with pytest.raises(HardwareError) as full:
        check_hardware(load_config(PRESET_7B), visible_gpus=1, gpu_memory_gb=[80.0])
    assert "needs 8 CUDA GPU(s) with >= 40 GB" in str(full.value)
    assert "LoRA adapter on 1 GPU(s) with >= 80 GB (configs/gpu_gsm8k_7b_lora.yaml, untested on GPU)" in str(full.value)
    check_hardware(lora_preset, visible_gpus=1, gpu_memory_gb=[80.0])  # one 80 GB GPU is enough
    with pytest.raises(HardwareError, match=r"needs 1 CUDA GPU\(s\) with >= 80 GB.*too small here: cuda:0 40 GB"):
        check_hardware(lora_preset, visible_gpus=1, gpu_memory_gb=[40.0])
    with pytest.raises(HardwareError, match=r"needs 1 CUDA GPU\(s\) with >= 80 GB .*LoRA rank 16"):
        check_hardware(lora_preset, visible_gpus=0)
