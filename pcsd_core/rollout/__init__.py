"""Rollout engines behind one interface (`base.RolloutEngine`): `hf` (transformers) and `sglang` (GPU)."""

from __future__ import annotations

from collections.abc import Sequence

from pcsd_core.errors import ConfigError, HardwareError
from pcsd_core.config.schema import PCSDConfig
from pcsd_core.models import resolve_device
from pcsd_core.rollout.base import Generation, RolloutEngine, SamplingParams

__all__ = ["Generation", "RolloutEngine", "SamplingParams", "create_rollout_engine"]


def create_rollout_engine(cfg: PCSDConfig, model_path: str, batch_size: int | None = None, *,
                          gpus_in_use: Sequence[int] = (), adapter_sync: bool = False) -> RolloutEngine:
    """Build the engine named by `cfg.rollout.engine` for the model at `model_path`.

    `batch_size` overrides `rollout.batch_size` for the HF engine (evaluation uses `eval.batch_size`).
    `adapter_sync` (training with `model.lora_rank >= 1`): the engine holds `model_path` as the base plus a LoRA
    adapter, and weight sync ships the adapter alone. Evaluation loads a model (or a merged adapter) as is.

    `hf` runs on `cfg.train.device` ("auto" = cuda when available). `sglang` placement follows
    `cfg.rollout.placement`: colocated shares the actor's first GPU (tp = rollout.num_gpus or 1). With placement
    split on CUDA, either engine takes the first rollout.num_gpus GPUs of this machine that `gpus_in_use` (the
    train workers' GPUs here, from `TrainWorkers.local_gpu_ids`; none in evaluation) leaves free.
    """
    rollout = cfg.rollout
    if rollout.engine == "hf":
        from pcsd_core.rollout.hf import HFRolloutEngine

        device = resolve_device(cfg.train.device)
        if device == "cuda" and rollout.placement == "split":
            device = f"cuda:{first_free_gpus(gpus_in_use, 1)}"
        return HFRolloutEngine(
            model_path,
            dtype=cfg.model.dtype,
            device=device,
            batch_size=batch_size or rollout.batch_size,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
            lora=cfg.model if adapter_sync and cfg.model.uses_lora else None,
        )
    if rollout.engine == "sglang":
        from pcsd_core.rollout.sglang import SGLangRolloutEngine

        tp_size = max(1, rollout.num_gpus)
        return SGLangRolloutEngine(
            model_path,
            placement=rollout.placement,
            tp_size=tp_size,
            base_gpu_id=first_free_gpus(gpus_in_use, tp_size) if rollout.placement == "split" else 0,
            mem_fraction_static=rollout.gpu_memory_utilization,
            dtype=cfg.model.dtype,
            seed=cfg.train.seed,
            lora=cfg.model if adapter_sync and cfg.model.uses_lora else None,
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
