"""SGLangRolloutEngine against a fake of `sglang.Engine` (fake_sglang.py): sleep and the phased wake inside the
weight sync, with its
memory budget, the lazy per-engine weight-sync group, sampling and finish-status translation, the EOS
set shared with the HF engine, and the errors raised before any GPU work."""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import json
import sys

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from pcsd_core.config.schema import PCSDConfig
from pcsd_core.rollout import create_rollout_engine
from pcsd_core.rollout.base import SamplingParams, load_eos_token_ids
from pcsd_core.rollout.hf import HFRolloutEngine
from pcsd_core.rollout.sglang import SGLangRolloutEngine
from pcsd_core.rollout.sglang_api import parse_output, to_sglang_sampling_params
from pcsd_core.distributed.weight_sync import WeightPiece

from fake_sglang import FakeBroadcaster, FakeSGLangEngine, ProtocolError, registered_group_names

EOS = 2
PROMPTS = [[5, 6, 7], [8, 9]]
GIB = 1 << 30


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


def _colocated(fake: FakeSGLangEngine, **options) -> SGLangRolloutEngine:
    return SGLangRolloutEngine("unused", engine=fake, eos_token_ids=[EOS], gpu_memory_probe=fake.memory_probe,
                               **options)


def _assert_engine_holds(fake: FakeSGLangEngine, actor_state: dict[str, torch.Tensor]) -> None:
    assert set(fake.weights) == set(actor_state)
    for name, tensor in actor_state.items():
        assert fake.weights[name].dtype == tensor.dtype, name
        assert torch.equal(fake.weights[name], tensor), name


def test_colocated_wake_is_phased_weights_then_update_then_cache(rollout_and_actor):
    """The engine owns its sleep/wake: `sleep` releases, and the next `update_weights` wakes it in phases."""
    rollout_weights, actor = rollout_and_actor
    fake = FakeSGLangEngine(rollout_weights, eos_token_id=EOS)
    # A small bucket forces several update calls, so cache flushing per bucket is visible.
    engine = _colocated(fake, bucket_bytes=8_000)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)

    before = engine.generate(PROMPTS, n=1, sampling=sampling)
    engine.sleep()
    engine.sleep()  # idempotent: the engine must not release twice
    with pytest.raises(RuntimeError, match="after sleep\\(\\) without update_weights\\(\\).*undefined"):
        engine.generate(PROMPTS, n=1, sampling=sampling)
    engine.update_weights(actor.state_dict().items())
    after = engine.generate(PROMPTS, n=1, sampling=sampling)

    updates = [kwargs for method, kwargs in fake.calls if method == "update_weights_from_tensor"]
    assert len(updates) > 1
    assert [(method, kwargs.get("tags")) for method, kwargs in fake.calls] == [
        ("generate", None),
        ("release_memory_occupation", ["kv_cache", "cuda_graph"]),
        ("release_memory_occupation", ["weights"]),
        ("resume_memory_occupation", ["weights"]),
    ] + [("update_weights_from_tensor", None)] * len(updates) + [
        ("resume_memory_occupation", ["kv_cache", "cuda_graph"]),  # only after the last weight bucket
        ("generate", None),
    ]
    assert [update["flush_cache"] for update in updates] == [False] * (len(updates) - 1) + [True]
    assert [name for update in updates for name in update["names"]] == list(actor.state_dict())
    _assert_engine_holds(fake, actor.state_dict())
    assert [g.response_ids for g in after] != [g.response_ids for g in before]  # new weights, new samples


@pytest.mark.parametrize("placement", ["colocated", "split"])
def test_row_pieces_from_two_ranks_reach_sglang_as_whole_tensors(rollout_and_actor, placement):
    """SGLang loads whole tensors: the adapter assembles the rows each train rank sends of its shard."""
    rollout_weights, actor = rollout_and_actor
    fake = FakeSGLangEngine(rollout_weights, eos_token_id=EOS)
    options = {"placement": "split", "tp_size": 1, "broadcaster": FakeBroadcaster(fake)} if placement == "split" else {}
    engine = SGLangRolloutEngine("unused", engine=fake, eos_token_ids=[EOS], bucket_bytes=2_000, **options)
    state = actor.state_dict()
    pieces = []
    for name, tensor in state.items():  # two ranks' halves, as FSDP2 shards dim 0, each half in two slices
        rows = len(tensor)
        cuts = sorted({0, rows // 4, rows // 2, 3 * rows // 4, rows})
        pieces += [WeightPiece(name, tensor[a:b], a, rows) for a, b in zip(cuts, cuts[1:])]
    engine.update_weights(iter(pieces))
    method = "update_weights_from_tensor" if placement == "colocated" else "update_weights_from_distributed"
    updates = [kwargs for called, kwargs in fake.calls if called == method]
    assert [name for update in updates for name in update["names"]] == list(state)  # each tensor once, whole
    _assert_engine_holds(fake, state)
    with pytest.raises(ValueError, match="rows of 'model.embed_tokens.weight' stopped at 16 of 64"):
        engine.update_weights([WeightPiece("model.embed_tokens.weight", state["model.embed_tokens.weight"][:16], 0, 64),
                               *state.items()])


def test_fake_poisons_released_weights_until_they_are_resent(rollout_and_actor):
    """Why the adapter wakes only inside update_weights: SGLang's resumed weights are garbage until re-sent."""
    fake = FakeSGLangEngine(rollout_and_actor[0], eos_token_id=EOS)
    fake.release_memory_occupation(tags=None)
    fake.resume_memory_occupation(tags=None)
    with pytest.raises(ProtocolError, match="undefined"):
        fake.generate(input_ids=[[1, 2]], sampling_params={"max_new_tokens": 8})
    fake.update_weights_from_tensor(list(rollout_and_actor[1].state_dict().items()))
    assert fake.generate(input_ids=[[1, 2]], sampling_params={"max_new_tokens": 8})[0]["output_ids"][-1] == EOS
    with pytest.raises(ProtocolError, match="only \\[\\] are released"):
        fake.resume_memory_occupation(tags=["kv_cache"])  # SGLang's offload_tags.remove raises


def test_the_sync_refuses_a_resume_that_no_longer_fits_after_the_optimizer_step(rollout_and_actor):
    rollout_weights, actor = rollout_and_actor
    fake = FakeSGLangEngine(rollout_weights, eos_token_id=EOS, gpu_total_bytes=100 * GIB,
                            tag_bytes={"weights": 10 * GIB, "kv_cache": 40 * GIB, "cuda_graph": 1 * GIB})
    engine = _colocated(fake, mem_fraction_static=0.5)
    fake.actor_bytes = 20 * GIB  # parameters only, at launch
    engine.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=8))
    engine.sleep()
    fake.actor_bytes = 60 * GIB  # + gradients and Adam state after the first optimizer step
    # The sync's first phase resumes the weights (10 GiB, which fit in the 40 GiB free); the KV cache and graphs (41 GiB) do not fit in 30 GiB: refused with the numbers, before the resume
    # that would kill the engine. Suggested fraction: 0.5 - 11/100 = 0.39, rounded down to 0.35.
    with pytest.raises(RuntimeError, match="needs 41.00 GiB but only 30.00 GiB.*gpu_memory_utilization \\(0.5\\).*"
                                           "about 0.35"):
        engine.update_weights(actor.state_dict().items())
    assert fake.dead is None
    with pytest.raises(ProtocolError, match="out of memory"):  # what the check spared us
        fake.resume_memory_occupation(tags=["kv_cache", "cuda_graph"])


def test_split_group_is_lazy_unique_per_engine_and_destroyed_on_close(rollout_and_actor):
    rollout_weights, actor = rollout_and_actor
    actor_state = {name: tensor.to(torch.bfloat16) for name, tensor in actor.state_dict().items()}
    engines, fakes, broadcasters = [], [], []
    for _ in range(2):  # two split engines in one process, as the baseline evaluation builds them
        fake = FakeSGLangEngine({name: t.to(torch.bfloat16) for name, t in rollout_weights.items()}, eos_token_id=EOS)
        broadcaster = FakeBroadcaster(fake)
        engines.append(SGLangRolloutEngine("unused", placement="split", tp_size=2, engine=fake, eos_token_ids=[EOS],
                                           broadcaster=broadcaster, bucket_bytes=4_000))
        fakes.append(fake), broadcasters.append(broadcaster)
    assert all(fake.calls == [] for fake in fakes)  # no group until the first weight sync
    for engine, fake, broadcaster in zip(engines, fakes, broadcasters):
        engine.sleep()  # split rollout owns its GPUs: sleep releases nothing
        engine.update_weights(actor_state.items())
        generations = engine.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=0.0, max_new_tokens=8))
        assert len(generations) == 4 and broadcaster.tensors_sent == len(actor_state)
        _assert_engine_holds(fake, actor_state)

    inits = [fake.calls[0] for fake in fakes]
    assert [method for method, _ in inits] == ["init_weights_update_group"] * 2
    assert inits[0][1]["group_name"] != inits[1][1]["group_name"]
    assert all(kwargs["rank_offset"] == 1 and kwargs["world_size"] == 3 and kwargs["backend"] == "nccl"
               and kwargs["master_port"] > 0 for _, kwargs in inits)
    for fake, (_, init) in zip(fakes, inits):
        updates = [kwargs for method, kwargs in fake.calls if method == "update_weights_from_distributed"]
        assert len(updates) > 1 and all(update["group_name"] == init["group_name"] for update in updates)
        assert {dtype for update in updates for dtype in update["dtypes"]} == {"bfloat16"}
        assert [update["flush_cache"] for update in updates] == [False] * (len(updates) - 1) + [True]
    assert registered_group_names() >= {init["group_name"] for _, init in inits}

    for engine, fake in zip(engines, fakes):
        engine.close()
        assert [method for method, _ in fake.calls[-2:]] == ["destroy_weights_update_group", "shutdown"]
        assert fake.groups == {}
    assert not registered_group_names() & {init["group_name"] for _, init in inits}


def test_split_engine_that_never_syncs_creates_no_group(rollout_and_actor):
    fake = FakeSGLangEngine(rollout_and_actor[0], eos_token_id=EOS)
    engine = SGLangRolloutEngine("unused", placement="split", engine=fake, eos_token_ids=[EOS],
                                 broadcaster=FakeBroadcaster(fake))
    engine.generate(PROMPTS, n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=8))
    engine.close()
    assert [method for method, _ in fake.calls] == ["generate", "shutdown"]


def test_fake_refuses_a_duplicate_group_name_in_one_process(rollout_and_actor):
    first, second = (FakeSGLangEngine(rollout_and_actor[0], timeout_s=0.2) for _ in range(2))
    first.engine_joined.set()
    FakeBroadcaster(first).connect(master_address="h", master_port=1, world_size=2, group_name="same",
                                   backend="nccl")
    with pytest.raises(ProtocolError, match="'same' is already registered"):
        FakeBroadcaster(second).connect(master_address="h", master_port=2, world_size=2, group_name="same",
                                        backend="nccl")


def test_fake_catches_an_announcement_without_broadcast(rollout_and_actor):
    """The fake must fail where real NCCL would hang, or the split test above could not fail."""
    fake = FakeSGLangEngine(rollout_and_actor[0], timeout_s=0.2)
    fake.groups["g"] = {}
    with pytest.raises(ProtocolError, match="none came"):
        fake.update_weights_from_distributed(names=["lm_head.weight"], dtypes=["float32"], shapes=[[64, 16]], group_name="g")
    fake.engine_joined.set()
    with pytest.raises(ProtocolError, match="no receiver"):
        FakeBroadcaster(fake).broadcast(torch.zeros(1))
    with pytest.raises(ProtocolError, match="rendezvous timed out"):
        FakeSGLangEngine({}, timeout_s=0.2).init_weights_update_group("h", 1, 1, 2, "g")


def test_an_unknown_weight_name_kills_the_engine(rollout_and_actor):
    fake = FakeSGLangEngine(rollout_and_actor[0], eos_token_id=EOS)
    engine = _colocated(fake)
    with pytest.raises(ProtocolError, match="unknown parameter 'model.embed.weight'"):
        engine.update_weights([("model.embed.weight", torch.zeros(64, 16))])
    with pytest.raises(ProtocolError, match="dead engine"):
        engine.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=8))


def test_generate_sends_prompt_major_repeats_and_parses_outputs(rollout_and_actor):
    fake = FakeSGLangEngine(rollout_and_actor[0], eos_token_id=EOS)
    engine = _colocated(fake)

    cut = engine.generate(PROMPTS, n=2, sampling=SamplingParams(temperature=0.7, top_p=0.9, max_new_tokens=3, seed=11))
    eos_last = engine.generate(PROMPTS, n=1, sampling=SamplingParams(temperature=0.7, max_new_tokens=4))
    done = engine.generate(PROMPTS, n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=8))

    first_call = fake.calls[0][1]
    assert first_call["input_ids"] == [[5, 6, 7], [5, 6, 7], [8, 9], [8, 9]]
    assert [params["sampling_seed"] for params in first_call["sampling_params"]] == [11, 12, 13, 14]
    assert [g.prompt_index for g in cut] == [0, 0, 1, 1]
    assert all(len(g.response_ids) == 3 and not g.finished for g in cut)  # "length", no EOS
    # EOS as the last allowed token: SGLang says "length", the response still finished (as in the HF engine).
    assert all(g.response_ids[-1] == EOS and len(g.response_ids) == 4 and g.finished for g in eos_last)
    assert [g.prompt_index for g in done] == [0, 1]
    assert all(g.finished and g.response_ids[-1] == EOS and len(g.response_ids) == 4 for g in done)


def test_sampling_params_are_explicit_and_neutral():
    neutral = {"top_k": -1, "min_p": 0.0, "repetition_penalty": 1.0, "frequency_penalty": 0.0,
               "presence_penalty": 0.0, "min_new_tokens": 0, "ignore_eos": False, "skip_special_tokens": False}
    greedy = to_sglang_sampling_params(SamplingParams(temperature=0.0, top_p=0.5, max_new_tokens=7), num_requests=3)
    assert greedy == {**neutral, "temperature": 0.0, "top_p": 1.0, "max_new_tokens": 7}
    sampled = to_sglang_sampling_params(SamplingParams(temperature=0.8, top_p=0.95, max_new_tokens=5), num_requests=2)
    assert sampled == {**neutral, "temperature": 0.8, "top_p": 0.95, "max_new_tokens": 5}
    with pytest.raises(ValueError, match="top_p \\(0.0\\) must be in \\(0, 1\\]"):
        SamplingParams(top_p=0.0)
    with pytest.raises(ValueError, match="max_new_tokens \\(0\\) must be >= 1"):
        SamplingParams(max_new_tokens=0)


def test_parse_output_finish_reasons():
    eos = {EOS, 7}
    length = parse_output({"output_ids": [4, 5], "meta_info": {"finish_reason": {"type": "length", "length": 2}}}, 3, eos)
    assert (length.prompt_index, length.response_ids, length.finished) == (3, [4, 5], False)
    eos_at_limit = parse_output({"output_ids": [4, 7], "meta_info": {"finish_reason": {"type": "length"}}}, 0, eos)
    assert eos_at_limit.response_ids == [4, 7] and eos_at_limit.finished
    with_eos = parse_output({"output_ids": [4, EOS], "meta_info": {"finish_reason": {"type": "stop", "matched": EOS}}},
                            0, eos)
    assert with_eos.response_ids == [4, EOS] and with_eos.finished
    # Should an SGLang version strip the matched stop token, the EOS is put back (the Generation contract).
    stripped = parse_output({"output_ids": [4], "meta_info": {"finish_reason": {"type": "stop", "matched": EOS}}}, 0, eos)
    assert stripped.response_ids == [4, EOS] and stripped.finished
    with pytest.raises(RuntimeError, match="aborted a request: out of memory"):
        parse_output({"output_ids": [], "meta_info": {"finish_reason": {"type": "abort", "message": "out of memory"}}},
                     0, eos)


def test_both_engines_stop_on_config_and_generation_config_eos(tmp_path):
    """config.json says 2, generation_config.json says [5, 2]: both engines use {2, 5}, as SGLang does."""
    model = _tiny_llama(seed=1)
    model.generation_config = GenerationConfig(eos_token_id=[5, EOS])
    model.save_pretrained(tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["eos_token_id"] == EOS
    assert load_eos_token_ids(str(tmp_path)) == [EOS, 5]
    assert HFRolloutEngine(str(tmp_path)).eos_token_ids == [EOS, 5]
    engine = SGLangRolloutEngine(str(tmp_path), engine=FakeSGLangEngine(model.state_dict(), eos_token_id=5))
    assert engine.eos_token_ids == {EOS, 5}
    generations = engine.generate(PROMPTS, n=1, sampling=SamplingParams(max_new_tokens=4))  # EOS 5 at the limit
    assert all(g.response_ids[-1] == 5 and g.finished for g in generations)


def test_engine_failure_message_is_raised(rollout_and_actor):
    class RefusingEngine(FakeSGLangEngine):
        def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
            return False, "shape mismatch in model.layers.0"

    engine = _colocated(RefusingEngine(rollout_and_actor[0]))
    with pytest.raises(RuntimeError, match="update_weights failed: shape mismatch in model.layers.0"):
        engine.update_weights(rollout_and_actor[1].state_dict().items())
    with pytest.raises(ValueError, match="got no tensors"):
        engine.update_weights([])


def test_config_refuses_float32_with_sglang():
    with pytest.raises(ValueError, match="rollout.engine 'sglang' with model.dtype 'float32'.*model.dtype: bfloat16"):
        config_from_dict({"rollout": {"engine": "sglang"}, "train": {"device": "cuda"}})
    cfg = config_from_dict({"model": {"dtype": "bfloat16"}, "rollout": {"engine": "sglang"},
                                "train": {"device": "cuda"}})
    assert cfg.model.dtype == "bfloat16"


def test_missing_sglang_gives_install_hint(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "sglang", None)  # makes `import sglang` raise ImportError
    with pytest.raises(ImportError, match=r"pip install -e '\.\[sglang\]'.*CUDA machine"):
        SGLangRolloutEngine(str(tmp_path))
    cfg = config_from_dict({"model": {"dtype": "bfloat16"}, "rollout": {"engine": "sglang"},
                                "train": {"device": "cuda"}})
    with pytest.raises(ImportError, match="rollout.engine 'sglang' needs the `sglang` package"):
        create_rollout_engine(cfg.rollout, cfg.model, str(tmp_path), device=cfg.train.device, seed=cfg.train.seed)


def test_bad_placement_fails_before_launch():
    with pytest.raises(ValueError, match="rollout.placement \\('nearby'\\) must be one of"):
        SGLangRolloutEngine("unused", placement="nearby")


def test_lora_sync_replaces_the_adapter_by_tensors_and_keeps_the_base_resident(rollout_and_actor):
    """LoRA, colocated: sleep releases the KV cache and CUDA graphs only (the base is never re-sent); each sync
    replaces the adapter under one name; generate asks for it once loaded."""
    from pcsd_core.config.loader import config_from_dict
    from pcsd_core.rollout.sglang import ADAPTER_NAME

    rollout_weights, _ = rollout_and_actor
    fake = FakeSGLangEngine(rollout_weights, eos_token_id=EOS, lora_enabled=True)
    lora = config_from_dict({"model": {"lora_rank": 2, "lora_alpha": 4.0}}).model
    engine = _colocated(fake, lora=lora)
    sampling = SamplingParams(temperature=1.0, max_new_tokens=8)
    name = "base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"
    outputs = [engine.generate(PROMPTS, n=1, sampling=sampling)]
    for value in (1.0, 2.0):
        engine.sleep()
        with pytest.raises(RuntimeError, match="without update_weights"):
            engine.generate(PROMPTS, n=1, sampling=sampling)  # the cache is gone until the sync
        engine.update_weights([(name, torch.full((16, 2), value))])
        outputs.append(engine.generate(PROMPTS, n=1, sampling=sampling))
    engine.close()

    assert [(method, kwargs.get("tags"), kwargs.get("lora_name")) for method, kwargs in fake.calls] == [
        ("generate", None, None),
        ("release_memory_occupation", ["kv_cache", "cuda_graph"], None),
        ("load_lora_adapter_from_tensors", None, ADAPTER_NAME),
        ("resume_memory_occupation", ["kv_cache", "cuda_graph"], None),
        ("generate", None, None),
        ("release_memory_occupation", ["kv_cache", "cuda_graph"], None),
        ("unload_lora_adapter", None, ADAPTER_NAME),
        ("load_lora_adapter_from_tensors", None, ADAPTER_NAME),
        ("resume_memory_occupation", ["kv_cache", "cuda_graph"], None),
        ("generate", None, None),
        ("shutdown", None, None),
    ]
    generates = [kwargs for method, kwargs in fake.calls if method == "generate"]
    assert "lora_path" not in generates[0] and all(g["lora_path"] == [ADAPTER_NAME] * len(PROMPTS) for g in generates[1:])
    assert torch.equal(fake.adapters[ADAPTER_NAME][0][name], torch.full((16, 2), 2.0))
    assert fake.adapters[ADAPTER_NAME][1]["r"] == 2 and fake.adapters[ADAPTER_NAME][1]["lora_alpha"] == 4.0
    _assert_engine_holds(fake, rollout_weights)  # the base was never released nor re-sent
    assert len({tuple(tuple(g.response_ids) for g in out) for out in outputs}) == 3  # each adapter changes the samples


def test_lora_calls_fail_loudly_when_sglang_refuses(rollout_and_actor):
    from pcsd_core.config.loader import config_from_dict

    fake = FakeSGLangEngine(rollout_and_actor[0], eos_token_id=EOS, lora_enabled=False)
    engine = _colocated(fake, lora=config_from_dict({"model": {"lora_rank": 2}}).model)
    with pytest.raises(RuntimeError, match="load_lora_adapter_from_tensors failed: LoRA is not enabled"):
        engine.update_weights([("x.lora_A.weight", torch.zeros(2, 2))])
