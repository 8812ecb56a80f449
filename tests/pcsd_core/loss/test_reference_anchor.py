"""The reference anchor (`loss.ref_kl_coef`) against float64 naive math: full logits, log_softmax, explicit sums.

The naive loss is written here without pcsd_core's divergence code: per token, the distillation divergence at the
loss temperature (clipped by token_clip) plus ref_kl_coef * KL(P_student || P_reference) at temperature 1, weighted
and summed; gradients come from float64 autograd.
"""

from __future__ import annotations

import pytest
import torch

from pcsd_core.loss.distillation import hidden_state_distillation_loss

REL_TOL = 1e-5
COEF = 0.3


def _naive_kl(target_logprobs, other_logprobs):
    return (target_logprobs.exp() * (target_logprobs - other_logprobs)).sum(-1)


def _naive_loss(student_hidden, student_weight, teacher_hidden, reference_hidden, reference_weight, weights, *,
                divergence="forward_kl", temperature=1.0, token_clip=0.0, coef=COEF):
    """(loss, per_token, reference KL per token), float64; teacher and reference are constants."""
    student_logits = student_hidden @ student_weight.T
    teacher_logits = (teacher_hidden @ student_weight.T).detach()
    reference_logits = (reference_hidden @ reference_weight.T).detach()
    student_t = torch.log_softmax(student_logits / temperature, dim=-1)
    teacher_t = torch.log_softmax(teacher_logits / temperature, dim=-1)
    divergence_values = _naive_kl(teacher_t, student_t) if divergence == "forward_kl" else _naive_kl(student_t, teacher_t)
    if token_clip > 0:
        divergence_values = torch.minimum(divergence_values, torch.full_like(divergence_values, token_clip))
    reference_kl = _naive_kl(torch.log_softmax(student_logits, -1), torch.log_softmax(reference_logits, -1))
    per_token = divergence_values + coef * reference_kl
    return (per_token * weights).sum(), per_token, reference_kl


def _problem(seed=0, num_tokens=12, hidden=16, vocab=48):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(num_tokens, hidden, generator=generator)
    teacher_hidden = student_hidden + 0.5 * torch.randn(num_tokens, hidden, generator=generator)
    reference_hidden = student_hidden + 0.7 * torch.randn(num_tokens, hidden, generator=generator)
    weight = 0.5 * torch.randn(vocab, hidden, generator=generator)
    reference_weight = weight + 0.2 * torch.randn(vocab, hidden, generator=generator)
    weights = torch.rand(num_tokens, generator=generator)
    weights[[2, 7]] = 0.0  # masked tokens inside the batch
    return student_hidden, teacher_hidden, reference_hidden, weight, reference_weight, weights


def _rel_err(ours, ref):
    return ((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


CASES = [
    dict(divergence="forward_kl"),  # the fused analytic path
    dict(divergence="forward_kl", temperature=0.7, token_clip=0.05),  # clip caps the divergence, not the anchor
    dict(divergence="reverse_kl", temperature=1.5),  # the autograd path
]


@pytest.mark.parametrize("chunk_tokens", [1, 5, 1000])
@pytest.mark.parametrize("case", CASES, ids=lambda case: "-".join(str(v) for v in case.values()))
@pytest.mark.parametrize("own_reference_head", [True, False], ids=["reference-head", "student-head"])
def test_anchored_loss_matches_float64_naive(case, chunk_tokens, own_reference_head):
    """Value, per-token values, ref_kl metric and both gradients; with the student's head as the reference's
    (LoRA: the frozen head), no gradient flows through the reference's use of it."""
    student_hidden, teacher_hidden, reference_hidden, weight, reference_weight, weights = _problem()
    student_hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = hidden_state_distillation_loss(
        student_hidden, teacher_hidden, weight, weights, reference_hidden=reference_hidden,
        reference_weight=reference_weight if own_reference_head else None, ref_kl_coef=COEF,
        chunk_tokens=chunk_tokens, **case)
    grads = torch.autograd.grad(out.loss, (student_hidden, weight))

    student64, weight64 = (t.detach().double().requires_grad_(True) for t in (student_hidden, weight))
    head64 = reference_weight.double() if own_reference_head else weight64
    ref_loss, ref_per_token, ref_kl = _naive_loss(student64, weight64, teacher_hidden.double(),
                                                  reference_hidden.double(), head64, weights.double(), **case)
    ref_grads = torch.autograd.grad(ref_loss, (student64, weight64))
    counted = weights != 0
    if case.get("token_clip"):  # the case is only worth its name if the clip bites and the anchor exceeds it
        assert (ref_per_token[counted] > case["token_clip"] + 1e-3).all()
    assert _rel_err(out.loss, ref_loss) <= REL_TOL
    assert _rel_err(out.per_token[counted], ref_per_token[counted]) <= REL_TOL
    assert torch.all(out.per_token[~counted] == 0)
    assert out.metrics["ref_kl"] == pytest.approx(ref_kl[counted].mean().item(), rel=REL_TOL)
    for ours, ref in zip(grads, ref_grads):
        assert _rel_err(ours, ref) <= REL_TOL


def test_coef_zero_is_the_loss_without_anchor_exactly():
    student_hidden, teacher_hidden, reference_hidden, weight, reference_weight, weights = _problem(seed=1)
    results = []
    for extra in ({}, dict(reference_hidden=reference_hidden, reference_weight=reference_weight, ref_kl_coef=0.0)):
        hidden, head = student_hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = hidden_state_distillation_loss(hidden, teacher_hidden, head, weights, chunk_tokens=5, **extra)
        results.append((out, torch.autograd.grad(out.loss, (hidden, head))))
    (plain, plain_grads), (zero, zero_grads) = results
    assert torch.equal(plain.loss, zero.loss) and torch.equal(plain.per_token, zero.per_token)
    assert plain.metrics == zero.metrics and "ref_kl" not in zero.metrics
    assert all(torch.equal(a, b) for a, b in zip(plain_grads, zero_grads))


def test_anchor_to_the_student_itself_adds_nothing():
    """KL(P_s || P_s) = 0 with zero gradient: reference = student leaves loss and gradients as without anchor."""
    student_hidden, teacher_hidden, _, weight, _, weights = _problem(seed=2)
    outputs = []
    for extra in ({}, dict(reference_hidden=student_hidden, ref_kl_coef=5.0)):
        head = weight.clone().requires_grad_(True)
        out = hidden_state_distillation_loss(student_hidden, teacher_hidden, head, weights, **extra)
        outputs.append((out.loss, torch.autograd.grad(out.loss, head)[0], out.metrics))
    # float32: the two log_softmaxes of the same logits differ by rounding (~1e-7 a token, times the coef)
    torch.testing.assert_close(outputs[1][0], outputs[0][0], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(outputs[1][1], outputs[0][1], rtol=1e-5, atol=1e-6)
    assert abs(outputs[1][2]["ref_kl"]) < 1e-6


def test_micro_batch_losses_add_up_with_the_anchor():
    student_hidden, teacher_hidden, reference_hidden, weight, reference_weight, weights = _problem(seed=3)
    options = dict(reference_weight=reference_weight, ref_kl_coef=COEF, chunk_tokens=4)
    whole = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights,
                                           reference_hidden=reference_hidden, **options)
    parts = [hidden_state_distillation_loss(student_hidden[rows], teacher_hidden[rows], weight, weights[rows],
                                            reference_hidden=reference_hidden[rows], **options)
             for rows in (slice(0, 5), slice(5, 12))]
    torch.testing.assert_close(sum(part.loss for part in parts), whole.loss, rtol=1e-6, atol=1e-7)


def test_anchor_without_reference_states_is_refused():
    student_hidden, teacher_hidden, reference_hidden, weight, _, weights = _problem()
    with pytest.raises(ValueError, match=r"^loss.ref_kl_coef \(0.3\) > 0 needs reference_hidden"):
        hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, ref_kl_coef=0.3)
    with pytest.raises(ValueError, match="reference_hidden"):
        hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, ref_kl_coef=0.3,
                                       reference_hidden=reference_hidden[:5])
    with pytest.raises(ValueError, match=r"^loss.ref_kl_coef \(-1.0\) must be a finite number >= 0"):
        hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, ref_kl_coef=-1.0)
