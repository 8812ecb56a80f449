"""Memory-bounded exact distillation loss from hidden states: logits are built one token chunk at a time.

Peer trainers materialise full-vocabulary logits for teacher and student ((N, V) fp32 each, ~0.8 GB for
N=2048, V=102,400) plus their log-softmaxes and gradients. Here a custom autograd Function walks the tokens in
chunks of `chunk_tokens` rows and, for each chunk (Liger-kernel style):

  1. student_logits = h_s[chunk] @ W_s^T, teacher_logits = h_t[chunk] @ W_t^T          # (c, V) each
  2. per-token divergence via `pcsd_core.loss.divergence` (the same code the unchunked path uses)
  3. d loss / d student_logits by autograd on that (c, V) graph only, then immediately
     grad_h[chunk] = g @ W_s and grad_W += g^T @ h_s[chunk]                              # exact gradients
  4. no-grad metrics on the same chunk; the chunk's tensors are then freed.

With a reference anchor (`LossSpec.ref_kl_coef` > 0 and reference hidden states), step 1 also builds
reference_logits = h_ref[chunk] @ W_ref^T, and `_reference_kl_step` adds ref_kl_coef * KL(P_s || P_ref) to each
token's loss and its analytic gradient to g, before step 2 overwrites the student logits.

So at most one chunk's (c, V) tensors are alive, and backward only rescales the stored (N, H) and (V, H)
gradients by the incoming scalar gradient. Double backward is not supported (not needed for a loss).
"""

from __future__ import annotations

import torch

from pcsd_core.loss.divergence import (
    LOGPROB_FLOOR,
    clip_token_loss,
    full_divergence,
    kl_from_logprobs,
    sampled_divergence,
    topk_divergence,
    topk_support,
)
from pcsd_core.loss.spec import LossSpec

# Seed of the generator that picks the tokens on which the top-k estimate is compared to the exact value,
# fixed so the metric is reproducible for the same batch.
_METRIC_SAMPLE_SEED = 0


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


@torch.no_grad()
def _gap_sums(student_logits: torch.Tensor, teacher_logits: torch.Tensor, spec: LossSpec) -> dict[str, float]:
    """Summed |topk estimate - exact| (and |exact|) on a few token rows, to measure the top-k error."""
    if student_logits.shape[0] == 0:
        return {}
    options = dict(divergence=spec.divergence, beta=spec.beta, temperature=spec.temperature)
    exact = full_divergence(student_logits, teacher_logits, **options)
    estimate = topk_divergence(student_logits, teacher_logits, topk=spec.topk, topk_source=spec.topk_source,
                               topk_tail=spec.topk_tail, **options)
    return {"topk_gap": (estimate - exact).abs().sum().item(), "topk_exact": exact.abs().sum().item(),
            "gap_tokens": float(exact.numel())}


def _row_dot(left: torch.Tensor, right: torch.Tensor) -> torch.Tensor:
    """Per-row dot product (c, V) x (c, V) -> (c,) without a (c, V) temporary."""
    return torch.bmm(left.unsqueeze(1), right.unsqueeze(2)).reshape(-1)


@torch.no_grad()
def _distribution_sums(student_logprobs, teacher_logprobs, teacher_probs, spec: LossSpec) -> dict[str, float]:
    """Summed exact forward KL, entropies and teacher mass on the top-k support over the chunk's tokens."""
    student_floored = student_logprobs.clamp_min(LOGPROB_FLOOR)
    support = topk_support(student_logprobs, teacher_logprobs, topk=spec.topk, topk_source=spec.topk_source)
    return {
        "kl": kl_from_logprobs(teacher_logprobs, student_logprobs).sum().item(),
        "teacher_entropy": -_row_dot(teacher_probs, teacher_logprobs.clamp_min(LOGPROB_FLOOR)).sum().item(),
        "student_entropy": -_row_dot(student_floored.exp(), student_floored).sum().item(),
        "topk_mass": teacher_probs.gather(-1, support).sum().item(),
    }


def _generic_chunk_step(student_logits, teacher_logits, chunk_ids, chunk_weights, spec: LossSpec, want_grad: bool):
    """Any divergence/estimator: per-token loss by `chunk_token_loss`, gradient by autograd on this chunk only."""
    student_logits.requires_grad_(want_grad)
    with torch.enable_grad():
        per_token = chunk_token_loss(student_logits, teacher_logits, chunk_ids, spec)
        grad_logits = None
        if want_grad:
            (grad_logits,) = torch.autograd.grad((per_token * chunk_weights).sum(), student_logits)
    with torch.no_grad():
        student_logprobs = torch.log_softmax(student_logits.detach() / spec.temperature, dim=-1)
        teacher_logprobs = torch.log_softmax(teacher_logits / spec.temperature, dim=-1)
        sums = _distribution_sums(student_logprobs, teacher_logprobs, teacher_logprobs.exp(), spec)
    return per_token.detach(), grad_logits, sums


@torch.no_grad()
def _fused_forward_kl_step(student_logits, teacher_logits, chunk_weights, spec: LossSpec, want_grad: bool):
    """Full-vocabulary forward KL with an analytic gradient and ~4 (c, V) buffers (the default, hot path).

    d/dz_s sum_x q(x) (log q(x) - log p(x)) = p - q, where q = P_t, p = P_s (softmax of z / T); with the
    log-prob floor the exact derivative is p * sum(q * m) - q * m, m = [log p > floor] (m = 1 in practice).
    Logit buffers are overwritten in place: they belong to this chunk.
    """
    if spec.temperature != 1.0:
        student_logits.div_(spec.temperature)
        teacher_logits.div_(spec.temperature)
    student_logprobs = student_logits.sub_(torch.logsumexp(student_logits, dim=-1, keepdim=True))
    teacher_logprobs = teacher_logits.sub_(torch.logsumexp(teacher_logits, dim=-1, keepdim=True))
    teacher_probs = teacher_logprobs.exp()
    above_floor = (student_logprobs > LOGPROB_FLOOR) if student_logprobs.min() <= LOGPROB_FLOOR else None
    student_logprobs.clamp_min_(LOGPROB_FLOOR)
    teacher_logprobs.clamp_min_(LOGPROB_FLOOR)
    scratch = torch.sub(teacher_logprobs, student_logprobs).mul_(teacher_probs)
    per_token = scratch.sum(-1)
    support = topk_support(student_logprobs, teacher_logprobs, topk=spec.topk, topk_source=spec.topk_source)
    sums = {"kl": per_token.sum().item(), "teacher_entropy": -_row_dot(teacher_probs, teacher_logprobs).sum().item(),
            "topk_mass": teacher_probs.gather(-1, support).sum().item()}
    student_probs = torch.exp(student_logprobs, out=scratch)
    sums["student_entropy"] = -_row_dot(student_probs, student_logprobs).sum().item()
    per_token = clip_token_loss(per_token, spec.token_clip)
    if not want_grad:
        return per_token, None, sums
    if above_floor is not None:
        teacher_probs.mul_(above_floor)
        student_probs.mul_(teacher_probs.sum(-1, keepdim=True))
    coefficient = chunk_weights / spec.temperature
    if spec.token_clip > 0:
        coefficient = coefficient * (per_token < spec.token_clip)
    grad_logits = student_probs.sub_(teacher_probs).mul_(coefficient.unsqueeze(-1))
    return per_token, grad_logits, sums


@torch.no_grad()
def _reference_kl_step(student_logits, reference_logits, coefficient, want_grad: bool):
    """Per-token KL(P_s || P_ref) (c,) over the whole vocabulary and its gradient w.r.t. the student logits, times
    `coefficient` (c,) (the token weights times ref_kl_coef); None when no gradient is wanted.

    At temperature 1 whatever `loss.temperature`: the anchor keeps the student's own sampling distribution near the
    initial model's, while the temperature only softens the distillation target. With p = softmax(z_s),
    d = log p - log p_ref and KL = sum_x p(x) d(x): dKL/dz_s = p * (d - KL). Both log-probs come from finite logits,
    so no log-prob floor is needed. The student logits are read, not changed (the distillation step overwrites
    them next); the reference logits are this chunk's, overwritten in place. Two more (c, V) buffers.
    """
    student_logprobs = torch.log_softmax(student_logits, dim=-1)
    reference_logprobs = reference_logits.sub_(torch.logsumexp(reference_logits, dim=-1, keepdim=True))
    log_ratio = reference_logprobs.neg_().add_(student_logprobs)  # log p - log p_ref, in the reference's buffer
    student_probs = student_logprobs.exp_()
    per_token = _row_dot(student_probs, log_ratio)
    if not want_grad:
        return per_token, None
    return per_token, log_ratio.sub_(per_token.unsqueeze(-1)).mul_(student_probs).mul_(coefficient.unsqueeze(-1))


def _add_sums(total: dict[str, float], part: dict[str, float]) -> None:
    for name, value in part.items():
        total[name] = total.get(name, 0.0) + value


def _pick_gap_rows(num_tokens: int, num_samples: int, device: torch.device) -> torch.Tensor:
    """A reproducible random subset of token rows on which the top-k estimate is compared to the exact value."""
    generator = torch.Generator().manual_seed(_METRIC_SAMPLE_SEED)
    rows = torch.randperm(num_tokens, generator=generator)[: min(num_samples, num_tokens)]
    return rows.sort().values.to(device)


def _finalise_metrics(sums: dict[str, float], num_tokens: int, anchored: bool) -> dict[str, float]:
    """Turn summed chunk metrics into per-token means; all zeros when no token was counted."""
    denominator = max(num_tokens, 1)
    names = ("kl", "teacher_entropy", "student_entropy") + (("ref_kl",) if anchored else ())
    metrics = {name: sums.get(name, 0.0) / denominator for name in names}
    metrics["topk_mass"] = sums.get("topk_mass", 0.0) / denominator
    if "gap_tokens" in sums:  # the opt-in top-k diagnostic ran
        metrics["topk_gap"] = sums["topk_gap"] / max(sums["gap_tokens"], 1.0)
        metrics["topk_gap_rel"] = sums["topk_gap"] / max(sums["topk_exact"], 1e-12)
    metrics["tokens"] = float(num_tokens)
    return metrics


def _in_loss_dtype(loss_dtype: torch.dtype, *weights: torch.Tensor | None) -> list[torch.Tensor | None]:
    """Each (V, H) weight in loss_dtype; a tensor passed twice (the student's lm_head as teacher or reference) is
    converted once, so it costs one float32 copy, not one per role."""
    converted: dict[tuple, torch.Tensor] = {}
    result = []
    for weight in weights:
        if weight is not None:
            key = (weight.data_ptr(), weight.dtype, tuple(weight.shape))
            weight = converted.setdefault(key, weight.to(loss_dtype))
        result.append(weight)
    return result


class ChunkedDistillation(torch.autograd.Function):
    """loss = sum_i weights_i * per_token_i over compacted response rows, gradients computed in forward.

    per_token_i = clip(divergence_i) + ref_kl_coef * KL(P_s || P_ref)_i, the second term only with reference inputs.
    """

    @staticmethod
    def forward(ctx, student_hidden, student_weight, teacher_hidden, teacher_weight, reference_hidden,
                reference_weight, weights, response_ids, spec, metrics_out):
        want_hidden_grad, want_weight_grad = ctx.needs_input_grad[0], ctx.needs_input_grad[1]
        num_tokens = student_hidden.shape[0]
        # bf16/fp16 inputs: logits, their gradient and grad_weight in float32. A bf16 matmul rounds each logit to
        # 8 mantissa bits (~0.05 at a logit of 10), and a bf16 grad_weight summed over chunks drops the small
        # chunks' contributions. The float32 (V, H) weight copies and grad_weight cost 4 * V * H bytes each (1.7 GB
        # at 7B: V 102400, H 4096), once per call; for float32 inputs `.to` returns the tensors themselves.
        loss_dtype = torch.promote_types(student_hidden.dtype, torch.float32)
        student_weight_in = student_weight
        student_weight, teacher_weight, reference_weight = _in_loss_dtype(
            loss_dtype, student_weight, teacher_weight, reference_weight)
        grad_hidden = torch.zeros_like(student_hidden) if want_hidden_grad else None  # each row written once
        grad_weight = torch.zeros_like(student_weight) if want_weight_grad else None  # (V, H) in loss_dtype
        per_token = torch.zeros(num_tokens, dtype=loss_dtype, device=student_hidden.device)
        gap_rows = _pick_gap_rows(num_tokens, spec.metric_sample_tokens, student_hidden.device)
        sums: dict[str, float] = {}
        want_grad = want_hidden_grad or want_weight_grad
        for start in range(0, num_tokens, spec.chunk_tokens):
            rows = slice(start, min(start + spec.chunk_tokens, num_tokens))
            chunk_hidden = student_hidden[rows].to(loss_dtype)
            student_logits = chunk_hidden @ student_weight.T  # (c, V)
            teacher_logits = teacher_hidden[rows].to(loss_dtype) @ teacher_weight.T  # (c, V)
            if spec.metric_sample_tokens:
                in_chunk = gap_rows[(gap_rows >= rows.start) & (gap_rows < rows.stop)] - rows.start
                _add_sums(sums, _gap_sums(student_logits[in_chunk], teacher_logits[in_chunk], spec))
            chunk_weights = weights[rows].to(loss_dtype)
            reference_logits = None if reference_hidden is None else \
                reference_hidden[rows].to(loss_dtype) @ reference_weight.T  # (c, V)
            chunk_ids = None if response_ids is None else response_ids[rows]
            per_token[rows], grad_logits = _chunk_step(student_logits, teacher_logits, reference_logits, chunk_ids,
                                                       chunk_weights, spec, want_grad, sums)
            del student_logits, teacher_logits, reference_logits
            if grad_logits is not None:
                grad_logits = grad_logits.to(loss_dtype)
                if want_hidden_grad:
                    grad_hidden[rows] = grad_logits @ student_weight  # cast to the hidden states' dtype on store
                if want_weight_grad:
                    grad_weight.addmm_(grad_logits.T, chunk_hidden)
                del grad_logits
        metrics_out.update(_finalise_metrics(sums, num_tokens, anchored=reference_hidden is not None))
        # Plain attributes, not save_for_backward: backward hands these tensors to autograd as the only
        # reference, so AccumulateGrad can adopt them instead of copying a (V, H) gradient.
        # autograd wants the gradient in the parameter's dtype; the float32 sum is rounded once, here.
        ctx.grad_hidden = grad_hidden
        ctx.grad_weight = None if grad_weight is None else grad_weight.to(student_weight_in.dtype)
        ctx.mark_non_differentiable(per_token)
        return (per_token * weights.to(loss_dtype)).sum(), per_token

    @staticmethod
    def backward(ctx, grad_loss, _grad_per_token):
        grad_hidden, grad_weight = ctx.grad_hidden, ctx.grad_weight
        ctx.grad_hidden = ctx.grad_weight = None
        # The usual upstream gradient is exactly 1; skipping the multiply avoids a second (V, H) buffer.
        if grad_loss.item() != 1.0:
            grad_hidden = None if grad_hidden is None else grad_hidden * grad_loss.to(grad_hidden.dtype)
            grad_weight = None if grad_weight is None else grad_weight * grad_loss.to(grad_weight.dtype)
        return grad_hidden, grad_weight, None, None, None, None, None, None, None, None


def _chunk_step(student_logits, teacher_logits, reference_logits, chunk_ids, chunk_weights, spec: LossSpec,
                want_grad: bool, sums: dict[str, float]):
    """One chunk's per-token loss (c,) and d loss / d student_logits (or None); adds its metric sums to `sums`."""
    if reference_logits is not None:  # first: the distillation steps below overwrite the student logits
        reference_kl, reference_grad = _reference_kl_step(student_logits, reference_logits,
                                                          chunk_weights * spec.ref_kl_coef, want_grad)
        _add_sums(sums, {"ref_kl": reference_kl.sum().item()})
    forward_kl = spec.divergence == "forward_kl" or (spec.divergence == "jsd" and spec.beta == 0.0)
    if spec.estimator == "full" and forward_kl:
        per_token, grad_logits, chunk_sums = _fused_forward_kl_step(
            student_logits, teacher_logits, chunk_weights, spec, want_grad)
    else:
        per_token, grad_logits, chunk_sums = _generic_chunk_step(
            student_logits, teacher_logits, chunk_ids, chunk_weights, spec, want_grad)
    _add_sums(sums, chunk_sums)
    if reference_logits is None:
        return per_token, grad_logits
    # The anchor after the clip: `token_clip` bounds the distillation divergence only.
    per_token = per_token + spec.ref_kl_coef * reference_kl
    return per_token, None if grad_logits is None else grad_logits.add_(reference_grad)


def chunked_distillation_loss(
    student_hidden: torch.Tensor,
    teacher_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_weight: torch.Tensor,
    weights: torch.Tensor,
    response_ids: torch.Tensor | None,
    spec: LossSpec,
    reference_hidden: torch.Tensor | None = None,
    reference_weight: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, dict[str, float]]:
    """(loss, per_token (N,), metrics) computing only rows with weight != 0; other rows get per_token 0.

    The anchor term is computed when `reference_hidden` is given and spec.ref_kl_coef > 0.
    """
    counted = (weights != 0).nonzero().squeeze(-1)
    metrics: dict[str, float] = {}
    compact_ids = None if response_ids is None else response_ids[counted]
    anchored = reference_hidden is not None and spec.ref_kl_coef > 0
    loss, compact_per_token = ChunkedDistillation.apply(
        student_hidden[counted],
        student_weight,
        teacher_hidden.detach()[counted],
        teacher_weight.detach(),
        reference_hidden.detach()[counted] if anchored else None,
        reference_weight.detach() if anchored else None,
        weights[counted].detach(),
        compact_ids,
        spec,
        metrics,
    )
    per_token = torch.zeros(weights.shape[0], dtype=compact_per_token.dtype, device=weights.device)
    per_token[counted] = compact_per_token
    return loss, per_token, metrics
