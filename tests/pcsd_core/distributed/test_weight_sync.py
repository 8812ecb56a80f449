"""The weight-sync plan and assembly, against FSDP2's own rule for who holds which rows (`torch.chunk` on dim 0).

Ranks are simulated here by chunking float64 tensors; the real FSDP2 shards over Ray are in test_workers.py and
test_multinode.py, which compare the pieces against a full all-gather.
"""

from __future__ import annotations

import pytest
import torch

from pcsd_core.distributed.weight_sync import (LocalShard, WeightPiece, plan_row_buckets, read_rows, rows_sent, shard_layout,
                                   whole_tensors)


def fsdp_chunks(state: dict[str, torch.Tensor], world: int) -> list[dict[str, LocalShard]]:
    """What each rank holds under FSDP2's Shard(0): torch.chunk of dim 0 (the last chunks may be short or empty)."""
    ranks = []
    for rank in range(world):
        shards = {}
        for name, tensor in state.items():
            chunks = torch.chunk(tensor, world, dim=0)
            local = chunks[rank] if rank < len(chunks) else tensor[:0]
            shards[name] = LocalShard(local, len(local), tuple(tensor.shape))
        ranks.append(shards)
    return ranks


STATE = {  # uneven shapes: 7 rows over 3 ranks (3, 3, 1), 2 rows over 3 ranks (1, 1, 0), a 1-D tensor
    "embed": torch.arange(7 * 5, dtype=torch.float64).reshape(7, 5),
    "small": torch.arange(2 * 3, dtype=torch.float64).reshape(2, 3) + 1000,
    "norm": torch.arange(4, dtype=torch.float64) + 2000,
}


@pytest.mark.parametrize("world", [1, 2, 3])
@pytest.mark.parametrize("bucket_bytes", [8, 40, 100, 10_000])
def test_pieces_reassemble_the_tensors_within_the_bound(world, bucket_bytes):
    ranks = fsdp_chunks(STATE, world)
    buckets = plan_row_buckets([shard_layout(shards) for shards in ranks], bucket_bytes)
    pieces = [read_rows(ranks[piece.rank], piece) for bucket in buckets for piece in bucket]
    for bucket in buckets:
        size = sum(piece.nbytes for piece in bucket)
        assert size <= bucket_bytes or (len(bucket) == 1 and bucket[0].stop - bucket[0].start == 1)
    assert [piece.name for piece in pieces] == sorted((piece.name for piece in pieces), key=list(STATE).index)
    assembled = dict(whole_tensors(pieces))
    assert set(assembled) == set(STATE)
    for name, tensor in STATE.items():
        assert torch.equal(assembled[name], tensor), name
    for piece in pieces:  # each piece is a view of its rank's shard, not a copy
        assert torch.equal(piece.tensor, STATE[piece.name][piece.row_start:piece.row_stop])


def test_one_bucket_holds_everything_when_it_fits_and_whole_tensors_pass_through():
    ranks = fsdp_chunks(STATE, 1)
    (bucket,) = plan_row_buckets([shard_layout(ranks[0])], 2**20)
    pieces = [read_rows(ranks[0], piece) for piece in bucket]
    assert all(piece.is_whole for piece in pieces)
    for (name, tensor), piece in zip(whole_tensors(pieces), pieces, strict=True):
        assert tensor is piece.tensor  # no copy for a tensor sent whole


def test_plan_refuses_shards_that_are_not_dim0_chunks():
    layouts = [shard_layout(shards) for shards in fsdp_chunks(STATE, 2)]
    layouts[1][0] = ("embed", 1, (7, 5), 8)  # rank 1 claims 1 row of embed where 3 are missing
    with pytest.raises(ValueError, match="hold 5 rows of 'embed' together, but it has 7"):
        plan_row_buckets(layouts, 64)
    layouts[1][0] = ("other", 4, (7, 5), 8)
    with pytest.raises(ValueError, match="different tensors"):
        plan_row_buckets(layouts, 64)


def test_assembly_refuses_interleaved_overlapping_or_incomplete_rows():
    rows = STATE["embed"]
    with pytest.raises(ValueError, match="rows of 'embed' stopped at 3 of 7 before 'norm' began"):
        list(whole_tensors([WeightPiece("embed", rows[:3], 0, 7), ("norm", STATE["norm"])]))
    with pytest.raises(ValueError, match="overlap"):
        list(whole_tensors([WeightPiece("embed", rows[:4], 0, 7), WeightPiece("embed", rows[3:6], 3, 7)]))
    with pytest.raises(ValueError, match=r"got only rows \[\(0, 3\)\] of 7"):
        list(whole_tensors([WeightPiece("embed", rows[:3], 0, 7)]))


def test_each_rank_sends_its_dim0_shard_and_rank_0_alone_sends_a_whole_or_replicated_tensor():
    from torch.distributed.tensor import Replicate, Shard

    assert [rows_sent("w", (Shard(0),), 5, rank) for rank in (0, 1)] == [5, 5]
    assert [rows_sent("w", None, 7, rank) for rank in (0, 1)] == [7, 0]
    assert [rows_sent("w", (Replicate(),), 7, rank) for rank in (0, 1)] == [7, 0]
    with pytest.raises(ValueError, match=r"'w' is placed as \(Shard\(dim=1\),\); only dim-0 sharding"):
        rows_sent("w", (Shard(1),), 7, 0)
    with pytest.raises(ValueError, match="only dim-0 sharding on a 1-D mesh"):
        rows_sent("w", (Shard(0), Shard(0)), 7, 0)
