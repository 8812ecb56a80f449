"""Memory-bounded exact distillation loss from hidden states: logits are built one token chunk at a time.

Peer trainers materialise full-vocabulary logits for teacher and student ((N, V) fp32 each, ~0.8 GB for
N=2048, V=102,400) plus their log-softmaxes and gradients. Here a custom autograd Function walks the tokens in
chunks of `chunk_tokens` rows and, for each chunk (Liger-kernel style):

  1. student_logits = h_s[chunk] @ W_s^T, teacher_logits = h_t[chunk] @ W_t^T          # (c, V) each
  2. per-token divergence via `pcsd_core.loss_math` (the same code the unchunked path uses)
  3. d loss / d student_logits by autograd on that (c, V) graph only, then immediately
     grad_h[chunk] = g @ W_s and grad_W += g^T @ h_s[chunk]                              # exact gradients
  4. no-grad metrics on the same chunk; the chunk's tensors are then freed.

So at most one chunk's (c, V) tensors are alive, and backward only rescales the stored (N, H) and (V, H)
gradients by the incoming scalar gradient. Double backward is not supported (not needed for a loss).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from pcsd_core.loss_math import (
    LOGPROB_FLOOR,
    clip_token_loss,
    full_divergence,
    kl_from_logprobs,
    sampled_divergence,
    topk_divergence,
    topk_support,
)

# Seed of the generator that picks the tokens on which the top-k estimate is compared to the exact value,
# fixed so the metric is reproducible for the same batch.
_METRIC_SAMPLE_SEED = 0


@dataclass(frozen=True)
class LossSpec:
    """Scalar options of the loss, validated by `pcsd_core.losses.hidden_state_distillation_loss`."""

    divergence: str
    beta: float
    temperature: float
    estimator: str
    topk: int
    topk_source: str
    topk_tail: str
    token_clip: float
    chunk_tokens: int
    metric_sample_tokens: int


def chunk_token_loss(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    response_ids: torch.Tensor | None,
    spec: LossSpec,
) -> torch.Tensor:
    """Per-token loss (c,) of the configured estimator, after clipping; differentiable in student_logits."""
    if spec.estimator == "sampled":
        return sampled_divergence(
            student_logits, teacher_logits, response_ids, temperature=spec.temperature, clip=spec.token_clip
        )
    if spec.estimator == "topk":
        per_token = topk_divergence(
            student_logits,
            teacher_logits,
            divergence=spec.divergence,
            beta=spec.beta,
            temperature=spec.temperature,
            topk=spec.topk,
            topk_source=spec.topk_source,
            topk_tail=spec.topk_tail,
        )
    else:
        per_token = full_divergence(
            student_logits, teacher_logits, divergence=spec.divergence, beta=spec.beta, temperature=spec.temperature
        )
    return clip_token_loss(per_token, spec.token_clip)


def _entropy(logprobs: torch.Tensor) -> torch.Tensor:
    """Shannon entropy (...,) from log-probs (..., V); zero-probability entries add exactly 0."""
    return -(logprobs.exp() * logprobs.clamp_min(LOGPROB_FLOOR)).sum(-1)


@torch.no_grad()
def _chunk_metric_sums(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    gap_rows: torch.Tensor,
    spec: LossSpec,
) -> dict[str, float]:
    """Sums over the chunk's tokens of exact forward KL, entropies, top-k mass, and top-k gap on `gap_rows`."""
    student_logprobs = torch.log_softmax(student_logits / spec.temperature, dim=-1)
    teacher_logprobs = torch.log_softmax(teacher_logits / spec.temperature, dim=-1)
    sums = {
        "kl": kl_from_logprobs(teacher_logprobs, student_logprobs).sum().item(),
        "teacher_entropy": _entropy(teacher_logprobs).sum().item(),
        "student_entropy": _entropy(student_logprobs).sum().item(),
    }
    support = topk_support(student_logits, teacher_logits, topk=spec.topk, topk_source=spec.topk_source)
    sums["topk_mass"] = teacher_logprobs.gather(-1, support).exp().sum().item()
    del student_logprobs, teacher_logprobs
    sums["topk_gap"], sums["topk_exact"], sums["gap_tokens"] = 0.0, 0.0, float(gap_rows.numel())
    if gap_rows.numel() > 0:
        options = dict(divergence=spec.divergence, beta=spec.beta, temperature=spec.temperature)
        exact = full_divergence(student_logits[gap_rows], teacher_logits[gap_rows], **options)
        estimate = topk_divergence(
            student_logits[gap_rows],
            teacher_logits[gap_rows],
            topk=spec.topk,
            topk_source=spec.topk_source,
            topk_tail=spec.topk_tail,
            **options,
        )
        sums["topk_gap"] = (estimate - exact).abs().sum().item()
        sums["topk_exact"] = exact.abs().sum().item()
    return sums


def _pick_gap_rows(num_tokens: int, num_samples: int, device: torch.device) -> torch.Tensor:
    """A reproducible random subset of token rows on which the top-k estimate is compared to the exact value."""
    generator = torch.Generator().manual_seed(_METRIC_SAMPLE_SEED)
    rows = torch.randperm(num_tokens, generator=generator)[: min(num_samples, num_tokens)]
    return rows.sort().values.to(device)


def _finalise_metrics(sums: dict[str, float], num_tokens: int) -> dict[str, float]:
    """Turn summed chunk metrics into per-token means; all zeros when no token was counted."""
    denominator = max(num_tokens, 1)
    metrics = {name: sums.get(name, 0.0) / denominator for name in ("kl", "teacher_entropy", "student_entropy")}
    metrics["topk_mass"] = sums.get("topk_mass", 0.0) / denominator
    gap_tokens = max(sums.get("gap_tokens", 0.0), 1.0)
    metrics["topk_gap"] = sums.get("topk_gap", 0.0) / gap_tokens
    metrics["topk_gap_rel"] = sums.get("topk_gap", 0.0) / max(sums.get("topk_exact", 0.0), 1e-12)
    metrics["tokens"] = float(num_tokens)
    return metrics


class ChunkedDistillation(torch.autograd.Function):
    """loss = sum_i weights_i * per_token_i over compacted response rows, gradients computed in forward."""

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, weights, response_ids, spec,
                metrics_out):
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens = student_hidden.shape[0]
        grad_hidden = torch.zeros_like(student_hidden) if want_hidden_grad else None
        grad_weight = torch.zeros_like(student_weight) if want_weight_grad else None
        loss_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        per_token = torch.zeros(num_tokens, dtype=loss_dtype, device=student_hidden.device)
        gap_rows = _pick_gap_rows(num_tokens, spec.metric_sample_tokens, student_hidden.device)
        sums: dict[str, float] = {}
        for start in range(0, num_tokens, spec.chunk_tokens):
            rows = slice(start, min(start + spec.chunk_tokens, num_tokens))
            chunk_hidden = student_hidden[rows]
            with torch.enable_grad():
                student_logits = (chunk_hidden @ student_weight.T).to(loss_dtype).requires_grad_(True)
                teacher_logits = (teacher_hidden[rows] @ teacher_weight.T).to(loss_dtype)
                chunk_ids = None if response_ids is None else response_ids[rows]
                chunk_loss_per_token = chunk_token_loss(student_logits, teacher_logits, chunk_ids, spec)
                if want_hidden_grad or want_weight_grad:
                    chunk_loss = (chunk_loss_per_token * weights[rows].to(loss_dtype)).sum()
                    (grad_logits,) = torch.autograd.grad(chunk_loss, student_logits)
                    grad_logits = grad_logits.to(student_weight.dtype)
                    if want_hidden_grad:
                        grad_hidden[rows] = grad_logits @ student_weight
                    if want_weight_grad:
                        grad_weight.addmm_(grad_logits.T, chunk_hidden)
                    del grad_logits
            per_token[rows] = chunk_loss_per_token.detach()
            del chunk_loss_per_token
            in_chunk = gap_rows[(gap_rows >= rows.start) & (gap_rows < rows.stop)] - rows.start
            for name, value in _chunk_metric_sums(student_logits.detach(), teacher_logits, in_chunk, spec).items():
                sums[name] = sums.get(name, 0.0) + value
            del student_logits, teacher_logits
        metrics_out.update(_finalise_metrics(sums, num_tokens))
        ctx.save_for_backward(grad_hidden, grad_weight)
        ctx.mark_non_differentiable(per_token)
        return (per_token * weights.to(loss_dtype)).sum(), per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        grad_hidden, grad_weight = ctx.saved_tensors
        # The usual upstream gradient is exactly 1; skipping the multiply avoids a second (V, H) buffer.
        if grad_loss.item() != 1.0:
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    weights: torch.Tensor,
    response_ids: torch.Tensor | None,
    spec: LossSpec,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(loss, per_token (N,), metrics) computing only rows with weight != 0; other rows get per_token 0."""
    counted = (weights != 0).nonzero().squeeze(-1)
    metrics: dict[str, float] = {}
    compact_ids = None if response_ids is None else response_ids[counted]
    loss, compact_per_token = ChunkedDistillation.apply(
        student_hidden[counted],
        student_weight,
        teacher_hidden.detach()[counted],
        teacher_weight.detach(),
        weights[counted].detach(),
        compact_ids,
        spec,
        metrics,
    )
    per_token = torch.zeros(weights.shape[0], dtype=compact_per_token.dtype, device=weights.device)
    per_token[counted] = compact_per_token
    return loss, per_token, metrics
