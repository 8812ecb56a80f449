"""Model aliases and loading: the embedded SmolLM2 runs a real forward pass and answers; bad names explain themselves."""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import re
from pathlib import Path

import pytest
import torch

from pcsd_core.models import ModelNotFoundError, load_model, load_tokenizer, resolve_model
from pcsd_core.data.prompts import build_student_messages, render_prompt_ids


@pytest.fixture(scope="module")
def smollm2_model():
    return load_model("smollm2-135m").eval()


def test_smollm2_forward_pass(smollm2_model, smollm2_tokenizer):
    ids = torch.tensor([smollm2_tokenizer("The capital of France is", add_special_tokens=False)["input_ids"]])
    with torch.no_grad():
        logits = smollm2_model(ids).logits
    assert logits.shape == (1, ids.shape[1], len(smollm2_tokenizer)) == (1, ids.shape[1], 49152)
    assert logits.dtype == torch.float32 and torch.isfinite(logits).all()
    # A trained model, not random weights: its next token after this prompt is "Paris".
    assert smollm2_tokenizer.decode(logits[0, -1].argmax()).strip() == "Paris"


def test_smollm2_greedy_generation_answers(smollm2_model, smollm2_tokenizer):
    prompt_ids = render_prompt_ids(smollm2_tokenizer, build_student_messages("What is 2+3?"))
    with torch.no_grad():
        output = smollm2_model.generate(
            torch.tensor([prompt_ids]),
            attention_mask=torch.ones(1, len(prompt_ids), dtype=torch.long),
            max_new_tokens=10,
            do_sample=False,
            pad_token_id=smollm2_tokenizer.pad_token_id,
        )
    new_tokens = output[0, len(prompt_ids) :].tolist()
    assert 1 <= len(new_tokens) <= 10 and all(0 <= token < len(smollm2_tokenizer) for token in new_tokens)
    assert "5" in smollm2_tokenizer.decode(new_tokens, skip_special_tokens=True)


def test_aliases_resolve():
    assert resolve_model("deepseek-math-7b-base") == "deepseek-ai/deepseek-math-7b-base"
    assert resolve_model("Qwen/Qwen2.5-0.5B") == "Qwen/Qwen2.5-0.5B"  # hub ids pass through untouched
    assert (Path(resolve_model("smollm2-135m")) / "config.json").is_file()  # the converted HF checkpoint
    assert load_tokenizer("smollm2-135m").pad_token_id is not None


def test_local_checkpoint_folder_loads(tiny_model_dir):
    assert resolve_model(str(tiny_model_dir)) == str(tiny_model_dir)
    model = load_model(str(tiny_model_dir))
    assert model.config.num_hidden_layers == 2


def test_unknown_alias_says_what_was_tried():
    expected = re.escape("model 'smollm-135' is not a known alias (['deepseek-math-7b-base', ") + ".*" + re.escape(
        "not an existing local folder, and not a hub id of the form 'owner/name'"
    )
    with pytest.raises(ModelNotFoundError, match=expected):
        resolve_model("smollm-135")


def test_local_folder_without_config(tmp_path):
    with pytest.raises(ModelNotFoundError, match=re.escape(f"{tmp_path / 'config.json'} is missing; point at a folder written by `save_pretrained`")):
        load_model(str(tmp_path))


def test_unreachable_hub_id(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    expected = re.escape("could not load model 'nobody-pcsd/no-such-model' (tried 'nobody-pcsd/no-such-model')")
    with pytest.raises(ModelNotFoundError, match=expected):
        load_tokenizer("nobody-pcsd/no-such-model")


def test_model_not_found_is_a_file_not_found_error_and_bad_dtype_is_rejected(tiny_model_dir):
    assert issubclass(ModelNotFoundError, FileNotFoundError)
    with pytest.raises(ValueError, match=re.escape("model dtype 'fp8' must be one of ['bfloat16', 'float16', 'float32']")):
        load_model(str(tiny_model_dir), dtype="fp8")


def test_generation_lengths_beyond_the_context_are_refused(tiny_model_dir):
    """The tiny model's config says max_position_embeddings=1024 (conftest); lengths are checked against it."""
    from transformers import AutoConfig

    from pcsd_core.config.schema import PCSDConfig
    from pcsd_core.models import check_context_length

    model_config = AutoConfig.from_pretrained(tiny_model_dir)
    assert model_config.max_position_embeddings == 1024
    fits = config_from_dict({}, {"rollout.max_response_tokens": 1000, "eval.max_new_tokens": 1000})
    check_context_length(fits, model_config)
    check_context_length(fits, model_config, max_prompt_tokens=24)  # 24 + 1000 = 1024: exactly fits
    with pytest.raises(ValueError, match="^" + re.escape(
            "rollout.max_response_tokens (1000): the longest prompt (25 tokens) + 1000 new tokens exceed the model's "
            "context of max_position_embeddings=1024 tokens; lower rollout.max_response_tokens to at most 999.")):
        check_context_length(fits, model_config, max_prompt_tokens=25)
    the_issue = config_from_dict({}, {"rollout.max_response_tokens": 100_000})  # accepted by the config alone
    with pytest.raises(ValueError, match=r"^rollout.max_response_tokens \(100000\): 100000 new tokens exceed"):
        check_context_length(the_issue, model_config)
    too_long_eval = config_from_dict({}, {"rollout.max_response_tokens": 8, "eval.max_new_tokens": 1025})
    with pytest.raises(ValueError, match=r"^eval.max_new_tokens \(1025\): .*max_position_embeddings=1024"):
        check_context_length(too_long_eval, model_config)
