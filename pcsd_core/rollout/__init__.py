"""Rollout engines behind one interface (`base.RolloutEngine`): `hf` (transformers) and `sglang` (GPU)."""

from __future__ import annotations

from pcsd_core.config import PCSDConfig
from pcsd_core.models import resolve_device
from pcsd_core.rollout.base import Generation, RolloutEngine, SamplingParams

__all__ = ["Generation", "RolloutEngine", "SamplingParams", "create_rollout_engine"]


def create_rollout_engine(cfg: PCSDConfig, model_path: str, batch_size: int | None = None) -> RolloutEngine:
    """Build the engine named by `cfg.rollout.engine` for the model at `model_path`.

    `batch_size` overrides `rollout.batch_size` for the HF engine (evaluation uses `eval.batch_size`).

    `hf` runs on `cfg.train.device` ("auto" = cuda when available); with placement split on CUDA it
    takes the first GPU after the actor's train.num_workers GPUs. `sglang` placement follows
    `cfg.rollout.placement`: colocated shares the actor's first GPUs (tp = rollout.num_gpus or 1);
    split puts the rollout on rollout.num_gpus GPUs after the train.num_workers actor GPUs.
    """
    rollout = cfg.rollout
    if rollout.engine == "hf":
        from pcsd_core.rollout.hf import HFRolloutEngine

        device = resolve_device(cfg.train.device)
        if device == "cuda" and rollout.placement == "split":
            device = f"cuda:{cfg.train.num_workers}"
        return HFRolloutEngine(
            model_path,
            dtype=cfg.model.dtype,
            device=device,
            batch_size=batch_size or rollout.batch_size,
            attn_implementation=cfg.model.attn_implementation,
            trust_remote_code=cfg.model.trust_remote_code,
        )
    if rollout.engine == "sglang":
        from pcsd_core.rollout.sglang import SGLangRolloutEngine

        split = rollout.placement == "split"
        return SGLangRolloutEngine(
            model_path,
            placement=rollout.placement,
            tp_size=max(1, rollout.num_gpus),
            base_gpu_id=cfg.train.num_workers if split else 0,
            mem_fraction_static=rollout.gpu_memory_utilization,
            dtype=cfg.model.dtype,
            seed=cfg.train.seed,
        )
    raise ValueError(f"rollout.engine ({rollout.engine!r}) must be 'hf' or 'sglang'.")
