"""Distillation losses against a float64 naive reference, a peer library (torch kl_div, TRL), and edge cases.

The reference below is written independently of pcsd_core.loss.divergence: it works on probabilities in float64
(softmax, explicit P * log(P / Q) sums, argsort for the top-k) and gets gradients from float64 autograd.
Our fp32 results must match it with relative error <= 1e-5 (norm-wise for gradient tensors).
"""

from __future__ import annotations

import math
import os

import pytest
import torch
import torch.nn.functional as F

from pcsd_core.loss.distillation import (
    batch_token_counts,
    hidden_state_distillation_loss,
    token_divergence,
    token_weights,
)

os.environ.setdefault("TRL_EXPERIMENTAL_SILENCE", "1")
REL_TOL = 1e-5


# ----------------------------------------------------------------------------- float64 reference
def _ref_kl(target_probs, other_probs):
    terms = target_probs * (torch.log(target_probs) - torch.log(other_probs))
    return torch.where(target_probs > 0, terms, torch.zeros_like(terms)).sum(-1)


def _ref_divergence(student_probs, teacher_probs, divergence, beta):
    if divergence == "forward_kl" or (divergence == "jsd" and beta == 0):
        return _ref_kl(teacher_probs, student_probs)
    if divergence == "reverse_kl" or (divergence == "jsd" and beta == 1):
        return _ref_kl(student_probs, teacher_probs)
    mixture = beta * teacher_probs + (1 - beta) * student_probs
    return beta * _ref_kl(teacher_probs, mixture) + (1 - beta) * _ref_kl(student_probs, mixture)


def _ref_support_probs(probs, support, tail):
    chosen = probs.gather(-1, support)
    if tail == "renorm":
        return chosen / chosen.sum(-1, keepdim=True)
    return torch.cat([chosen, 1 - chosen.sum(-1, keepdim=True)], dim=-1)


def _ref_per_token(student_logits, teacher_logits, *, divergence="forward_kl", beta=0.5, temperature=1.0,
                   estimator="full", topk=4, topk_source="teacher", topk_tail="tail_bucket", response_ids=None,
                   token_clip=0.0):
    """Float64 per-token loss of every estimator (sampled: a surrogate whose gradient is the estimator's)."""
    student_probs = torch.softmax(student_logits.double() / temperature, dim=-1)
    teacher_probs = torch.softmax(teacher_logits.detach().double() / temperature, dim=-1)
    if estimator == "sampled":
        student_logprob = torch.log(student_probs.gather(-1, response_ids[:, None]).squeeze(-1))
        teacher_logprob = torch.log(teacher_probs.gather(-1, response_ids[:, None]).squeeze(-1))
        advantage = (teacher_logprob - student_logprob).detach()
        return -advantage * student_logprob, -advantage
    if estimator == "topk":
        source = teacher_probs if topk_source == "teacher" else student_probs
        support = torch.argsort(source, dim=-1, descending=True)[..., :topk]
        student_probs = _ref_support_probs(student_probs, support, topk_tail)
        teacher_probs = _ref_support_probs(teacher_probs, support, topk_tail)
    values = _ref_divergence(student_probs, teacher_probs, divergence, beta)
    if token_clip > 0:
        values = torch.minimum(values, torch.full_like(values, token_clip))
    return values, values.detach()


def _rel_err(ours, ref):
    return ((ours.double() - ref.double()).norm() / ref.double().norm().clamp_min(1e-30)).item()


def _random_problem(seed=0, num_tokens=12, hidden=16, vocab=48, dtype=torch.float32):
    generator = torch.Generator().manual_seed(seed)
    student_hidden = torch.randn(num_tokens, hidden, generator=generator, dtype=dtype)
    teacher_hidden = student_hidden + 0.5 * torch.randn(num_tokens, hidden, generator=generator, dtype=dtype)
    weight = 0.5 * torch.randn(vocab, hidden, generator=generator, dtype=dtype)
    weights = torch.rand(num_tokens, generator=generator, dtype=dtype)
    weights[2] = 0.0  # a masked token inside the batch
    response_ids = torch.randint(0, vocab, (num_tokens,), generator=generator)
    return student_hidden, teacher_hidden, weight, weights, response_ids


# ----------------------------------------------------------------------------- logits API
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.3), ("jsd", 0.5)])
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_token_divergence_matches_float64_reference(divergence, beta, temperature):
    generator = torch.Generator().manual_seed(1)
    student_logits = (2 * torch.randn(2, 5, 64, generator=generator)).requires_grad_(True)
    teacher_logits = 2 * torch.randn(2, 5, 64, generator=generator)
    upstream = torch.rand(2, 5, generator=generator)
    ours = token_divergence(student_logits, teacher_logits, divergence=divergence, beta=beta, temperature=temperature)
    (ours_grad,) = torch.autograd.grad((ours * upstream).sum(), student_logits)
    student64 = student_logits.detach().double().requires_grad_(True)
    ref, _ = _ref_per_token(student64, teacher_logits, divergence=divergence, beta=beta, temperature=temperature)
    (ref_grad,) = torch.autograd.grad((ref * upstream.double()).sum(), student64)
    assert ours.shape == (2, 5)
    assert _rel_err(ours, ref) <= REL_TOL
    assert _rel_err(ours_grad, ref_grad) <= REL_TOL


def test_jsd_endpoints_equal_the_kls_and_interior_is_between():
    generator = torch.Generator().manual_seed(2)
    student_logits, teacher_logits = torch.randn(2, 7, 32, generator=generator).unbind(0)
    forward = token_divergence(student_logits, teacher_logits, divergence="forward_kl")
    reverse = token_divergence(student_logits, teacher_logits, divergence="reverse_kl")
    assert torch.equal(token_divergence(student_logits, teacher_logits, divergence="jsd", beta=0.0), forward)
    assert torch.equal(token_divergence(student_logits, teacher_logits, divergence="jsd", beta=1.0), reverse)
    # Interior JSD(beta) is bounded by the entropy-of-mixing bound h(beta) <= log 2 and behaves as beta * KL near 0.
    small_beta = 1e-4
    near_zero = token_divergence(student_logits.double(), teacher_logits.double(), divergence="jsd", beta=small_beta)
    torch.testing.assert_close(near_zero / small_beta, forward.double(), rtol=2e-3, atol=1e-6)
    mid = token_divergence(student_logits, teacher_logits, divergence="jsd", beta=0.5)
    assert (mid >= 0).all() and (mid <= math.log(2) + 1e-6).all()


# ----------------------------------------------------------------------------- hidden-state API, every estimator
ESTIMATOR_CASES = [
    dict(estimator="full", divergence="forward_kl"),
    dict(estimator="full", divergence="forward_kl", temperature=0.7, token_clip=1.0),
    dict(estimator="full", divergence="reverse_kl"),
    dict(estimator="full", divergence="jsd", beta=0.4, temperature=1.5),
    dict(estimator="topk", divergence="forward_kl", topk_source="teacher", topk_tail="tail_bucket"),
    dict(estimator="topk", divergence="forward_kl", topk_source="teacher", topk_tail="renorm"),
    dict(estimator="topk", divergence="reverse_kl", topk_source="student", topk_tail="tail_bucket"),
    dict(estimator="topk", divergence="jsd", beta=0.5, topk_source="student", topk_tail="renorm", temperature=0.8),
    dict(estimator="sampled", divergence="reverse_kl"),
    dict(estimator="sampled", divergence="reverse_kl", temperature=0.6),
]


@pytest.mark.parametrize("case", ESTIMATOR_CASES, ids=lambda case: "-".join(str(v) for v in case.values()))
def test_hidden_state_loss_matches_float64_reference(case):
    student_hidden, teacher_hidden, weight, weights, response_ids = _random_problem()
    student_hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, response_ids=response_ids,
                                         topk=4, chunk_tokens=5, **case)
    ours_grads = torch.autograd.grad(out.loss, (student_hidden, weight))

    student64, weight64 = (t.detach().double().requires_grad_(True) for t in (student_hidden, weight))
    surrogate, values = _ref_per_token(student64 @ weight64.T, teacher_hidden.double() @ weight64.detach().T,
                                       response_ids=response_ids, topk=4, **case)
    ref_loss = (surrogate * weights.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, (student64, weight64))
    counted = weights != 0
    assert _rel_err(out.per_token[counted], values[counted]) <= REL_TOL
    assert torch.all(out.per_token[~counted] == 0)
    assert _rel_err(out.loss, (values * weights.double()).sum()) <= REL_TOL
    for ours_grad, ref_grad in zip(ours_grads, ref_grads):
        assert _rel_err(ours_grad, ref_grad) <= REL_TOL


def test_topk_with_k_at_least_vocab_equals_full():
    student_hidden, teacher_hidden, weight, weights, _ = _random_problem(seed=3, vocab=20)
    full = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights)
    for tail in ("renorm", "tail_bucket"):
        topk = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, estimator="topk",
                                              topk=20, topk_tail=tail)
        torch.testing.assert_close(topk.loss, full.loss)


def test_token_clip_caps_values_and_removes_their_gradient():
    student_hidden, teacher_hidden, weight, weights, _ = _random_problem(seed=4)
    weight.requires_grad_(True)
    unclipped = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights)
    sorted_values = unclipped.per_token[weights != 0].sort().values
    clip = sorted_values[4:6].mean().item()  # between two tokens' values, so some tokens are capped
    clipped = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, token_clip=clip)
    torch.testing.assert_close(clipped.per_token, unclipped.per_token.clamp(max=clip))
    # Only unclipped tokens drive the gradient: it equals the gradient of the loss restricted to them.
    below = (unclipped.per_token < clip).to(weights.dtype)
    restricted = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights * below)
    (clipped_grad,) = torch.autograd.grad(clipped.loss, weight)
    (restricted_grad,) = torch.autograd.grad(restricted.loss, weight)
    torch.testing.assert_close(clipped_grad, restricted_grad)


# ----------------------------------------------------------------------------- chunking and micro-batching
@pytest.mark.parametrize("estimator", ["full", "topk"])
def test_chunked_equals_unchunked(estimator):
    # float64, so fp32 BLAS blocking differences between chunk sizes cannot hide an algorithmic difference.
    student_hidden, teacher_hidden, weight, weights, _ = _random_problem(seed=5, num_tokens=23, dtype=torch.float64)
    results = []
    for chunk_tokens in (1, 4, 7, 23, 1000):
        hidden, lm_head = student_hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
        out = hidden_state_distillation_loss(hidden, teacher_hidden, lm_head, weights, estimator=estimator,
                                             topk=6, chunk_tokens=chunk_tokens)
        out.loss.backward()
        results.append((out.loss.detach(), out.per_token, hidden.grad, lm_head.grad, out.metrics))
    # The chunked path must also equal the plain (N, V) computation through token_divergence.
    hidden, lm_head = student_hidden.clone().requires_grad_(True), weight.clone().requires_grad_(True)
    if estimator == "full":
        plain = (token_divergence(hidden @ lm_head.T, teacher_hidden @ weight.T) * weights).sum()
        plain.backward()
        results.append((plain.detach(), results[0][1], hidden.grad, lm_head.grad, results[0][4]))
    for loss, per_token, hidden_grad, weight_grad, metrics in results[1:]:
        torch.testing.assert_close(loss, results[0][0], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(per_token, results[0][1], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(hidden_grad, results[0][2], rtol=1e-12, atol=1e-14)
        torch.testing.assert_close(weight_grad, results[0][3], rtol=1e-12, atol=1e-14)
        assert metrics == pytest.approx(results[0][4], rel=1e-12)


@pytest.mark.parametrize("aggregation", ["token_mean", "seq_mean"])
def test_micro_batched_equals_full_batch(aggregation):
    generator = torch.Generator().manual_seed(6)
    batch, length, hidden, vocab = 6, 9, 8, 30
    student_hidden = torch.randn(batch, length, hidden, generator=generator)
    teacher_hidden = torch.randn(batch, length, hidden, generator=generator)
    weight = torch.randn(vocab, hidden, generator=generator)
    response_mask = (torch.rand(batch, length, generator=generator) > 0.3).long()
    response_mask[3] = 0  # an empty response: contributes nothing, is not counted as a sequence
    options = dict(aggregation=aggregation, skip_first_tokens=2)

    def loss_and_grad(rows, **totals):
        lm_head = weight.clone().requires_grad_(True)
        weights = token_weights(response_mask[rows], **options, **totals)
        out = hidden_state_distillation_loss(student_hidden[rows].reshape(-1, hidden),
                                             teacher_hidden[rows].reshape(-1, hidden), lm_head, weights.reshape(-1))
        out.loss.backward()
        return out.loss.detach(), lm_head.grad

    full_loss, full_grad = loss_and_grad(slice(0, batch))
    num_tokens, num_sequences = batch_token_counts(response_mask, skip_first_tokens=2)
    parts = [loss_and_grad(rows, num_tokens_in_batch=num_tokens, num_sequences_in_batch=num_sequences)
             for rows in (slice(0, 2), slice(2, 5), slice(5, 6))]
    torch.testing.assert_close(sum(loss for loss, _ in parts), full_loss, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(sum(grad for _, grad in parts), full_grad, rtol=1e-5, atol=1e-7)


def test_token_weights_by_hand():
    # Left-padded second row: skipping is relative to each response's own first token.
    mask = torch.tensor([[1, 1, 1, 1, 0], [0, 0, 1, 1, 1]])
    token_mean = token_weights(mask, skip_first_tokens=1)
    expected = torch.tensor([[0, 1, 1, 1, 0], [0, 0, 0, 1, 1]]) / 5.0
    torch.testing.assert_close(token_mean, expected.float())
    seq_mean = token_weights(mask, aggregation="seq_mean", skip_first_tokens=1)
    expected = torch.tensor([[0, 1 / 3, 1 / 3, 1 / 3, 0], [0, 0, 0, 1 / 2, 1 / 2]]) / 2
    torch.testing.assert_close(seq_mean, expected.float())
    assert batch_token_counts(mask, skip_first_tokens=1) == (5.0, 2)
    assert torch.all(token_weights(torch.zeros(2, 3)) == 0)
    with pytest.raises(ValueError, match="num_tokens_in_batch"):
        token_weights(mask, num_tokens_in_batch=2)
    with pytest.raises(ValueError, match="aggregation"):
        token_weights(mask, aggregation="sum")


# ----------------------------------------------------------------------------- numerical edge cases
@pytest.mark.parametrize("divergence,beta", [("forward_kl", 0.5), ("reverse_kl", 0.5), ("jsd", 0.5)])
def test_teacher_zero_probabilities_stay_finite(divergence, beta):
    generator = torch.Generator().manual_seed(7)
    student_logits = torch.randn(4, 16, generator=generator).requires_grad_(True)
    teacher_logits = torch.randn(4, 16, generator=generator)
    teacher_logits[:, ::3] = float("-inf")  # exact zeros in P_t
    values = token_divergence(student_logits, teacher_logits, divergence=divergence, beta=beta)
    (grad,) = torch.autograd.grad(values.sum(), student_logits)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    if divergence != "reverse_kl":  # forward KL and JSD are finite in exact math too: compare with float64
        ref, _ = _ref_per_token(student_logits.double(), teacher_logits, divergence=divergence, beta=beta)
        assert _rel_err(values, ref) <= REL_TOL


@pytest.mark.parametrize("divergence", ["forward_kl", "reverse_kl", "jsd"])
def test_extreme_logits_stay_finite(divergence):
    generator = torch.Generator().manual_seed(8)
    student_logits = (1e4 * torch.randn(3, 40, generator=generator)).requires_grad_(True)
    teacher_logits = 1e4 * torch.randn(3, 40, generator=generator)
    values = token_divergence(student_logits, teacher_logits, divergence=divergence)
    (grad,) = torch.autograd.grad(values.sum(), student_logits)
    assert torch.isfinite(values).all() and torch.isfinite(grad).all()
    identical = token_divergence(teacher_logits, teacher_logits, divergence=divergence)
    assert torch.all(identical.abs() <= 1e-6)  # KL(P || P) = 0 even for near one-hot P


def test_all_masked_batch_gives_zero_loss_and_zero_gradients():
    student_hidden, teacher_hidden, weight, _, response_ids = _random_problem(seed=9)
    student_hidden.requires_grad_(True)
    weight.requires_grad_(True)
    for estimator, divergence in (("full", "forward_kl"), ("topk", "jsd"), ("sampled", "reverse_kl")):
        out = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, torch.zeros(12),
                                             response_ids=response_ids, estimator=estimator, divergence=divergence)
        grads = torch.autograd.grad(out.loss, (student_hidden, weight))
        assert out.loss.item() == 0.0 and all(torch.all(g == 0) for g in grads)
        assert out.metrics["tokens"] == 0 and all(math.isfinite(v) for v in out.metrics.values())


# ----------------------------------------------------------------------------- metrics
def test_metrics_match_direct_computation():
    student_hidden, teacher_hidden, weight, weights, _ = _random_problem(seed=10, vocab=64)
    out = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, topk=8,
                                         metric_sample_tokens=1000, chunk_tokens=5)
    counted = weights != 0
    student_logits, teacher_logits = (student_hidden @ weight.T)[counted], (teacher_hidden @ weight.T)[counted]
    student_probs, teacher_probs = torch.softmax(student_logits.double(), -1), torch.softmax(teacher_logits.double(), -1)
    exact, _ = _ref_per_token(student_logits, teacher_logits)
    estimate, _ = _ref_per_token(student_logits, teacher_logits, estimator="topk", topk=8)
    support = torch.argsort(teacher_probs, dim=-1, descending=True)[:, :8]
    expected = {
        "kl": exact.mean(),
        "teacher_entropy": -(teacher_probs * teacher_probs.log()).sum(-1).mean(),
        "student_entropy": -(student_probs * student_probs.log()).sum(-1).mean(),
        "topk_mass": teacher_probs.gather(-1, support).sum(-1).mean(),
        "topk_gap": (estimate - exact).abs().mean(),
        "tokens": counted.sum(),
    }
    for name, value in expected.items():
        assert out.metrics[name] == pytest.approx(value.item(), rel=1e-5), name


# ----------------------------------------------------------------------------- peers
def test_forward_kl_matches_torch_kl_div():
    generator = torch.Generator().manual_seed(11)
    student_logits, teacher_logits = (3 * torch.randn(2, 6, 10, 50, generator=generator)).unbind(0)
    peer = F.kl_div(torch.log_softmax(student_logits, -1), torch.log_softmax(teacher_logits, -1),
                    reduction="none", log_target=True).sum(-1)
    torch.testing.assert_close(token_divergence(student_logits, teacher_logits), peer, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("beta", [0.0, 0.3, 1.0])
def test_jsd_matches_trl_gkd(beta):
    from trl.experimental.gkd import GKDTrainer

    generator = torch.Generator().manual_seed(12)
    student_logits, teacher_logits = (2 * torch.randn(2, 2, 5, 40, generator=generator)).unbind(0)
    peer = GKDTrainer.generalized_jsd_loss(student_logits, teacher_logits, beta=beta, temperature=0.9, reduction="sum")
    ours = token_divergence(student_logits, teacher_logits, divergence="jsd", beta=beta, temperature=0.9).sum()
    torch.testing.assert_close(ours, peer, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("tail", ["renorm", "tail_bucket"])
@pytest.mark.parametrize("divergence,alpha", [("forward_kl", 0.0), ("reverse_kl", 1.0), ("jsd", 0.5)])
def test_student_topk_and_sampled_match_trl_sdft(tail, divergence, alpha):
    from trl.experimental.sdft import loss_utils

    student_hidden, teacher_hidden, weight, weights, response_ids = _random_problem(seed=13, vocab=40)
    weight.requires_grad_(True)
    ours = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, estimator="topk", topk=10,
                                          topk_source="student", topk_tail=tail, divergence=divergence, beta=alpha)
    student_logits, teacher_logits = student_hidden @ weight.T, teacher_hidden @ weight.detach().T
    peer = loss_utils.compute_topk_self_distillation_loss(student_logits, teacher_logits, distillation_topk=10,
                                                          distillation_alpha=alpha,
                                                          distillation_add_tail=tail == "tail_bucket")
    torch.testing.assert_close(ours.per_token, peer.detach() * (weights != 0), rtol=1e-5, atol=1e-6)
    if divergence == "reverse_kl":  # TRL's sampled loss has the same gradient (its value is not the KL)
        sampled = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights,
                                                 estimator="sampled", divergence="reverse_kl",
                                                 response_ids=response_ids)
        peer_sampled = loss_utils.compute_sampled_token_self_distillation_loss(
            student_logits[None], teacher_logits[None], response_ids[None], distillation_alpha=1.0)
        ours_grad = torch.autograd.grad(sampled.loss, weight)[0]
        peer_grad = torch.autograd.grad((peer_sampled[0] * weights).sum(), weight)[0]
        torch.testing.assert_close(ours_grad, peer_grad, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- input validation
def test_bad_inputs_raise_clear_errors():
    student_hidden, teacher_hidden, weight, weights, _ = _random_problem()
    with pytest.raises(ValueError, match="needs divergence .reverse_kl."):
        hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, estimator="sampled",
                                       response_ids=torch.zeros(12, dtype=torch.long))
    with pytest.raises(ValueError, match="response_ids"):
        hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, estimator="sampled",
                                       divergence="reverse_kl")
    with pytest.raises(ValueError, match="teacher_hidden"):
        hidden_state_distillation_loss(student_hidden, teacher_hidden[:5], weight, weights)
    with pytest.raises(ValueError, match="beta"):
        token_divergence(weight, weight, divergence="jsd", beta=1.5)
    with pytest.raises(ValueError, match="estimator"):
        hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, estimator="exact")


def test_fused_forward_kl_matches_autograd_below_the_logprob_floor():
    # Logit gaps > 1e4 push student log-probs under LOGPROB_FLOOR: the fused analytic gradient must still equal
    # autograd through the plain definition (token_divergence).
    generator = torch.Generator().manual_seed(14)
    student_hidden = torch.randn(6, 4, generator=generator).requires_grad_(True)
    teacher_hidden = torch.randn(6, 4, generator=generator)
    weight = (3000 * torch.randn(30, 4, generator=generator)).requires_grad_(True)
    weights = torch.full((6,), 1 / 6)
    out = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights)
    plain = (token_divergence(student_hidden @ weight.T, teacher_hidden @ weight.T) * weights).sum()
    assert ((student_hidden @ weight.T).log_softmax(-1) < -1e4).any()
    torch.testing.assert_close(out.loss, plain)
    for ours, ref in zip(torch.autograd.grad(out.loss, (student_hidden, weight)),
                         torch.autograd.grad(plain, (student_hidden, weight))):
        assert torch.isfinite(ours).all()
        torch.testing.assert_close(ours, ref)


def test_topk_gap_diagnostic_is_opt_in():
    """The top-k gap costs an extra exact and top-k pass; by default it is not computed nor reported."""
    student_hidden, teacher_hidden, weight, weights, _ = _random_problem(seed=11, vocab=64)
    default = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, topk=8)
    assert "topk_gap" not in default.metrics and "topk_gap_rel" not in default.metrics
    asked = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, topk=8,
                                           metric_sample_tokens=4)
    assert asked.metrics["topk_gap"] > 0
    torch.testing.assert_close(asked.loss, default.loss)  # a diagnostic only


# ----------------------------------------------------------------------------- bf16 inputs
BF16_REL_TOL = 1e-4  # float32 logits and grad_weight: ~1e-6; a bf16 matmul and bf16 accumulation: ~1e-2


@pytest.mark.parametrize("divergence", ["forward_kl", "jsd"])
def test_bf16_inputs_are_computed_in_float32_against_float64(divergence):
    """bf16 hidden states and lm_head (the GPU preset's compute dtype), 64 tokens in chunks of 8: loss, per-token
    values and both gradients within BF16_REL_TOL of float64 math on the same bf16 values. The tolerance is what
    float32 logits give (~1e-6 here); bf16 logits (8 mantissa bits, errors ~0.02 at logits ~5) and a grad_weight
    summed in bf16 over the 8 chunks are ~1e-2 off."""
    student_hidden, teacher_hidden, weight, weights, _ = _random_problem(seed=7, num_tokens=64, hidden=64, vocab=512)
    student_hidden, teacher_hidden, weight = (t.to(torch.bfloat16) for t in (student_hidden, teacher_hidden, weight))
    student_hidden.requires_grad_(True)
    weight.requires_grad_(True)
    out = hidden_state_distillation_loss(student_hidden, teacher_hidden, weight, weights, divergence=divergence,
                                         chunk_tokens=8)
    grads = torch.autograd.grad(out.loss, (student_hidden, weight))

    student64, weight64 = (t.detach().double().requires_grad_(True) for t in (student_hidden, weight))
    surrogate, values = _ref_per_token(student64 @ weight64.T, teacher_hidden.double() @ weight64.detach().T,
                                       divergence=divergence, beta=0.5)
    ref_loss = (surrogate * weights.double()).sum()
    ref_grads = torch.autograd.grad(ref_loss, (student64, weight64))
    counted = weights != 0
    assert _rel_err(out.per_token[counted], values[counted]) <= BF16_REL_TOL
    assert _rel_err(out.loss, ref_loss) <= BF16_REL_TOL
    assert grads[1].dtype == torch.bfloat16  # autograd's contract: the gradient in the parameter's dtype
    # The gradients come back in bf16: within twice bf16's rounding (2^-9 relative) of the float64 gradient.
    for ours, ref in zip(grads, ref_grads):
        assert _rel_err(ours, ref) <= 2 * 2**-9
