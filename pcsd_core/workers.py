"""The train workers behind one interface: the actor in this process, or Ray workers holding FSDP2 shards.

The trainer calls the same methods on either (`TrainWorkers`): `compute_distributions`, `update`,
`full_state_dict`, `training_state`, `load_training_state`, `peak_memory_mb`, `shutdown`.
`build_train_workers(cfg, ...)` picks `InProcessWorkers` (one device, no Ray: tests, profiling, the CPU
default) or, with `train.use_ray`, `RayWorkers` from `launch_train_workers`.

`launch_train_workers(cfg, model_path)` reserves a placement group with one bundle per worker (1 CPU, or
1 CPU + 1 GPU), starts one `TrainWorker` in each bundle, and has them form a torch.distributed process group
(gloo on CPU, NCCL on GPU) at a master address/port the controller picked. Each worker builds an `Actor`
whose model is `fully_shard`-ed over that group. The controller calls the workers explicitly:

    parts = ray.get([worker.compute_distributions.remote(batch_ref) for worker in group.workers])

Every worker receives the whole `RolloutBatch` and takes its own rows by rank (`batch.worker_rows`), so the
ranks always run the same number of forward passes and their collectives line up. Methods that gather
full weights or optimizer state are collective: call them on all workers at once; rank 0 returns the data.
"""

from __future__ import annotations

import os
import socket
from dataclasses import dataclass
from typing import Any, Protocol

import torch

from pcsd_core.actor import Actor
from pcsd_core.batch import RolloutBatch, TeacherOutputs, UpdateStats
from pcsd_core.config import PCSDConfig


class TrainWorker:
    """One FSDP2 rank. Wrapped with `ray.remote` by `launch_train_workers`; plain Python otherwise."""

    def __init__(self, cfg: PCSDConfig, model_path: str, *, rank: int, world_size: int, master_addr: str,
                 master_port: int, device_type: str, teacher_path: str | None = None, threads: int = 1):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(threads)
        backend = "nccl" if device_type == "cuda" else "gloo"
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=rank,
                                world_size=world_size)
        # Ray sets CUDA_VISIBLE_DEVICES to this bundle's GPU, so it is always cuda:0 here.
        device = "cuda:0" if device_type == "cuda" else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(0)
        mesh = init_device_mesh(device_type, (world_size,))
        self.actor = Actor(cfg, model_path, device=device, rank=rank, world_size=world_size,
                           teacher_path=teacher_path, mesh=mesh)

    def compute_distributions(self, batch: RolloutBatch) -> TeacherOutputs:
        return self.actor.compute_distributions(batch)

    def update_policy_with_distillation(self, batch: RolloutBatch, teacher_outputs: TeacherOutputs) -> UpdateStats:
        return self.actor.update_policy_with_distillation(batch, teacher_outputs)

    def full_state_dict(self, which: str = "student") -> dict[str, torch.Tensor]:
        return self.actor.full_state_dict(which)

    def training_state(self) -> dict[str, Any]:
        return self.actor.training_state()

    def load_training_state(self, state: dict[str, Any], teacher_state: dict[str, torch.Tensor] | None) -> None:
        self.actor.load_training_state(state, teacher_state)

    def peak_memory_mb(self) -> float:
        return peak_memory_mb(self.actor.device)

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


class TrainWorkers(Protocol):
    """What the trainer asks of its workers, wherever they run."""

    def compute_distributions(self, batch: RolloutBatch) -> TeacherOutputs: ...

    def update(self, batch: RolloutBatch, teacher_outputs: TeacherOutputs) -> UpdateStats: ...

    def full_state_dict(self, which: str = "student") -> dict[str, torch.Tensor]: ...

    def training_state(self) -> dict[str, Any]: ...

    def load_training_state(self, state: dict[str, Any], teacher_state: dict[str, torch.Tensor] | None) -> None: ...

    def peak_memory_mb(self) -> float:
        """Peak memory of the worker processes other than this one (0 when the actor runs here)."""
        ...

    def shutdown(self) -> None: ...


class InProcessWorkers:
    """The actor in this process, on one device."""

    def __init__(self, actor: Actor):
        self.actor = actor

    def compute_distributions(self, batch: RolloutBatch) -> TeacherOutputs:
        return self.actor.compute_distributions(batch)

    def update(self, batch: RolloutBatch, teacher_outputs: TeacherOutputs) -> UpdateStats:
        return self.actor.update_policy_with_distillation(batch, teacher_outputs)

    def full_state_dict(self, which: str = "student") -> dict[str, torch.Tensor]:
        return self.actor.full_state_dict(which)

    def training_state(self) -> dict[str, Any]:
        return self.actor.training_state()

    def load_training_state(self, state: dict[str, Any], teacher_state: dict[str, torch.Tensor] | None) -> None:
        self.actor.load_training_state(state, teacher_state)

    def peak_memory_mb(self) -> float:
        return 0.0  # the actor lives in this process, which the controller measures itself

    def shutdown(self) -> None:
        self.actor = None


@dataclass
class RayWorkers:
    """FSDP2 ranks as Ray actors; every call goes to all ranks (the collectives need them all)."""

    workers: list[Any]  # Ray actor handles, rank order
    placement_group: Any
    owns_ray: bool = False  # this group started Ray, so shutting the group down also shuts Ray down

    def compute_distributions(self, batch: RolloutBatch) -> TeacherOutputs:
        import ray

        batch_ref = ray.put(batch)
        parts = ray.get([w.compute_distributions.remote(batch_ref) for w in self.workers])
        return TeacherOutputs(hidden=[hidden for part in parts for hidden in part.hidden])  # rank order = row order

    def update(self, batch: RolloutBatch, teacher_outputs: TeacherOutputs) -> UpdateStats:
        import ray

        batch_ref, teacher_ref = ray.put(batch), ray.put(teacher_outputs)
        parts = ray.get([w.update_policy_with_distillation.remote(batch_ref, teacher_ref) for w in self.workers])
        return UpdateStats.merged(parts)

    def full_state_dict(self, which: str = "student") -> dict[str, torch.Tensor]:
        import ray

        return ray.get([w.full_state_dict.remote(which) for w in self.workers])[0]  # collective; rank 0 has it

    def training_state(self) -> dict[str, Any]:
        import ray

        return ray.get([w.training_state.remote() for w in self.workers])[0]  # collective; rank 0 has it

    def load_training_state(self, state: dict[str, Any], teacher_state: dict[str, torch.Tensor] | None) -> None:
        import ray

        ray.get([w.load_training_state.remote(state, teacher_state) for w in self.workers])

    def peak_memory_mb(self) -> float:
        import ray

        return sum(ray.get([w.peak_memory_mb.remote() for w in self.workers]))

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        ray.get([worker.shutdown.remote() for worker in self.workers])
        for worker in self.workers:
            ray.kill(worker)
        remove_placement_group(self.placement_group)
        if self.owns_ray:
            ray.shutdown()


def build_train_workers(cfg: PCSDConfig, model_path: str, *, device: str, teacher_path: str) -> TrainWorkers:
    """Ray workers with `train.use_ray`, else the actor in this process on `device`."""
    if cfg.train.use_ray:
        device_type = "cuda" if device.startswith("cuda") else "cpu"
        return launch_train_workers(cfg, model_path, device_type=device_type, teacher_path=teacher_path)
    return InProcessWorkers(Actor(cfg, model_path, device=device, teacher_path=teacher_path))


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def ensure_ray() -> bool:
    """Start a local Ray instance unless one is already running; True when this call started it."""
    import ray

    if ray.is_initialized():
        return False
    ray.init(num_cpus=max(2, os.cpu_count() or 2), include_dashboard=False, configure_logging=False)
    return True


def launch_train_workers(cfg: PCSDConfig, model_path: str, *, device_type: str,
                         teacher_path: str | None = None) -> RayWorkers:
    """Placement group with one bundle per worker, one `TrainWorker` per bundle, one process group."""
    import ray
    from ray.util.placement_group import placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    owns_ray = ensure_ray()
    world_size = cfg.train.num_workers
    bundle = {"CPU": 1, "GPU": 1} if device_type == "cuda" else {"CPU": 1}
    group = placement_group([dict(bundle) for _ in range(world_size)], strategy="PACK")
    ray.get(group.ready(), timeout=120)
    remote_worker = ray.remote(TrainWorker)
    master_addr, master_port = "127.0.0.1", free_port()
    threads = max(1, (os.cpu_count() or 1) // world_size)
    workers = [
        remote_worker.options(
            num_cpus=1, num_gpus=1 if device_type == "cuda" else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(placement_group=group, placement_group_bundle_index=rank),
        ).remote(cfg, model_path, rank=rank, world_size=world_size, master_addr=master_addr, master_port=master_port,
                 device_type=device_type, teacher_path=teacher_path, threads=threads)
        for rank in range(world_size)
    ]
    ray.get([worker.peak_memory_mb.remote() for worker in workers])  # wait until every rank is built
    return RayWorkers(workers=workers, placement_group=group, owns_ray=owns_ray)
