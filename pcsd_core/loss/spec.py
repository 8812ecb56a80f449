"""The loss's vocabulary and options: the one place divergence, estimator and aggregation names are defined.

`LossSpec` is the config's `loss:` section as it is (`cfg.loss`), validated here once and handed unchanged to
the loss functions. This module imports no torch, so the config can be checked without loading it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Literal

from pcsd_core.errors import require

DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")
ESTIMATORS = ("full", "topk", "sampled")
AGGREGATIONS = ("token_mean", "seq_mean")
TOPK_SOURCES = ("teacher", "student")
TOPK_TAILS = ("renorm", "tail_bucket")
# Tokens per chunk of the memory-bounded exact loss (bounds the (chunk, V) logits held at once; 256 x V=102,400
# fp32 is ~100 MB per buffer). Training and the held-out KL both use it.
DEFAULT_CHUNK_TOKENS = 256


@dataclass(frozen=True)
class LossSpec:
    """The distillation loss's options. As the config section `loss`, each message names `loss.<option>`."""

    # "forward_kl" = KL(P_teacher || P_student) (the reference objective), "reverse_kl" = KL(P_student || P_teacher),
    # "jsd" = generalized Jensen-Shannon with weight `beta` (beta=0 -> forward KL, beta=1 -> reverse KL).
    divergence: Literal[DIVERGENCES] = "forward_kl"
    beta: float = 0.5
    # Softmax temperature applied to both teacher and student logits inside the loss.
    temperature: float = 1.0
    # "full": exact over the whole vocabulary; "topk": support of the top-k tokens; "sampled": the
    # sampled-token log-ratio used as a per-token advantage (on-policy distillation estimator).
    estimator: Literal[ESTIMATORS] = "full"
    topk: int = 64
    # Which model's top-k defines the support, and what happens to the mass outside it.
    topk_source: Literal[TOPK_SOURCES] = "teacher"
    topk_tail: Literal[TOPK_TAILS] = "tail_bucket"
    # Response tokens excluded at the start of every response (0 = none).
    skip_first_tokens: int = 0
    # Per-token loss clip (0 = no clip).
    token_clip: float = 0.0
    # "token_mean": mean over all response tokens of the batch; "seq_mean": mean of per-sequence means.
    aggregation: Literal[AGGREGATIONS] = "token_mean"
    # Tokens per chunk of the memory-bounded exact loss (DEFAULT_CHUNK_TOKENS above).
    chunk_tokens: int = DEFAULT_CHUNK_TOKENS
    # Tokens per call on which the top-k estimate is compared with the exact divergence (`topk_gap` metrics);
    # 0 = none. A diagnostic: it costs one extra exact and top-k pass over those tokens.
    metric_sample_tokens: int = 0
    # Weight of the reference anchor (0 = off): adds ref_kl_coef * KL(P_student || P_reference) to every response
    # token's loss, P_reference being the initial model (frozen) scoring the same response after the student
    # prompt, at temperature 1 (verl's `use_kl_loss`, against collapse). Exact over the vocabulary whatever the
    # estimator, never clipped by `token_clip`. Costs one more no-grad forward per response, and, with full
    # fine-tuning and a live or EMA teacher, one more frozen copy of the model in model.dtype (2 bytes a parameter
    # in bf16: 14 GB at 7B, sharded over the FSDP ranks) and its gathered lm_head (0.8 GB at 7B, plus a float32
    # copy of 1.7 GB during each loss call); a frozen teacher or the LoRA base serves as is, with no copy.
    ref_kl_coef: float = 0.0

    def __post_init__(self) -> None:
        check_divergence_options(self.divergence, self.beta, self.temperature)
        for name, choices in (("estimator", ESTIMATORS), ("topk_source", TOPK_SOURCES), ("topk_tail", TOPK_TAILS),
                              ("aggregation", AGGREGATIONS)):
            check_choice(name, getattr(self, name), choices)
        for name, minimum in (("topk", 1), ("chunk_tokens", 1), ("metric_sample_tokens", 0), ("token_clip", 0),
                              ("skip_first_tokens", 0), ("ref_kl_coef", 0)):
            value = getattr(self, name)
            require(value >= minimum and math.isfinite(value), f"{_named(name)} ({value}) must be a finite number >= "
                    f"{minimum}.", field=_named(name))
        # The sampled tokens come from the student, so the estimator is unbiased for KL(student || teacher) only:
        # reverse KL, or JSD at beta = 1, which is defined as exactly that.
        require(
            self.estimator != "sampled" or self.divergence == "reverse_kl"
            or (self.divergence == "jsd" and self.beta == 1.0),
            f"loss.estimator 'sampled' estimates KL(student || teacher) from the student's own samples, so it "
            f"needs divergence 'reverse_kl' (got {self.divergence!r}, beta {self.beta}); use estimator 'full' "
            f"or 'topk' for {self.divergence!r}.",
            field="loss.estimator",
        )


def _named(option: str) -> str:
    return f"loss.{option}"


def check_choice(name: str, value: object, choices: tuple) -> None:
    require(value in choices, f"{_named(name)} ({value!r}) must be one of {list(choices)}; pick one of those.",
            field=_named(name))


def check_divergence_options(divergence: str, beta: float, temperature: float) -> None:
    check_choice("divergence", divergence, DIVERGENCES)
    require(0.0 <= beta <= 1.0, f"loss.beta ({beta}) must be in [0, 1] (0 = forward KL, 1 = reverse KL).",
            field="loss.beta")
    require(temperature > 0 and math.isfinite(temperature),
            f"loss.temperature ({temperature}) must be a finite number > 0; use 1.0 for the model's own "
            "distribution.", field="loss.temperature")
