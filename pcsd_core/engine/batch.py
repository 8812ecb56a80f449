"""Typed values that move between the controller and the train workers.

A `RolloutBatch` is one training step's worth of sampled responses, prompt-major
(`[p0 r0, p0 r1, p1 r0, ...]`), each row carrying its student prompt, teacher prompt and response as token
ids. Responses are never re-tokenized: the same `response_ids` are appended to both prompts
(see `prompts.py`). Two layouts turn some rows into the tensors of one forward pass, plus the flat indices
of the hidden states that predict the response tokens:

- `pack_prompt_groups` (the default, `train.share_prompt_prefix`): one row per distinct prompt, holding the
  prompt once and then each of its responses, with a 4D attention mask that lets a response see the prompt
  and itself but not its siblings. The `n` responses of a prompt share one pass over the prompt, which on
  GSM8K teacher prompts (~250 tokens of question + solution before a 64-token response) is most of the work.
- `pad_rows`: one right-padded row per response (any attention implementation, e.g. flash_attention_2,
  which takes no 4D mask).

Both give the same hidden states up to float rounding (tested).

Rows are split by plain index arithmetic (`worker_rows`, `micro_batches`), identical on every worker,
so FSDP ranks always run the same number of forward passes (their collectives must line up).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from pcsd_core.data.prompts import response_logits_slice


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
    # The initial model's, same responses after the student prompt (loss.ref_kl_coef > 0); None when off.
    reference_hidden: list[torch.Tensor] | None = None


@dataclass
class ModelInputs:
    """The tensors of one forward pass over some rows, and where each row's response states land."""

    input_ids: torch.Tensor  # (B, T), right-padded
    # (B, T) 0/1 padding mask, or (B, 1, T, T) bool, True where query t may attend to key s (packed groups)
    attention_mask: torch.Tensor
    position_ids: torch.Tensor | None  # (B, T); None = 0..T-1 in every row
    response_positions: torch.Tensor  # (N,) flat indices into (B*T), row after row, token after token
    response_tokens: torch.Tensor  # (N,) the response tokens in the same order


def pad_rows(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> ModelInputs:
    """Right-pad prompt + response rows; position `start - 1 + j` predicts response token j."""
    sequences = [list(p) + list(r) for p, r in zip(prompts, responses)]
    width = max(len(s) for s in sequences)
    input_ids = torch.full((len(sequences), width), pad_id, dtype=torch.long)
    attention_mask = torch.zeros((len(sequences), width), dtype=torch.long)
    positions: list[int] = []
    for row, (prompt, response, sequence) in enumerate(zip(prompts, responses, sequences)):
        input_ids[row, : len(sequence)] = torch.tensor(sequence)
        attention_mask[row, : len(sequence)] = 1
        predicting = response_logits_slice(len(prompt), len(response))
        positions.extend(row * width + t for t in range(predicting.start, predicting.stop))
    return ModelInputs(input_ids=input_ids, attention_mask=attention_mask, position_ids=None,
                       response_positions=torch.tensor(positions, dtype=torch.long),
                       response_tokens=_flat_tokens(responses))


# Segment ids of packed positions: >= 0 is the k-th response of the row's prompt.
_PROMPT, _PADDING = -1, -2


def pack_prompt_groups(prompts: list[list[int]], responses: list[list[int]], pad_id: int) -> ModelInputs:
    """One row per distinct prompt: `prompt | response_0[:-1] | response_1[:-1] | ... | padding`.

    A response's first token is predicted by the prompt's last state (shared by all its responses); token
    j > 0 by the state of token j - 1 inside its own segment, so a response's last token is never an input.
    Segment k's positions continue the prompt's (position ids P, P+1, ...), and its queries see the whole
    prompt and the earlier tokens of segment k only: each response is scored exactly as if it followed the
    prompt alone. Padding queries see only themselves (no fully masked softmax row, so no NaN).
    """
    groups: dict[tuple[int, ...], list[int]] = {}  # prompt -> its rows, in row order
    for row, prompt in enumerate(prompts):
        groups.setdefault(tuple(prompt), []).append(row)
    width = max(len(prompt) + sum(max(len(responses[row]) - 1, 0) for row in rows) for prompt, rows in groups.items())
    input_ids = torch.full((len(groups), width), pad_id, dtype=torch.long)
    position_ids = torch.zeros((len(groups), width), dtype=torch.long)
    segment = torch.full((len(groups), width), _PADDING, dtype=torch.long)
    row_positions: dict[int, list[int]] = {}
    for group, (prompt, rows) in enumerate(groups.items()):
        prompt_len, offset = len(prompt), len(prompt)
        input_ids[group, :prompt_len] = torch.tensor(prompt)
        position_ids[group, :prompt_len] = torch.arange(prompt_len)
        segment[group, :prompt_len] = _PROMPT
        for k, row in enumerate(rows):
            inputs = responses[row][:-1]
            end = offset + len(inputs)
            input_ids[group, offset:end] = torch.tensor(inputs, dtype=torch.long)
            position_ids[group, offset:end] = torch.arange(prompt_len, prompt_len + len(inputs))
            segment[group, offset:end] = k
            predicting = [prompt_len - 1] + list(range(offset, end)) if responses[row] else []
            row_positions[row] = [group * width + t for t in predicting]
            offset = end
    query, key = segment[:, :, None], segment[:, None, :]
    causal = torch.ones(width, width, dtype=torch.bool).tril()
    sees = (key == _PROMPT) & (query != _PADDING) | (key == query) & (query >= 0)
    padding_self = (query == _PADDING) & torch.eye(width, dtype=torch.bool)
    attention_mask = (causal & sees | padding_self)[:, None]  # (U, 1, T, T)
    positions = [position for row in range(len(prompts)) for position in row_positions[row]]
    return ModelInputs(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                       response_positions=torch.tensor(positions, dtype=torch.long),
                       response_tokens=_flat_tokens(responses))


def _flat_tokens(responses: list[list[int]]) -> torch.Tensor:
    return torch.tensor([token for response in responses for token in response], dtype=torch.long)


def flat_response_weights(weights: torch.Tensor, lengths: list[int]) -> torch.Tensor:
    """(B, R) per-token weights -> (N,) for the real tokens, row after row (the order of `response_positions`)."""
    return torch.cat([weights[row, :length] for row, length in enumerate(lengths)])


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
    ref_kl_sum: float = 0.0  # sum over counted tokens of KL(student || reference) (0 without the anchor)
    num_tokens: int = 0  # response tokens scored (all epochs)
    grad_norms: list[float] = field(default_factory=list)  # one per optimizer step (identical on all ranks)
    lr: float = 0.0  # the optimizer's learning rate during this update (identical on all ranks)
    token_kl: dict[int, list[float]] = field(default_factory=dict)  # row -> per-token loss (0 if skipped), epoch 1

    @classmethod
    def merged(cls, parts: list[UpdateStats]) -> UpdateStats:
        """The whole update from the workers' shares: sums add up; norms and lr are global already."""
        merged = cls(grad_norms=parts[0].grad_norms, lr=parts[0].lr)
        for part in parts:
            merged.loss_sum += part.loss_sum
            merged.kl_sum += part.kl_sum
            merged.teacher_entropy_sum += part.teacher_entropy_sum
            merged.student_entropy_sum += part.student_entropy_sum
            merged.ref_kl_sum += part.ref_kl_sum
            merged.num_tokens += part.num_tokens
            merged.token_kl.update(part.token_kl)
        return merged
