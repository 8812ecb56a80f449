"""SGLangRolloutEngine on a real GPU with the real `sglang` (a few minutes; skipped without CUDA and a full
`make setup-gpu` install). A tiny random Llama is saved to a temp folder; SGLang's greedy output must be
token-identical to the HF engine's, sleep -> wake -> update must load what was sent, and a second engine
must work in the same process (the baseline evaluation builds engines in a loop)."""

from __future__ import annotations

import pytest
import torch
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM

from pcsd_core.rollout.base import SamplingParams

PROMPTS = [[5, 17, 42, 9], [100, 3], [7, 7, 7, 7, 7, 7]]
GREEDY = SamplingParams(temperature=0.0, max_new_tokens=12)
EOS = 1


def _sglang_runs_here() -> bool:
    if not torch.cuda.is_available():
        return False
    try:
        import sglang  # noqa: F401  (the CPU test venv has its source only, without CUDA dependencies)
    except Exception:
        return False
    return True


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not _sglang_runs_here(), reason="needs CUDA and sglang with its dependencies (make setup-gpu)"),
]


@pytest.fixture(scope="module")
def tiny_llama_dir(tmp_path_factory):
    """bf16, head_dim 64 (what SGLang's attention kernels take); a wide init so greedy choices are not near-ties."""
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=512, hidden_size=256, intermediate_size=512, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=512, eos_token_id=EOS, bos_token_id=0,
        tie_word_embeddings=False, initializer_range=0.2, torch_dtype="bfloat16",
    )
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.generation_config = GenerationConfig(eos_token_id=EOS)
    path = tmp_path_factory.mktemp("tiny_llama_sglang")
    model.save_pretrained(path)
    return path, {name: tensor.clone() for name, tensor in model.state_dict().items()}


def _ids(generations) -> list[list[int]]:
    return [list(generation.response_ids) for generation in generations]


def _sglang(path, **options):
    from pcsd_core.rollout.sglang import SGLangRolloutEngine

    return SGLangRolloutEngine(str(path), dtype="bfloat16", mem_fraction_static=0.2, **options)


def test_greedy_matches_hf_then_sleep_update_and_a_second_engine(tiny_llama_dir):
    from pcsd_core.rollout.hf import HFRolloutEngine

    path, state = tiny_llama_dir
    hf = HFRolloutEngine(str(path), dtype="bfloat16", device="cuda")
    expected = hf.generate(PROMPTS, n=1, sampling=GREEDY)
    hf.close()

    engine = _sglang(path, placement="colocated")
    first = engine.generate(PROMPTS, n=2, sampling=GREEDY)
    assert _ids(first) == [ids for ids in _ids(expected) for _ in range(2)]
    assert [g.finished for g in first[::2]] == [g.finished for g in expected]

    engine.sleep()
    with pytest.raises(RuntimeError, match="without update_weights"):
        engine.generate(PROMPTS, n=1, sampling=GREEDY)
    torch.manual_seed(1)
    perturbed = {name: (tensor.float() + 0.5 * torch.randn_like(tensor.float())).to(tensor.dtype)
                 for name, tensor in state.items()}
    engine.update_weights((name, tensor.cuda()) for name, tensor in perturbed.items())
    changed = engine.generate(PROMPTS, n=1, sampling=GREEDY)
    assert _ids(changed) != _ids(expected)
    engine.sleep()
    engine.update_weights((name, tensor.cuda()) for name, tensor in state.items())
    assert _ids(engine.generate(PROMPTS, n=1, sampling=GREEDY)) == _ids(expected)  # the update loads what was sent
    engine.close()

    second = _sglang(path, placement="colocated")
    assert _ids(second.generate(PROMPTS, n=1, sampling=GREEDY)) == _ids(expected)
    second.close()


@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="split placement needs a second GPU for the engine")
def test_two_split_engines_sync_weights_in_one_process(tiny_llama_dir):
    from pcsd_core.rollout.sglang_api import NcclWeightBroadcaster

    path, state = tiny_llama_dir
    torch.manual_seed(2)
    perturbed = {name: (tensor.float() + 0.5 * torch.randn_like(tensor.float())).to(tensor.dtype)
                 for name, tensor in state.items()}
    outputs = []
    for _ in range(2):
        engine = _sglang(path, placement="split", base_gpu_id=1, broadcaster=NcclWeightBroadcaster(device="cuda:0"))
        engine.update_weights((name, tensor.cuda(0)) for name, tensor in perturbed.items())
        outputs.append(_ids(engine.generate(PROMPTS, n=1, sampling=GREEDY)))
        engine.update_weights((name, tensor.cuda(0)) for name, tensor in state.items())
        outputs.append(_ids(engine.generate(PROMPTS, n=1, sampling=GREEDY)))
        engine.close()
    assert outputs[0] == outputs[2] and outputs[1] == outputs[3] and outputs[0] != outputs[1]
