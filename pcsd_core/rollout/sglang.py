"""The SGLang rollout engine (GPU): `sglang.Engine` in this process, weights synced from the actor.

Written against the offline Engine API of `sglang/srt/entrypoints/engine.py`; sglang is imported only
when an engine is launched, so this module imports (and is tested against a fake) on CPU machines.

    engine = SGLangRolloutEngine("/path/to/model", placement="colocated", mem_fraction_static=0.5)

Placement decides how weights move and whether the engine sleeps:

- "colocated": actor and rollout share GPUs. `sleep()` -> `Engine.release_memory_occupation()` frees
  weights and KV cache while the actor trains (needs `enable_memory_saver=True` at launch);
  `wake()` -> `resume_memory_occupation()`; `update_weights` -> `update_weights_from_tensor`, which
  takes a plain list of (name, tensor) and serialises it itself (CUDA tensors travel as IPC handles):
  `Engine.update_weights_from_tensor(named_tensors: List[Tuple[str, Tensor]], load_format=None,
  flush_cache=True)`.
- "split": the rollout owns its own GPUs (`base_gpu_id`, `tp_size`) and never sleeps. At start the
  engine's TP ranks (ranks 1..tp_size) and this process (rank 0) form an NCCL group with
  `Engine.init_weights_update_group(master_address, master_port, rank_offset=1, world_size, group_name,
  backend)`; `update_weights` then announces each bucket with `Engine.update_weights_from_distributed(
  names, dtypes, shapes, group_name, flush_cache)` while rank 0 broadcasts the same tensors in the same
  order. Both calls block until every rank joins, so the engine call runs in a helper thread while
  this thread broadcasts (the pattern of SGLang's own tests and verl's SGLang sync).

The rank-0 side is a `WeightBroadcaster`; the default one joins the group in this process with
SGLang's `init_custom_process_group` (the actor's full tensors must be on a GPU of this process).
Pass another broadcaster (e.g. one living in the rank-0 train worker) to sync from elsewhere.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Protocol

import torch

from pcsd_core.rollout.base import Generation, SamplingParams

SGLANG_INSTALL_HINT = (
    "rollout.engine 'sglang' needs the `sglang` package, which is not installed. Run "
    "`pip install '.[sglang]'` on a CUDA machine, or use rollout.engine 'hf'."
)
PLACEMENTS = ("colocated", "split")
DEFAULT_BUCKET_BYTES = 512 << 20  # tensors per weight-sync call; bounds the staging memory SGLang needs


class WeightBroadcaster(Protocol):
    """Rank 0 of the weight-sync group: joins it, then broadcasts full tensors to the rollout ranks."""

    def connect(
        self, *, master_address: str, master_port: int, world_size: int, group_name: str, backend: str
    ) -> None: ...

    def broadcast(self, tensor: torch.Tensor) -> None: ...


class NcclWeightBroadcaster:
    """Joins the weight-sync group from this process as rank 0 and broadcasts over it (NCCL, GPU)."""

    def __init__(self, device: str | torch.device = "cuda") -> None:
        self.device = torch.device(device)
        self.group = None

    def connect(self, *, master_address: str, master_port: int, world_size: int, group_name: str, backend: str) -> None:
        _import_sglang()
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
        broadcaster: WeightBroadcaster | None = None,
        master_address: str = "127.0.0.1",
        master_port: int | None = None,
        group_name: str = "pcsd_weight_sync",
        bucket_bytes: int = DEFAULT_BUCKET_BYTES,
        rendezvous_timeout_s: float = 600.0,
    ) -> None:
        _check_options(placement, tp_size, base_gpu_id, mem_fraction_static, bucket_bytes)
        self.placement = placement
        self.tp_size = tp_size
        self.group_name = group_name
        self.bucket_bytes = bucket_bytes
        self.rendezvous_timeout_s = rendezvous_timeout_s
        self._released = False
        # One helper thread runs the blocking engine side of every rendezvous / broadcast.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="sglang-weight-sync")
        if engine is None:
            engine = _launch_engine(model_path, placement, tp_size, base_gpu_id, mem_fraction_static, dtype, seed)
        self.engine = engine
        self.broadcaster = None
        if placement == "split":
            self.broadcaster = broadcaster if broadcaster is not None else NcclWeightBroadcaster()
            self._connect_weight_sync(master_address, master_port or _free_port())

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """Sample `n` responses per prompt; prompt-major order: [p0 r0, p0 r1, ..., p1 r0, ...]."""
        if n < 1:
            raise ValueError(f"generate: n ({n}) must be >= 1 responses per prompt.")
        self._require_awake("generate")
        # Each prompt is repeated n times (prompt-major) rather than using SGLang's `n`, so the output
        # order is explicit; the radix cache shares the repeated prompt's KV anyway.
        input_ids = [list(ids) for ids in prompt_ids for _ in range(n)]
        sampling_params = to_sglang_sampling_params(sampling, num_requests=len(input_ids))
        outputs = self.engine.generate(input_ids=input_ids, sampling_params=sampling_params)
        if len(outputs) != len(input_ids):
            raise RuntimeError(f"sglang returned {len(outputs)} outputs for {len(input_ids)} requests.")
        return [parse_output(output, prompt_index=row // n) for row, output in enumerate(outputs)]

    # ---- weight sync and memory ---------------------------------------------------------------

    def update_weights(self, named_tensors: Iterable[tuple[str, torch.Tensor]]) -> None:
        """Push the actor's full weights (HF names) into the engine, bucket by bucket."""
        self._require_awake("update_weights")
        buckets = list(_buckets(named_tensors, self.bucket_bytes))
        if not buckets:
            raise ValueError("update_weights got no tensors; pass the actor's full state dict as (name, tensor) pairs.")
        for number, bucket in enumerate(buckets):
            # Flush the prefix cache once, after the last bucket: cached KV was computed with old weights.
            flush_cache = number == len(buckets) - 1
            if self.placement == "colocated":
                result = self.engine.update_weights_from_tensor(named_tensors=bucket, flush_cache=flush_cache)
            else:
                result = self._broadcast_bucket(bucket, flush_cache)
            _check_result("update_weights", result)

    def sleep(self) -> None:
        """Colocated: free weights and KV cache while the actor trains. Split: nothing to free."""
        if self.placement == "colocated" and not self._released:
            _check_result("release_memory_occupation", self.engine.release_memory_occupation())
            self._released = True

    def wake(self) -> None:
        """Colocated: re-allocate what `sleep` freed; call before `update_weights` and `generate`."""
        if self.placement == "colocated" and self._released:
            _check_result("resume_memory_occupation", self.engine.resume_memory_occupation())
            self._released = False

    def close(self) -> None:
        self._pool.shutdown(wait=False)
        if self.engine is not None:
            self.engine.shutdown()
            self.engine = None

    # ---- split placement: the NCCL path -------------------------------------------------------

    def _connect_weight_sync(self, master_address: str, master_port: int) -> None:
        world_size = 1 + self.tp_size  # rank 0 = this process, ranks 1..tp_size = the engine's TP workers
        engine_side = self._pool.submit(
            self.engine.init_weights_update_group,
            master_address=master_address,
            master_port=master_port,
            rank_offset=1,
            world_size=world_size,
            group_name=self.group_name,
            backend="nccl",
        )
        self.broadcaster.connect(
            master_address=master_address,
            master_port=master_port,
            world_size=world_size,
            group_name=self.group_name,
            backend="nccl",
        )
        _check_result("init_weights_update_group", engine_side.result(timeout=self.rendezvous_timeout_s))

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

    def _require_awake(self, operation: str) -> None:
        if self._released:
            raise RuntimeError(f"SGLangRolloutEngine.{operation} called after sleep(); call wake() first.")


# ---- translation to and from SGLang's formats ------------------------------------------------


def to_sglang_sampling_params(sampling: SamplingParams, num_requests: int) -> dict | list[dict]:
    """Our SamplingParams -> SGLang's sampling_params (docs: basic_usage/sampling_params).

    temperature 0 is SGLang's greedy (it maps to top_k=1); top_k is left at SGLang's default (whole
    vocabulary) so sampling matches the HF engine. Special tokens are kept so response ids round-trip.
    With a seed, each request gets its own `sampling_seed` (seed + row); SGLang added that key in its
    0.5 series and honours it only with deterministic inference enabled, so SGLang rollouts are not
    bit-reproducible the way the HF engine's are.
    """
    params = {
        "temperature": float(sampling.temperature),
        "top_p": 1.0 if sampling.temperature == 0 else float(sampling.top_p),
        "max_new_tokens": int(sampling.max_new_tokens),
        "skip_special_tokens": False,
    }
    if sampling.seed is None:
        return params
    return [{**params, "sampling_seed": sampling.seed + row} for row in range(num_requests)]


def parse_output(output: dict, prompt_index: int) -> Generation:
    """One SGLang output dict -> Generation. finish_reason {"type": "stop", "matched": id} = EOS, "length" = cut."""
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
    return Generation(prompt_index=prompt_index, response_ids=response_ids, finished=kind == "stop")


# ---- helpers ----------------------------------------------------------------------------------


def _import_sglang():
    try:
        import sglang
    except ImportError as error:
        raise ImportError(SGLANG_INSTALL_HINT) from error
    return sglang


def _launch_engine(model_path, placement, tp_size, base_gpu_id, mem_fraction_static, dtype, seed):
    sglang = _import_sglang()
    from pcsd_core.models import resolve_model

    return sglang.Engine(
        model_path=resolve_model(model_path),
        dtype=dtype,
        tp_size=tp_size,
        base_gpu_id=base_gpu_id,
        mem_fraction_static=mem_fraction_static,
        # torch_memory_saver makes release/resume_memory_occupation possible (colocated sleep/wake).
        enable_memory_saver=placement == "colocated",
        # We send and receive token ids only; the engine needs no tokenizer of its own.
        skip_tokenizer_init=True,
        random_seed=seed,
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


def _buckets(named_tensors, bucket_bytes: int):
    """Group (name, tensor) pairs into lists of about `bucket_bytes` each (a big tensor gets its own)."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        tensor_bytes = tensor.numel() * tensor.element_size()
        if bucket and size + tensor_bytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor.detach()))
        size += tensor_bytes
    if bucket:
        yield bucket


def _check_result(operation: str, result: Any) -> None:
    """SGLang's control calls answer (success, message); raise with the message on failure."""
    if isinstance(result, tuple) and len(result) >= 1 and result[0] is False:
        message = result[1] if len(result) > 1 else ""
        raise RuntimeError(f"sglang {operation} failed: {message}")


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
