"""The train workers behind one interface (`TrainWorkers`): the actor in this process, or Ray workers.

The trainer calls the same methods on either, named as the actor's: `compute_distributions`,
`update_policy_with_distillation`, `full_state_dict`, `iter_state_dict_buckets`, `training_state`,
`load_training_state`, `peak_memory_mb`, `local_gpu_ids`, `shutdown`. `build_train_workers(model, train, loss, ...)`
(the config sections the actor reads) picks `InProcessWorkers` (one device, no Ray: tests, profiling, the CPU
default) or, with `train.use_ray`, `RayWorkers` holding FSDP2 shards (`ray_workers.py`).
"""

from __future__ import annotations

from typing import Any, Iterator, Protocol

import torch

from pcsd_core.config.schema import ModelConfig
from pcsd_core.config.train import TrainConfig
from pcsd_core.distributed.ray_workers import launch_train_workers
from pcsd_core.distributed.weight_sync import WeightPiece, bucketed, tensor_bytes, unique_state_items
from pcsd_core.engine.actor import Actor
from pcsd_core.engine.batch import RolloutBatch, TeacherOutputs, UpdateStats
from pcsd_core.engine.checkpoint import optimizer_state_bytes
from pcsd_core.loss.spec import LossSpec


class TrainWorkers(Protocol):
    """What the trainer asks of its workers, wherever they run."""

    def compute_distributions(self, batch: RolloutBatch) -> TeacherOutputs: ...

    def update_policy_with_distillation(self, batch: RolloutBatch, teacher_outputs: TeacherOutputs) -> UpdateStats: ...

    def full_state_dict(self, which: str = "student") -> dict[str, torch.Tensor]: ...

    def iter_state_dict_buckets(self, bucket_bytes: int) -> Iterator[list[WeightPiece]]:
        """The policy's full weights for the weight sync (HF names, tied tensors once; with LoRA its adapter) as
        pieces in lists of at most `bucket_bytes` each, produced one at a time, each tensor's pieces one after
        another. Ray workers cut a tensor bigger than a bucket by rows, so that the sync's extra memory is about
        one bucket; in this process they are views of the live tensors, whole (no copy to bound)."""
        ...

    def training_state(self) -> dict[str, Any]: ...

    def load_training_state(self, state: dict[str, Any], teacher_state: dict[str, torch.Tensor] | None) -> list[int]:
        """Load a checkpoint's training state; returns the optimizer-state bytes each rank was sent."""
        ...

    def peak_memory_mb(self) -> float:
        """Peak memory of the worker processes other than this one (0 when the actor runs here)."""
        ...

    def local_gpu_ids(self) -> list[int]:
        """The GPUs of this machine (torch's indexes in this process) that the workers hold: a split rollout
        engine takes others."""
        ...

    def shutdown(self) -> None: ...


class InProcessWorkers:
    """The actor in this process, on one device."""

    def __init__(self, actor: Actor):
        self.actor = actor

    def compute_distributions(self, batch: RolloutBatch) -> TeacherOutputs:
        return self.actor.compute_distributions(batch)

    def update_policy_with_distillation(self, batch: RolloutBatch, teacher_outputs: TeacherOutputs) -> UpdateStats:
        return self.actor.update_policy_with_distillation(batch, teacher_outputs)

    def full_state_dict(self, which: str = "student") -> dict[str, torch.Tensor]:
        return self.actor.full_state_dict(which)

    def iter_state_dict_buckets(self, bucket_bytes: int) -> Iterator[list[WeightPiece]]:
        # Whole tensors, never cut by rows: they are views, so a bucket costs no memory, and SGLang would have to
        # reassemble the rows into a copy. The buckets only bound how much one engine call takes (a tensor bigger
        # than a bucket goes alone).
        if self.actor.model_config.uses_lora:  # the adapter's master tensors (float32, as the engine's adapter)
            items = self.actor.policy_sync_items()
        else:  # the live compute-dtype parameters (the rollout's dtype), not the masters
            items = unique_state_items(self.actor.forward_module("student").lm)
        for bucket in bucketed(items, tensor_bytes, bucket_bytes):
            yield [WeightPiece(name, tensor) for name, tensor in bucket]

    def training_state(self) -> dict[str, Any]:
        return self.actor.training_state()

    def load_training_state(self, state: dict[str, Any], teacher_state: dict[str, torch.Tensor] | None) -> list[int]:
        self.actor.load_training_state(state, teacher_state)
        return [optimizer_state_bytes(state)]

    def peak_memory_mb(self) -> float:
        return 0.0  # the actor lives in this process, which the controller measures itself

    def local_gpu_ids(self) -> list[int]:
        device = self.actor.device
        return [device.index or 0] if device.type == "cuda" else []

    def shutdown(self) -> None:
        self.actor = None


def build_train_workers(model: ModelConfig, train: TrainConfig, loss: LossSpec, model_path: str, *, device: str,
                        teacher_path: str) -> TrainWorkers:
    """Ray workers with `train.use_ray`, else the actor in this process on `device`."""
    if train.use_ray:
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        return launch_train_workers(model, train, loss, model_path, device_type=device_type, teacher_path=teacher_path)
    return InProcessWorkers(Actor(model, train, loss, model_path, device=device, teacher_path=teacher_path))
