"""SGLangRolloutEngine against a recording fake of `sglang.Engine`: the sleep/wake and weight-sync
protocol (colocated and split), sampling-parameter translation, output parsing, the missing-import error."""

from __future__ import annotations

import sys

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

from pcsd_core.config import PCSDConfig
from pcsd_core.rollout import create_rollout_engine
from pcsd_core.rollout.base import SamplingParams
from pcsd_core.rollout.sglang import SGLangRolloutEngine, parse_output, to_sglang_sampling_params

from fake_sglang import FakeBroadcaster, FakeSGLangEngine, ProtocolError

EOS = 2
PROMPTS = [[5, 6, 7], [8, 9]]


def _tiny_llama(seed: int) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    config = LlamaConfig(
        vocab_size=64, hidden_size=16, intermediate_size=32, num_hidden_layers=2, num_attention_heads=2,
        num_key_value_heads=1, eos_token_id=EOS, tie_word_embeddings=True,
    )
    return LlamaForCausalLM(config)


@pytest.fixture()
def rollout_and_actor():
    """The engine starts from the initial weights; the actor has taken one real SGD step since."""
    rollout_weights = _tiny_llama(seed=0).state_dict()
    actor = _tiny_llama(seed=0)
    batch = torch.tensor([[1, 3, 5, 7, 9, 11]])
    actor(input_ids=batch, labels=batch).loss.backward()
    torch.optim.SGD(actor.parameters(), lr=1.0).step()
    return rollout_weights, actor


def _assert_engine_holds(fake: FakeSGLangEngine, actor_state: dict[str, torch.Tensor]) -> None:
    assert set(fake.weights) == set(actor_state)
    for name, tensor in actor_state.items():
        assert fake.weights[name].dtype == tensor.dtype, name
        assert torch.equal(fake.weights[name], tensor), name


def test_colocated_sleep_wake_update_generate(rollout_and_actor):
    rollout_weights, actor = rollout_and_actor
    fake = FakeSGLangEngine(rollout_weights, eos_token_id=EOS)
    # A small bucket forces several update calls, so cache flushing per bucket is visible.
    engine = SGLangRolloutEngine("unused", placement="colocated", engine=fake, bucket_bytes=8_000)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)

    before = engine.generate(PROMPTS, n=1, sampling=sampling)
    engine.sleep()
    engine.sleep()  # idempotent: the engine must not release twice
    with pytest.raises(RuntimeError, match="wake\\(\\) first"):
        engine.generate(PROMPTS, n=1, sampling=sampling)
    with pytest.raises(RuntimeError, match="wake\\(\\) first"):
        engine.update_weights(actor.state_dict().items())
    engine.wake()
    engine.update_weights(actor.state_dict().items())
    after = engine.generate(PROMPTS, n=1, sampling=sampling)

    methods = [method for method, _ in fake.calls]
    updates = [kwargs for method, kwargs in fake.calls if method == "update_weights_from_tensor"]
    assert len(updates) > 1
    assert methods == ["generate", "release_memory_occupation", "resume_memory_occupation"] + [
        "update_weights_from_tensor"
    ] * len(updates) + ["generate"]
    assert [update["flush_cache"] for update in updates] == [False] * (len(updates) - 1) + [True]
    assert [name for update in updates for name in update["names"]] == list(actor.state_dict())
    _assert_engine_holds(fake, actor.state_dict())
    assert [g.response_ids for g in after] != [g.response_ids for g in before]  # new weights, new samples


def test_split_syncs_over_the_weight_group_in_bf16(rollout_and_actor):
    rollout_weights, actor = rollout_and_actor
    actor_state = {name: tensor.to(torch.bfloat16) for name, tensor in actor.state_dict().items()}
    fake = FakeSGLangEngine({name: t.to(torch.bfloat16) for name, t in rollout_weights.items()}, eos_token_id=EOS)
    broadcaster = FakeBroadcaster(fake)
    engine = SGLangRolloutEngine(
        "unused", placement="split", tp_size=2, engine=fake, broadcaster=broadcaster,
        master_address="10.0.0.1", master_port=29555, group_name="pcsd_sync", bucket_bytes=4_000,
    )

    method, init = fake.calls[0]
    assert method == "init_weights_update_group"
    assert init == {
        "master_address": "10.0.0.1", "master_port": 29555, "rank_offset": 1, "world_size": 3,
        "group_name": "pcsd_sync", "backend": "nccl",
    }
    engine.sleep()  # split rollout owns its GPUs: sleep/wake release nothing
    engine.wake()
    engine.update_weights(actor_state.items())
    generations = engine.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=0.0, max_new_tokens=8))

    updates = [kwargs for method, kwargs in fake.calls if method == "update_weights_from_distributed"]
    assert [method for method, _ in fake.calls] == ["init_weights_update_group"] + [
        "update_weights_from_distributed"
    ] * len(updates) + ["generate"]
    assert len(updates) > 1 and all(update["group_name"] == "pcsd_sync" for update in updates)
    assert {dtype for update in updates for dtype in update["dtypes"]} == {"bfloat16"}
    assert [update["flush_cache"] for update in updates] == [False] * (len(updates) - 1) + [True]
    assert broadcaster.tensors_sent == len(actor_state)
    _assert_engine_holds(fake, actor_state)
    assert len(generations) == 4


def test_fake_catches_an_announcement_without_broadcast(rollout_and_actor):
    """The fake must fail where real NCCL would hang, or the split test above could not fail."""
    fake = FakeSGLangEngine(rollout_and_actor[0], timeout_s=0.2)
    fake.group = {"group_name": "g"}
    with pytest.raises(ProtocolError, match="none came"):
        fake.update_weights_from_distributed(names=["lm_head.weight"], dtypes=["float32"], shapes=[[64, 16]], group_name="g")
    fake.engine_joined.set()
    with pytest.raises(ProtocolError, match="no receiver"):
        FakeBroadcaster(fake).broadcast(torch.zeros(1))
    with pytest.raises(ProtocolError, match="rendezvous timed out"):
        FakeSGLangEngine({}, timeout_s=0.2).init_weights_update_group("h", 1, 1, 2, "g")


def test_generate_sends_prompt_major_repeats_and_parses_outputs(rollout_and_actor):
    fake = FakeSGLangEngine(rollout_and_actor[0], eos_token_id=EOS)
    engine = SGLangRolloutEngine("unused", engine=fake)

    cut = engine.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3, seed=11))
    done = engine.generate(PROMPTS, n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=8))

    first_call = fake.calls[0][1]
    assert first_call["input_ids"] == [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
    assert [params["sampling_seed"] for params in first_call["sampling_params"]] == [11, 12, 13, 14]
    assert [g.prompt_index for g in cut] == [0, 0, 1, 1]
    assert all(len(g.response_ids) == 3 and not g.finished for g in cut)  # finish_reason "length"
    assert [g.prompt_index for g in done] == [0, 1]
    assert all(g.finished and g.response_ids[-1] == EOS and len(g.response_ids) == 4 for g in done)


def test_sampling_params_translation():
    greedy = to_sglang_sampling_params(SamplingParams(temperature=0.0, top_p=0.5, max_new_tokens=7), num_requests=3)
    assert greedy == {"temperature": 0.0, "top_p": 1.0, "max_new_tokens": 7, "skip_special_tokens": False}
    sampled = to_sglang_sampling_params(SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=5), num_requests=2)
    assert sampled == {"temperature": 0.8, "top_p": 0.95, "max_new_tokens": 5, "skip_special_tokens": False}
    with pytest.raises(ValueError, match="top_p \\(0.0\\) must be in \\(0, 1\\]"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="temperature \\(-1.0\\) must be >= 0"):
        SamplingParams(temperature=-1.0)
    with pytest.raises(ValueError, match="max_new_tokens \\(0\\) must be >= 1"):
        SamplingParams(max_new_tokens=0)


def test_parse_output_finish_reasons():
    length = parse_output({"output_ids": [4, 5], "meta_info": {"finish_reason": {"type": "length", "length": 2}}}, 3)
    assert (length.prompt_index, length.response_ids, length.finished) == (3, [4, 5], False)
    with_eos = parse_output({"output_ids": [4, EOS], "meta_info": {"finish_reason": {"type": "stop", "matched": EOS}}}, 0)
    assert with_eos.response_ids == [4, EOS] and with_eos.finished
    # Should an SGLang version strip the matched stop token, the EOS is put back (the Generation contract).
    stripped = parse_output({"output_ids": [4], "meta_info": {"finish_reason": {"type": "stop", "matched": EOS}}}, 0)
    assert stripped.response_ids == [4, EOS] and stripped.finished
    with pytest.raises(RuntimeError, match="aborted a request: out of memory"):
        parse_output({"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "message": "out of memory"}}}, 0)


def test_engine_failure_message_is_raised(rollout_and_actor):
    class RefusingEngine(FakeSGLangEngine):
        def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
            return False, "shape mismatch in model.layers.0"

    engine = SGLangRolloutEngine("unused", engine=RefusingEngine(rollout_and_actor[0]))
    with pytest.raises(RuntimeError, match="update_weights failed: shape mismatch in model.layers.0"):
        engine.update_weights(rollout_and_actor[1].state_dict().items())
    with pytest.raises(ValueError, match="got no tensors"):
        engine.update_weights([])


def test_missing_sglang_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sglang", None)  # makes `import sglang` raise ImportError
    with pytest.raises(ImportError, match=r"pip install '\.\[sglang\]'.*CUDA machine"):
        SGLangRolloutEngine(str(tmp_path))
    cfg = PCSDConfig.from_dict({"rollout": {"engine": "sglang"}, "train": {"device": "cuda"}})
    with pytest.raises(ImportError, match="rollout.engine 'sglang' needs the `sglang` package"):
        create_rollout_engine(cfg, str(tmp_path))


def test_bad_placement_fails_before_launch():
    with pytest.raises(ValueError, match="rollout.placement \\('nearby'\\) must be one of"):
        SGLangRolloutEngine("unused", placement="nearby")
