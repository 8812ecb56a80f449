"""Shared fixtures: the local GSM8K copy, the embedded SmolLM2 model, tiny random models. No network."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

REPO_ROOT = Path(__file__).resolve().parents[1]
# Metaflow refuses the user name `root`; the hub is never reached from tests.
os.environ.setdefault("METAFLOW_USER", "pcsd-tests")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


@pytest.fixture(scope="session")
def gsm8k_dir() -> Path:
    """The local GSM8K copy (train.jsonl, test.jsonl) shipped beside the repository."""
    path = Path(os.environ.get("PCSD_GSM8K_DIR", REPO_ROOT.parent / "shared" / "data" / "gsm8k"))
    if not (path / "train.jsonl").is_file():
        pytest.fail(f"GSM8K copy not found at {path}; set PCSD_GSM8K_DIR to a folder with train.jsonl/test.jsonl")
    return path


@pytest.fixture(scope="session")
def smollm2_path() -> str:
    """Folder of the converted embedded SmolLM2-135M-Instruct (converted once per cache)."""
    from pcsd_core.models import resolve_model

    return resolve_model("smollm2-135m")


@pytest.fixture(scope="session")
def smollm2_tokenizer(smollm2_path):
    from pcsd_core.models import load_tokenizer

    return load_tokenizer(smollm2_path)


@pytest.fixture()
def tiny_model_dir(tmp_path_factory, smollm2_tokenizer) -> Path:
    """A tiny random-weight Llama (2 layers, hidden 64) with SmolLM2's tokenizer, saved as a checkpoint."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=len(smollm2_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=1024,
        bos_token_id=smollm2_tokenizer.bos_token_id,
        eos_token_id=smollm2_tokenizer.eos_token_id,
        pad_token_id=smollm2_tokenizer.pad_token_id,
        tie_word_embeddings=True,
    )
    model = LlamaForCausalLM(config)
    path = tmp_path_factory.mktemp("tiny_llama")
    model.save_pretrained(path)
    smollm2_tokenizer.save_pretrained(path)
    return path
