"""Which GPUs of the trainer's machine a split rollout takes, and what the start step's check counts there.

No GPU is needed: the machine's answers (visible GPUs, CUDA_VISIBLE_DEVICES, Ray's GPU ids) are arguments.
"""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import pytest

from pcsd_core.config.schema import PCSDConfig
from pcsd_core.models import HardwareError, check_hardware, local_gpus_required
from pcsd_core.rollout import first_free_gpus
from pcsd_core.distributed.ray_cluster import local_gpu_indexes


def test_split_rollout_takes_the_first_consecutive_gpus_the_workers_leave_free():
    assert first_free_gpus([], 4, visible=4) == 0  # evaluation: no train workers here
    assert first_free_gpus([0, 1, 2, 3], 4, visible=8) == 4  # all 4 actor ranks on this machine
    assert first_free_gpus([0, 1], 2, visible=8) == 2  # 2 of 4 ranks here, 2 on another Ray node
    assert first_free_gpus([1], 2, visible=4) == 2  # 0 is free but 0..1 is not
    assert first_free_gpus([2, 3], 2, visible=4) == 0
    with pytest.raises(HardwareError, match=r"needs 4 free GPU\(s\).*hold GPU\(s\) \[0, 1, 2, 3\] of its 4"):
        first_free_gpus([0, 1, 2, 3], 4, visible=4)


def test_ray_gpu_ids_become_this_process_s_torch_indexes():
    assert local_gpu_indexes([0, 1], None) == [0, 1]
    assert local_gpu_indexes(["3", "2"], "2,3,4,5") == [0, 1]  # Ray numbers by the node's CUDA_VISIBLE_DEVICES
    assert local_gpu_indexes([6], "2,3") == []  # a GPU this process cannot see cannot collide with one here


def test_actor_gpus_on_a_joined_cluster_are_not_counted_on_this_machine(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    layout = {"model.name": "deepseek-math-7b-base", "model.dtype": "bfloat16", "train.device": "cuda",
              "train.use_ray": True, "train.num_workers": 8, "train.micro_batch_size": 1, "rollout.engine": "sglang",
              "rollout.placement": "split", "rollout.num_gpus": 2}
    local = config_from_dict({}, layout)
    assert local_gpus_required(local) == 10
    with pytest.raises(HardwareError, match=r"needs 10 CUDA GPU\(s\).*this machine has 2 visible"):
        check_hardware(local, visible_gpus=2, gpu_memory_gb=[80.0] * 2)
    joined = config_from_dict({}, {**layout, "train.ray_address": "10.0.0.1:6379"})
    assert local_gpus_required(joined) == 2  # the rollout's; Ray's placement group places the 8 actor ranks
    check_hardware(joined, visible_gpus=2, gpu_memory_gb=[80.0] * 2)
    monkeypatch.setenv("RAY_ADDRESS", "10.0.0.1:6379")
    assert local_gpus_required(local) == 2
    with pytest.raises(HardwareError, match=r"needs 2 CUDA GPU\(s\).*this machine has 1 visible"):
        check_hardware(local, visible_gpus=1, gpu_memory_gb=[80.0])


@pytest.mark.parametrize("actor_gpus, visible_devices, tp, expected_base, expected_sender", [
    ([4, 5, 6, 7], None, 4, 0, 4),  # Ray gave the actor 4..7: the rollout takes 0..3, the sender sends from 4
    ([0, 1, 2, 3], None, 4, 4, 0),
    ([4, 5, 6, 7], None, 2, 0, 4),
    (["4", "5", "6", "7"], "4,5,6,7,0,1,2,3", 4, 4, 0),  # a remapped CUDA_VISIBLE_DEVICES: torch indexes 0..3
    ([6, 7], None, 4, 0, 6),  # 2 ranks here, the others on another node
])
def test_weight_sync_sender_is_the_actors_own_gpu_outside_the_rollout(actor_gpus, visible_devices, tp, expected_base,
                                                                       expected_sender):
    from pcsd_core.rollout import weight_sync_sender_gpu

    in_use = local_gpu_indexes(actor_gpus, visible_devices)
    base = first_free_gpus(in_use, tp, visible=8)
    sender = weight_sync_sender_gpu(in_use, base, tp, visible=8)
    assert (base, sender) == (expected_base, expected_sender)
    assert sender in in_use and sender not in range(base, base + tp)


def test_sender_without_actor_gpus_here_takes_a_spare_gpu_or_refuses():
    from pcsd_core.rollout import weight_sync_sender_gpu

    assert weight_sync_sender_gpu([], 0, 2, visible=3) == 2  # actor on other nodes: a GPU the rollout leaves
    with pytest.raises(HardwareError, match=r"split rollout on GPU\(s\) \[0, 1\] needs a GPU of this machine outside"):
        weight_sync_sender_gpu([], 0, 2, visible=2)
    with pytest.raises(HardwareError, match=r"sender GPU 1 is one of the split rollout's GPUs \[0, 1\]"):
        weight_sync_sender_gpu([1], 0, 2, visible=4)


def test_split_sglang_engine_gets_the_actors_gpu_as_sender(monkeypatch):
    """create_rollout_engine with the actor on GPUs 4..7 of 8: SGLang on 0..3, its weight sync sent from cuda:4
    (it was cuda:0, one of SGLang's own GPUs, which NCCL refuses)."""
    import torch

    from pcsd_core.rollout import create_rollout_engine
    from pcsd_core.rollout import sglang as adapter

    made = {}
    monkeypatch.setattr(adapter, "SGLangRolloutEngine", lambda path, **kwargs: made.update(kwargs) or kwargs)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 8)
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = config_from_dict({}, {"model.dtype": "bfloat16", "train.device": "cuda", "train.use_ray": True,
                                "train.num_workers": 4, "train.micro_batch_size": 1, "rollout.engine": "sglang",
                                "rollout.placement": "split", "rollout.num_gpus": 4})
    create_rollout_engine(cfg.rollout, cfg.model, "unused", device="cuda", seed=0, gpus_in_use=[4, 5, 6, 7])
    assert made["base_gpu_id"] == 0 and made["tp_size"] == 4
    assert made["broadcaster"].device == torch.device("cuda:4")
