"""Rollout engines behind one interface (`base.RolloutEngine`): `hf` (transformers) and `sglang` (GPU)."""

from __future__ import annotations

from collections.abc import Sequence

from pcsd_core.errors import ConfigError, HardwareError
from pcsd_core.config.schema import ModelConfig, RolloutConfig
from pcsd_core.models import resolve_device
from pcsd_core.rollout.base import Generation, RolloutEngine, SamplingParams

__all__ = ["Generation", "RolloutEngine", "SamplingParams", "create_rollout_engine", "weight_sync_sender_gpu"]


def create_rollout_engine(rollout: RolloutConfig, model: ModelConfig, model_path: str, *, device: str, seed: int,
                          batch_size: int | None = None, gpus_in_use: Sequence[int] = (), syncs_weights: bool = True,
                          adapter_sync: bool = False) -> RolloutEngine:
    """Build the engine named by `rollout.engine` for the model at `model_path` (`model`: its dtype, attention and
    LoRA settings; `device` and `seed`: the run's `train.device` and `train.seed`).

    `batch_size` overrides `rollout.batch_size` for the HF engine (evaluation uses `eval.batch_size`).
    `adapter_sync` (training with `model.lora_rank >= 1`): the engine holds `model_path` as the base plus a LoRA
    adapter, and weight sync ships the adapter alone. Evaluation loads a model (or a merged adapter) as is.

    `hf` runs on `device` ("auto" = cuda when available). `sglang` placement follows `rollout.placement`: colocated
    shares the actor's first GPU (tp = rollout.num_gpus or 1). With placement split on CUDA, either engine takes the
    first rollout.num_gpus GPUs of this machine that `gpus_in_use` (the train workers' GPUs here, from
    `TrainWorkers.local_gpu_ids`; none in evaluation) leaves free, and its weight sync is sent from the actor's own
    GPU (`weight_sync_sender_gpu`) unless `syncs_weights` is false (evaluation).
    """
    if rollout.engine == "hf":
        from pcsd_core.rollout.hf import HFRolloutEngine

        device = resolve_device(device)
        if device == "cuda" and rollout.placement == "split":
            device = f"cuda:{first_free_gpus(gpus_in_use, 1)}"
        return HFRolloutEngine(
            model_path,
            dtype=model.dtype,
            device=device,
            batch_size=batch_size or rollout.batch_size,
            attn_implementation=model.attn_implementation,
            trust_remote_code=model.trust_remote_code,
            lora=model if adapter_sync and model.uses_lora else None,
        )
    if rollout.engine == "sglang":
        from pcsd_core.rollout.sglang import SGLangRolloutEngine
        from pcsd_core.rollout.sglang_api import NcclWeightBroadcaster

        tp_size = max(1, rollout.num_gpus)
        base_gpu_id, broadcaster = 0, None
        if rollout.placement == "split":
            base_gpu_id = first_free_gpus(gpus_in_use, tp_size)
        lora_sync = adapter_sync and model.uses_lora  # the adapter goes in one API call: no NCCL group
        if rollout.placement == "split" and syncs_weights and not lora_sync:
            sender = weight_sync_sender_gpu(gpus_in_use, base_gpu_id, tp_size)
            broadcaster = NcclWeightBroadcaster(device=f"cuda:{sender}")
        return SGLangRolloutEngine(
            model_path,
            placement=rollout.placement,
            tp_size=tp_size,
            base_gpu_id=base_gpu_id,
            mem_fraction_static=rollout.gpu_memory_utilization,
            dtype=model.dtype,
            seed=seed,
            broadcaster=broadcaster,
            lora=model if lora_sync else None,
        )
    raise ConfigError(f"rollout.engine ({rollout.engine!r}) must be 'hf' or 'sglang'.")


def first_free_gpus(in_use: Sequence[int], count: int, visible: int | None = None) -> int:
    """The first GPU of `count` consecutive ones (SGLang takes base_gpu_id..base_gpu_id + tp - 1) that are not
    `in_use`; refuses, naming both, when this machine's `visible` GPUs (torch's count by default) end first."""
    busy = set(in_use)
    base = next(first for first in range(max(busy, default=0) + 2) if busy.isdisjoint(range(first, first + count)))
    if visible is None:
        import torch

        visible = torch.cuda.device_count()
    if base + count > visible:
        raise HardwareError(
            f"a split rollout needs {count} free GPU(s) on this machine, but the train workers hold GPU(s) "
            f"{sorted(busy)} of its {visible}: none of {count} consecutive ones is free. Give the rollout more "
            "GPUs here, lower rollout.num_gpus, or use rollout.placement 'colocated'.")
    return base


def weight_sync_sender_gpu(in_use: Sequence[int], rollout_base: int, rollout_gpus: int,
                           visible: int | None = None) -> int:
    """The GPU from which this process broadcasts the weights to a split SGLang rollout (rank 0 of the weight-sync
    NCCL group): the actor's own first GPU on this machine, else the first visible GPU the rollout does not use.
    Never one of the rollout's GPUs: NCCL refuses two ranks of one group on one GPU."""
    rollout = range(rollout_base, rollout_base + rollout_gpus)
    if in_use:
        sender = min(in_use)
    else:
        if visible is None:
            import torch

            visible = torch.cuda.device_count()
        sender = next((gpu for gpu in range(visible) if gpu not in rollout), None)
        if sender is None:
            raise HardwareError(
                f"the weight sync to a split rollout on GPU(s) {list(rollout)} needs a GPU of this machine outside "
                f"them to send from, and the train workers hold none here (of {visible} visible). Run the trainer "
                "where an actor GPU or a spare GPU is, or use rollout.placement 'colocated'.")
    if sender in rollout:
        raise HardwareError(f"weight-sync sender GPU {sender} is one of the split rollout's GPUs {list(rollout)}; "
                            "the actor's GPUs and the rollout's must not overlap.")
    return sender
