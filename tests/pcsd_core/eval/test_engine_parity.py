"""One evaluation whatever the engine: the same greedy texts through the HF engine and the SGLang adapter.

Both engines are made to produce the same scripted token stream per question (the HF engine's model emits it as
its greedy choice; the fake SGLang engine returns it free-running, as SGLang does without stop strings). With
eval.stop_at_answer the HF decode loop stops at the first completed `#### <n>` line and the adapter must cut at
the same token: same texts, same strict/flexible scores, same lengths. The held-out KL is scored by the model as
the trainer holds it, so it is a number on the SGLang path too, and the same one.
"""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from pcsd_core.config.loader import config_from_dict
from pcsd_core.eval.evaluation import evaluate_model

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
from fake_sglang import FakeSGLangEngine  # noqa: E402  (the protocol fake beside the SGLang tests)

MAX_NEW_TOKENS = 40
SCRIPTS = [  # what the "model" writes: the k-th distinct prompt seen gets SCRIPTS[k % 4], on both engines
    "Half of 10 is 5.\n#### 5\nBut wait, #### 6\nand more text here",
    "The answer is 18 apples and then it goes on and on without an answer line",
    "We add them: 3 + 4 = 7\n#### 7",  # ends with EOS, no newline after the answer
    "#### 72\n#### 73\n",
]


_SCRIPT_OF: dict[tuple[int, ...], int] = {}  # prompt -> script index; both engines see the prompts in one order


def script_ids(tokenizer, prompt: list[int], eos_id: int) -> list[int]:
    text = SCRIPTS[_SCRIPT_OF.setdefault(tuple(prompt), len(_SCRIPT_OF) % len(SCRIPTS))]
    ids = tokenizer.encode(text, add_special_tokens=False)
    filler = tokenizer.encode(" la", add_special_tokens=False)[0]
    ids = ids + [eos_id] if text.endswith("#### 7") else ids
    return (ids + [filler] * MAX_NEW_TOKENS)[:MAX_NEW_TOKENS]


class ScriptedLM(nn.Module):
    """Wraps a causal LM (its cache and shapes stay real) and makes the script's next token the greedy choice.
    Generation goes one prompt at a time (eval.batch_size 1): a prefill starts a script, each decode step
    advances it."""

    def __init__(self, lm, tokenizer, eos_id: int):
        super().__init__()
        self.lm, self.config, self.tokenizer, self.eos_id = lm, lm.config, tokenizer, eos_id
        self.base_model = lm.base_model  # what a scorer of hidden states reads, as on the real model
        self.get_output_embeddings = lm.get_output_embeddings
        self.script, self.position = [], 0

    def forward(self, input_ids, attention_mask=None, position_ids=None, use_cache=True, logits_to_keep=None,
                cache=None, past_key_values=None):
        from pcsd_core.rollout.hf import _cache_argument

        if input_ids.shape[1] > 1:  # a prefill: a new prompt
            self.script = script_ids(self.tokenizer, input_ids[0][attention_mask[0].bool()].tolist(), self.eos_id)
            self.position = 0
        kwargs = {_cache_argument(self.lm): cache if cache is not None else past_key_values}
        out = self.lm(input_ids=input_ids, attention_mask=attention_mask, position_ids=position_ids,
                      use_cache=use_cache, **({} if logits_to_keep is None else {"logits_to_keep": logits_to_keep}),
                      **kwargs)
        forced = torch.full_like(out.logits[:, -1:], -1e4)
        forced[..., self.script[min(self.position, len(self.script) - 1)]] = 1e4
        self.position += 1
        out.logits = torch.cat([out.logits[:, :-1], forced], dim=1)
        return out


class ScriptedSGLang(FakeSGLangEngine):
    """The fake SGLang engine answering each request with the script, free-running to max_new_tokens or EOS."""

    def __init__(self, state_dict, tokenizer, eos_id: int):
        super().__init__(state_dict, eos_token_id=eos_id)
        self.tokenizer = tokenizer

    def _respond(self, ids, params, lora_path=None):
        tokens = script_ids(self.tokenizer, ids, self.eos_token_id)[: params["max_new_tokens"]]
        if self.eos_token_id in tokens:
            tokens = tokens[: tokens.index(self.eos_token_id) + 1]
            return {"output_ids": tokens, "meta_info": {"finish_reason": {"type": "stop", "matched": self.eos_token_id}}}
        return {"output_ids": tokens, "meta_info": {"finish_reason": {"type": "length", "length": len(tokens)}}}


@pytest.mark.parametrize("stop_at_answer", [True, False])
def test_hf_and_sglang_give_the_same_evaluation(tiny_model_dir, smollm2_tokenizer, gsm8k_dir, tmp_path, stop_at_answer):
    from pcsd_core.config.schema import DataConfig
    from pcsd_core.data.prepare import prepare_dataset
    from pcsd_core.rollout.hf import HFRolloutEngine
    from pcsd_core.rollout.sglang import SGLangRolloutEngine

    prepared = prepare_dataset(DataConfig(path=str(gsm8k_dir), max_train_rows=2, max_test_rows=6), tmp_path / "data")
    cfg = config_from_dict({}, {"model.name": str(tiny_model_dir), "train.device": "cpu", "eval.num_examples": 6,
                                "eval.batch_size": 1, "eval.max_new_tokens": MAX_NEW_TOKENS,
                                "eval.stop_at_answer": stop_at_answer, "eval.heldout_kl_questions": 3})
    eos_id = smollm2_tokenizer.eos_token_id
    hf = HFRolloutEngine(str(tiny_model_dir), batch_size=1)
    hf.model = ScriptedLM(hf.model, smollm2_tokenizer, eos_id)
    sglang = SGLangRolloutEngine(str(tiny_model_dir), engine=ScriptedSGLang({}, smollm2_tokenizer, eos_id),
                                 eos_token_ids=[eos_id], gpu_memory_probe=lambda: (1, 1))
    results = {name: evaluate_model(str(tiny_model_dir), prepared.test_path, cfg, engine=engine)
               for name, engine in (("hf", hf), ("sglang", sglang))}
    hf_rows, sglang_rows = results["hf"].examples, results["sglang"].examples
    for hf_row, sglang_row in zip(hf_rows, sglang_rows, strict=True):
        for column in ("response", "extracted_strict", "extracted_flexible", "correct_strict", "correct_flexible",
                       "has_answer_line", "length_tokens", "truncated"):
            assert hf_row[column] == sglang_row[column], (column, hf_row["response"], sglang_row["response"])
    first = next(row["response"] for row in hf_rows if row["response"].startswith("Half of 10"))
    # With stop_at_answer both stop after the first answer line (the HF loop's rule); without, both run on.
    assert (first == "Half of 10 is 5.\n#### 5\n") == stop_at_answer, first
    kl = {name: result.summary["heldout_kl"] for name, result in results.items()}
    assert math.isfinite(kl["sglang"]) and kl["sglang"] == pytest.approx(kl["hf"], rel=1e-6)
    for hf_row, sglang_row in zip(hf_rows[:3], sglang_rows[:3]):
        assert sglang_row["heldout_kl"] == pytest.approx(hf_row["heldout_kl"], rel=1e-6)
