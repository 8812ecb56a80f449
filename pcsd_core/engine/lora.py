"""LoRA with peft: the policy as a frozen base plus a trainable adapter, and the adapter-based teachers.

- `check_lora_targets(model_config, model_cfg)`: refuses, from the model's config alone (a weightless skeleton,
  nothing loaded), target names the model does not have, before any weights load.
- `add_lora(lm, model_cfg, ema_adapter=...)`: wraps a causal LM with peft; the adapter `STUDENT` trains, the base
  is frozen. With `ema_adapter` a second adapter `EMA` starts as a copy of it and only moves by `ema_update`.
- `adapter_view(lm, adapter)`: runs the model with one adapter (or, with None, with the adapters off: the base
  model, i.e. the `frozen` teacher), without a second copy of the weights.
- `adapter_items(lm, adapter)`: the adapter's tensors under peft's file names (`...q_proj.lora_A.weight`, the
  names of `adapter_model.safetensors`): what weight sync ships and checkpoints keep.
- `backbone(lm)`: the decoder stack (embeddings, layers, final norm) of a plain or peft-wrapped LM.
"""

from __future__ import annotations

import re
from contextlib import contextmanager
from typing import Any, Iterator

import torch
from torch import nn

from pcsd_core.errors import ConfigError

STUDENT = "default"  # peft's default adapter name: the one that trains
EMA = "ema"  # the EMA teacher's adapter (teacher_mode "ema")


def lora_config(model_cfg: Any, base_model_path: str | None = None):
    """The peft `LoraConfig` of a `ModelConfig` (`model.lora_*`)."""
    from peft import LoraConfig

    return LoraConfig(r=model_cfg.lora_rank, lora_alpha=model_cfg.lora_alpha, lora_dropout=model_cfg.lora_dropout,
                      target_modules=list(model_cfg.lora_targets), bias="none", task_type="CAUSAL_LM",
                      base_model_name_or_path=base_model_path)


def check_lora_targets(model_config: Any, model_cfg: Any) -> None:
    """Refuse target names that match no linear layer of the model's decoder blocks (no weights are loaded:
    the module tree comes from a skeleton on the meta device)."""
    from transformers import AutoModelForCausalLM
    from transformers.pytorch_utils import Conv1D  # GPT-2's linear layers, which peft also adapts

    if not model_cfg.uses_lora:
        return
    with torch.device("meta"):
        skeleton = AutoModelForCausalLM.from_config(model_config, trust_remote_code=model_cfg.trust_remote_code)
    linear = sorted({name.rsplit(".", 1)[-1] for name, module in skeleton.named_modules()
                     if isinstance(module, (nn.Linear, Conv1D)) and name.rsplit(".", 1)[-1] != "lm_head"})
    unknown = [name for name in model_cfg.lora_targets if name not in linear]
    if unknown:
        have = "has none of them" if len(unknown) == len(model_cfg.lora_targets) else f"has no {unknown}"
        raise ConfigError(
            f"model.lora_target_modules ({model_cfg.lora_target_modules!r}): model {model_cfg.name!r} "
            f"({model_config.model_type}) {have}; its decoder's linear layers are {linear}. Set "
            f"model.lora_target_modules to some of those (or model.lora_rank: 0 for full fine-tuning).")


def add_lora(lm: nn.Module, model_cfg: Any, *, ema_adapter: bool = False, base_model_path: str | None = None,
             seed: int = 0):
    """`lm` wrapped by peft with a trainable adapter `STUDENT` (base frozen) and, optionally, a frozen `EMA` copy.

    peft draws A at random; it is drawn from `seed` (the global RNG left as it was), so a run starts the same
    every time and every FSDP rank builds the same adapter before taking its shard of it."""
    from peft import get_peft_model

    config = lora_config(model_cfg, base_model_path)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        peft_model = get_peft_model(lm, config)
    if ema_adapter:
        peft_model.add_adapter(EMA, config)  # add_adapter leaves `STUDENT` active and the new one frozen
        with torch.no_grad():
            for (_, ema), (_, student) in zip(adapter_items(peft_model, EMA), adapter_items(peft_model, STUDENT),
                                              strict=True):
                ema.copy_(student)  # the EMA teacher starts at the initial student
        for _, tensor in adapter_items(peft_model, EMA, detach=False):
            tensor.requires_grad_(False)
    return peft_model


def is_peft(lm: nn.Module) -> bool:
    return hasattr(lm, "get_base_model")


def backbone(lm: nn.Module) -> nn.Module:
    """The decoder stack (`LlamaModel` and the like) of a causal LM or of a peft model around one. With peft the
    adapters sit inside its layers, so calling it runs them."""
    return (lm.get_base_model() if is_peft(lm) else lm).base_model


def _tuner_layers(lm: nn.Module) -> list[nn.Module]:
    from peft.tuners.tuners_utils import BaseTunerLayer

    return [module for module in lm.modules() if isinstance(module, BaseTunerLayer)]


@contextmanager
def adapter_view(lm: nn.Module, adapter: str | None) -> Iterator[None]:
    """Within the block, `lm` computes with `adapter` alone, or with no adapter (None: the base model).

    Why not peft's `disable_adapter()` / `set_adapter()`: both also flip the adapters' `requires_grad`, and FSDP2
    fixes a parameter's `requires_grad` when it first unshards it, so a flip during the (first) teacher pass
    would freeze the adapter for the whole run. The layers' active-adapter and disabled flags are all a LoRA
    layer's forward reads.
    """
    layers = _tuner_layers(lm)
    saved = [(layer._active_adapter, layer._disable_adapters) for layer in layers]
    try:
        for layer in layers:
            if adapter is None:
                layer._disable_adapters = True
            else:
                layer._active_adapter = [adapter]
        yield
    finally:
        for layer, (active, disabled) in zip(layers, saved):
            layer._active_adapter, layer._disable_adapters = active, disabled


def wire_name(param_name: str, adapter: str) -> str | None:
    """peft's file name for an adapter parameter (the adapter name dropped), or None for other parameters."""
    wire, count = re.subn(rf"\.(lora_[AB])\.{re.escape(adapter)}\.", r".\1.", param_name)
    return wire if count == 1 else None


def adapter_items(lm: nn.Module, adapter: str = STUDENT, *, detach: bool = True) -> list[tuple[str, torch.Tensor]]:
    """(peft file name, parameter) of `adapter`, in module order (the same on every FSDP rank); no copy.
    Under FSDP2 the parameters are the rank's DTensor shards."""
    items = []
    for name, parameter in lm.named_parameters():
        wire = wire_name(name, adapter)
        if wire is not None:
            items.append((wire, parameter.detach() if detach else parameter))
    return items


def adapter_param_names(lm: nn.Module, adapter: str = STUDENT) -> dict[str, str]:
    """peft file name -> the parameter's name in `lm`."""
    return {wire: name for name, _ in lm.named_parameters() if (wire := wire_name(name, adapter)) is not None}


@torch.no_grad()
def ema_update(lm: nn.Module, rate: float) -> None:
    """ema <- (1 - rate) * ema + rate * student, adapter tensor by adapter tensor (shard by shard under FSDP2)."""
    for (_, ema), (_, student) in zip(adapter_items(lm, EMA), adapter_items(lm, STUDENT), strict=True):
        ema.lerp_(student, rate)
