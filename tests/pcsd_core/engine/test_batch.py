"""Batch layouts: packed prompt groups score every response as if it followed its prompt alone."""

from __future__ import annotations

import pytest
import torch

from pcsd_core.engine.batch import flat_response_weights, pack_prompt_groups, pad_rows

PAD = 0


def test_packed_layout_by_hand():
    """Prompt A with two responses, prompt B with one; every tensor checked against a hand-made layout."""
    prompts = [[11, 12, 13], [21, 22], [11, 12, 13]]
    responses = [[14, 15], [23], [16, 17, 18]]
    inputs = pack_prompt_groups(prompts, responses, PAD)

    # Row 0: prompt A, then responses 0 and 2 without their last token; row 1: prompt B (response 1 is one
    # token, predicted by B's last state, so it adds no input), padded to the width of row 0.
    assert inputs.input_ids.tolist() == [[11, 12, 13, 14, 16, 17], [21, 22, PAD, PAD, PAD, PAD]]
    assert inputs.position_ids.tolist() == [[0, 1, 2, 3, 3, 4], [0, 1, 0, 0, 0, 0]]
    # Response 0: A's last state (2), then its own token 14 (3). Response 1: B's last state (6 + 1).
    # Response 2: A's last state again (2), then 16 (4) and 17 (5).
    assert inputs.response_positions.tolist() == [2, 3, 7, 2, 4, 5]
    assert inputs.response_tokens.tolist() == [14, 15, 23, 16, 17, 18]

    sees = inputs.attention_mask[:, 0].int()
    assert sees[0].tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [1, 1, 1, 0, 0, 0],
        [1, 1, 1, 1, 0, 0],  # response 0 sees the prompt and itself
        [1, 1, 1, 0, 1, 0],  # response 2 sees the prompt, not response 0
        [1, 1, 1, 0, 1, 1],
    ]
    assert sees[1].tolist() == [
        [1, 0, 0, 0, 0, 0],
        [1, 1, 0, 0, 0, 0],
        [0, 0, 1, 0, 0, 0],  # padding sees only itself: no fully masked softmax row
        [0, 0, 0, 1, 0, 0],
        [0, 0, 0, 0, 1, 0],
        [0, 0, 0, 0, 0, 1],
    ]


def test_flat_weights_follow_the_response_order():
    weights = torch.tensor([[1.0, 2.0, 0.0], [3.0, 0.0, 0.0], [4.0, 5.0, 6.0]])
    assert flat_response_weights(weights, [2, 1, 3]).tolist() == [1.0, 2.0, 3.0, 4.0, 5.0, 6.0]


def grouped_rows(seed: int = 0):
    """Three prompts x two responses, prompt-major like a rollout; lengths differ, one response is one token."""
    generator = torch.Generator().manual_seed(seed)

    def ids(length: int) -> list[int]:
        return torch.randint(10, 40000, (length,), generator=generator).tolist()

    prompt_set = [ids(7), ids(12), ids(4)]
    prompts = [prompt_set[i // 2] for i in range(6)]
    responses = [ids(length) for length in (5, 1, 9, 3, 6, 6)]
    return prompts, responses


def response_states(model, inputs):
    hidden = model.model(input_ids=inputs.input_ids, attention_mask=inputs.attention_mask,
                         position_ids=inputs.position_ids).last_hidden_state
    return hidden.reshape(-1, hidden.shape[-1])[inputs.response_positions]


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_packed_states_and_gradients_equal_padded(tiny_model_dir, attn_implementation):
    """Same response states and the same parameter gradients as one padded row per response (float64)."""
    from pcsd_core.engine.distillation_module import DistillationModule
    from pcsd_core.loss.distillation import LossSpec
    from pcsd_core.models import load_model

    prompts, responses = grouped_rows()
    probe = torch.randn(sum(len(r) for r in responses), 64, generator=torch.Generator().manual_seed(1),
                        dtype=torch.float64)
    results = {}
    for name, layout in (("padded", pad_rows), ("packed", pack_prompt_groups)):
        module = DistillationModule(load_model(str(tiny_model_dir), dtype="float32", device="cpu",
                                               attn_implementation=attn_implementation).double(), LossSpec())
        inputs = layout(prompts, responses, PAD)
        states = module(inputs.input_ids, inputs.attention_mask, inputs.position_ids, inputs.response_positions)
        (states * probe).sum().backward()
        results[name] = (states.detach(), inputs.response_tokens,
                         {n: p.grad for n, p in module.named_parameters() if p.grad is not None})
        assert not states.isnan().any()
    (padded_states, padded_tokens, padded_grads), (packed_states, packed_tokens, packed_grads) = results.values()
    assert packed_tokens.tolist() == padded_tokens.tolist()
    torch.testing.assert_close(packed_states, padded_states, rtol=1e-5, atol=1e-6)  # float32 softmax in eager
    assert packed_grads.keys() == padded_grads.keys()
    # transformers' RMSNorm (and eager softmax) compute in float32 even in a float64 model, and packing sums a
    # prompt's gradient from its two responses before that rounding, padding after it: float32-level
    # differences (measured 4e-8 of the norm), where a wrong mask or position gives errors of order 1.
    for name in padded_grads:
        error = (packed_grads[name] - padded_grads[name]).norm() / padded_grads[name].norm()
        assert error < 1e-6, f"{name}: packed gradient differs by {error:.2e} of its norm"


def test_packing_shares_the_prompt_tokens():
    """The point of packing: a prompt's tokens go through the model once per micro-batch, not once per response."""
    prompts, responses = grouped_rows()
    packed = pack_prompt_groups(prompts, responses, PAD)
    padded = pad_rows(prompts, responses, PAD)
    packed_tokens = int((packed.input_ids != PAD).sum())  # random ids are >= 10, so PAD marks only padding
    distinct_prompts = {tuple(prompt) for prompt in prompts}
    assert packed.input_ids.shape[0] == len(distinct_prompts) == 3
    assert packed_tokens == sum(map(len, distinct_prompts)) + sum(len(r) - 1 for r in responses)
    assert packed_tokens < int(padded.attention_mask.sum()) == sum(map(len, prompts)) + sum(map(len, responses))
