"""The actor as Ray workers holding FSDP2 shards: one `TrainWorker` per rank, driven by `RayWorkers`.

`launch_train_workers(model, train, loss, model_path)` (the config sections the actor reads) joins the Ray cluster
at `train.ray_address` / RAY_ADDRESS (or starts a local Ray: `ray_cluster.ensure_ray`), reserves one
placement-group bundle per node on `train.num_nodes` distinct nodes, starts one `TrainWorker` per rank in its
node's bundle, and has them form a torch.distributed process group (gloo on CPU, NCCL on GPU) at rank 0's node IP
and a port free there. Each worker builds an `Actor` whose model is `fully_shard`-ed over that group. The
controller calls the workers explicitly:

    parts = self._get([worker.compute_distributions.remote(batch_ref) for worker in self.workers], "...")

Every worker receives the whole `RolloutBatch` and takes its own rows by rank (`batch.worker_rows`), so the
ranks always run the same number of forward passes and their collectives line up. Methods that gather
full weights or optimizer state are collective: call them on all workers at once; rank 0 returns the data.
The weight sync (`iter_state_dict_buckets`) gathers nothing: each rank sends rows of its own shard, one bucket
at a time (`weight_sync.py`).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from typing import Any, Iterator

import torch

from pcsd_core.config.schema import ModelConfig
from pcsd_core.config.train import TrainConfig
from pcsd_core.distributed.ray_cluster import ensure_ray, free_port, local_gpu_indexes, placement_bundles
from pcsd_core.distributed.weight_sync import (RowSlice, WeightPiece, cast_for_wire, local_shards, plan_row_buckets,
                                               read_rows, shard_layout, tensor_to_wire, wire_to_tensor)
from pcsd_core.engine.actor import Actor
from pcsd_core.engine.batch import RolloutBatch, TeacherOutputs, UpdateStats
from pcsd_core.engine.checkpoint import optimizer_state_bytes
from pcsd_core.loss.spec import LossSpec
from pcsd_core.models import peak_memory_mb

# Bounds on waiting for Ray workers, so that nothing hangs until a job's wall-clock limit: a collective whose
# peer died fails after COLLECTIVE_TIMEOUT_S; a call none of whose ranks died but that has not answered fails
# after CALL_TIMEOUT_S (a step of a large model on a slow node stays well inside it).
COLLECTIVE_TIMEOUT_S = 600
CALL_TIMEOUT_S = 3600
PLACEMENT_TIMEOUT_S = 120


class TrainWorker:
    """One FSDP2 rank. Wrapped with `ray.remote` by `launch_train_workers`; plain Python otherwise.

    Built in two calls so that rank 0 can report its own node's address before anyone joins the process group:
    the constructor only places the process (`node_id`, `rendezvous_address`), `start` joins and loads.
    """

    def __init__(self, *, rank: int, world_size: int, threads: int = 1):
        self.rank, self.world_size, self.threads = rank, world_size, threads
        self.actor: Actor | None = None

    def node_id(self) -> str:
        import ray

        return ray.get_runtime_context().get_node_id()

    def node_ip(self) -> str:
        import ray.util

        return ray.util.get_node_ip_address()

    def gpu_ids(self) -> list[int | str]:
        """The GPUs Ray gave this worker, as its node numbers them (CUDA_VISIBLE_DEVICES entries)."""
        import ray

        return ray.get_gpu_ids()

    def rendezvous_address(self) -> tuple[str, int]:
        """This node's IP as Ray reports it and a port free on this node: the process group's master address."""
        return self.node_ip(), free_port("")

    def start(self, model: ModelConfig, train: TrainConfig, loss: LossSpec, model_path: str, *, master_addr: str,
              master_port: int, device_type: str, teacher_path: str | None = None) -> None:
        import datetime

        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        torch.set_num_threads(self.threads)
        backend = "nccl" if device_type == "cuda" else "gloo"
        # A peer that dies mid-collective fails the survivors after this long instead of the 30-minute default.
        dist.init_process_group(backend, init_method=f"tcp://{master_addr}:{master_port}", rank=self.rank,
                                world_size=self.world_size, timeout=datetime.timedelta(seconds=COLLECTIVE_TIMEOUT_S))
        # Ray sets CUDA_VISIBLE_DEVICES to this bundle's GPU, so it is always cuda:0 here.
        device = "cuda:0" if device_type == "cuda" else "cpu"
        if device_type == "cuda":
            torch.cuda.set_device(0)
        mesh = init_device_mesh(device_type, (self.world_size,))
        self.actor = Actor(model, train, loss, model_path, device=device, rank=self.rank, world_size=self.world_size,
                           teacher_path=teacher_path, mesh=mesh)

    def compute_distributions(self, batch: RolloutBatch) -> TeacherOutputs:
        return self.actor.compute_distributions(batch)

    def update_policy_with_distillation(self, batch: RolloutBatch, teacher_outputs: TeacherOutputs) -> UpdateStats:
        return self.actor.update_policy_with_distillation(batch, teacher_outputs)

    def full_state_dict(self, which: str = "student") -> list[tuple[str, Any, str]]:
        """Rank 0's unsharded weights as wire arrays (`tensor_to_wire`), as the sync buckets travel: numpy arrays
        cross the object store without a copy or a pickle of torch storages."""
        return [tensor_to_wire(name, tensor) for name, tensor in self.actor.full_state_dict(which).items()]

    def shard_layout(self) -> list[tuple[str, int, tuple[int, ...], int]]:
        """(name, rows this rank sends, global shape, element bytes on the wire) per tensor, for `plan_row_buckets`."""
        return shard_layout(local_shards(self.actor.policy_sync_items(), self.rank), self._wire_dtype())

    def read_rows(self, slices: list[RowSlice]) -> list[tuple[str, Any, str]]:
        """The rows `slices` (this rank's) name, from this rank's own shards: no collective.

        The shards hold the masters (train.master_dtype); the rows go out cast to the rollout engine's dtype
        (model.dtype): the engine gets what it computes with, and a bf16 sync moves half the bytes of a float32 one.
        Numpy arrays, which the Ray object store hands to the controller without a copy (torch tensors would be
        pickled); `wire_to_tensor` turns them back.
        """
        shards = local_shards(self.actor.policy_sync_items(), self.rank)
        return [tensor_to_wire(piece.name, cast_for_wire(read_rows(shards, piece).tensor, self._wire_dtype()))
                for piece in slices]

    def _wire_dtype(self) -> torch.dtype | None:
        """The rollout engine's dtype (model.dtype) for full weights; None (as held) for a LoRA adapter, which the
        engine keeps in float32 as peft does, and which is megabytes anyway."""
        from pcsd_core.models import DTYPES

        return None if self.actor.model_config.uses_lora else DTYPES[self.actor.model_config.dtype]

    def training_state(self) -> dict[str, Any]:
        return self.actor.training_state()

    def load_training_state(self, state: dict[str, Any], teacher_state: dict[str, torch.Tensor] | None) -> int:
        """Loads the state (collective); returns the optimizer-state bytes this rank was sent (0 off rank 0)."""
        self.actor.load_training_state(state, teacher_state)
        return optimizer_state_bytes(state)

    def peak_memory_mb(self) -> float:
        return peak_memory_mb(self.actor.device) if self.actor else 0.0

    def pid(self) -> int:
        return os.getpid()

    def shutdown(self) -> None:
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()


@dataclass
class RayWorkers:
    """FSDP2 ranks as Ray actors; every call goes to all ranks (the collectives need them all).

    Every call waits through `_get`: a rank that dies (its process, or its node) fails the call at once with
    the rank and node named, instead of leaving the other ranks blocked in a collective.
    """

    workers: list[Any]  # Ray actor handles, rank order
    placement_group: Any
    owns_ray: bool = False  # this group started Ray, so shutting the group down also shuts Ray down
    nodes: list[str] = field(default_factory=list)  # per rank: "<ip> (node <id>)"
    node_ids: list[str] = field(default_factory=list)  # per rank: Ray's node id

    def compute_distributions(self, batch: RolloutBatch) -> TeacherOutputs:
        import ray

        batch_ref = ray.put(batch)
        parts = self._get([w.compute_distributions.remote(batch_ref) for w in self.workers], "compute_distributions")
        # Each rank scored its own rows: rank order = row order. Every rank has the reference states, or none does.
        reference = None if parts[0].reference_hidden is None else \
            [hidden for part in parts for hidden in part.reference_hidden]
        return TeacherOutputs(hidden=[hidden for part in parts for hidden in part.hidden], reference_hidden=reference)

    def update_policy_with_distillation(self, batch: RolloutBatch, teacher_outputs: TeacherOutputs) -> UpdateStats:
        import ray

        batch_ref, teacher_ref = ray.put(batch), ray.put(teacher_outputs)
        parts = self._get([w.update_policy_with_distillation.remote(batch_ref, teacher_ref) for w in self.workers],
                          "update_policy_with_distillation")
        return UpdateStats.merged(parts)

    def full_state_dict(self, which: str = "student") -> dict[str, torch.Tensor]:
        wire = self._get([w.full_state_dict.remote(which) for w in self.workers], "full_state_dict")[0]  # rank 0
        return dict(wire_to_tensor(item) for item in wire)

    def iter_state_dict_buckets(self, bucket_bytes: int) -> Iterator[list[WeightPiece]]:
        # One Ray round trip per bucket: each rank reads the bucket's rows of its own shards (no collective) and
        # ships them through the object store; the next bucket is read only when the consumer asks for it.
        layouts = self._get([w.shard_layout.remote() for w in self.workers], "weight sync layout")
        for bucket in plan_row_buckets(layouts, bucket_bytes):
            # Every rank is called, those with nothing in this bucket with [], so results stay in rank order.
            parts = self._get([w.read_rows.remote([piece for piece in bucket if piece.rank == rank])
                               for rank, w in enumerate(self.workers)], "weight sync")
            arrays = [iter(part) for part in parts]
            pieces = [WeightPiece(piece.name, wire_to_tensor(next(arrays[piece.rank]))[1], piece.row_start,
                                  piece.full_rows) for piece in bucket]
            del parts, arrays  # the pieces alone hold the object-store buffers, and `drain` lets them go
            yield pieces

    def training_state(self) -> dict[str, Any]:
        return self._get([w.training_state.remote() for w in self.workers], "training_state")[0]  # rank 0

    def load_training_state(self, state: dict[str, Any], teacher_state: dict[str, torch.Tensor] | None) -> list[int]:
        import ray

        # One object-store copy, which rank 0 alone reads; FSDP broadcasts the shards from it
        # (`broadcast_from_rank0`). The other ranks get the scheduler state and an empty optimizer (and teacher)
        # state. Passed by value to every rank, the full state (56 GB of AdamW moments at 7B) was copied and
        # deserialised once per rank.
        state_ref = ray.put(state)
        teacher_ref = None if teacher_state is None else ray.put(teacher_state)
        others = ({"scheduler": state["scheduler"]}, None if teacher_state is None else {})
        return self._get([w.load_training_state.remote(*((state_ref, teacher_ref) if rank == 0 else others))
                          for rank, w in enumerate(self.workers)], "load_training_state")

    def peak_memory_mb(self) -> float:
        return sum(self._get([w.peak_memory_mb.remote() for w in self.workers], "peak_memory_mb"))

    def local_gpu_ids(self) -> list[int]:
        # Only the ranks on this process's own Ray node hold GPUs of this machine; Ray numbers a node's GPUs by
        # the node's CUDA_VISIBLE_DEVICES entries, torch by their position in this process's.
        import ray

        here = ray.get_runtime_context().get_node_id()
        held = self._get([w.gpu_ids.remote() for w in self.workers], "gpu_ids")
        return local_gpu_indexes([gpu for node, gpus in zip(self.node_ids, held) for gpu in gpus if node == here],
                                 os.environ.get("CUDA_VISIBLE_DEVICES"))

    def _get(self, refs: list[Any], what: str, timeout_s: float = CALL_TIMEOUT_S) -> list[Any]:
        """Results in rank order; the first rank to die raises RuntimeError naming it and its node."""
        return wait_for_ranks(refs, what, nodes=self.nodes, timeout_s=timeout_s)

    def shutdown(self) -> None:
        import ray
        from ray.util.placement_group import remove_placement_group

        # Leave the process group cleanly where a rank can; a dead or stuck rank is simply killed.
        ray.wait([worker.shutdown.remote() for worker in self.workers], num_returns=len(self.workers), timeout=10)
        for worker in self.workers:
            ray.kill(worker)
        remove_placement_group(self.placement_group)
        if self.owns_ray:
            ray.shutdown()


def wait_for_ranks(refs: list[Any], what: str, *, nodes: list[str], timeout_s: float) -> list[Any]:
    """ray.get of one call per rank, failing as soon as any rank's worker died (not when all have answered)."""
    import ray
    from ray.exceptions import RayActorError

    rank_of = {ref: rank for rank, ref in enumerate(refs)}
    pending, deadline = list(refs), time.monotonic() + timeout_s
    while pending:
        done, pending = ray.wait(pending, num_returns=1, timeout=max(0.0, deadline - time.monotonic()))
        if not done:
            late = sorted(rank_of[ref] for ref in pending)
            raise TimeoutError(f"train workers {what}: rank(s) {late} did not answer within {timeout_s:.0f} s; a "
                               "rank may be stuck in a collective (a peer or the network gone).")
        try:
            ray.get(done[0])
        except RayActorError as error:
            rank = rank_of[done[0]]
            node = nodes[rank] if rank < len(nodes) else "unknown"
            raise RuntimeError(f"train worker rank {rank} on node {node} died during {what}: {error}") from error
    return ray.get(list(refs))


def launch_train_workers(model: ModelConfig, train: TrainConfig, loss: LossSpec, model_path: str, *,
                         device_type: str, teacher_path: str | None = None) -> RayWorkers:
    """Placement group over `train.num_nodes` nodes, one `TrainWorker` per rank, one process group at rank 0's node."""
    import ray
    from ray.exceptions import GetTimeoutError
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    owns_ray = ensure_ray(train.ray_address)
    world_size, num_nodes = train.num_workers, train.num_nodes
    bundles, strategy = placement_bundles(world_size, num_nodes, device_type)
    group = placement_group(bundles, strategy=strategy)
    try:
        ray.get(group.ready(), timeout=PLACEMENT_TIMEOUT_S)
    except GetTimeoutError:
        remove_placement_group(group)
        raise RuntimeError(
            f"train.num_workers ({world_size}) on train.num_nodes ({num_nodes}) needs {num_nodes} node(s) with "
            f"{bundles[0]} free each; Ray found none within {PLACEMENT_TIMEOUT_S} s (cluster resources: "
            f"{ray.available_resources()}). Lower train.num_workers/num_nodes or add nodes.") from None
    threads = max(1, (os.cpu_count() or 1) // world_size)
    workers = [
        ray.remote(TrainWorker).options(
            num_cpus=1, num_gpus=1 if device_type == "cuda" else 0,
            scheduling_strategy=PlacementGroupSchedulingStrategy(
                placement_group=group, placement_group_bundle_index=rank // (world_size // num_nodes)),
        ).remote(rank=rank, world_size=world_size, threads=threads)
        for rank in range(world_size)
    ]
    ips, node_ids = ray.get([w.node_ip.remote() for w in workers]), ray.get([w.node_id.remote() for w in workers])
    group_workers = RayWorkers(workers=workers, placement_group=group, owns_ray=owns_ray, node_ids=node_ids,
                               nodes=[f"{ip} (node {node_id})" for ip, node_id in zip(ips, node_ids)])
    try:
        # The rendezvous is rank 0's own node, at a port free there: other nodes reach it, 127.0.0.1 they would not.
        master_addr, master_port = group_workers._get([workers[0].rendezvous_address.remote()], "rendezvous")[0]
        group_workers._get([w.start.remote(model, train, loss, model_path, master_addr=master_addr,
                                           master_port=master_port, device_type=device_type, teacher_path=teacher_path)
                            for w in workers], "start")
    except BaseException:
        group_workers.shutdown()
        raise
    return group_workers
