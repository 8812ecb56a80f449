"""The `train:` section of the run config: steps, batches, optimizer, teacher, workers, validation, outputs.

Like every section (`pcsd_core.config.schema`), frozen and checked in `__post_init__`; an error names its field.
"""

from __future__ import annotations

import re
import warnings
from dataclasses import dataclass
from typing import Literal

from pcsd_core.config.fields import DTYPE_NAMES, check_field_types, require_text
from pcsd_core.errors import require

MAX_SEED = 2**32 - 1  # numpy's legacy seeding (and libraries built on it) take 32-bit seeds
LARGE_LR = 1e-2  # above this, full fine-tuning of a pretrained LM usually diverges
# What train.keep_best_by may rank validations by ("" keeps the last checkpoint): `summarize_scores` names.
KEEP_BEST_METRICS = ("", "accuracy_strict", "accuracy_flexible")


@dataclass(frozen=True)
class TrainConfig:
    total_training_steps: int = 4
    # Student prompts sampled per step; each gets `rollout.n` responses.
    prompts_per_step: int = 4
    # Passes over each rollout batch (the reference's PPO epochs).
    ppo_epochs: int = 1
    # Responses per optimizer step; (prompts_per_step * rollout.n) must be divisible by it.
    mini_batch_size: int = 8
    # Responses per forward/backward (gradient accumulation inside a mini-batch).
    micro_batch_size: int = 4
    # Score the responses of one prompt in one packed row holding the prompt once (a 4D attention mask keeps
    # them apart), instead of one padded row each: the prompt pass is shared by the rollout.n responses in a
    # micro-batch (make micro_batch_size a multiple of rollout.n). Same result; needs attn_implementation
    # sdpa or eager. With very long responses and large n the packed row's attention (quadratic) can cost
    # more than it saves: set false, as for flash_attention_2.
    share_prompt_prefix: bool = True
    lr: float = 1e-6
    # dtype of the master weights and the optimizer state (one of DTYPE_NAMES): what AdamW updates and what
    # checkpoints store. float32 (verl's choice): an Adam step of lr 1e-6 survives on every weight, where
    # bfloat16 masters (8 mantissa bits) keep it only for |w| < ~5e-4 and move ~1% of a model. Must be float32 or
    # model.dtype: masters narrower than the compute dtype would round every update away.
    master_dtype: Literal[DTYPE_NAMES] = "float32"
    warmup_steps: int = 0
    lr_schedule: Literal["constant", "cosine", "linear"] = "constant"
    weight_decay: float = 0.0
    # Max global gradient norm (0 = no clipping).
    grad_clip: float = 1.0
    seed: int = 0
    # Teacher weights: "live" (current policy, the reference), "frozen" (initial weights), "ema".
    teacher_mode: Literal["live", "frozen", "ema"] = "live"
    ema_rate: float = 0.05
    # Train workers (FSDP2 shards). 1 with `use_ray=False` runs in-process.
    num_workers: int = 1
    use_ray: bool = False
    # Nodes the workers spread over: num_workers / num_nodes workers on each of num_nodes distinct Ray nodes
    # (a placement group of one bundle per node, STRICT_SPREAD). 1 keeps every worker on one node.
    num_nodes: int = 1
    # Ray cluster to join, "host:port", "ray://host:port" or "auto" (KubeRay, `ray up`, a Metaflow-launched
    # cluster); empty: RAY_ADDRESS if set, else a local Ray started for this run. A joined cluster is never
    # shut down by the run.
    ray_address: str = ""
    # Weight sync streams the actor's weights to the rollout engine in buckets of at most this many MiB, each
    # rank sending rows of its own shard (a bigger tensor is cut by rows): the sync's extra memory is about one
    # bucket, not the whole model (SGLang, which loads whole tensors, adds the largest tensor).
    weight_sync_bucket_mb: int = 256
    # "cpu", "cuda" or "auto" (cuda when available).
    device: str = "auto"
    # Save a checkpoint every K steps (0 = only at the end).
    checkpoint_every: int = 0
    # Validation during training (`pcsd_core.eval.validation`), every K steps, before the first and after the last
    # (0 = off): greedy answers to eval.validation_questions held-out questions, taken off the END of the train
    # split and never trained on, scored like the final evaluation and logged under `val/`.
    validate_every: int = 0
    # Keep the checkpoint of the best validation instead of the last: "" (the last), "accuracy_strict" or
    # "accuracy_flexible"; ties go to the higher answer-format rate, then the lower repetition rate, then the earlier
    # step. The final evaluation and the registry then use that checkpoint. Needs validate_every.
    keep_best_by: Literal[KEEP_BEST_METRICS] = ""
    # End the branch when a validation's repetition rate (share of degenerate answers) is above this (0 = never).
    # Needs validate_every.
    stop_if_repetition_above: float = 0.0
    # A local folder, or (flow only) a storage URI that every step's machine reaches: s3://, gs://, file://
    output_dir: str = "outputs/run"
    # Checkpoint folder to continue from (same step, same data order).
    resume_from: str = ""

    def __post_init__(self) -> None:
        check_field_types(self, "train")  # also refuses inf/nan, e.g. lr inf
        require(self.total_training_steps >= 1, f"train.total_training_steps ({self.total_training_steps}) must be >= 1.")
        require(self.prompts_per_step >= 1, f"train.prompts_per_step ({self.prompts_per_step}) must be >= 1.")
        require(self.ppo_epochs >= 1, f"train.ppo_epochs ({self.ppo_epochs}) must be >= 1.")
        require(self.mini_batch_size >= 1, f"train.mini_batch_size ({self.mini_batch_size}) must be >= 1.")
        require(self.micro_batch_size >= 1, f"train.micro_batch_size ({self.micro_batch_size}) must be >= 1.")
        require(self.lr > 0, f"train.lr ({self.lr}) must be > 0.")
        if self.lr > LARGE_LR:
            warnings.warn(
                f"train.lr ({self.lr}) is above {LARGE_LR}; fine-tuning a pretrained model at this rate usually "
                "diverges (the presets use 1e-6 to 1e-5). Check the exponent.",
                stacklevel=2,
            )
        require(self.warmup_steps >= 0, f"train.warmup_steps ({self.warmup_steps}) must be >= 0.")
        require(self.weight_decay >= 0, f"train.weight_decay ({self.weight_decay}) must be >= 0 (0 disables it).")
        require(self.grad_clip >= 0, f"train.grad_clip ({self.grad_clip}) must be >= 0 (0 disables it).")
        require(0 <= self.seed <= MAX_SEED, f"train.seed ({self.seed}) must be in [0, {MAX_SEED}].")
        require(0 < self.ema_rate <= 1, f"train.ema_rate ({self.ema_rate}) must be in (0, 1].")
        require(self.num_workers >= 1, f"train.num_workers ({self.num_workers}) must be >= 1.")
        require(
            self.use_ray or self.num_workers == 1,
            f"train.num_workers ({self.num_workers}) > 1 needs train.use_ray: true.",
        )
        require(
            self.mini_batch_size % self.micro_batch_size == 0,
            f"train.mini_batch_size ({self.mini_batch_size}) must be a multiple of train.micro_batch_size "
            f"({self.micro_batch_size}); change one of them.",
        )
        require(self.num_nodes >= 1, f"train.num_nodes ({self.num_nodes}) must be >= 1.")
        require(
            self.num_workers % self.num_nodes == 0,
            f"train.num_nodes ({self.num_nodes}) must divide train.num_workers ({self.num_workers}) evenly (the same "
            "number of workers on every node); change one of them.",
        )
        require_text("train.ray_address", self.ray_address, allow_empty=True)
        require(
            self.ray_address == "" or re.fullmatch(r"auto|(ray://)?[^\s:/]+:\d{1,5}", self.ray_address) is not None,
            f"train.ray_address ({self.ray_address!r}) must be 'host:port', 'ray://host:port' or 'auto' (or empty "
            "for RAY_ADDRESS / a local Ray).",
        )
        require(
            self.use_ray or self.ray_address == "",
            f"train.ray_address ({self.ray_address!r}) needs train.use_ray: true (the in-process actor uses no Ray).",
        )
        require(
            self.weight_sync_bucket_mb >= 1,
            f"train.weight_sync_bucket_mb ({self.weight_sync_bucket_mb}) must be >= 1 (MiB per weight-sync bucket).",
        )
        require(self.device in ("auto", "cpu", "cuda"), f"train.device ({self.device!r}) must be auto, cpu or cuda.")
        require(
            self.checkpoint_every >= 0,
            f"train.checkpoint_every ({self.checkpoint_every}) must be >= 0 (0 = only at the end).",
        )
        require(self.validate_every >= 0, f"train.validate_every ({self.validate_every}) must be >= 0 (0 = off).")
        require(0 <= self.stop_if_repetition_above < 1,
                f"train.stop_if_repetition_above ({self.stop_if_repetition_above}) must be in [0, 1): a share of "
                "answers (0 = never stop).")
        for name, value in (("keep_best_by", self.keep_best_by), ("stop_if_repetition_above", self.stop_if_repetition_above)):
            require(not value or self.validate_every > 0,
                    f"train.{name} ({value!r}) acts on validations, which train.validate_every: 0 turns off; set "
                    f"train.validate_every (e.g. 4) or unset train.{name}.")
        require_text("train.output_dir", self.output_dir)
        # Whether resume_from holds a complete checkpoint is checked at setup (pcsd_core.engine.checkpoint), not here.
        require_text("train.resume_from", self.resume_from, allow_empty=True)

    def optimizer_steps(self, responses: int) -> int:
        """AdamW steps that one rollout batch of `responses` responses takes: ppo_epochs x its mini-batches."""
        return self.ppo_epochs * (responses // self.mini_batch_size)
