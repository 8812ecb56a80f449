"""The SGLang rollout engine (GPU): `sglang.Engine` in this process, weights synced from the actor.

Written against the offline Engine API of the pinned SGLang release (`sglang/srt/entrypoints/engine.py`;
the pin is the `sglang` extra in pyproject.toml). sglang is imported only when an engine is launched, so
this module imports (and is tested against a fake) on CPU machines; tests/pcsd_core/rollout/
test_sglang_contract.py checks what it sends against the installed package's source.

    engine = SGLangRolloutEngine("/path/to/model", placement="colocated", mem_fraction_static=0.5)

Placement decides how weights move and whether the engine sleeps:

- "colocated": actor and rollout share GPUs (`enable_memory_saver=True` at launch). `sleep()` releases
  the KV cache and CUDA graphs, then the weights, measuring what each phase frees. The engine wakes inside
  the next `update_weights`, in phases: it frees this process's cached torch blocks and resumes the weights
  only, loads the actor's tensors with `update_weights_from_tensor`, and only then resumes the KV cache and
  CUDA graphs (verl's order: the big KV pool comes back last, after the weight-update staging memory is
  gone). SGLang leaves released weights undefined, so there is no waking without new weights: `generate`
  after `sleep()` raises until `update_weights` has run.
  Before each resume the free GPU memory is compared with what that phase needs; a shortfall (the
  actor's optimizer state did not exist when `mem_fraction_static` was chosen) raises with the numbers
  instead of letting the resume kill the process tree. The first such check runs after the actor's
  first optimizer step, so it measures the real budget.
- "split": the rollout owns its own GPUs (`base_gpu_id`, `tp_size`); `sleep()` frees nothing. On the first
  `update_weights` the engine's TP ranks (ranks 1..tp_size) and this process (rank 0) form an NCCL
  group (`init_weights_update_group`) under a name unique to this engine, so several engines can live
  in one process; `update_weights` then announces each bucket with `update_weights_from_distributed`
  while rank 0 broadcasts the same tensors in the same order. Both sides block until every rank joins,
  so the engine call runs in a helper thread while this thread broadcasts (SGLang's own tests and
  verl do the same). `close()` destroys the group on both sides.

The rank-0 side is a `WeightBroadcaster` (`sglang_api.py`, with the rest of what we send SGLang); the default
one joins the group in this process with SGLang's `init_custom_process_group`, sending from the GPU it is given:
`create_rollout_engine` gives it the actor's own GPU (`weight_sync_sender_gpu`), never one of the rollout's.

LoRA (`lora=`, a `ModelConfig` with `lora_rank >= 1`): the engine launches with `enable_lora`, `max_lora_rank`
and `lora_target_modules`, holds the base for the whole run, and `update_weights` replaces the adapter
`ADAPTER_NAME` with `unload_lora_adapter` + `load_lora_adapter_from_tensors` (its config as peft's dict), in
either placement: the adapter is megabytes, so it goes in one call and needs no NCCL group. `generate` then asks
for that adapter (`lora_path`). Sleep releases the KV cache and CUDA graphs only: SGLang leaves released weights
undefined, and the base is never sent again.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import torch

from pcsd_core.rollout.answer_stop import TokenTexts, cut_at_answer_line
from pcsd_core.rollout.base import Generation, SamplingParams, load_eos_token_ids
from pcsd_core.rollout.sglang_api import (WeightBroadcaster, check_result, engine_kwargs, import_sglang,
                                         lora_engine_kwargs, parse_output, sglang_lora_config, to_sglang_sampling_params)
from pcsd_core.distributed.weight_sync import bucketed, tensor_bytes, whole_tensors

PLACEMENTS = ("colocated", "split")
DEFAULT_BUCKET_BYTES = 512 << 20  # tensors per weight-sync call; bounds the staging memory SGLang needs
ADAPTER_NAME = "pcsd_policy"  # the one LoRA adapter the engine serves (LoRA runs), replaced at each sync
# SGLang's memory tags (sglang/srt/constants.py GPU_MEMORY_TYPE_*), in the order they come back on wake.
WEIGHTS_TAGS = ["weights"]
CACHE_TAGS = ["kv_cache", "cuda_graph"]
_GROUP_NUMBERS = itertools.count()  # unique weight-sync group names within this process


class SGLangRolloutEngine:
    """Rollout with `sglang.Engine`; implements `rollout.base.RolloutEngine`."""

    def __init__(
        self,
        model_path: str,
        *,
        placement: str = "colocated",
        tp_size: int = 1,
        base_gpu_id: int = 0,
        mem_fraction_static: float = 0.5,
        dtype: str = "bfloat16",
        seed: int = 0,
        engine: Any = None,
        eos_token_ids: Iterable[int] | None = None,
        broadcaster: WeightBroadcaster | None = None,
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        rendezvous_timeout_s: float = 600.0,
        gpu_memory_probe: Callable[[], tuple[int, int]] | None = None,
        lora: Any = None,
    ) -> None:
        _check_options(placement, tp_size, base_gpu_id, mem_fraction_static, bucket_bytes)
        self.placement = placement
        self.tp_size = tp_size
        self.mem_fraction_static = mem_fraction_static
        self.bucket_bytes = bucket_bytes
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self.master_address, self.master_port = master_address, master_port
        self.group_name = f"pcsd_weight_sync_{os.getpid()}_{next(_GROUP_NUMBERS)}"
        self._group_connected = False
        # "resident" (ready), "weights_only" (woken, weights not yet re-sent), "released" (asleep).
        self._memory = "resident"
        self._released_bytes = {"cache": 0, "weights": 0}  # what each sleep phase freed on the first GPU
        self._probe = gpu_memory_probe if gpu_memory_probe is not None else _cuda_memory_probe(base_gpu_id)
        # One helper thread runs the blocking engine side of every rendezvous / broadcast.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-weight-sync")
        sglang = import_sglang() if engine is None else None  # the install hint before any file is read
        self.eos_token_ids = set(eos_token_ids) if eos_token_ids is not None else set(load_eos_token_ids(model_path))
        self.model_path = model_path
        self._token_texts: TokenTexts | None = None  # the tokenizer, loaded on the first stop_at_answer
        self.lora = lora if lora is not None and lora.uses_lora else None
        self._adapter_loaded = False
        if engine is None:
            kwargs = engine_kwargs(model_path, placement, tp_size, base_gpu_id, mem_fraction_static, dtype, seed)
            engine = sglang.Engine(**kwargs, **lora_engine_kwargs(self.lora))
        self.engine = engine
        # Split placement syncs through it; None for an engine that never receives weights (evaluation).
        self.broadcaster = broadcaster if placement == "split" else None

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """Sample `n` responses per prompt; prompt-major order: [p0 r0, p0 r1, ..., p1 r0, ...]."""
        if n < 1:
            raise ValueError(f"generate: n ({n}) must be >= 1 responses per prompt.")
        if self._memory != "resident":
            raise RuntimeError(
                "SGLangRolloutEngine.generate called after sleep() without update_weights(): SGLang leaves "
                "released weights undefined; push the actor's weights with update_weights() first, which wakes "
                "the engine."
            )
        # Each prompt is repeated n times (prompt-major) rather than using SGLang's `n`, so the output
        # order is explicit; the radix cache shares the repeated prompt's KV anyway.
        input_ids = [list(ids) for ids in prompt_ids for _ in range(n)]
        sampling_params = to_sglang_sampling_params(sampling, num_requests=len(input_ids))
        # Before the first sync the adapter is the initial one (B = 0), i.e. the base: no lora_path.
        adapter = {"lora_path": [ADAPTER_NAME] * len(input_ids)} if self._adapter_loaded else {}
        outputs = self.engine.generate(input_ids=input_ids, sampling_params=sampling_params, **adapter)
        if len(outputs) != len(input_ids):
            raise RuntimeError(f"sglang returned {len(outputs)} outputs for {len(input_ids)} requests.")
        generations = [parse_output(output, row // n, self.eos_token_ids) for row, output in enumerate(outputs)]
        if sampling.stop_at_answer:
            # The HF engine stops at the first completed "#### <number>" line; SGLang cannot (a stop string needs
            # its detokenizer, which skip_tokenizer_init turns off), so its text is cut at the same token here: the
            # same greedy text up to there, hence the same scores (eval.stop_at_answer).
            generations = [self._cut_at_answer(generation) for generation in generations]
        return generations

    def _cut_at_answer(self, generation: Generation) -> Generation:
        if self._token_texts is None:
            from pcsd_core.models import load_tokenizer

            self._token_texts = TokenTexts(load_tokenizer(self.model_path))
        response_ids, answered = cut_at_answer_line(list(generation.response_ids), self._token_texts)
        return Generation(prompt_index=generation.prompt_index, response_ids=response_ids,
                          finished=generation.finished or answered)

    # ---- weight sync and memory ---------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple]) -> None:
        """Push the actor's full weights (HF names) into the engine, bucket by bucket.

        Items are (name, tensor) pairs or `WeightPiece`s. SGLang loads whole tensors only, so a tensor sent as
        row pieces is assembled first (`whole_tensors`): the largest such tensor is this sync's extra memory.
        """
        self._wake_weights()
        if self.lora is not None:
            self._load_adapter(named_tensors)
            return
        # One bucket of look-ahead (to know which is last) instead of a list of all: the caller may stream the
        # weights from the train workers, and holding them all would cost the whole model.
        buckets = bucketed(whole_tensors(named_tensors), tensor_bytes, self.bucket_bytes)
        bucket = next(buckets, None)
        if bucket is None:
            raise ValueError("update_weights got no tensors; pass the actor's full state dict as (name, tensor) pairs.")
        if self.placement == "split" and not self._group_connected:
            self._connect_weight_sync()
        while bucket is not None:
            following = next(buckets, None)
            # Flush the prefix cache once, after the last bucket: cached KV was computed with old weights.
            flush_cache = following is None
            if self.placement == "colocated":
                result = self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=flush_cache)
            else:
                result = self._broadcast_bucket(bucket, flush_cache)
            check_result("update_weights", result)
            bucket = following
        if self._memory == "weights_only":  # last wake phase: the KV cache and CUDA graphs come back
            self._resume(CACHE_TAGS, self._released_bytes["cache"], "its KV cache and CUDA graphs")
            self._memory = "resident"

    def _load_adapter(self, named_tensors: Iterable[tuple]) -> None:
        """Replace the adapter: the whole adapter (megabytes) in one call, under the same name."""
        tensors = dict(whole_tensors(named_tensors))
        if not tensors:
            raise ValueError("update_weights got no adapter tensors; with LoRA pass the adapter's (name, tensor) pairs.")
        if self._adapter_loaded:
            check_result("unload_lora_adapter", self.engine.unload_lora_adapter(lora_name=ADAPTER_NAME))
        result = self.engine.load_lora_adapter_from_tensors(lora_name=ADAPTER_NAME, tensors=tensors,
                                                            config_dict=sglang_lora_config(self.lora))
        check_result("load_lora_adapter_from_tensors", result)
        self._adapter_loaded = True
        if self._memory == "weights_only":  # the KV cache and CUDA graphs come back (the base never left)
            self._resume(CACHE_TAGS, self._released_bytes["cache"], "its KV cache and CUDA graphs")
            self._memory = "resident"

    def sleep(self) -> None:
        """Colocated: free the KV cache and CUDA graphs, then the weights (not with LoRA: the base stays), until
        the next `update_weights`. Split: nothing to free."""
        if self.placement != "colocated" or self._memory == "released":
            return
        if self.lora is not None:
            if self._memory == "resident":
                self._released_bytes["cache"] = self._release(CACHE_TAGS)
                self._memory = "weights_only"  # generate needs update_weights first, which resumes the cache
            return
        if self._memory == "resident":
            self._released_bytes["cache"] = self._release(CACHE_TAGS)
        self._released_bytes["weights"] = self._release(WEIGHTS_TAGS)
        self._memory = "released"

    def _wake_weights(self) -> None:
        """Colocated, asleep: resume the weights' memory, the first phase of `update_weights` (the KV cache comes
        back after the new weights are in)."""
        if self.placement != "colocated" or self._memory != "released":
            return
        if torch.cuda.is_available():
            torch.cuda.empty_cache()  # hand this process's cached-but-unused blocks back before SGLang asks
        self._resume(WEIGHTS_TAGS, self._released_bytes["weights"], "its weights")
        self._memory = "weights_only"

    def close(self) -> None:
        if self._group_connected:
            engine_side = self._pool.submit(self.engine.destroy_weights_update_group, group_name=self.group_name)
            self.broadcaster.disconnect()
            engine_side.result(timeout=self.rendezvous_timeout_s)
            self._group_connected = False
        self._pool.shutdown(wait=False)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    # ---- colocated: memory phases ----------------------------------------------------------------

    def _release(self, tags: list[str]) -> int:
        """Release `tags`; returns the bytes that came free on the first GPU (0 without a probe)."""
        free_before = self._probe()[0] if self._probe else 0
        check_result("release_memory_occupation", self.engine.release_memory_occupation(tags=tags))
        return max(0, self._probe()[0] - free_before) if self._probe else 0

    def _resume(self, tags: list[str], needed_bytes: int, what: str) -> None:
        if self._probe is not None and needed_bytes > 0:
            _check_memory_budget(self._probe(), needed_bytes, what, self.mem_fraction_static)
        check_result("resume_memory_occupation", self.engine.resume_memory_occupation(tags=tags))

    # ---- split placement: the NCCL path -------------------------------------------------------

    def _connect_weight_sync(self) -> None:
        from pcsd_core.distributed.ray_cluster import free_port

        if self.broadcaster is None:
            raise ValueError("update_weights on a split SGLang engine built without a weight-sync sender: pass "
                             "broadcaster=NcclWeightBroadcaster(device=...) on a GPU outside the rollout's "
                             "(create_rollout_engine(..., syncs_weights=True) picks the actor's own GPU).")

        master_port = self.master_port or free_port()
        world_size = 1 + self.tp_size  # rank 0 = this process, ranks 1..tp_size = the engine's TP workers
        engine_side = self._pool.submit(
            self.engine.init_weights_update_group,
            master_address=self.master_address,
            master_port=master_port,
            rank_offset=1,
            world_size=world_size,
            group_name=self.group_name,
            backend="nccl",
        )
        self.broadcaster.connect(
            master_address=self.master_address,
            master_port=master_port,
            world_size=world_size,
            group_name=self.group_name,
            backend="nccl",
        )
        check_result("init_weights_update_group", engine_side.result(timeout=self.rendezvous_timeout_s))
        self._group_connected = True

    def _broadcast_bucket(self, bucket: list[tuple[str, torch.Tensor]], flush_cache: bool) -> Any:
        engine_side = self._pool.submit(
            self.engine.update_weights_from_distributed,
            names=[name for name, _ in bucket],
            dtypes=[str(tensor.dtype).removeprefix("torch.") for _, tensor in bucket],
            shapes=[list(tensor.shape) for _, tensor in bucket],
            group_name=self.group_name,
            flush_cache=flush_cache,
        )
        for _, tensor in bucket:  # same order as `names`: the receivers match broadcasts by position
            self.broadcaster.broadcast(tensor)
        return engine_side.result(timeout=self.rendezvous_timeout_s)


# ---- helpers ----------------------------------------------------------------------------------


def _cuda_memory_probe(device_index: int) -> Callable[[], tuple[int, int]] | None:
    """(free, total) bytes of the engine's first GPU as the driver sees them (all processes), or None on CPU."""
    if not torch.cuda.is_available():
        return None
    return lambda: torch.cuda.mem_get_info(device_index)


def _check_memory_budget(probe_result: tuple[int, int], needed_bytes: int, what: str, mem_fraction: float) -> None:
    free_bytes, total_bytes = probe_result
    if free_bytes >= needed_bytes:
        return
    gib = 1 << 30
    lower = max(0.05, int((mem_fraction - (needed_bytes - free_bytes) / total_bytes) * 20) / 20)
    raise RuntimeError(
        f"SGLang cannot resume {what}: it needs {needed_bytes / gib:.2f} GiB but only {free_bytes / gib:.2f} GiB "
        f"of the GPU are free while the actor (parameters, gradients, optimizer state) is resident. "
        f"rollout.gpu_memory_utilization ({mem_fraction}) was sized before the actor's optimizer state existed; "
        f"lower it to about {lower:.2f}, or use rollout.placement 'split'."
    )


def _check_options(placement, tp_size, base_gpu_id, mem_fraction_static, bucket_bytes) -> None:
    if placement not in PLACEMENTS:
        raise ValueError(f"rollout.placement ({placement!r}) must be one of {list(PLACEMENTS)}.")
    if tp_size < 1:
        raise ValueError(f"SGLang tp_size ({tp_size}) must be >= 1 (set rollout.num_gpus).")
    if base_gpu_id < 0:
        raise ValueError(f"SGLang base_gpu_id ({base_gpu_id}) must be >= 0.")
    if not 0 < mem_fraction_static < 1:
        raise ValueError(f"rollout.gpu_memory_utilization ({mem_fraction_static}) must be in (0, 1).")
    if bucket_bytes < 1:
        raise ValueError(f"SGLang bucket_bytes ({bucket_bytes}) must be >= 1.")


