"""The interface every rollout engine implements, and the typed values that cross it.

The trainer only talks to this interface: `generate` samples responses as token ids, `update_weights`
pushes the actor's current weights into the engine, and `sleep` says that the actor needs the accelerator now.
What sleeping frees, and how the engine comes back, is the engine's own policy: a colocated engine releases
its accelerator memory and restores it inside the next `update_weights` (which must come before `generate`);
an engine with nothing to free (split placement, CPU) does nothing.

Both engines stop a response at the same EOS set (`merge_eos_token_ids`), so `Generation.finished` means
the same whichever engine sampled it.
"""

from __future__ import annotations

import json
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    # 0.0 means greedy decoding (evaluation); > 0 samples (training rollouts).
    temperature: float = 1.0
    top_p: float = 1.0
    max_new_tokens: int = 256
    # Seed for this call's sampling; engines derive per-sample seeds from it so runs are reproducible.
    seed: int | None = None
    # Stop a response at the end of its first `#### <number>` line (the token holding the line's newline is
    # the last one; EOS and max_new_tokens still apply); such responses are `finished`. For evaluation: the
    # strict answer of a stopped response is then its first answer line (see rollout/answer_stop.py).
    stop_at_answer: bool = False

    def __post_init__(self) -> None:
        if self.temperature < 0:
            raise ValueError(f"sampling temperature ({self.temperature}) must be >= 0 (0 = greedy).")
        if not 0 < self.top_p <= 1:
            raise ValueError(f"sampling top_p ({self.top_p}) must be in (0, 1].")
        if self.max_new_tokens < 1:
            raise ValueError(f"sampling max_new_tokens ({self.max_new_tokens}) must be >= 1.")


@dataclass(frozen=True)
class Generation:
    """One sampled response to one prompt."""

    prompt_index: int  # index into the `prompt_ids` list given to `generate`
    response_ids: list[int]  # sampled tokens, including the EOS token when one was produced
    # True when the response ended with EOS (or, with stop_at_answer, its first answer line); False when cut
    # at max_new_tokens
    finished: bool


class RolloutEngine(Protocol):
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """Sample `n` responses per prompt; the result is prompt-major: [p0 r0, p0 r1, ..., p1 r0, ...]."""
        ...

    def update_weights(self, named_tensors: Iterable[tuple]) -> None:
        """Load the actor's full weights, by Hugging Face parameter name, into the engine: (name, whole tensor)
        pairs or `weight_sync.WeightPiece`s (rows of one tensor; each tensor's rows one after another)."""
        ...

    def sleep(self) -> None:
        """The actor needs the accelerator until the next `update_weights`: free what this engine holds there.

        `update_weights` brings the engine back (SGLang leaves released weights undefined, so it cannot come back
        without them); `generate` before it raises."""
        ...

    def close(self) -> None: ...


def merge_eos_token_ids(config_eos: Any, generation_eos: Any) -> list[int]:
    """The EOS set every engine stops on: config.json's eos_token_id ∪ generation_config.json's (sorted).

    This is the set SGLang builds itself (`ModelConfig._get_hf_eos_token_id`); each argument may be None,
    one id or a list of ids.
    """
    merged: set[int] = set()
    for eos in (config_eos, generation_eos):
        if eos is not None:
            merged |= {int(eos)} if isinstance(eos, int) else {int(token) for token in eos}
    if not merged:
        raise ValueError(
            "the rollout model defines no eos_token_id (generation_config.json / config.json); responses "
            "could never finish. Set eos_token_id in the checkpoint's generation_config.json."
        )
    return sorted(merged)


def load_eos_token_ids(model_path: str) -> list[int]:
    """`merge_eos_token_ids` read from a checkpoint's config.json and generation_config.json (if present)."""
    from transformers.utils import cached_file

    from pcsd_core.models import resolve_model

    path = resolve_model(model_path)
    found = []
    for name in ("config.json", "generation_config.json"):
        file = cached_file(path, name, _raise_exceptions_for_missing_entries=False)
        if file is None:
            found.append(None)
            continue
        with open(file) as handle:
            found.append(json.load(handle).get("eos_token_id"))
    return merge_eos_token_ids(*found)
