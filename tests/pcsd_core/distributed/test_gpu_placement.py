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
