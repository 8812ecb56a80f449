"""Weight sync in bounded buckets: the actor's weights go to the rollout engine one bucket at a time.

A full gather of a 7B bf16 model is ~14 GB held at once (on rank 0, in the object store and in the controller);
a bucket of `train.weight_sync_bucket_mb` bounds that to about one bucket plus the largest tensor. These helpers
cut a (name, tensor) stream into buckets, ship bucket tensors through the Ray object store without a copy, and
release each tensor as soon as the engine has taken it (`drain`).
"""

from __future__ import annotations

from typing import Any, Iterable, Iterator

import torch


def unique_state_items(lm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of `lm`'s state dict without copying, each tied tensor once (the engines re-tie)."""
    seen: set[int] = set()
    for name, tensor in lm.state_dict(keep_vars=True).items():  # keep_vars: tied aliases are one object
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor.detach()


def bucket_named_tensors(named_tensors: Iterable[tuple[str, torch.Tensor]],
                         bucket_bytes: int) -> Iterator[list[tuple[str, torch.Tensor]]]:
    """Consecutive lists of (name, tensor) of at most `bucket_bytes` (global size); a bigger tensor goes alone."""
    bucket, size = [], 0
    for name, tensor in named_tensors:
        tensor_bytes = tensor.numel() * tensor.element_size()  # a DTensor reports its global shape
        if bucket and size + tensor_bytes > bucket_bytes:
            yield bucket
            bucket, size = [], 0
        bucket.append((name, tensor))
        size += tensor_bytes
    if bucket:
        yield bucket


def tensor_to_wire(name: str, tensor: torch.Tensor) -> tuple[str, Any, str]:
    """(name, numpy array, torch dtype name); bfloat16 travels as int16 bits (numpy has no bfloat16)."""
    tensor = tensor.cpu()
    if tensor.dtype == torch.bfloat16:
        return name, tensor.view(torch.int16).numpy(), "bfloat16"
    return name, tensor.numpy(), str(tensor.dtype).removeprefix("torch.")


def wire_to_tensor(item: tuple[str, Any, str]) -> tuple[str, torch.Tensor]:
    import warnings

    name, array, dtype = item
    with warnings.catch_warnings():  # the object store's arrays are read-only; the engines only read them
        warnings.simplefilter("ignore", UserWarning)
        tensor = torch.from_numpy(array)
    return name, tensor.view(torch.bfloat16) if dtype == "bfloat16" else tensor


def drain(buckets: Iterable[list[tuple[str, torch.Tensor]]]) -> Iterator[tuple[str, torch.Tensor]]:
    """The (name, tensor) pairs of `buckets`, each let go once consumed: about one bucket alive at a time."""
    for bucket in buckets:
        bucket.reverse()
        while bucket:
            yield bucket.pop()
