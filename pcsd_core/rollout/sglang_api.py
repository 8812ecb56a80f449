"""Our side of the pinned SGLang release's offline Engine API: what we send it and how we read its answers.

The engine's launch arguments (`engine_kwargs`, `lora_engine_kwargs`), the adapter config it reads
(`sglang_lora_config`), sampling parameters (`to_sglang_sampling_params`), its outputs (`parse_output`) and
results (`check_result`), and rank 0 of the weight-sync NCCL group (`NcclWeightBroadcaster`).
tests/pcsd_core/rollout/test_sglang_contract.py checks each against the installed package's source; sglang itself
is imported only when an engine is launched (`import_sglang`). The adapter that uses them: `sglang.py`.
"""

from __future__ import annotations

from typing import Any, Protocol

import torch

from pcsd_core.rollout.base import Generation, SamplingParams

SGLANG_INSTALL_HINT = (
    "rollout.engine 'sglang' needs the `sglang` package with its CUDA dependencies ({error}). Run "
    "`pip install -e '.[sglang]'` on a CUDA machine (README, GPU hosts), or use rollout.engine 'hf'."
)
# Sent with every request so neither SGLang's defaults nor a checkpoint's generation_config shape the
# distribution: the HF engine samples from temperature and top_p alone (values = "off" in SamplingParams).
NEUTRAL_SAMPLING = {
    "top_k": -1,
    "min_p": 0.0,
    "repetition_penalty": 1.0,
    "frequency_penalty": 0.0,
    "presence_penalty": 0.0,
    "min_new_tokens": 0,
    "ignore_eos": False,
    "skip_special_tokens": False,  # keep special tokens so response ids round-trip
}


class WeightBroadcaster(Protocol):
    """Rank 0 of the weight-sync group: joins it, broadcasts full tensors to the rollout ranks, leaves it."""

    def connect(
        self, *, master_address: str, master_port: int, world_size: int, group_name: str, backend: str
    ) -> None: ...

    def broadcast(self, tensor: torch.Tensor) -> None: ...

    def disconnect(self) -> None: ...


class NcclWeightBroadcaster:
    """Joins the weight-sync group from this process as rank 0 and broadcasts over it (NCCL, GPU)."""

    def __init__(self, device: str | torch.device) -> None:
        self.device = torch.device(device)  # the sender's GPU: outside the rollout's (weight_sync_sender_gpu)
        self.group = None

    def connect(self, *, master_address: str, master_port: int, world_size: int, group_name: str, backend: str) -> None:
        import_sglang()
        # A separate group, not the default one: the actor's own process group (FSDP) stays untouched.
        from sglang.srt.utils import init_custom_process_group

        self.group = init_custom_process_group(
            backend=backend,
            init_method=f"tcp://{master_address}:{master_port}",
            world_size=world_size,
            rank=0,
            group_name=group_name,
        )

    def broadcast(self, tensor: torch.Tensor) -> None:
        torch.distributed.broadcast(tensor.to(self.device).contiguous(), src=0, group=self.group)

    def disconnect(self) -> None:
        if self.group is not None:
            torch.distributed.destroy_process_group(self.group)
            self.group = None


def engine_kwargs(model_path, placement, tp_size, base_gpu_id, mem_fraction_static, dtype, seed) -> dict:
    """The keyword arguments of `sglang.Engine(...)` (each a `ServerArgs` field of the pinned release)."""
    from pcsd_core.models import resolve_model

    return {
        "model_path": resolve_model(model_path),
        "dtype": dtype,
        "tp_size": tp_size,
        "base_gpu_id": base_gpu_id,
        "mem_fraction_static": mem_fraction_static,
        # torch_memory_saver makes release/resume_memory_occupation possible (colocated sleep/wake).
        "enable_memory_saver": placement == "colocated",
        # We send and receive token ids only; the engine needs no tokenizer of its own.
        "skip_tokenizer_init": True,
        "random_seed": seed,
    }


def lora_engine_kwargs(lora: Any) -> dict:
    """`sglang.Engine` keyword arguments (ServerArgs fields) that enable LoRA for `lora` (a ModelConfig), or {}."""
    if lora is None:
        return {}
    return {"enable_lora": True, "max_lora_rank": lora.lora_rank, "lora_target_modules": list(lora.lora_targets),
            "max_loras_per_batch": 1}


def sglang_lora_config(lora: Any) -> dict:
    """The adapter config SGLang's `LoRAConfig(config_dict=...)` reads: peft's adapter_config.json keys."""
    return {"peft_type": "LORA", "r": lora.lora_rank, "lora_alpha": lora.lora_alpha,
            "target_modules": list(lora.lora_targets), "lora_dropout": 0.0, "bias": "none"}


def to_sglang_sampling_params(sampling: SamplingParams, num_requests: int) -> dict | list[dict]:
    """Our SamplingParams -> SGLang's sampling_params (keys of `sglang.srt.sampling.SamplingParams`).

    temperature 0 is SGLang's greedy (it maps to top_k=1). With a seed, each request gets its own
    `sampling_seed` (seed + row); SGLang honours it only with deterministic inference enabled, so
    SGLang rollouts are not bit-reproducible the way the HF engine's are.
    """
    params = {
        **NEUTRAL_SAMPLING,
        "temperature": float(sampling.temperature),
        "top_p": 1.0 if sampling.temperature == 0 else float(sampling.top_p),
        "max_new_tokens": int(sampling.max_new_tokens),
    }
    if sampling.seed is None:
        return params
    return [{**params, "sampling_seed": sampling.seed + row} for row in range(num_requests)]


def parse_output(output: dict, prompt_index: int, eos_token_ids: set[int]) -> Generation:
    """One SGLang output dict -> Generation.

    finish_reason {"type": "stop", "matched": id} = EOS, "length" = cut at max_new_tokens. SGLang checks
    the length limit before EOS, so an EOS sampled as the last allowed token reports "length"; the
    response still ended with EOS and counts as finished, as in the HF engine.
    """
    response_ids = [int(token) for token in output["output_ids"]]
    finish_reason = output.get("meta_info", {}).get("finish_reason") or {}
    kind = finish_reason.get("type")
    if kind == "abort":
        raise RuntimeError(f"sglang aborted a request: {finish_reason.get('message', finish_reason)}")
    if kind not in ("stop", "length"):
        raise RuntimeError(f"sglang returned an unexpected finish_reason {finish_reason!r}.")
    matched = finish_reason.get("matched")
    if kind == "stop" and isinstance(matched, int) and (not response_ids or response_ids[-1] != matched):
        response_ids.append(matched)  # the contract: a finished response ends with its EOS token
    finished = kind == "stop" or (bool(response_ids) and response_ids[-1] in eos_token_ids)
    return Generation(prompt_index=prompt_index, response_ids=response_ids, finished=finished)


def import_sglang():
    try:
        import sglang
    except ImportError as error:
        raise ImportError(SGLANG_INSTALL_HINT.format(error=error)) from error
    return sglang


def check_result(operation: str, result: Any) -> None:
    """SGLang's control calls answer (success, message), its LoRA calls a `LoRAUpdateOutput` (success,
    error_message); raise with the message on failure."""
    if isinstance(result, tuple) and len(result) >= 1 and result[0] is False:
        message = result[1] if len(result) > 1 else ""
        raise RuntimeError(f"sglang {operation} failed: {message}")
    if getattr(result, "success", None) is False:
        raise RuntimeError(f"sglang {operation} failed: {getattr(result, 'error_message', '')}")
