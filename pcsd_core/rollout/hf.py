"""The transformers rollout engine: batched sampling on CPU or one GPU, with in-place weight sync.

The engine keeps its own copy of the policy. Each training step the trainer pushes the actor's full
weights with `update_weights`, so the next `generate` samples from the current policy (on-policy).

    engine = HFRolloutEngine("smollm2-135m", batch_size=16)
    generations = engine.generate(prompt_ids, n=2, sampling=SamplingParams(temperature=1.0, seed=0))

Batching: prompts are sorted by length and cut into chunks of `batch_size` prompts (each expanded to
`n` rows), so a chunk holds prompts of similar length and little padding. Padding is on the LEFT with
an attention mask and position ids counted from each row's first real token, so every row's last prompt
token sits at the same position, new tokens append after it, and a padded row decodes like the prompt
alone (tested against a hand-written greedy decoder).

The decode loop is our own (`_decode`), not `transformers.generate`, for three reasons: each prompt is
prefilled once and its KV cache repeated for its `n` samples (generate would run the prompt `n` times);
rows that finished are dropped from the batch (generate keeps decoding padding until the longest row
ends); and sampling is an inverse-CDF draw from a seeded generator (`sampling.py`), exact and cheaper
than `torch.multinomial` over a 49k vocabulary. Only the given SamplingParams shape the distribution: a
checkpoint's generation_config (a hub default top_k, a repetition penalty) is never applied. With
`SamplingParams.stop_at_answer` a row also leaves the batch once it completes its first `#### <number>` line
(`answer_stop.py`; the tokenizer is loaded on first use to read token texts).
"""

from __future__ import annotations

import inspect
from collections.abc import Iterable
from typing import Any

import torch

from pcsd_core.models import DTYPES, load_model, load_tokenizer
from pcsd_core.rollout.answer_stop import AnswerLineStop, TokenTexts
from pcsd_core.rollout.base import Generation, SamplingParams, merge_eos_token_ids
from pcsd_core.rollout.sampling import next_tokens
from pcsd_core.distributed.weight_sync import WeightPiece, as_piece, rows_of, rows_tile


class HFRolloutEngine:
    """Rollout with our own batched decode loop over a transformers model; implements `rollout.base.RolloutEngine`."""

    def __init__(
        self,
        model_path: str,
        *,
        dtype: str = "float32",
        device: str | torch.device = "cpu",
        batch_size: int = 16,
        attn_implementation: str = "sdpa",
        trust_remote_code: bool = False,
        lora: Any = None,
    ) -> None:
        """`lora`: a `ModelConfig` with `lora_rank >= 1`: the engine holds the base plus an adapter of that shape,
        and `update_weights` takes the adapter's tensors alone (peft file names)."""
        if batch_size < 1:
            raise ValueError(f"HFRolloutEngine batch_size ({batch_size}) must be >= 1 (prompts per generate call).")
        if dtype not in DTYPES:
            raise ValueError(f"HFRolloutEngine dtype ({dtype!r}) must be one of {sorted(DTYPES)}.")
        self.device = torch.device(device)
        self.batch_size = batch_size
        self._model_source = (model_path, trust_remote_code)  # for the tokenizer, loaded only for stop_at_answer
        self._token_texts: TokenTexts | None = None
        self.model = load_model(
            model_path,
            dtype=dtype,
            device=self.device,
            attn_implementation=attn_implementation,
            trust_remote_code=trust_remote_code,
        )
        self.lora = lora is not None and lora.uses_lora
        self._peft_model = None
        if self.lora:
            from pcsd_core.engine.lora import add_lora

            # A zero-initialised B: until the first sync the engine samples from the base, as the actor does. peft
            # injects the adapter into the model's own layers, so decoding calls the model as before; the peft
            # wrapper is kept for the adapter's names.
            self._peft_model = add_lora(self.model, lora)
        self.model.eval()
        self.model.requires_grad_(False)
        # config.json ∪ generation_config.json, the set SGLang stops on too.
        self.eos_token_ids = merge_eos_token_ids(
            getattr(self.model.config, "eos_token_id", None), self.model.generation_config.eos_token_id
        )
        self.pad_token_id = _pad_token_id(self.model, self.eos_token_ids)
        self._asleep = False

    # ---- generation ---------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, prompt_ids: list[list[int]], n: int, sampling: SamplingParams) -> list[Generation]:
        """Sample `n` responses per prompt; prompt-major order: [p0 r0, p0 r1, ..., p1 r0, ...]."""
        _check_generate_args(prompt_ids, n)
        if self._asleep:
            raise RuntimeError("HFRolloutEngine.generate called after sleep(); update_weights() brings the engine "
                               "back with the actor's weights.")
        # Sort by length so each chunk pads little; results are put back in the caller's order.
        order = sorted(range(len(prompt_ids)), key=lambda index: len(prompt_ids[index]))
        responses: dict[int, list[Generation]] = {}
        for chunk_number, start in enumerate(range(0, len(order), self.batch_size)):
            chunk = order[start : start + self.batch_size]
            # A distinct but fixed seed per chunk keeps a call reproducible for a given `sampling.seed`.
            seed = None if sampling.seed is None else sampling.seed + chunk_number
            rows = self._generate_chunk([prompt_ids[index] for index in chunk], n, sampling, seed)
            for position, index in enumerate(chunk):
                responses[index] = [
                    Generation(prompt_index=index, response_ids=ids, finished=finished)
                    for ids, finished in rows[position * n : (position + 1) * n]
                ]
        return [generation for index in range(len(prompt_ids)) for generation in responses[index]]

    def _generate_chunk(
        self, prompts: list[list[int]], n: int, sampling: SamplingParams, seed: int | None
    ) -> list[tuple[list[int], bool]]:
        """Generate for one chunk; returns (response_ids, finished) per row, prompt-major."""
        input_ids, attention_mask = _left_pad(prompts, self.pad_token_id, self.device)
        greedy = sampling.temperature == 0.0
        # Without a seed: a randomly seeded generator, so the trainer's global RNG stream is never moved.
        generator = torch.Generator(self.device)
        if seed is None:
            generator.seed()
        else:
            generator.manual_seed(seed)
        # Greedy decoding is deterministic: decode each prompt once and repeat it n times.
        rows = self._decode(input_ids, attention_mask, 1 if greedy else n, sampling, generator)
        return [row for row in rows for _ in range(n)] if greedy else rows

    def _decode(self, input_ids: torch.Tensor, attention_mask: torch.Tensor, copies: int, sampling: SamplingParams,
                generator: torch.Generator | None) -> list[tuple[list[int], bool]]:
        """Prefill the prompts once, then decode `copies` rows per prompt one token a step, dropping rows at EOS
        (and, with `sampling.stop_at_answer`, rows that completed their first answer line)."""
        from transformers import DynamicCache

        cache = DynamicCache(config=self.model.config)
        cache_argument = {_cache_argument(self.model): cache}
        positions = (attention_mask.cumsum(-1) - 1).clamp(min=0)
        logits = self.model(input_ids=input_ids, attention_mask=attention_mask, position_ids=positions,
                            use_cache=True, logits_to_keep=1, **cache_argument).logits[:, -1]
        if copies > 1:
            cache.batch_repeat_interleave(copies)
            logits, attention_mask = logits.repeat_interleave(copies, 0), attention_mask.repeat_interleave(copies, 0)
        next_position = positions[:, -1:].repeat_interleave(copies, 0) + 1
        eos = torch.tensor(self.eos_token_ids, device=self.device)
        responses: list[list[int]] = [[] for _ in range(len(logits))]
        running = list(range(len(logits)))  # which response each batch row extends
        answer_stop = AnswerLineStop(self._token_text, len(logits)) if sampling.stop_at_answer else None
        answered: set[int] = set()  # responses stopped at their first answer line
        for step in range(sampling.max_new_tokens):
            tokens = next_tokens(logits, temperature=sampling.temperature, top_p=sampling.top_p, generator=generator)
            token_list = tokens.tolist()
            for row, token in zip(running, token_list):
                responses[row].append(token)
            stopped = answer_stop.update(running, token_list) if answer_stop else [False] * len(running)
            answered.update(row for row, stop in zip(running, stopped) if stop)
            if step + 1 == sampling.max_new_tokens:
                break
            finished = torch.isin(tokens, eos)
            if any(stopped):
                finished |= torch.tensor(stopped, dtype=torch.bool, device=tokens.device)
            if finished.any():
                keep = (~finished).nonzero().squeeze(1)
                if len(keep) == 0:
                    break
                cache.batch_select_indices(keep)
                running = [running[index] for index in keep.tolist()]
                tokens, attention_mask, next_position = tokens[keep], attention_mask[keep], next_position[keep]
            attention_mask = torch.cat([attention_mask, attention_mask.new_ones((len(tokens), 1))], dim=1)
            logits = self.model(input_ids=tokens[:, None], attention_mask=attention_mask, position_ids=next_position,
                                use_cache=True, **cache_argument).logits[:, -1]
            next_position = next_position + 1
        trimmed = [_trim_at_eos(response, self.eos_token_ids) for response in responses]
        return [(ids, finished or row in answered) for row, (ids, finished) in enumerate(trimmed)]

    def _token_text(self, token_id: int) -> str:
        if self._token_texts is None:
            model_path, trust_remote_code = self._model_source
            self._token_texts = TokenTexts(load_tokenizer(model_path, trust_remote_code=trust_remote_code))
        return self._token_texts(token_id)

    # ---- weight sync and memory ---------------------------------------------------------------

    @torch.no_grad()
    def update_weights(self, named_tensors: Iterable[tuple]) -> None:
        """Copy the actor's full weights (HF names) into this engine's model, in place.

        Items are (name, tensor) pairs of whole tensors or `WeightPiece`s (rows of one tensor), copied into the
        parameter's rows with no staging copy. Every row of every parameter must be given exactly once (a
        partial sync would silently mix old and new weights); unknown names and shape mismatches raise. With
        tied embeddings `lm_head.weight` is the same tensor as the input embedding, so it may be present or
        absent.
        """
        self._wake()
        targets = self._sync_targets()  # name -> tensor sharing storage with the live parameters
        spans: dict[str, list[tuple[int, int]]] = {}
        for piece in map(as_piece, named_tensors):
            if piece.name not in targets:
                raise KeyError(
                    f"update_weights got unknown parameter {piece.name!r}; the rollout model has e.g. "
                    f"{sorted(targets)[:3]}. Send full Hugging Face names (no FSDP/compile prefixes)."
                )
            target = targets[piece.name]
            _check_piece_shape(piece, target)
            (target if target.dim() == 0 else target[piece.row_start:piece.row_stop]).copy_(piece.tensor)  # casts
            spans.setdefault(piece.name, []).append((piece.row_start, piece.row_stop))
        partial = sorted(name for name, got in spans.items() if not rows_tile(got, rows_of(targets[name])))
        if partial:
            raise ValueError(f"update_weights got the rows of {partial[:3]} incompletely or more than once "
                             f"(e.g. {sorted(spans[partial[0]])[:4]} of {rows_of(targets[partial[0]])}).")
        if self.lora:
            missing = sorted(set(targets) - set(spans))
        else:
            required = {name for name, _ in self.model.named_parameters()}  # tied aliases appear once
            missing = sorted(required - set(spans) - _tied_aliases_received(self.model, set(spans)))
        if missing:
            raise ValueError(
                f"update_weights is missing {len(missing)} parameter(s), e.g. {missing[:3]}; send the full state dict."
            )

    def _sync_targets(self) -> dict[str, torch.Tensor]:
        """What a sync writes: every weight by Hugging Face name, or with LoRA the adapter by peft file name."""
        if self.lora:
            from pcsd_core.engine.lora import adapter_items

            return dict(adapter_items(self._peft_model))
        return self.model.state_dict()

    def sleep(self) -> None:
        """On CUDA move the weights to host memory and free the cache (the next `update_weights` moves them back);
        on CPU there is nothing to free."""
        if self.device.type == "cuda" and not self._asleep:
            self.model.to("cpu")
            torch.cuda.empty_cache()
        self._asleep = self.device.type == "cuda"

    def _wake(self) -> None:
        """Move the weights back to the engine's device (no-op on CPU)."""
        if self._asleep:
            self.model.to(self.device)
        self._asleep = False

    def close(self) -> None:
        self.model = self._peft_model = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()


# ---- helpers ----------------------------------------------------------------------------------


def _check_generate_args(prompt_ids: list[list[int]], n: int) -> None:
    if n < 1:
        raise ValueError(f"generate: n ({n}) must be >= 1 responses per prompt.")
    empty = [index for index, ids in enumerate(prompt_ids) if len(ids) == 0]
    if empty:
        raise ValueError(f"generate: prompt(s) {empty[:5]} are empty; every prompt needs at least one token.")


def _left_pad(prompts: list[list[int]], pad_token_id: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """Left-pad to a rectangle: (B, T) input ids and the matching 0/1 attention mask."""
    width = max(len(ids) for ids in prompts)
    input_ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attention_mask = torch.zeros((len(prompts), width), dtype=torch.long)
    for row, ids in enumerate(prompts):
        input_ids[row, width - len(ids) :] = torch.tensor(ids, dtype=torch.long)
        attention_mask[row, width - len(ids) :] = 1
    return input_ids.to(device), attention_mask.to(device)


def _trim_at_eos(tokens: list[int], eos_token_ids: list[int]) -> tuple[list[int], bool]:
    """Cut a generated row after its first EOS (kept); what follows is padding. No EOS = truncated."""
    for position, token in enumerate(tokens):
        if token in eos_token_ids:
            return tokens[: position + 1], True
    return tokens, False


def _pad_token_id(model, eos_token_ids: list[int]) -> int:
    pad = model.generation_config.pad_token_id
    if pad is None:
        pad = model.config.pad_token_id
    # Any id works for padding: padded positions are masked out and trimmed off the response.
    return eos_token_ids[0] if pad is None else int(pad)


def _cache_argument(model) -> str:
    """transformers renamed `past_key_values` to `cache` (5.2x); use whichever this version takes."""
    return "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"


def _check_piece_shape(piece: WeightPiece, target: torch.Tensor) -> None:
    """A whole tensor has the parameter's shape; rows have its row shape and lie within its rows."""
    if piece.full_rows is None:
        if tuple(piece.tensor.shape) != tuple(target.shape):
            raise ValueError(f"update_weights: {piece.name!r} has shape {tuple(piece.tensor.shape)} but the rollout "
                             f"model expects {tuple(target.shape)}; send full (unsharded) tensors or row pieces.")
        return
    fits = (piece.full_rows == rows_of(target) and tuple(piece.tensor.shape[1:]) == tuple(target.shape[1:])
            and 0 <= piece.row_start < piece.row_stop <= piece.full_rows)
    if not fits:
        raise ValueError(f"update_weights: rows {piece.row_start}..{piece.row_stop} of {piece.full_rows} of "
                         f"{piece.name!r} with row shape {tuple(piece.tensor.shape[1:])} do not fit its shape "
                         f"{tuple(target.shape)}.")


def _tied_aliases_received(model, received: set[str]) -> set[str]:
    """Parameters that count as received because a tied alias of theirs was sent (e.g. lm_head <-> embed)."""
    aliases: dict[int, set[str]] = {}
    for name, parameter in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(parameter), set()).add(name)
    covered: set[str] = set()
    for names in aliases.values():
        if names & received:
            covered |= names
    return covered
