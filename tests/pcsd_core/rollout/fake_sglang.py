"""A CPU stand-in for `sglang.Engine` that records every call and enforces the weight-sync protocol.

SGLang cannot run on these machines, so the adapter is tested against this fake. It mirrors the real
method names and keyword arguments (sglang/srt/entrypoints/engine.py) and fails loudly where the real
engine would misbehave or hang:

- generate / update_weights_* while memory is released; release twice; resume without release;
- update_weights_from_tensor with unknown names or wrong shapes (SGLang's loader would KeyError);
- the NCCL rendezvous: `init_weights_update_group` and the trainer's rank-0 `connect` must overlap,
  and `update_weights_from_distributed` must receive one broadcast per announced tensor, in order, with
  the announced dtype and shape. A caller that runs them one after the other times out here, as it
  would deadlock on real NCCL.

Generation is scripted: a deterministic function of the prompt and of the current weights' checksum,
so a test can see that new weights reached the engine.
"""

from __future__ import annotations

import queue
import threading

import torch


class ProtocolError(AssertionError):
    """The adapter called the engine in an order or with arguments the real engine would not accept."""


class FakeSGLangEngine:
    def __init__(self, state_dict: dict[str, torch.Tensor], *, eos_token_id: int = 2, timeout_s: float = 5.0):
        self.weights = {name: tensor.detach().clone() for name, tensor in state_dict.items()}
        self.eos_token_id = eos_token_id
        self.timeout_s = timeout_s
        self.calls: list[tuple[str, dict]] = []
        self.released = False
        self.shut_down = False
        self.group: dict | None = None
        # Rendezvous and "wire" shared with FakeBroadcaster (the trainer's rank 0).
        self.trainer_joined = threading.Event()
        self.engine_joined = threading.Event()
        self.wire: queue.Queue[tuple[torch.Tensor, threading.Event]] = queue.Queue()
        self.trainer_connect_args: dict | None = None

    def _record(self, method: str, **kwargs) -> None:
        if self.shut_down:
            raise ProtocolError(f"{method} called after shutdown()")
        self.calls.append((method, kwargs))

    def _require_resident(self, method: str) -> None:
        if self.released:
            raise ProtocolError(f"{method} called while memory is released; resume_memory_occupation first")

    # ---- generation ---------------------------------------------------------------------------

    def generate(self, prompt=None, sampling_params=None, input_ids=None, **kwargs):
        self._record("generate", prompt=prompt, sampling_params=sampling_params, input_ids=input_ids, **kwargs)
        self._require_resident("generate")
        if prompt is not None or not isinstance(input_ids, list) or not all(isinstance(ids, list) for ids in input_ids):
            raise ProtocolError("the adapter must send a batch of token id lists as input_ids")
        params = sampling_params if isinstance(sampling_params, list) else [sampling_params] * len(input_ids)
        if len(params) != len(input_ids):
            raise ProtocolError(f"{len(params)} sampling_params for {len(input_ids)} requests")
        return [self._respond(ids, request_params) for ids, request_params in zip(input_ids, params)]

    def _respond(self, ids: list[int], params: dict) -> dict:
        """3 content tokens derived from the prompt and weights, then EOS if max_new_tokens allows."""
        base = sum(ids) + self.weights_checksum() + int(params.get("sampling_seed") or 0)
        tokens = [10 + (base + step) % 50 for step in range(min(3, params["max_new_tokens"]))]
        if params["max_new_tokens"] > 3:
            tokens.append(self.eos_token_id)
            finish_reason = {"type": "stop", "matched": self.eos_token_id}
        else:
            finish_reason = {"type": "length", "length": params["max_new_tokens"]}
        return {"output_ids": tokens, "meta_info": {"finish_reason": finish_reason, "prompt_tokens": len(ids)}}

    def weights_checksum(self) -> int:
        return int(sum(float(tensor.double().abs().sum()) for tensor in self.weights.values()) * 1000) % 997

    # ---- colocated: tensors in process, memory saver --------------------------------------------

    def update_weights_from_tensor(self, named_tensors, load_format=None, flush_cache=True):
        self._record("update_weights_from_tensor", names=[n for n, _ in named_tensors], flush_cache=flush_cache)
        self._require_resident("update_weights_from_tensor")
        if load_format is not None:
            raise ProtocolError("plain (name, tensor) lists need load_format=None")
        for name, tensor in named_tensors:
            self._load(name, tensor)
        return True, "Succeeded to update model weights."

    def release_memory_occupation(self, tags=None):
        self._record("release_memory_occupation", tags=tags)
        if self.released:
            raise ProtocolError("release_memory_occupation called twice")
        self.released = True

    def resume_memory_occupation(self, tags=None):
        self._record("resume_memory_occupation", tags=tags)
        if not self.released:
            raise ProtocolError("resume_memory_occupation without a release")
        self.released = False

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
        self.group = expected
        return True, "Succeeded to initialize custom process group."

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
        self._require_resident("update_weights_from_distributed")
        if self.group is None or group_name != self.group["group_name"]:
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
            raise ProtocolError(f"unknown parameter {name!r}")
        if tensor.shape != self.weights[name].shape:
            raise ProtocolError(f"{name}: shape {tuple(tensor.shape)} != {tuple(self.weights[name].shape)}")
        self.weights[name] = tensor.detach().clone()

    def flush_cache(self):
        self._record("flush_cache")

    def shutdown(self):
        self._record("shutdown")
        self.shut_down = True


class FakeBroadcaster:
    """The trainer's rank 0 in the fake NCCL group: joins the rendezvous, then "broadcasts" on the wire."""

    def __init__(self, engine: FakeSGLangEngine):
        self.engine = engine
        self.tensors_sent = 0

    def connect(self, *, master_address, master_port, world_size, group_name, backend):
        if backend != "nccl":
            raise ProtocolError(f"weight sync needs the nccl backend, got {backend!r}")
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
