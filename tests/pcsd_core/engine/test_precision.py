"""Mixed precision in this process: float32 masters that an lr-1e-6 step moves, compute in model.dtype.

The reference for "moves" is arithmetic, not another run: an AdamW step of lr 1e-6 changes a weight by ~1e-6,
which a float32 master keeps for any |w| < ~8, and a bfloat16 weight keeps only for |w| < ~5e-4.
"""

from __future__ import annotations

import pytest
import torch

from pcsd_core.config.loader import config_from_dict
from pcsd_core.errors import ConfigError
from test_actor import actor_of, random_batch


def bf16_config(**train):
    base = {"prompts_per_step": 2, "mini_batch_size": 4, "micro_batch_size": 2, "lr": 1e-6, "device": "cpu"}
    return config_from_dict({"train": {**base, **train}, "rollout": {"n": 2}, "model": {"dtype": "bfloat16"}})


def moved_fraction(before: dict[str, torch.Tensor], after: dict[str, torch.Tensor]) -> float:
    changed = sum(int((after[name] != tensor).sum()) for name, tensor in before.items())
    return changed / sum(tensor.numel() for tensor in before.values())


def test_one_bf16_step_at_lr_1e6_moves_the_float32_masters(tiny_model_dir):
    actor = actor_of(bf16_config(), str(tiny_model_dir))
    before = {name: tensor.clone() for name, tensor in actor.full_state_dict().items()}
    assert {tensor.dtype for tensor in before.values()} == {torch.float32}  # masters, as checkpoints store them
    batch = random_batch(4)
    actor.update_policy_with_distillation(batch, actor.compute_distributions(batch))
    after = actor.full_state_dict()
    assert {tensor.dtype for tensor in after.values()} == {torch.float32}
    fraction = moved_fraction(before, after)
    assert fraction >= 0.9, f"only {fraction:.1%} of the master weights moved"
    # The forward runs in bfloat16 on the masters cast down: the module that computes holds exactly that.
    compute = dict(actor.forward_module().lm.named_parameters())
    assert {param.dtype for param in compute.values()} == {torch.bfloat16}
    for name, param in compute.items():
        assert torch.equal(param, after[name].to(torch.bfloat16)), name
    # The optimizer state is float32 too (exact resume).
    moments = [value for state in actor.optimizer.state.values() for value in state.values() if value.dim() > 0]
    assert moments and {value.dtype for value in moments} == {torch.float32}


def test_pure_bf16_masters_barely_move(tiny_model_dir):
    """The control: train.master_dtype bfloat16 (the old behaviour) moves a few percent at lr 1e-6."""
    actor = actor_of(bf16_config(master_dtype="bfloat16"), str(tiny_model_dir))
    before = {name: tensor.clone() for name, tensor in actor.full_state_dict().items()}
    batch = random_batch(4)
    actor.update_policy_with_distillation(batch, actor.compute_distributions(batch))
    assert moved_fraction(before, actor.full_state_dict()) < 0.2


def test_bf16_gradients_accumulate_in_float32_over_micro_batches(tiny_model_dir):
    """The masters' gradient is float32 and the same (to bf16 forward noise) whether a mini-batch runs as one
    micro-batch or two, as FSDP's float32 reduce_dtype accumulation gives; the compute copy keeps none."""
    batch = random_batch(4)
    grads = []
    for micro in (1, 2):
        actor = actor_of(bf16_config(micro_batch_size=micro, share_prompt_prefix=False, grad_clip=0.0),
                      str(tiny_model_dir))
        actor.update_policy_with_distillation(batch, actor.compute_distributions(batch))
        grads.append({name: param.grad for name, param in actor.student.lm.named_parameters()})
        assert all(param.grad is None for param in actor.forward_module().lm.parameters())
    for name, grad in grads[0].items():
        assert grad.dtype == torch.float32 and grads[1][name].dtype == torch.float32, name
        error = (grad - grads[1][name]).norm() / grad.norm()
        assert error < 2e-2, f"{name}: relative difference {error:.3g}"


def test_ema_teacher_masters_move_by_the_rate_in_float32(tiny_model_dir):
    actor = actor_of(bf16_config(teacher_mode="ema", ema_rate=0.05), str(tiny_model_dir))
    before = {name: tensor.clone() for name, tensor in actor.full_state_dict("teacher").items()}
    batch = random_batch(4)
    actor.update_policy_with_distillation(batch, actor.compute_distributions(batch))
    student, teacher = actor.full_state_dict(), actor.full_state_dict("teacher")
    for name, tensor in teacher.items():
        assert tensor.dtype == torch.float32
        torch.testing.assert_close(tensor, 0.95 * before[name] + 0.05 * student[name], rtol=0, atol=1e-7, msg=name)
    assert moved_fraction(before, teacher) >= 0.9


@pytest.mark.parametrize("settings, message", [
    ({"train.master_dtype": "float64"}, r"train.master_dtype \('float64'\) must be one of"),
    ({"train.master_dtype": "bfloat16"}, r"train.master_dtype \('bfloat16'\) must be 'float32' or model.dtype"),
    ({"train.master_dtype": "float16", "model.dtype": "bfloat16"}, r"train.master_dtype \('float16'\)"),
])
def test_master_dtype_is_checked_with_the_field_named(settings, message):
    with pytest.raises(ConfigError, match=message):
        config_from_dict({}, settings)
    assert config_from_dict({}, {"model.dtype": "bfloat16"}).train.master_dtype == "float32"
