"""The actor's reference anchor (`loss.ref_kl_coef`): the reference is the initial model on the student prompt, it
never moves, its loss term and gradient match float64 full-logits math, and it reuses what already holds the
initial weights (the frozen teacher, the LoRA base)."""

from __future__ import annotations

import copy

import pytest
import torch

from pcsd_core.config.loader import config_from_dict
from pcsd_core.engine.batch import RolloutBatch
from pcsd_core.models import load_model
from test_actor import actor_of, random_batch

COEF = 0.5


def anchor_config(coef: float = COEF, model: dict | None = None, **train):
    base = {"prompts_per_step": 2, "mini_batch_size": 4, "micro_batch_size": 2, "lr": 1e-3, "device": "cpu"}
    return config_from_dict({"train": {**base, **train}, "rollout": {"n": 2}, "model": model or {},
                             "loss": {"ref_kl_coef": coef}})


def initial_states(initial, batch: RolloutBatch) -> list[torch.Tensor]:
    """The initial model's final hidden states predicting each response token after the student prompt."""
    with torch.no_grad():
        return [initial.model(torch.tensor([prompt + response])).last_hidden_state[0, len(prompt) - 1: -1]
                for prompt, response in zip(batch.student_prompt_ids, batch.response_ids)]


def anchored_reference_loss(student, initial, batch: RolloutBatch) -> tuple[torch.Tensor, float]:
    """Token mean of KL(P_t || P_s) + COEF * KL(P_s || P_initial), float64 full logits; and the mean anchor KL."""
    total, anchor, tokens = 0.0, 0.0, 0
    for prompt, teacher_prompt, response in zip(batch.student_prompt_ids, batch.teacher_prompt_ids,
                                                 batch.response_ids):
        with torch.no_grad():
            t_logprobs = student(torch.tensor([teacher_prompt + response])).logits[0, len(teacher_prompt) - 1: -1]
            r_logprobs = initial(torch.tensor([prompt + response])).logits[0, len(prompt) - 1: -1]
        s_logprobs = student(torch.tensor([prompt + response])).logits[0, len(prompt) - 1: -1].double().log_softmax(-1)
        t_logprobs, r_logprobs = t_logprobs.double().log_softmax(-1), r_logprobs.double().log_softmax(-1)
        reference_kl = (s_logprobs.exp() * (s_logprobs - r_logprobs)).sum()
        total = total + (t_logprobs.exp() * (t_logprobs - s_logprobs)).sum() + COEF * reference_kl
        anchor += float(reference_kl.detach())
        tokens += len(response)
    return total / tokens, anchor / tokens


def test_anchored_update_matches_full_logits_reference(tiny_model_dir, moved_model_dir):
    """Live teacher, full fine-tuning: the reference is an extra frozen module loaded from the initial weights
    (teacher_path); loss, ref_kl and every parameter's gradient equal float64 full-logits math."""
    actor = actor_of(anchor_config(grad_clip=0.0), str(moved_model_dir), teacher_path=str(tiny_model_dir))
    initial = load_model(str(tiny_model_dir))
    student = copy.deepcopy(actor.student.lm)
    batch = random_batch(4)

    outputs = actor.compute_distributions(batch)
    for got, want in zip(outputs.reference_hidden, initial_states(initial, batch), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    stats = actor.update_policy_with_distillation(batch, outputs)  # one optimizer step: grads stay on the params
    expected, expected_ref_kl = anchored_reference_loss(student, initial, batch)
    expected.backward()

    assert expected_ref_kl > 1e-3  # the anchor is not trivially zero here
    assert stats.loss_sum == pytest.approx(expected.item(), rel=1e-4)
    assert stats.ref_kl_sum / stats.num_tokens == pytest.approx(expected_ref_kl, rel=1e-4)
    for (name, got), want in zip(actor.student.lm.named_parameters(), student.parameters(), strict=True):
        error = (got.grad.double() - want.grad.double()).norm() / want.grad.double().norm()
        assert error < 1e-4, name

    # The reference never moves: scoring again gives the same states, while the (live) teacher did move.
    again = actor.compute_distributions(batch)
    assert all(torch.equal(a, b) for a, b in zip(again.reference_hidden, outputs.reference_hidden, strict=True))
    assert any(not torch.allclose(a, b, atol=1e-6) for a, b in zip(again.hidden, outputs.hidden))
    assert not any(parameter.requires_grad for parameter in actor.reference.parameters())


def test_the_reference_reuses_the_frozen_teacher_and_is_off_at_zero(tiny_model_dir):
    path = str(tiny_model_dir)
    frozen = actor_of(anchor_config(teacher_mode="frozen"), path)
    assert frozen.reference is frozen.teacher  # no second copy of the initial weights
    batch = random_batch(4)
    outputs = frozen.compute_distributions(batch)
    assert frozen._reference_weight is frozen._teacher_weight
    for got, want in zip(outputs.reference_hidden, initial_states(load_model(path), batch), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)

    live = actor_of(anchor_config(), path)
    assert live.reference is not None and live.reference is not live.student and live.teacher is None
    off = actor_of(anchor_config(coef=0.0), path)
    assert off.reference is None and off.compute_distributions(batch).reference_hidden is None
    assert off.update_policy_with_distillation(batch, off.compute_distributions(batch)).ref_kl_sum == 0.0


def test_lora_reference_is_the_base_with_the_adapter_off(tiny_model_dir):
    actor = actor_of(anchor_config(model={"lora_rank": 4, "lora_alpha": 8.0}, lr=1e-2), str(tiny_model_dir))
    assert actor.reference is actor.forward_module("student") and actor.teacher is None  # no copy
    for seed in (1, 2):  # the adapter moves (B starts at 0, so two steps)
        batch = random_batch(4, seed)
        stats = actor.update_policy_with_distillation(batch, actor.compute_distributions(batch))
    assert stats.ref_kl_sum > 0
    batch = random_batch(4, seed=7)
    outputs = actor.compute_distributions(batch)
    for got, want in zip(outputs.reference_hidden, initial_states(load_model(str(tiny_model_dir)), batch),
                         strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # The adapter is back on afterwards: the live teacher (the student) differs from the base.
    base = actor_of(anchor_config(coef=0.0), str(tiny_model_dir)).compute_distributions(batch)
    assert any(not torch.allclose(a, b, atol=1e-4) for a, b in zip(outputs.hidden, base.hidden))
