"""LoRA (peft) in the actor: only the adapter trains, the frozen teacher is the base, the EMA adapter's arithmetic,
and bad LoRA settings refused before any weights load."""

from __future__ import annotations

import pytest
import torch

from pcsd_core.config.loader import config_from_dict
from pcsd_core.engine import lora
from pcsd_core.engine.actor import Actor
from pcsd_core.errors import ConfigError
from pcsd_core.models import load_model
from test_actor import actor_of, random_batch

LORA = {"lora_rank": 4, "lora_alpha": 8.0}


def lora_config(teacher_mode: str = "live", **train):
    base = {"prompts_per_step": 2, "mini_batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "device": "cpu",
            "teacher_mode": teacher_mode, "ema_rate": 0.25}
    return config_from_dict({"train": {**base, **train}, "rollout": {"n": 2}, "model": LORA})


def train_steps(actor: Actor, steps: int) -> None:
    for seed in range(1, steps + 1):
        batch = random_batch(4, seed)
        actor.update_policy_with_distillation(batch, actor.compute_distributions(batch))


def base_name(peft_name: str) -> str:
    """The plain model's name of a peft model's base parameter."""
    return peft_name.removeprefix("base_model.model.").replace(".base_layer.", ".")


def test_a_step_changes_only_the_adapter(tiny_model_dir):
    actor = actor_of(lora_config(), str(tiny_model_dir))
    base = dict(load_model(str(tiny_model_dir)).named_parameters())  # the checkpoint, loaded on its own
    initial = {name: p.detach().clone() for name, p in actor.student.lm.named_parameters()}
    optimized = {id(p) for group in actor.optimizer.param_groups for p in group["params"]}
    train_steps(actor, 2)  # the first step moves B only (B starts at 0, so A gets no gradient); the second both

    changed = set()
    for name, parameter in actor.student.lm.named_parameters():
        if lora.wire_name(name, lora.STUDENT) is None:
            torch.testing.assert_close(parameter, base[base_name(name)], rtol=0, atol=0, msg=name)
            assert not parameter.requires_grad and id(parameter) not in optimized, name
        elif not torch.equal(parameter, initial[name]):
            changed.add(name)
    adapter = {name for name, _ in actor.student.lm.named_parameters() if lora.wire_name(name, lora.STUDENT)}
    assert changed == adapter and len(adapter) == 2 * 7 * 2  # A and B of 7 projections in each of 2 layers
    assert len(optimized) == len(adapter)


def test_frozen_teacher_is_the_base_model_without_a_copy(tiny_model_dir):
    actor = actor_of(lora_config("frozen"), str(tiny_model_dir))
    train_steps(actor, 2)
    assert actor.teacher is None  # no second model: the base with the adapter off
    batch = random_batch(4, seed=7)
    teacher = actor.compute_distributions(batch)

    plain = actor_of(config_from_dict({"train": {"prompts_per_step": 2, "mini_batch_size": 4, "micro_batch_size": 2,
                                              "device": "cpu"}, "rollout": {"n": 2}}), str(tiny_model_dir))
    expected = plain.compute_distributions(batch)  # the untouched checkpoint, live teacher = itself
    for got, want in zip(teacher.hidden, expected.hidden, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The adapter is back on afterwards, and it moved the student away from the base.
    live = actor_of(lora_config(), str(tiny_model_dir))
    live._load_adapter(dict(actor.adapter_items()), lora.STUDENT)
    moved = live.compute_distributions(batch)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(moved.hidden, expected.hidden))
    assert all(p.requires_grad for name, p in actor.student.lm.named_parameters() if lora.wire_name(name, lora.STUDENT))


def test_ema_adapter_arithmetic_by_hand(tiny_model_dir):
    """ema_1 = (1 - r) ema_0 + r student_1 per adapter tensor, ema_0 = the initial student; the teacher pass
    runs the EMA adapter (equal to a student whose adapter holds the EMA weights)."""
    rate = 0.25
    actor = actor_of(lora_config("ema"), str(tiny_model_dir))
    assert actor.teacher is None
    ema = {name: t.clone() for name, t in actor.adapter_items("teacher")}
    student = {name: t.clone() for name, t in actor.adapter_items("student")}
    assert ema.keys() == student.keys() and all(torch.equal(ema[k], student[k]) for k in ema)
    for seed in (1, 2):
        batch = random_batch(4, seed)
        actor.update_policy_with_distillation(batch, actor.compute_distributions(batch))
        student = {name: t.clone() for name, t in actor.adapter_items("student")}
        for name, value in ema.items():
            ema[name] = value * (1 - rate) + student[name] * rate
        got = dict(actor.adapter_items("teacher"))
        for name in ema:
            torch.testing.assert_close(got[name], ema[name], rtol=1e-6, atol=1e-7, msg=name)
    assert not any(p.requires_grad for name, p in actor.student.lm.named_parameters() if lora.wire_name(name, lora.EMA))

    batch = random_batch(4, seed=9)
    teacher = actor.compute_distributions(batch)
    reference = actor_of(lora_config(), str(tiny_model_dir))
    reference._load_adapter(ema, lora.STUDENT)
    for got, want in zip(teacher.hidden, reference.compute_distributions(batch).hidden, strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("teacher_mode", ["frozen", "ema"])
def test_in_process_bfloat16_teachers_switch_the_adapter_of_the_copy_the_forward_runs_on(tiny_model_dir, teacher_mode):
    """LoRA + model.dtype bfloat16 in this process: forward passes run on a bf16 copy of the float32 masters, so
    the teacher's adapter switch must act on that copy. Frozen: the teacher is the base (the adapter off), equal to a
    plain bf16 model of the checkpoint; EMA: the copy's EMA adapter is the masters' after every step."""
    def bf16(cfg):
        return config_from_dict({**cfg.to_dict(), "model": {**cfg.to_dict()["model"], "dtype": "bfloat16"}})

    actor = actor_of(bf16(lora_config(teacher_mode)), str(tiny_model_dir))
    assert actor._student_copy is not None  # masters float32, forward bf16
    train_steps(actor, 2)
    batch = random_batch(4, seed=7)
    teacher = actor.compute_distributions(batch)
    if teacher_mode == "frozen":
        plain = actor_of(config_from_dict({"model": {"dtype": "bfloat16"}, "train": {
            "prompts_per_step": 2, "mini_batch_size": 4, "micro_batch_size": 2, "device": "cpu",
            "master_dtype": "bfloat16"}, "rollout": {"n": 2}}), str(tiny_model_dir))
        expected = plain.compute_distributions(batch).hidden
    else:
        copy_ema = dict(lora.adapter_items(actor.forward_module("student").lm, lora.EMA))
        for name, master in actor.adapter_items("teacher"):
            torch.testing.assert_close(copy_ema[name], master.to(torch.bfloat16), rtol=0, atol=0, msg=name)
        student_view = actor_of(bf16(lora_config()), str(tiny_model_dir))  # live: its teacher pass is its student
        student_view._load_adapter(dict(actor.adapter_items("teacher")), lora.STUDENT)  # a student holding the EMA
        student_view._student_copy.copy_from_masters()
        expected = student_view.compute_distributions(batch).hidden
    for got, want in zip(teacher.hidden, expected, strict=True):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("targets, message", [
    ("q_proj,qkv_proj", "has no ['qkv_proj']"),
    ("c_attn,c_fc", "has none of them"),
])
def test_unknown_lora_targets_are_refused_from_the_config_alone(tiny_model_dir, targets, message):
    from transformers import AutoConfig

    cfg = config_from_dict({"model": {**LORA, "lora_target_modules": targets}})
    with pytest.raises(ConfigError) as refused:
        lora.check_lora_targets(AutoConfig.from_pretrained(tiny_model_dir), cfg.model)
    assert str(refused.value).startswith("model.lora_target_modules") and message in str(refused.value)
    assert "q_proj" in str(refused.value)  # lists what the model has


def test_a_model_with_none_of_the_default_targets_is_refused():
    from transformers import GPT2Config

    cfg = config_from_dict({"model": LORA})
    with pytest.raises(ConfigError, match=r"^model.lora_target_modules .*has none of them.*c_attn"):
        lora.check_lora_targets(GPT2Config(n_layer=1, n_embd=32, n_head=2), cfg.model)


def test_merging_an_adapter_needs_one():
    with pytest.raises(ConfigError, match=r"^register.merge_adapter \(true\) needs model.lora_rank >= 1"):
        config_from_dict({"register": {"merge_adapter": True}})
    assert config_from_dict({"register": {"merge_adapter": True}, "model": LORA}).register.merge_adapter
