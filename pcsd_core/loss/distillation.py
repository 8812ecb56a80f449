"""Distillation losses between the teacher (stop-gradient) and student next-token distributions.

Public API (users put these into their own trainers):
- `token_divergence(student_logits, teacher_logits, *, divergence, beta, temperature)`: exact per-token
  divergence over the full vocabulary, logits (..., T, V) -> (..., T).
- `token_weights(response_mask, *, aggregation, skip_first_tokens, ...)`: per-token weights (B, T) whose dot
  product with per-token losses is the batch loss; `batch_token_counts` gives the totals to pass when the
  batch is split into micro-batches, so the micro-batch losses sum to the full-batch loss.
- `hidden_state_distillation_loss(student_hidden, teacher_hidden, student_weight, weights, ...)`: the
  memory-bounded loss from final hidden states and the output projection, chunked over tokens so [N, V]
  logits are never held for both models (see `pcsd_core.loss.chunked`), with exact gradients; with
  `ref_kl_coef` > 0 and `reference_hidden`, each token's loss also holds ref_kl_coef * KL(P_student || P_reference).

Divergences ("forward_kl" = KL(P_t || P_s), the default; "reverse_kl"; "jsd" with beta), temperature and the
estimators ("full", "topk", "sampled") are defined once in `pcsd_core.loss.divergence`; read its docstring for
the exact conventions (JSD endpoints, temperature scaling, zero-probability handling).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Literal

import torch

from pcsd_core.loss.chunked import chunked_distillation_loss
from pcsd_core.loss.divergence import full_divergence
from pcsd_core.loss.spec import (AGGREGATIONS, DIVERGENCES, LossSpec, check_choice,
                                   check_divergence_options)

Divergence = Literal[DIVERGENCES]


def token_divergence(
    student_logits: torch.Tensor,
    teacher_logits: torch.Tensor,
    *,
    divergence: Divergence = "forward_kl",
    beta: float = 0.5,
    temperature: float = 1.0,
) -> torch.Tensor:
    """Exact per-token divergence over the full vocabulary: logits (..., T, V) -> (..., T), in float32 or wider.

    Teacher logits are treated as constants (no gradient flows into them). Materialises (..., T, V)
    log-probs; for long responses and large vocabularies use `hidden_state_distillation_loss`.
    """
    check_divergence_options(divergence, beta, temperature)
    if student_logits.shape != teacher_logits.shape:
        raise ValueError(
            f"student_logits {tuple(student_logits.shape)} and teacher_logits {tuple(teacher_logits.shape)} "
            "must have the same shape (..., T, V); slice both to the response tokens first."
        )
    return full_divergence(student_logits, teacher_logits, divergence=divergence, beta=beta, temperature=temperature)


def _counted_mask(response_mask: torch.Tensor, skip_first_tokens: int) -> torch.Tensor:
    """Boolean (B, T) mask of the response tokens that enter the loss (the first N of each response dropped)."""
    if response_mask.dim() != 2:
        raise ValueError(f"response_mask must be (B, T), got shape {tuple(response_mask.shape)}.")
    if skip_first_tokens < 0:
        raise ValueError(f"skip_first_tokens ({skip_first_tokens}) must be >= 0 (0 keeps every response token).")
    mask = response_mask.bool()
    if skip_first_tokens > 0:
        # Position of each token within its own response (1-based), so left padding is handled too.
        position_in_response = mask.long().cumsum(dim=1)
        mask = mask & (position_in_response > skip_first_tokens)
    return mask


def batch_token_counts(response_mask: torch.Tensor, *, skip_first_tokens: int = 0) -> tuple[float, int]:
    """(tokens, sequences with at least one token) counted by the loss; pass these of the WHOLE batch to
    `token_weights` for each micro-batch so the micro-batch losses add up to the whole-batch loss."""
    mask = _counted_mask(response_mask, skip_first_tokens)
    return float(mask.sum().item()), int((mask.sum(dim=1) > 0).sum().item())


def token_weights(
    response_mask: torch.Tensor,
    *,
    aggregation: Literal["token_mean", "seq_mean"] = "token_mean",
    skip_first_tokens: int = 0,
    num_tokens_in_batch: float | None = None,
    num_sequences_in_batch: int | None = None,
) -> torch.Tensor:
    """Per-token float32 weights (B, T) whose dot product with per-token losses is the batch loss.

    token_mean: every counted token weighs 1 / num_tokens_in_batch.
    seq_mean:   a sequence with n counted tokens gives each 1 / (n * num_sequences_in_batch), i.e. the mean over
                sequences of the per-sequence token mean (sequences with no counted token are not counted).
    Totals default to this batch's own counts. For gradient accumulation pass the totals of the whole
    (mini-)batch from `batch_token_counts`, so the sum of micro-batch losses equals the whole-batch loss.
    """
    check_choice("aggregation", aggregation, AGGREGATIONS)
    mask = _counted_mask(response_mask, skip_first_tokens)
    local_tokens, local_sequences = batch_token_counts(response_mask, skip_first_tokens=skip_first_tokens)
    weights = mask.float()
    if aggregation == "token_mean":
        total = local_tokens if num_tokens_in_batch is None else float(num_tokens_in_batch)
        if total < local_tokens:
            raise ValueError(
                f"num_tokens_in_batch ({num_tokens_in_batch}) is smaller than this micro-batch's own {local_tokens:g} "
                "counted tokens; pass batch_token_counts(...) of the whole batch."
            )
        return weights / total if total > 0 else weights
    total_sequences = local_sequences if num_sequences_in_batch is None else int(num_sequences_in_batch)
    if total_sequences < local_sequences:
        raise ValueError(
            f"num_sequences_in_batch ({num_sequences_in_batch}) is smaller than this micro-batch's own "
            f"{local_sequences} non-empty sequences; pass batch_token_counts(...) of the whole batch."
        )
    tokens_per_sequence = weights.sum(dim=1, keepdim=True).clamp_min(1.0)
    return weights / (tokens_per_sequence * max(total_sequences, 1))


@dataclass
class LossOutput:
    loss: torch.Tensor  # scalar, differentiable w.r.t. student inputs: sum(weights * per_token)
    # (N,) detached per-token loss (after clipping, plus the anchor term); 0 where weights == 0 (not computed)
    per_token: torch.Tensor
    # Means over the tokens with weight != 0: kl (exact forward KL), teacher_entropy, student_entropy,
    # topk_mass (teacher mass on the top-k support), tokens; and, only when `metric_sample_tokens` > 0, on a
    # fixed random subset of that many tokens: topk_gap (mean |topk estimate - exact|), topk_gap_rel
    # (sum gap / sum exact); and, only with the reference anchor on, ref_kl (exact KL(P_student || P_reference)).
    metrics: dict[str, float]


def _check_loss_inputs(student_hidden, teacher_hidden, student_weight, teacher_weight, weights, response_ids,
                       spec: LossSpec, reference_hidden=None, reference_weight=None) -> None:
    """Shape and option checks, raised before any (N, V) work."""
    for name, hidden in (("teacher_hidden", teacher_hidden), ("reference_hidden", reference_hidden)):
        if hidden is not None and (student_hidden.dim() != 2 or student_hidden.shape != hidden.shape):
            raise ValueError(
                f"student_hidden {tuple(student_hidden.shape)} and {name} {tuple(hidden.shape)} must "
                "both be (N, H) over the same response tokens; flatten (B, T, H) with a response mask first."
            )
    if spec.ref_kl_coef > 0 and reference_hidden is None:
        raise ValueError(f"loss.ref_kl_coef ({spec.ref_kl_coef}) > 0 needs reference_hidden (N, H): the initial "
                         "model's final hidden states at the same response tokens; or set ref_kl_coef to 0.")
    for name, weight in (("student_weight", student_weight), ("teacher_weight", teacher_weight),
                         ("reference_weight", reference_weight)):
        if weight.dim() != 2 or weight.shape[1] != student_hidden.shape[1] or weight.shape != student_weight.shape:
            raise ValueError(f"{name} {tuple(weight.shape)} must be (V, H) with H = {student_hidden.shape[1]}.")
    if weights.shape != student_hidden.shape[:1]:
        raise ValueError(f"weights {tuple(weights.shape)} must be (N,) = ({student_hidden.shape[0]},).")
    if spec.estimator == "sampled" and (response_ids is None or response_ids.shape != weights.shape):
        raise ValueError("estimator='sampled' needs response_ids (N,): the sampled token at each position.")


def hidden_state_distillation_loss(
    student_hidden: torch.Tensor,  # (N, H) student final hidden states at response positions
    teacher_hidden: torch.Tensor,  # (N, H) teacher final hidden states at the same response tokens (no grad)
    student_weight: torch.Tensor,  # (V, H) output projection (lm_head) weight, gets gradients
    weights: torch.Tensor,  # (N,) per-token weights from `token_weights` (0 for masked tokens)
    *,
    teacher_weight: torch.Tensor | None = None,  # (V, H) teacher lm_head; default: student_weight, detached
    response_ids: torch.Tensor | None = None,  # (N,) sampled tokens, needed by the `sampled` estimator
    reference_hidden: torch.Tensor | None = None,  # (N, H) initial model's states, used when ref_kl_coef > 0
    reference_weight: torch.Tensor | None = None,  # (V, H) its lm_head; default: student_weight, detached
    spec: LossSpec | None = None,  # the loss options (the config's `loss` section); default LossSpec()
    **options,  # or single options over the spec: divergence="jsd", chunk_tokens=128, ...
) -> LossOutput:
    """Memory-bounded loss from hidden states: never holds (N, V) logits for teacher and student at once.

    loss = sum_i weights_i * clip(d_i), d_i the per-token divergence of the chosen estimator:
    full = exact over V; topk = over the top-k tokens of `topk_source`, renormalised or with one tail bucket
    holding the leftover mass; sampled = the on-policy reverse-KL estimator on `response_ids` (value: the
    log-ratio; gradient: stopgrad(log-ratio) * grad log P_s(y); `token_clip` clips the log-ratio to +-clip).
    `token_clip` > 0 caps each token's divergence (capped tokens get no gradient). Rows with weight 0 are
    skipped entirely. Peak extra memory is O(chunk_tokens * V); gradients are exact (computed per chunk).
    With `ref_kl_coef` > 0 each token's loss adds ref_kl_coef * KL(P_student || P_reference), exact over V at
    temperature 1 and not clipped, P_reference from `reference_hidden` and `reference_weight` (the reference
    anchor, `LossSpec.ref_kl_coef`); with ref_kl_coef 0 the reference inputs are ignored and nothing is computed.
    """
    teacher_weight = student_weight if teacher_weight is None else teacher_weight
    reference_weight = student_weight if reference_weight is None else reference_weight
    spec = dataclasses.replace(spec or LossSpec(), **options) if options else (spec or LossSpec())
    _check_loss_inputs(student_hidden, teacher_hidden, student_weight, teacher_weight, weights, response_ids, spec,
                       reference_hidden, reference_weight)
    loss, per_token, metrics = chunked_distillation_loss(
        student_hidden, teacher_hidden, student_weight, teacher_weight, weights, response_ids, spec,
        reference_hidden=reference_hidden, reference_weight=reference_weight,
    )
    return LossOutput(loss=loss, per_token=per_token, metrics=metrics)
