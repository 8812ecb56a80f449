"""Typed values that move between the controller and the train workers.

A `RolloutBatch` is one training step's worth of sampled responses, prompt-major
(`[p0 r0, p0 r1, p1 r0, ...]`), each row carrying its student prompt, teacher prompt and response as token
ids. Responses are never re-tokenized: the same `response_ids` are appended to both prompts
(see `prompts.py`). `pad_rows` turns some rows into the padded tensors one forward pass needs, plus the
flat indices of the hidden states that predict the response tokens.

Rows are split by plain index arithmetic (`worker_rows`, `micro_batches`), identical on every worker,
so FSDP ranks always run the same number of forward passes (their collectives must line up).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pcsd_core.prompts import response_logits_slice


@dataclass
class RolloutBatch:
    student_prompt_ids: list[list[int]]
    teacher_prompt_ids: list[list[int]]
    response_ids: list[list[int]]
    finished: list[bool]  # False when the response was cut at max_response_tokens
    record_indices: list[int] = field(default_factory=list)  # which PromptRecord each row answers

    def __post_init__(self) -> None:
        sizes = {len(self.student_prompt_ids), len(self.teacher_prompt_ids), len(self.response_ids), len(self.finished)}
        assert len(sizes) == 1, f"RolloutBatch columns differ in length: {sizes}"

    def __len__(self) -> int:
        return len(self.response_ids)

    @property
    def response_lengths(self) -> list[int]:
        return [len(ids) for ids in self.response_ids]

    def select(self, rows: range | list[int]) -> RolloutBatch:
        rows = list(rows)
        return RolloutBatch(
            student_prompt_ids=[self.student_prompt_ids[i] for i in rows],
            teacher_prompt_ids=[self.teacher_prompt_ids[i] for i in rows],
            response_ids=[self.response_ids[i] for i in rows],
            finished=[self.finished[i] for i in rows],
            record_indices=[self.record_indices[i] for i in rows] if self.record_indices else [],
        )


@dataclass
class TeacherOutputs:
    """Teacher final hidden states at the response positions, one (L_i, H) tensor per row (no grad)."""

    hidden: list[torch.Tensor]


@dataclass
class PaddedInputs:
    input_ids: torch.Tensor  # (B, T) right-padded
    attention_mask: torch.Tensor  # (B, T)
    response_positions: torch.Tensor  # (N,) flat indices into (B*T) of the states predicting response tokens
    response_mask: torch.Tensor  # (B, R) True where row b has a response token j
    response_tokens: torch.Tensor  # (N,) the response tokens, row-major


def pad_rows(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> PaddedInputs:
    """Right-pad prompt + response rows; position `start - 1 + j` predicts response token j."""
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    max_response = max((len(r) for r in responses), default=0)
    response_mask = torch.zeros((len(sequences), max(max_response, 1)), dtype=torch.bool)
    positions: list[int] = []
    for row, (prompt, response, sequence) in enumerate(zip(prompts, responses, sequences)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        response_mask[row, : len(response)] = True
        predicting = response_logits_slice(len(prompt), len(response))
        positions.extend(row * width + t for t in range(predicting.start, predicting.stop))
    tokens = [token for response in responses for token in response]
    return PaddedInputs(
        input_ids=input_ids,
        attention_mask=attention_mask,
        response_positions=torch.tensor(positions, dtype=torch.long),
        response_mask=response_mask,
        response_tokens=torch.tensor(tokens, dtype=torch.long),
    )


def worker_rows(start: int, stop: int, rank: int, world_size: int) -> range:
    """This rank's contiguous share of rows [start, stop); shares are equal (config validation ensures it)."""
    share = (stop - start) // world_size
    assert share * world_size == stop - start, f"{stop - start} rows do not split over {world_size} workers"
    return range(start + rank * share, start + (rank + 1) * share)


def micro_batches(rows: range, micro_batch_size: int) -> list[range]:
    return [rows[i : i + micro_batch_size] for i in range(0, len(rows), micro_batch_size)]


@dataclass
class UpdateStats:
    """What one worker reports after `update_policy_with_distillation`; the controller sums over workers."""

    loss_sum: float = 0.0  # sum over optimizer steps of this worker's share of the mini-batch loss
    kl_sum: float = 0.0  # sum over counted tokens of the exact forward KL (all epochs)
    teacher_entropy_sum: float = 0.0
    student_entropy_sum: float = 0.0
    num_tokens: int = 0  # response tokens scored (all epochs)
    grad_norms: list[float] = field(default_factory=list)  # one per optimizer step (identical on all ranks)
    token_kl: dict[int, list[float]] = field(default_factory=dict)  # row -> per-token loss (0 if skipped), epoch 1
