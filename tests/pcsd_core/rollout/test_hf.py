"""HFRolloutEngine: batched left-padded generation against per-prompt and hand-written references,
sampling order and reproducibility, truncation, and weight sync (rollout logits == actor logits)."""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import pytest
import torch
from transformers import AutoModelForCausalLM, DynamicCache

from pcsd_core.config.schema import PCSDConfig
from pcsd_core.rollout import create_rollout_engine
from pcsd_core.rollout.base import SamplingParams
from pcsd_core.rollout.hf import HFRolloutEngine
from pcsd_core.distributed.weight_sync import WeightPiece

GREEDY = SamplingParams(temperature=0.0, max_new_tokens=10)


def _chat_ids(tokenizer, question: str) -> list[int]:
    ids = tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True, tokenize=True)
    return list(ids["input_ids"] if hasattr(ids, "keys") else ids)


def _reference_greedy(model, prompt: list[int], max_new_tokens: int, eos_token_id: int) -> list[int]:
    """Greedy decoding by hand: one unpadded sequence, argmax per step (independent of `generate`)."""
    response: list[int] = []
    step_input, cache = torch.tensor([prompt]), DynamicCache(config=model.config)
    with torch.no_grad():
        for _ in range(max_new_tokens):
            # The cache is the 4th positional argument (named `cache` or `past_key_values` by version).
            logits = model(step_input, None, None, cache, use_cache=True).logits
            next_token = int(logits[0, -1].argmax())
            response.append(next_token)
            if next_token == eos_token_id:
                break
            step_input = torch.tensor([[next_token]])
    return response


@pytest.fixture(scope="module")
def smollm2_engine(smollm2_path):
    engine = HFRolloutEngine(smollm2_path, batch_size=3)
    yield engine
    engine.close()


def test_batched_left_padded_greedy_equals_hand_written_greedy_smollm2(smollm2_engine, smollm2_tokenizer):
    questions = ["Hi", "What is 2+3?", "Name three colours of the rainbow, please."]
    prompts = [_chat_ids(smollm2_tokenizer, question) for question in questions]
    assert len({len(prompt) for prompt in prompts}) == 3  # different lengths, so the batch is padded

    batched = smollm2_engine.generate(prompts, n=1, sampling=GREEDY)

    eos = smollm2_tokenizer.eos_token_id
    for generation, prompt in zip(batched, prompts):
        expected = _reference_greedy(smollm2_engine.model, prompt, GREEDY.max_new_tokens, eos)
        assert generation.response_ids == expected
        assert generation.finished == (expected[-1] == eos)
        assert eos not in generation.response_ids[:-1]  # nothing (no padding) after the first EOS
    assert any(g.finished for g in batched)  # a short answer ended early inside a longer batch
    assert len({len(g.response_ids) for g in batched}) > 1


def test_greedy_n_and_order_across_sorted_chunks(tiny_model_dir):
    engine = HFRolloutEngine(str(tiny_model_dir), batch_size=2)  # 5 prompts -> 3 chunks after sorting
    prompts = [[5, 6, 7, 8, 9, 10], [11], [12, 13, 14], [15, 16, 17, 18, 19, 20, 21, 22], [23, 24]]
    sampling = SamplingParams(temperature=0.0, max_new_tokens=5)

    batched = engine.generate(prompts, n=2, sampling=sampling)
    alone = [engine.generate([prompt], n=1, sampling=sampling)[0] for prompt in prompts]

    assert [g.prompt_index for g in batched] == [0, 0, 1, 1, 2, 2, 3, 3, 4, 4]
    for row, generation in enumerate(batched):
        assert generation.response_ids == alone[row // 2].response_ids
        assert generation.prompt_index == row // 2


def test_max_new_tokens_truncates_and_marks_unfinished(tiny_model_dir):
    # A random model almost never samples EOS (1 in 49152), so every response runs to the limit.
    engine = HFRolloutEngine(str(tiny_model_dir))
    generations = engine.generate([[1, 2, 3], [4]], n=3, sampling=SamplingParams(temperature=1.0, max_new_tokens=3, seed=0))
    assert len(generations) == 6
    assert [g.prompt_index for g in generations] == [0, 0, 0, 1, 1, 1]
    assert all(len(g.response_ids) == 3 and not g.finished for g in generations)


def test_seed_reproducible_and_global_rng_untouched(tiny_model_dir):
    engine = HFRolloutEngine(str(tiny_model_dir), batch_size=2)
    prompts = [[1, 2, 3], [4, 5], [6]]

    rng_before = torch.get_rng_state()
    first = engine.generate(prompts, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=6, seed=7))
    assert torch.equal(torch.get_rng_state(), rng_before)  # the trainer's RNG stream is not moved
    again = engine.generate(prompts, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=6, seed=7))
    other = engine.generate(prompts, n=2, sampling=SamplingParams(temperature=1.0, max_new_tokens=6, seed=8))

    assert [g.response_ids for g in first] == [g.response_ids for g in again]
    assert [g.response_ids for g in first] != [g.response_ids for g in other]
    # The two samples of one prompt differ (they are not one sample repeated).
    assert first[0].response_ids != first[1].response_ids


def test_decode_prefills_each_prompt_once_and_drops_finished_rows(smollm2_engine, smollm2_tokenizer):
    """One prefill of the 3 prompts (not 3 x n rows), then single-token steps over the rows still running."""
    questions = ["What is 2+3? Answer with the number only.", "Name three colours of the rainbow, please.", "Hi"]
    prompts = [_chat_ids(smollm2_tokenizer, question) for question in questions]
    shapes = []
    hook = smollm2_engine.model.register_forward_pre_hook(
        lambda module, args, kwargs: shapes.append(tuple(kwargs["input_ids"].shape)), with_kwargs=True)
    try:
        generations = smollm2_engine.generate(prompts, n=3, sampling=SamplingParams(temperature=0.7, max_new_tokens=40,
                                                                                    seed=11))
    finally:
        hook.remove()

    assert shapes[0] == (3, max(map(len, prompts)))
    decode_rows = [rows for rows, width in shapes[1:] if width == 1]
    assert len(decode_rows) == len(shapes) - 1 and decode_rows[0] == 9
    assert decode_rows == sorted(decode_rows, reverse=True)  # rows only leave
    lengths = [len(g.response_ids) for g in generations]
    # A step runs once per token of the longest response still going; each row's count equals its length.
    assert len(decode_rows) == max(lengths) - 1
    for step, rows in enumerate(decode_rows):
        assert rows == sum(length > step + 1 for length in lengths)
    assert any(g.finished for g in generations) and len(set(lengths)) > 1
    assert len({tuple(g.response_ids) for g in generations}) > 3  # samples, not one response repeated


def _train_one_sgd_step(model, lr: float) -> None:
    """One real optimizer step on a next-token loss, so the actor's weights differ from the engine's."""
    model.train()
    optimizer = torch.optim.SGD(model.parameters(), lr=lr)
    batch = torch.tensor([[3, 1, 4, 1, 5, 9, 2, 6], [2, 7, 1, 8, 2, 8, 1, 8]])
    model(input_ids=batch, labels=batch).loss.backward()
    optimizer.step()
    model.eval()


@pytest.mark.parametrize("send", ["state_dict", "named_parameters"])
def test_rollout_logits_equal_actor_logits_after_sync(tiny_model_dir, send):
    engine = HFRolloutEngine(str(tiny_model_dir))
    actor = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    _train_one_sgd_step(actor, lr=50.0)
    probe = torch.tensor([[7, 8, 9, 10, 11]])
    sampling = SamplingParams(temperature=0.0, max_new_tokens=6)
    before_tokens = engine.generate(probe.tolist(), n=1, sampling=sampling)[0].response_ids
    with torch.no_grad():
        actor_logits = actor(probe).logits
        assert not torch.allclose(engine.model(probe).logits, actor_logits, atol=1e-4)

    # state_dict carries the tied alias lm_head.weight; named_parameters sends the embedding once.
    named = actor.state_dict().items() if send == "state_dict" else actor.named_parameters()
    engine.update_weights((name, tensor.detach()) for name, tensor in named)

    with torch.no_grad():
        torch.testing.assert_close(engine.model(probe).logits, actor_logits, rtol=0, atol=1e-6)
    after_tokens = engine.generate(probe.tolist(), n=1, sampling=sampling)[0].response_ids
    eos = engine.eos_token_ids[0]
    assert after_tokens == _reference_greedy(actor, probe[0].tolist(), 6, eos)
    assert after_tokens != before_tokens


def test_update_weights_rejects_unknown_missing_and_misshaped(tiny_model_dir):
    engine = HFRolloutEngine(str(tiny_model_dir))
    full = {name: tensor.clone() for name, tensor in engine.model.state_dict().items()}
    with pytest.raises(KeyError, match="unknown parameter 'model.not_a_layer.weight'"):
        engine.update_weights([*full.items(), ("model.not_a_layer.weight", torch.zeros(1))])
    name = "model.layers.0.mlp.up_proj.weight"
    with pytest.raises(ValueError, match="has shape"):
        engine.update_weights([(name, torch.zeros(3, 3))])
    with pytest.raises(ValueError, match="missing 1 parameter"):
        engine.update_weights([(key, value) for key, value in full.items() if key != name])


def test_update_weights_takes_row_pieces_in_any_order(tiny_model_dir):
    """Rows of a tensor, as the train ranks send their shards, land in the parameter's rows: logits equal the actor's."""
    engine = HFRolloutEngine(str(tiny_model_dir))
    actor = AutoModelForCausalLM.from_pretrained(tiny_model_dir, dtype=torch.float32)
    _train_one_sgd_step(actor, lr=50.0)
    pieces = []
    for name, tensor in actor.named_parameters():
        rows = len(tensor)
        cuts = [0, rows // 3, rows // 2, rows]
        pieces += [WeightPiece(name, tensor.detach()[a:b], a, rows) for a, b in zip(cuts, cuts[1:]) if b > a]
    engine.update_weights(reversed(pieces))  # rows in any order, tensors interleaved: the HF engine copies in place
    probe = torch.tensor([[7, 8, 9, 10, 11]])
    with torch.no_grad():
        torch.testing.assert_close(engine.model(probe).logits, actor(probe).logits, rtol=0, atol=1e-6)


def test_update_weights_rejects_rows_missing_twice_or_out_of_place(tiny_model_dir):
    engine = HFRolloutEngine(str(tiny_model_dir))
    full = {name: tensor.clone() for name, tensor in engine.model.named_parameters()}
    name = "model.layers.0.mlp.up_proj.weight"  # (128, 64)
    others = [(key, value) for key, value in full.items() if key != name]
    rows = full[name]
    with pytest.raises(ValueError, match=rf"rows of \['{name}'\] incompletely.*\(0, 100\).* of 128"):
        engine.update_weights([*others, WeightPiece(name, rows[:100], 0, 128)])
    with pytest.raises(ValueError, match="incompletely or more than once"):
        engine.update_weights([*others, WeightPiece(name, rows[:100], 0, 128), WeightPiece(name, rows[50:], 50, 128)])
    with pytest.raises(ValueError, match="rows 100..129 of 128"):
        engine.update_weights([WeightPiece(name, rows[:29], 100, 128)])
    with pytest.raises(ValueError, match=r"row shape \(32,\) do not fit"):
        engine.update_weights([WeightPiece(name, rows[:4, :32], 0, 128)])


def test_sleep_is_a_no_op_on_cpu_and_bad_arguments_fail_early(tiny_model_dir):
    engine = HFRolloutEngine(str(tiny_model_dir))
    sampling = SamplingParams(temperature=0.0, max_new_tokens=3)
    before = engine.generate([[1, 2]], n=1, sampling=sampling)
    engine.sleep()  # nothing to free on CPU: generating needs no weight sync first
    assert engine.generate([[1, 2]], n=1, sampling=sampling) == before
    with pytest.raises(ValueError, match="n \\(0\\) must be >= 1"):
        engine.generate([[1, 2]], n=0, sampling=sampling)
    with pytest.raises(ValueError, match="prompt\\(s\\) \\[1\\] are empty"):
        engine.generate([[1], []], n=1, sampling=sampling)
    with pytest.raises(ValueError, match="batch_size \\(0\\) must be >= 1"):
        HFRolloutEngine(str(tiny_model_dir), batch_size=0)


def test_create_rollout_engine_builds_hf_from_config(tiny_model_dir):
    cfg = config_from_dict({"rollout": {"engine": "hf", "batch_size": 3}, "train": {"device": "cpu"}})
    engine = create_rollout_engine(cfg.rollout, cfg.model, str(tiny_model_dir), device=cfg.train.device, seed=0)
    assert isinstance(engine, HFRolloutEngine)
    assert engine.batch_size == 3 and engine.device.type == "cpu"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_sleep_frees_gpu_memory_and_the_weight_sync_restores_it(tiny_model_dir):
    engine = HFRolloutEngine(str(tiny_model_dir), device="cuda")
    sampling = SamplingParams(temperature=0.0, max_new_tokens=4)
    before = engine.generate([[1, 2, 3]], n=2, sampling=sampling)
    allocated_awake = torch.cuda.memory_allocated()
    engine.sleep()
    assert torch.cuda.memory_allocated() < allocated_awake
    with pytest.raises(RuntimeError, match="after sleep\\(\\); update_weights\\(\\) brings"):
        engine.generate([[1, 2, 3]], n=1, sampling=sampling)
    engine.update_weights(engine.model.state_dict().items())  # wakes the engine: the weights come back first
    assert engine.generate([[1, 2, 3]], n=2, sampling=sampling) == before
