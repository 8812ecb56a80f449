"""Distillation divergences between the teacher (stop-gradient) and student next-token distributions.

STUB: signatures agreed between the engine and the loss implementation; the loss helper replaces the
bodies (and may add private helpers / split modules), keeping these public names and arguments.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import torch

Divergence = Literal["forward_kl", "reverse_kl", "jsd"]


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact per-token divergence over the full vocabulary: logits (..., T, V) -> (..., T).

    Teacher logits are treated as constants (no gradient flows into them).
    """
    raise NotImplementedError


def token_weights(
    response_mask: torch.Tensor,
    *,
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean",
    skip_first_tokens: int = 0,
    num_tokens_in_batch: float | None = None,
    num_sequences_in_batch: int | None = None,
) -> torch.Tensor:
    """Per-token weights (B, T) whose dot product with per-token losses is the batch loss.

    For gradient accumulation pass the totals of the whole (mini-)batch, so the sum of micro-batch
    losses equals the loss of the whole batch.
    """
    raise NotImplementedError


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. student inputs: sum(weights * per_token)
    per_token: torch.Tensor  # (N,) detached per-token divergence (after clipping), for metrics
    metrics: dict[str, float]  # kl, teacher_entropy, student_entropy, topk_mass, topk_gap, ...


def hidden_state_distillation_loss(
    student_hidden: torch.Tensor,  # (N, H) student final hidden states at response positions
    teacher_hidden: torch.Tensor,  # (N, H) teacher final hidden states at the same response tokens (no grad)
    student_weight: torch.Tensor,  # (V, H) output projection (lm_head) weight, gets gradients
    weights: torch.Tensor,  # (N,) per-token weights from `token_weights` (0 for masked tokens)
    *,
    teacher_weight: torch.Tensor | None = None,  # (V, H) teacher lm_head (frozen/EMA teacher); default: student_weight, detached
    response_ids: torch.Tensor | None = None,  # (N,) sampled tokens, needed by the `sampled` estimator
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
    estimator: Literal["full", "topk", "sampled"] = "full",
    topk: int = 64,
    topk_source: Literal["teacher", "student"] = "teacher",
    topk_tail: Literal["renorm", "tail_bucket"] = "tail_bucket",
    token_clip: float = 0.0,
    chunk_tokens: int = 1024,
) -> LossOutput:
    """Memory-bounded loss from hidden states: never holds (N, V) logits for teacher and student at once."""
    raise NotImplementedError
