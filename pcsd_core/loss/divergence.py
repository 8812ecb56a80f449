"""Per-token divergence math on log-probabilities: the divergences and the three estimators.

Every function here maps one token's distributions to one number, vectorised over leading dims:
log-probs (..., K) -> (..., ). `pcsd_core.loss.distillation` (public API) and `pcsd_core.loss.chunked` (the
memory-bounded path) both call these, so the chunked and unchunked losses share one definition.

Conventions (also in the README):
- Teacher = P_t (target, stop-gradient), student = P_s.
- forward KL = KL(P_t || P_s) = sum_x P_t(x) (log P_t(x) - log P_s(x))   (the reference objective)
- reverse KL = KL(P_s || P_t)
- JSD(beta) = beta * KL(P_t || M) + (1 - beta) * KL(P_s || M),  M = beta * P_t + (1 - beta) * P_s
  (Eq. 1 of the GKD paper, arXiv 2306.13649, identical to TRL's `generalized_jsd_loss`). The endpoints are
  defined as the KLs: beta = 0 -> forward KL, beta = 1 -> reverse KL, exactly as TRL does. Note the
  interior formula itself tends to 0 at the endpoints (JSD(beta) ~ beta * forward KL for small beta), so
  the loss scale jumps at beta in {0, 1}; this is the published convention, kept for comparability.
- Temperature divides both logits before the softmax; the loss is not rescaled by temperature**2.
"""

from __future__ import annotations

import math

import torch

from pcsd_core.loss.spec import DIVERGENCES  # noqa: F401  (the names this module computes)

# Log-probabilities below this are treated as this value inside log-ratios. exp(-1e4) is 0 in every float
# format, so the floor never changes a term whose probability is representable; it only turns
# "teacher probability exactly 0 under reverse KL" (mathematically +inf) into a large finite penalty
# instead of inf/NaN gradients.
LOGPROB_FLOOR = -1.0e4



def _loss_dtype(tensor: torch.Tensor) -> torch.dtype:
    """Loss math runs in float32 at least (bf16/fp16 logits are upcast); float64 inputs stay float64."""
    return torch.promote_types(tensor.dtype, torch.float32)


def kl_from_logprobs(target_logprobs: torch.Tensor, other_logprobs: torch.Tensor) -> torch.Tensor:
    """KL(target || other) from log-probs (..., K) -> (...,). Zero-probability target entries add exactly 0."""
    target_probs = target_logprobs.exp()
    log_ratio = target_logprobs.clamp_min(LOGPROB_FLOOR) - other_logprobs.clamp_min(LOGPROB_FLOOR)
    return (target_probs * log_ratio).sum(-1)


def divergence_from_logprobs(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    divergence: str,
    beta: float,
) -> torch.Tensor:
    """One of the divergences between two normalised distributions given as log-probs (..., K) -> (...,).

    The teacher is detached here, so callers cannot accidentally push gradients into it.
    """
    teacher_logprobs = teacher_logprobs.detach()
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0.0):
        return kl_from_logprobs(teacher_logprobs, student_logprobs)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1.0):
        return kl_from_logprobs(student_logprobs, teacher_logprobs)
    if divergence != "jsd":
        raise ValueError(f"divergence ({divergence!r}) must be one of {DIVERGENCES}.")
    # log M = log(beta * P_t + (1 - beta) * P_s), stable via logsumexp over the two weighted terms.
    mixture_logprobs = torch.logaddexp(teacher_logprobs + math.log(beta), student_logprobs + math.log1p(-beta))
    teacher_to_mixture = kl_from_logprobs(teacher_logprobs, mixture_logprobs)
    student_to_mixture = kl_from_logprobs(student_logprobs, mixture_logprobs)
    return beta * teacher_to_mixture + (1.0 - beta) * student_to_mixture


def full_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str,
    beta: float,
    temperature: float,
) -> torch.Tensor:
    """Exact divergence over the whole vocabulary: logits (..., V) -> (...,)."""
    student_logprobs = torch.log_softmax(student_logits.to(_loss_dtype(student_logits)) / temperature, dim=-1)
    teacher_logprobs = torch.log_softmax(teacher_logits.detach().to(_loss_dtype(teacher_logits)) / temperature, dim=-1)
    return divergence_from_logprobs(student_logprobs, teacher_logprobs, divergence=divergence, beta=beta)


def topk_support(
    student_logits: torch.Tensor, teacher_logits: torch.Tensor, *, topk: int, topk_source: str
) -> torch.Tensor:
    """Token ids (..., k) of the source model's k most likely tokens (temperature does not change the order)."""
    source_logits = teacher_logits if topk_source == "teacher" else student_logits
    return torch.topk(source_logits.detach(), k=min(topk, source_logits.shape[-1]), dim=-1).indices


def _support_logprobs(logits: torch.Tensor, support: torch.Tensor, tail: str) -> torch.Tensor:
    """Log-probs on the top-k support (..., k), renormalised or followed by one tail bucket (..., k + 1)."""
    support_logits = logits.gather(-1, support)
    if tail == "renorm":
        return torch.log_softmax(support_logits, dim=-1)
    # Tail mass computed directly as logsumexp over the tokens outside the support (no 1 - p cancellation).
    full_lse = torch.logsumexp(logits, dim=-1, keepdim=True)
    outside_logits = logits.scatter(-1, support, float("-inf"))
    tail_logprob = torch.logsumexp(outside_logits, dim=-1, keepdim=True) - full_lse
    return torch.cat([support_logits - full_lse, tail_logprob], dim=-1)


def topk_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: str,
    beta: float,
    temperature: float,
    topk: int,
    topk_source: str,
    topk_tail: str,
) -> torch.Tensor:
    """Divergence restricted to the source's top-k tokens, renormalised or with a tail bucket: (..., V) -> (...,).

    With k >= V the support is the whole vocabulary and the tail is empty, so both variants equal the exact
    divergence; the (empty, -inf) tail bucket is dropped then, because its logsumexp has no gradient.
    """
    student_scaled = student_logits.to(_loss_dtype(student_logits)) / temperature
    teacher_scaled = teacher_logits.detach().to(_loss_dtype(teacher_logits)) / temperature
    support = topk_support(student_scaled, teacher_scaled, topk=topk, topk_source=topk_source)
    tail = "renorm" if support.shape[-1] >= student_logits.shape[-1] else topk_tail
    student_logprobs = _support_logprobs(student_scaled, support, tail)
    teacher_logprobs = _support_logprobs(teacher_scaled, support, tail)
    return divergence_from_logprobs(student_logprobs, teacher_logprobs, divergence=divergence, beta=beta)


def sampled_token_logprobs(logits: torch.Tensor, token_ids: torch.Tensor, temperature: float) -> torch.Tensor:
    """log P(token_ids) at the given temperature: logits (..., V), ids (...,) -> (...,)."""
    scaled = logits.to(_loss_dtype(logits)) / temperature
    chosen = scaled.gather(-1, token_ids.unsqueeze(-1)).squeeze(-1)
    return chosen - torch.logsumexp(scaled, dim=-1)


def sampled_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    token_ids: torch.Tensor,
    *,
    temperature: float,
    clip: float = 0.0,
) -> torch.Tensor:
    """On-policy distillation estimator of reverse KL from the sampled tokens y ~ P_s: (..., V) -> (...,).

    Value: the log-ratio r = log P_s(y) - log P_t(y) (an unbiased per-token estimate of KL(P_s || P_t)),
    clipped to [-clip, clip] when clip > 0. Gradient: stopgrad(r) * grad log P_s(y), i.e. the policy gradient
    with per-token advantage A = -r = log P_t(y) - log P_s(y); in expectation over y ~ P_s this is the
    gradient of KL(P_s || P_t). Same gradient as TRL's `r.detach() * log P_s(y)`, whose value is not the KL.
    """
    student_logprob = sampled_token_logprobs(student_logits, token_ids, temperature)
    teacher_logprob = sampled_token_logprobs(teacher_logits.detach(), token_ids, temperature)
    log_ratio = (student_logprob.clamp_min(LOGPROB_FLOOR) - teacher_logprob.clamp_min(LOGPROB_FLOOR)).detach()
    if clip > 0:
        log_ratio = log_ratio.clamp(-clip, clip)
    # value == log_ratio, gradient == log_ratio * d(student_logprob).
    return log_ratio + log_ratio * (student_logprob - student_logprob.detach())


def clip_token_loss(per_token: torch.Tensor, clip: float) -> torch.Tensor:
    """Cap each token's divergence at `clip` (0 = off); capped tokens contribute no gradient."""
    return per_token.clamp(max=clip) if clip > 0 else per_token
