"""Weight sync in bounded buckets: the actor's weights go to the rollout engine one bucket at a time.

A full gather of a 7B bf16 model is ~14 GB held at once (on rank 0, in the object store and in the controller).
Instead, each train rank sends rows of its own FSDP shard, and nothing is ever all-gathered:

- `local_shards(items, rank)`: each tensor's rows this rank holds (FSDP2 shards dim 0 into contiguous chunks in
  rank order; a tensor that is not sharded is sent by rank 0 alone);
- `plan_row_buckets(layouts, bucket_bytes)`: the slices to send, tensor by tensor and rank by rank, each at most
  `bucket_bytes` (a tensor bigger than a bucket is cut by rows), grouped into buckets of at most `bucket_bytes`;
- `WeightPiece`: what the engines' `update_weights` takes, rows `row_start..` of one parameter; the HF engine
  copies them into its parameter in place, and `whole_tensors` assembles them for SGLang, whose API takes whole
  tensors;
- `tensor_to_wire` / `wire_to_tensor`: the slices cross the Ray object store as numpy arrays, without a copy;
- `drain`: each piece is let go as soon as the engine has taken it.

The extra memory of a sync is then a few buckets (one being copied in, the next being read, the last one not yet
freed by Ray), plus, for SGLang only, the one tensor it is assembling. That needs Ray to free each object at once
(`ray_cluster.RAY_SYSTEM_CONFIG`): with Ray's default, batched about once a second, a fast sync piles up a second's
worth of buckets in the object store.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Iterable, Iterator, NamedTuple, TypeVar

import torch

Item = TypeVar("Item")


class WeightPiece(NamedTuple):
    """Rows [row_start, row_start + len(tensor)) of the parameter `name`, whose first dimension is `full_rows`
    long; `full_rows` None means the tensor is whole. A plain (name, tensor) pair reads as a whole tensor."""

    name: str
    tensor: torch.Tensor
    row_start: int = 0
    full_rows: int | None = None

    @property
    def row_stop(self) -> int:
        return self.row_start + rows_of(self.tensor)

    @property
    def is_whole(self) -> bool:
        return self.full_rows is None or (self.row_start == 0 and self.row_stop == self.full_rows)


def as_piece(item: tuple) -> WeightPiece:
    """A `WeightPiece` from a (name, tensor) pair or a (name, tensor, row_start, full_rows) tuple."""
    return WeightPiece(*item)


def rows_of(tensor: torch.Tensor) -> int:
    """Length of the first dimension; a 0-d tensor counts as one row (it only ever travels whole)."""
    return tensor.shape[0] if tensor.dim() else 1


def rows_tile(spans: list[tuple[int, int]], rows: int) -> bool:
    """Whether the [start, stop) spans cover 0..rows exactly once."""
    position = 0
    for start, stop in sorted(spans):
        if start != position:
            return False
        position = stop
    return position == rows


def unique_state_items(lm: torch.nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """(HF name, tensor) of `lm`'s state dict without copying, each tied tensor once (the engines re-tie)."""
    seen: set[int] = set()
    for name, tensor in lm.state_dict(keep_vars=True).items():  # keep_vars: tied aliases are one object
        if id(tensor) not in seen:
            seen.add(id(tensor))
            yield name, tensor.detach()


# ---- the sender's side: which rows each rank holds, and the plan ----------------------------------------------


@dataclass(frozen=True)
class LocalShard:
    """One tensor as one rank holds it: `local` (its FSDP shard, or the whole tensor), of which this rank sends
    the first `rows_sent` rows; the tensor's global shape."""

    local: torch.Tensor
    rows_sent: int
    shape: tuple[int, ...]


def local_shards(items: Iterable[tuple[str, torch.Tensor]], rank: int) -> dict[str, LocalShard]:
    """Each of the (name, tensor) items (a model's `unique_state_items`, or a LoRA adapter's) as `rank` holds it,
    in the items' order (the same on every rank)."""
    shards = {}
    for name, tensor in items:
        placements = getattr(tensor, "placements", None)  # a DTensor (FSDP2) has them; a plain tensor does not
        # A dim-0 shard holds rows [offset, offset + len), offset = the lower ranks' rows; a DTensor reports its
        # global shape.
        local = tensor.to_local() if placements is not None else tensor
        shards[name] = LocalShard(local, rows_sent(name, placements, rows_of(local), rank), tuple(tensor.shape))
    return shards


def rows_sent(name: str, placements: tuple | None, local_rows: int, rank: int) -> int:
    """How many of its `local_rows` `rank` sends: all of a dim-0 shard (FSDP2 `fully_shard`); all of a whole or
    replicated tensor on rank 0 and none elsewhere. Other placements are refused."""
    if placements is None or all(placement.is_replicate() for placement in placements):
        return local_rows if rank == 0 else 0
    if len(placements) == 1 and placements[0].is_shard(dim=0):
        return local_rows
    raise ValueError(f"weight sync: {name!r} is placed as {placements}; only dim-0 sharding on a 1-D mesh "
                     "(FSDP2 fully_shard) or replication can be sent shard by shard.")


def shard_layout(shards: dict[str, LocalShard], wire_dtype: torch.dtype | None = None,
                 ) -> list[tuple[str, int, tuple[int, ...], int]]:
    """What `plan_row_buckets` needs of one rank: (name, rows sent, global shape, element bytes on the wire), small
    to ship. With `wire_dtype`, floating tensors travel cast to it (`cast_for_wire`), and are sized so."""
    return [(name, shard.rows_sent, shard.shape,
             cast_for_wire(shard.local.reshape(-1)[:1], wire_dtype).element_size()) for name, shard in shards.items()]


def cast_for_wire(tensor: torch.Tensor, dtype: torch.dtype | None) -> torch.Tensor:
    """Floating tensors cast to `dtype` (a copy only when the dtype differs); integer ones, or `dtype` None, as is."""
    return tensor.to(dtype) if dtype is not None and tensor.is_floating_point() else tensor


@dataclass(frozen=True)
class RowSlice:
    """Rows [start, stop) of `rank`'s local `name`, which are rows [row_start, ...) of the whole tensor."""

    rank: int
    name: str
    start: int
    stop: int
    row_start: int
    full_rows: int
    nbytes: int


def plan_row_buckets(layouts: list[list[tuple[str, int, tuple[int, ...], int]]],
                     bucket_bytes: int) -> list[list[RowSlice]]:
    """The slices of every rank's shards (`layouts[rank]` from `shard_layout`), tensor by tensor and, within a
    tensor, rank by rank, so one tensor's rows come one after another; each slice and each bucket at most
    `bucket_bytes` (a single row bigger than that goes alone)."""
    slices = []
    for entries in zip(*layouts, strict=True):
        name, _, shape, element_bytes = entries[0]
        if any(entry[0] != name for entry in entries):
            raise ValueError(f"weight sync: the ranks list different tensors ({[entry[0] for entry in entries]}).")
        full_rows = shape[0] if shape else 1
        row_bytes = max(1, element_bytes * (torch.Size(shape[1:]).numel() if shape else 1))
        rows_per_slice = max(1, bucket_bytes // row_bytes)
        offset = 0
        for rank, (_, rows_sent, _, _) in enumerate(entries):
            for start in range(0, rows_sent, rows_per_slice):
                stop = min(start + rows_per_slice, rows_sent)
                slices.append(RowSlice(rank, name, start, stop, offset + start, full_rows, (stop - start) * row_bytes))
            offset += rows_sent
        if offset != full_rows:
            raise ValueError(f"weight sync: the ranks hold {offset} rows of {name!r} together, but it has "
                             f"{full_rows}; its sharding is not FSDP2's dim-0 chunks.")
    return list(bucketed(slices, lambda piece: piece.nbytes, bucket_bytes))


def read_rows(shards: dict[str, LocalShard], piece: RowSlice) -> WeightPiece:
    """The rows `piece` names, as a view of the local shard (no copy)."""
    local = shards[piece.name].local
    rows = local if local.dim() == 0 else local[piece.start:piece.stop]
    return WeightPiece(piece.name, rows, piece.row_start, piece.full_rows)


def bucketed(items: Iterable[Item], size: Callable[[Item], int], bucket_bytes: int) -> Iterator[list[Item]]:
    """Consecutive lists of `items` of at most `bucket_bytes` in all; an item bigger than that goes alone."""
    bucket, total = [], 0
    for item in items:
        if bucket and total + size(item) > bucket_bytes:
            yield bucket
            bucket, total = [], 0
        bucket.append(item)
        total += size(item)
    if bucket:
        yield bucket


def tensor_bytes(named: tuple[str, torch.Tensor]) -> int:
    return named[1].numel() * named[1].element_size()


# ---- the receiver's side --------------------------------------------------------------------------------------


def whole_tensors(items: Iterable[tuple]) -> Iterator[tuple[str, torch.Tensor]]:
    """(name, whole tensor) from `WeightPiece`s or (name, tensor) pairs, for an engine that loads whole tensors.

    The rows of one tensor must come one after another (as `plan_row_buckets` orders them): only the tensor being
    assembled is held, so the extra memory is the largest tensor, not the model. A whole tensor passes through
    without a copy.
    """
    name, buffer, spans = None, None, []
    for piece in map(as_piece, items):
        if name is not None and piece.name != name:
            raise ValueError(f"weight sync: rows of {name!r} stopped at {sum(b - a for a, b in spans)} of "
                             f"{rows_of(buffer)} before {piece.name!r} began; send each tensor's rows together.")
        if piece.is_whole:
            yield piece.name, piece.tensor
            continue
        if name is None:
            name, spans = piece.name, []
            buffer = piece.tensor.new_empty((piece.full_rows, *piece.tensor.shape[1:]))
        buffer[piece.row_start:piece.row_stop].copy_(piece.tensor)
        spans.append((piece.row_start, piece.row_stop))
        if sum(stop - start for start, stop in spans) >= piece.full_rows:
            if not rows_tile(spans, piece.full_rows):
                raise ValueError(f"weight sync: the rows sent of {name!r} overlap ({sorted(spans)}).")
            yield name, buffer
            name, buffer, spans = None, None, []
    if name is not None:
        raise ValueError(f"weight sync: {name!r} got only rows {sorted(spans)} of {rows_of(buffer)}.")


# ---- across the Ray object store ---------------------------------------------------------------------------


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


def drain(buckets: Iterable[list[Item]]) -> Iterator[Item]:
    """The items of `buckets`, each let go once consumed: about one bucket alive at a time."""
    for bucket in buckets:
        bucket.reverse()
        while bucket:
            yield bucket.pop()
