"""A CPU stand-in for `sglang.Engine` that records every call and enforces what the real engine enforces.

SGLang cannot run on these machines, so the adapter's protocol is tested against this fake (its names and
keywords are checked against the pinned package in test_sglang_contract.py). It mirrors the real
behaviour of the pinned release and fails loudly where the real engine would misbehave, crash or hang:

- memory tags ("weights", "kv_cache", "cuda_graph"): releasing a released tag or resuming a resident one
  fails (the scheduler's `offload_tags.remove` raises); generate needs every tag resident; weight updates
  need the "weights" tag. Releasing "weights" poisons them with NaN, as torch_memory_saver without CPU
  backup leaves garbage, so a generate before the next update fails.
- a simulated GPU (`gpu_total_bytes`, `actor_bytes`, per-tag sizes): a resume that does not fit kills the
  engine, as a failed resume kills SGLang's process tree; `memory_probe()` answers like `mem_get_info`.
- update_weights_* with an unknown name or a wrong shape crashes the engine (SGLang's loader raises in
  the scheduler and the process dies); every later call fails.
- the NCCL rendezvous: `init_weights_update_group` and the trainer's rank-0 `connect` must overlap, and
  `update_weights_from_distributed` must receive one broadcast per announced tensor, in order, with the
  announced dtype and shape. Rank 0's group names are registered per process, as torch's are: a
  duplicate name raises until `disconnect` destroys the group.
- finish reasons: the length limit is checked before EOS, so EOS sampled as the last allowed token
  reports "length" (schedule_batch.Req.check_finished).

- LoRA (`lora_enabled`, the engine launched with enable_lora): `load_lora_adapter_from_tensors` under a name
  already loaded fails, as does `unload_lora_adapter` of an unknown name (a `LoRAUpdateOutput` with
  success False); a `generate` naming an adapter not loaded crashes; without enable_lora the LoRA calls fail.

Generation is scripted: 3 content tokens derived from the prompt and the weights' checksum (and the adapter's,
when a request names one), then EOS, so a test can see that new weights reached the engine.
"""

from __future__ import annotations

import math
import queue
import threading
import types

import torch

MEMORY_TAGS = ("kv_cache", "weights", "cuda_graph")
_RANK0_GROUPS: set[str] = set()  # group names this process (rank 0) has registered with "torch"


class ProtocolError(AssertionError):
    """The adapter called the engine in an order or with arguments the real engine would not accept."""


class FakeSGLangEngine:
    def __init__(
        self,
        state_dict: dict[str, torch.Tensor],
        *,
        eos_token_id: int = 2,
        timeout_s: float = 5.0,
        tag_bytes: dict[str, int] | None = None,
        gpu_total_bytes: int = 100 << 30,
        lora_enabled: bool = False,
    ):
        self.lora_enabled = lora_enabled
        self.adapters: dict[str, tuple[dict[str, torch.Tensor], dict]] = {}  # name -> (tensors, config_dict)
        self.weights = {name: tensor.detach().clone() for name, tensor in state_dict.items()}
        self.eos_token_id = eos_token_id
        self.timeout_s = timeout_s
        self.calls: list[tuple[str, dict]] = []
        self.released: set[str] = set()
        self.dead: str | None = None  # why the engine's processes died
        self.shut_down = False
        self.groups: dict[str, dict] = {}
        self.tag_bytes = tag_bytes or {"weights": 10 << 30, "kv_cache": 40 << 30, "cuda_graph": 1 << 30}
        self.gpu_total_bytes = gpu_total_bytes
        self.actor_bytes = 0  # what the colocated actor holds on the simulated GPU
        # Rendezvous and "wire" shared with FakeBroadcaster (the trainer's rank 0).
        self.trainer_joined = threading.Event()
        self.engine_joined = threading.Event()
        self.wire: queue.Queue[tuple[torch.Tensor, threading.Event]] = queue.Queue()
        self.trainer_connect_args: dict | None = None

    def _record(self, method: str, **kwargs) -> None:
        if self.shut_down:
            raise ProtocolError(f"{method} called after shutdown()")
        if self.dead:
            raise ProtocolError(f"{method} called on a dead engine ({self.dead})")
        self.calls.append((method, kwargs))

    def _crash(self, reason: str) -> None:
        self.dead = reason
        raise ProtocolError(reason)

    def _require_resident(self, method: str, tags=MEMORY_TAGS) -> None:
        released = sorted(self.released & set(tags))
        if released:
            raise ProtocolError(f"{method} called while {released} are released; resume_memory_occupation first")

    def memory_probe(self) -> tuple[int, int]:
        """(free, total) bytes of the simulated GPU, like torch.cuda.mem_get_info."""
        resident = sum(size for tag, size in self.tag_bytes.items() if tag not in self.released)
        return self.gpu_total_bytes - self.actor_bytes - resident, self.gpu_total_bytes

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompt=None, sampling_params=None, input_ids=None, **kwargs):
        self._record("generate", prompt=prompt, sampling_params=sampling_params, input_ids=input_ids, **kwargs)
        self._require_resident("generate")
        if any(not bool(torch.isfinite(tensor).all()) for tensor in self.weights.values() if tensor.is_floating_point()):
            raise ProtocolError("generate with undefined (released, never re-sent) weights: the output is garbage")
        if prompt is not None or not isinstance(input_ids, list) or not all(isinstance(ids, list) for ids in input_ids):
            raise ProtocolError("the adapter must send a batch of token id lists as input_ids")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(input_ids)
        if len(params) != len(input_ids):
            raise ProtocolError(f"{len(params)} sampling_params for {len(input_ids)} requests")
        lora_paths = kwargs.get("lora_path") or [None] * len(input_ids)
        if len(lora_paths) != len(input_ids) or any(path is not None and path not in self.adapters for path in lora_paths):
            self._crash(f"generate names LoRA adapters {lora_paths} but only {sorted(self.adapters)} are loaded")
        return [self._respond(ids, request_params, path) for ids, request_params, path in
                zip(input_ids, params, lora_paths)]

    def _respond(self, ids: list[int], params: dict, lora_path: str | None = None) -> dict:
        """3 content tokens derived from the prompt, weights and adapter, then EOS, cut at max_new_tokens."""
        adapter = self.adapters[lora_path][0] if lora_path else {}
        adapter_sum = int(sum(float(t.double().abs().sum()) for t in adapter.values()) * 1000) % 997
        base = sum(ids) + self.weights_checksum() + adapter_sum + int(params.get("sampling_seed") or 0)
        limit = params["max_new_tokens"]
        tokens = ([10 + (base + step) % 50 for step in range(3)] + [self.eos_token_id])[:limit]
        if len(tokens) >= limit:  # the length check runs before the EOS check
            finish_reason = {"type": "length", "length": limit}
        else:
            finish_reason = {"type": "stop", "matched": self.eos_token_id}
        return {"output_ids": tokens, "meta_info": {"finish_reason": finish_reason, "prompt_tokens": len(ids)}}

    def weights_checksum(self) -> int:
        return int(sum(float(tensor.double().abs().sum()) for tensor in self.weights.values()) * 1000) % 997

    # ---- colocated: tensors in process, memory saver --------------------------------------------

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self._record("update_weights_from_tensor", names=[n for n, _ in named_tensors], flush_cache=flush_cache)
        self._require_resident("update_weights_from_tensor", tags=["weights"])
        if load_format is not None:
            raise ProtocolError("plain (name, tensor) lists need load_format=None")
        for name, tensor in named_tensors:
            self._load(name, tensor)
        return True, "Succeeded to update model weights."

    # ---- LoRA adapters (the pinned Engine's signatures) -------------------------------------------

    def load_lora_adapter_from_tensors(self, lora_name, tensors, config_dict, load_format=None):
        self._record("load_lora_adapter_from_tensors", lora_name=lora_name, names=sorted(tensors),
                     config_dict=config_dict, load_format=load_format)
        if not self.lora_enabled:
            return types.SimpleNamespace(success=False, error_message="LoRA is not enabled; launch with enable_lora")
        if lora_name in self.adapters:
            return types.SimpleNamespace(success=False, error_message=f"adapter {lora_name!r} is already loaded")
        if load_format is not None or not all(isinstance(t, torch.Tensor) for t in tensors.values()):
            raise ProtocolError("plain tensors need load_format=None")
        self.adapters[lora_name] = ({n: t.detach().clone() for n, t in tensors.items()}, dict(config_dict))
        return types.SimpleNamespace(success=True, error_message=None)

    def unload_lora_adapter(self, lora_name):
        self._record("unload_lora_adapter", lora_name=lora_name)
        if self.adapters.pop(lora_name, None) is None:
            return types.SimpleNamespace(success=False, error_message=f"adapter {lora_name!r} is not loaded")
        return types.SimpleNamespace(success=True, error_message=None)

    def release_memory_occupation(self, tags=None):
        self._record("release_memory_occupation", tags=tags)
        for tag in tags or MEMORY_TAGS:
            if tag not in MEMORY_TAGS or tag in self.released:
                self._crash(f"release_memory_occupation of {tag!r}, which is unknown or already released")
            self.released.add(tag)
        if "weights" in (tags or MEMORY_TAGS):
            for tensor in self.weights.values():
                if tensor.is_floating_point():
                    tensor.fill_(math.nan)

    def resume_memory_occupation(self, tags=None):
        self._record("resume_memory_occupation", tags=tags)
        tags = list(tags or MEMORY_TAGS)
        if not set(tags) <= self.released:
            self._crash(f"resume_memory_occupation of {tags}, but only {sorted(self.released)} are released")
        free, _ = self.memory_probe()
        if sum(self.tag_bytes[tag] for tag in tags) > free:
            self._crash(f"CUDA out of memory resuming {tags}; the process tree was killed")
        self.released -= set(tags)

    # ---- split: NCCL group with the trainer ------------------------------------------------------

    def init_weights_update_group(
        self, master_address, master_port, rank_offset, world_size, group_name, backend="nccl"
    ):
        self._record(
            "init_weights_update_group",
            master_address=master_address,
            master_port=master_port,
            rank_offset=rank_offset,
            world_size=world_size,
            group_name=group_name,
            backend=backend,
        )
        if group_name in self.groups:
            raise ProtocolError(f"the engine already has a weight update group named {group_name!r}")
        self.engine_joined.set()
        if not self.trainer_joined.wait(self.timeout_s):
            raise ProtocolError("rendezvous timed out: rank 0 (the trainer) never joined while the engine waited")
        expected = {
            "master_address": master_address,
            "master_port": master_port,
            "world_size": world_size,
            "group_name": group_name,
        }
        if self.trainer_connect_args != expected:
            raise ProtocolError(f"trainer joined {self.trainer_connect_args}, engine joined {expected}")
        if rank_offset != 1:
            raise ProtocolError(f"rank 0 is the trainer, so the engine's ranks start at 1 (got {rank_offset})")
        self.groups[group_name] = expected
        return True, "Succeeded to initialize custom process group."

    def destroy_weights_update_group(self, group_name):
        self._record("destroy_weights_update_group", group_name=group_name)
        if self.groups.pop(group_name, None) is None:
            return False, "The group to be destroyed does not exist."
        return True, "Succeeded to destroy custom process group."

    def update_weights_from_distributed(
        self, names, dtypes, shapes, group_name="weight_update_group", flush_cache=True, load_format=None
    ):
        self._record(
            "update_weights_from_distributed",
            names=list(names),
            dtypes=list(dtypes),
            shapes=list(shapes),
            group_name=group_name,
            flush_cache=flush_cache,
        )
        self._require_resident("update_weights_from_distributed", tags=["weights"])
        if group_name not in self.groups:
            raise ProtocolError(f"no weight update group named {group_name!r}; call init_weights_update_group first")
        for name, dtype, shape in zip(names, dtypes, shapes):
            try:
                tensor, received = self.wire.get(timeout=self.timeout_s)
            except queue.Empty:
                raise ProtocolError(f"waited for the broadcast of {name!r}, none came (deadlock on real NCCL)") from None
            received.set()
            if str(tensor.dtype).removeprefix("torch.") != dtype or list(tensor.shape) != list(shape):
                raise ProtocolError(f"{name}: announced {dtype}{shape}, broadcast {tensor.dtype}{list(tensor.shape)}")
            self._load(name, tensor)
        return True, "Succeeded to update parameter online."

    def _load(self, name: str, tensor: torch.Tensor) -> None:
        if name not in self.weights:
            self._crash(f"KeyError: unknown parameter {name!r} (the scheduler died)")
        if tensor.shape != self.weights[name].shape:
            self._crash(f"{name}: shape {tuple(tensor.shape)} != {tuple(self.weights[name].shape)} (the scheduler died)")
        self.weights[name] = tensor.detach().clone()

    def flush_cache(self):
        self._record("flush_cache")

    def shutdown(self):
        self.calls.append(("shutdown", {}))
        self.shut_down = True


class FakeBroadcaster:
    """The trainer's rank 0 in the fake NCCL group: joins the rendezvous, then "broadcasts" on the wire."""

    def __init__(self, engine: FakeSGLangEngine):
        self.engine = engine
        self.tensors_sent = 0
        self.group_name: str | None = None

    def connect(self, *, master_address, master_port, world_size, group_name, backend):
        if backend != "nccl":
            raise ProtocolError(f"weight sync needs the nccl backend, got {backend!r}")
        if group_name in _RANK0_GROUPS:
            raise ProtocolError(f"process group name {group_name!r} is already registered in this process")
        _RANK0_GROUPS.add(group_name)
        self.group_name = group_name
        self.engine.trainer_connect_args = {
            "master_address": master_address,
            "master_port": master_port,
            "world_size": world_size,
            "group_name": group_name,
        }
        self.engine.trainer_joined.set()
        if not self.engine.engine_joined.wait(self.engine.timeout_s):
            raise ProtocolError("rendezvous timed out: the engine never joined while rank 0 waited")

    def broadcast(self, tensor: torch.Tensor) -> None:
        if not self.engine.engine_joined.is_set():
            raise ProtocolError("broadcast before the group exists")
        # Like NCCL, a broadcast completes only when the receivers take part: wait for the engine side.
        received = threading.Event()
        self.engine.wire.put((tensor.detach().clone(), received))
        if not received.wait(self.engine.timeout_s):
            raise ProtocolError("broadcast had no receiver: update_weights_from_distributed was not running")
        self.tensors_sent += 1

    def disconnect(self) -> None:
        if self.group_name is None:
            raise ProtocolError("disconnect without a group")
        _RANK0_GROUPS.discard(self.group_name)
        self.group_name = None


def registered_group_names() -> set[str]:
    """Rank 0's group names currently registered in this process."""
    return set(_RANK0_GROUPS)
