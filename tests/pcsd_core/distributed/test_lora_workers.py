"""LoRA under Ray + FSDP2: two workers sharding a peft model (gloo, CPU) give the adapter gradients and weights
of one in-process actor, keep the base untouched, and sync the adapter alone, in bounded buckets, into an HF
engine whose logits then equal the actor's. Tiny 2-layer model, rank-4 adapter, EMA teacher adapter."""

from __future__ import annotations

import pytest
import torch

from pcsd_core.config.loader import config_from_dict
from pcsd_core.config.schema import PCSDConfig
from pcsd_core.distributed.weight_sync import drain, whole_tensors
from pcsd_core.engine import lora
from pcsd_core.engine.actor import full_tensor
from test_workers import actor_of, assert_buckets_bounded, random_batch, ray_session  # noqa: F401 (a fixture)

ray = pytest.importorskip("ray")


def config(**train) -> PCSDConfig:
    base = {"prompts_per_step": 4, "mini_batch_size": 4, "micro_batch_size": 2, "lr": 1e-2, "device": "cpu",
            "teacher_mode": "ema", "ema_rate": 0.5}
    return config_from_dict({"train": {**base, **train}, "rollout": {"n": 2},
                             "model": {"lora_rank": 4, "lora_alpha": 8.0}})


def test_two_fsdp_workers_give_one_process_adapter_gradients(tiny_model_dir, ray_session):
    from pcsd_core.distributed.ray_workers import launch_train_workers
    from pcsd_core.rollout.hf import HFRolloutEngine

    batch = random_batch(8)
    single = actor_of(config(), str(tiny_model_dir))
    single_stats = single.update_policy_with_distillation(batch, single.compute_distributions(batch))
    expected_grads = {wire: p.grad.clone() for wire, p in lora.adapter_items(single.student.lm, detach=False)}

    def adapter_gradients(worker_self) -> dict[str, torch.Tensor]:
        """Runs inside a TrainWorker (Ray's __ray_call__; a local function, so it travels by value): the student
        adapter's whole gradients (full_tensor is collective: every rank runs it)."""
        return {wire: full_tensor(p.grad).clone() for wire, p in lora.adapter_items(worker_self.actor.student.lm,
                                                                                   detach=False)}

    cfg = config(use_ray=True, num_workers=2)
    group = launch_train_workers(cfg.model, cfg.train, cfg.loss, str(tiny_model_dir), device_type="cpu")
    try:
        stats = group.update_policy_with_distillation(batch, group.compute_distributions(batch))
        grads = ray.get([w.__ray_call__.remote(adapter_gradients) for w in group.workers])
        adapter = group.full_state_dict("student")
        ema = group.full_state_dict("teacher")
        optimizer = group.training_state()["optimizer"]
        bucket_bytes = 2**10  # 1 KiB: each rank's shard of an adapter matrix cut into rows
        buckets = list(group.iter_state_dict_buckets(bucket_bytes))
    finally:
        group.shutdown()

    assert stats.loss_sum == pytest.approx(single_stats.loss_sum, rel=1e-5)
    assert stats.grad_norms == pytest.approx(single_stats.grad_norms, rel=1e-4)
    for rank_grads in grads:  # the last mini-batch's gradients, whole, on both ranks
        assert rank_grads.keys() == expected_grads.keys()
        for name, grad in expected_grads.items():
            torch.testing.assert_close(rank_grads[name], grad, rtol=1e-4, atol=1e-7, msg=name)
    # The weights after the two AdamW steps: B equal; A within a tenth of the lr (1e-2). At the first step B = 0,
    # so A's gradient is exactly 0 in one process and rounding-size (~1e-10) after FSDP's reduce-scatter, which
    # Adam's g / (sqrt(v) + eps) turns into a step of a sizeable fraction of the lr: Adam's, not the gradients'.
    for which, got in (("student", adapter), ("teacher", ema)):
        for name, tensor in single.adapter_items(which):
            atol = 2e-5 if ".lora_B." in name else 1e-3
            torch.testing.assert_close(got[name], tensor, rtol=0, atol=atol, msg=f"{which} {name}")
    assert len(optimizer["state"]) == len(expected_grads)  # AdamW moments of the adapter alone

    # Adapter-only sync from the shards: the bound holds, no base weight crosses, the engine matches the actor.
    assert_buckets_bounded(buckets, bucket_bytes)
    pieces = [piece for bucket in buckets for piece in bucket]
    assert {piece.name for piece in pieces} == set(expected_grads) and any(not p.is_whole for p in pieces)
    assert dict(whole_tensors(pieces)).keys() == adapter.keys()
    engine = HFRolloutEngine(str(tiny_model_dir), lora=config().model)
    engine.update_weights(drain(buckets))
    ids = torch.tensor([[1, 400, 2000, 30, 77, 9]])
    with torch.no_grad():
        torch.testing.assert_close(engine.model(ids).logits, single.student.lm(input_ids=ids).logits,
                                   rtol=0, atol=1e-4)
