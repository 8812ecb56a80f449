"""Evaluation throughput with and without stop-at-answer, on the embedded model, greedy.

    python benchmarks/eval_throughput.py                      # 32 GSM8K test questions, 256 new tokens
    python benchmarks/eval_throughput.py --n 200 --max-new-tokens 192

Evaluates SmolLM2-135M-Instruct (the evaluate step's setting: student prompt, greedy, the HF engine) on the
first N test questions twice in one process, `stop_at_answer` off and on. The questions are cut into the
engine's own batches (sorted by length, `--batch-size` each) and each batch runs both ways back to back, the
order alternating, so load changes on a shared machine hit both ways alike. It prints a table: questions/s,
tokens generated, strict and flexible accuracy, rows stopped at their first `#### <number>` line, truncated
rows. It also checks the stopped responses against the full ones (a prefix, with the strict answer of the full
text cut after its first answer line). Last line: `speedup=<x>` (questions/s on / off).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO_ROOT))

from pcsd_core.config.schema import GSM8K_INSTRUCTION  # noqa: E402
from pcsd_core.models import load_tokenizer, resolve_model  # noqa: E402
from pcsd_core.data.prompts import build_student_messages, render_prompt_ids  # noqa: E402
from pcsd_core.rollout.base import SamplingParams  # noqa: E402
from pcsd_core.rollout.hf import HFRolloutEngine  # noqa: E402
from pcsd_core.eval.scoring import extract_answer, is_correct, text_through_first_answer_line  # noqa: E402


def _parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=32, help="test questions (the first N)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--batch-size", type=int, default=16, help="prompts per decode batch (eval.batch_size)")
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-path", default=str(REPO_ROOT.parent / "shared" / "data" / "gsm8k"))
    return parser.parse_args()


def _generate_timed(engine, prompts, max_new_tokens: int, batch_size: int) -> dict:
    """Both ways, batch by batch (the engine's batches: prompts sorted by length), alternating which goes first."""
    order = sorted(range(len(prompts)), key=lambda index: len(prompts[index]))
    generations = {"off": [None] * len(prompts), "on": [None] * len(prompts)}
    seconds = {"off": 0.0, "on": 0.0}
    for batch_number, start in enumerate(range(0, len(order), batch_size)):
        batch = order[start : start + batch_size]
        modes = ("off", "on") if batch_number % 2 == 0 else ("on", "off")
        for mode in modes:
            sampling = SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens, stop_at_answer=mode == "on")
            began = time.perf_counter()
            batch_generations = engine.generate([prompts[index] for index in batch], 1, sampling)
            seconds[mode] += time.perf_counter() - began
            for index, generation in zip(batch, batch_generations):
                generations[mode][index] = generation
    return {mode: (generations[mode], seconds[mode]) for mode in ("off", "on")}


def _summary(engine, tokenizer, generations, seconds: float, rows) -> dict:
    texts = [tokenizer.decode(g.response_ids, skip_special_tokens=True) for g in generations]
    truths = [extract_answer(row["answer"], "strict") for row in rows]
    return {
        "generations": generations,
        "texts": texts,
        "seconds": seconds,
        "tokens": sum(len(g.response_ids) for g in generations),
        "strict": sum(is_correct(t, truth, "strict") for t, truth in zip(texts, truths)),
        "flexible": sum(is_correct(t, truth, "flexible") for t, truth in zip(texts, truths)),
        "answered": sum(extract_answer(t, "strict") is not None for t in texts),
        "stopped": sum(g.finished and g.response_ids[-1] not in engine.eos_token_ids for g in generations),
        "truncated": sum(not g.finished for g in generations),
    }


def _consistency_failures(full: dict, stopped: dict) -> int:
    failures = 0
    for whole, cut, whole_text, cut_text in zip(full["generations"], stopped["generations"], full["texts"], stopped["texts"]):
        prefix = whole.response_ids[: len(cut.response_ids)] == cut.response_ids
        same = extract_answer(cut_text, "strict") == extract_answer(text_through_first_answer_line(whole_text), "strict")
        failures += not (prefix and same)
    return failures


def main() -> None:
    args = _parse_args()
    lines = (Path(args.data_path) / "test.jsonl").read_text().splitlines()[: args.n]
    rows = [json.loads(line) for line in lines]
    source = resolve_model(args.model)
    tokenizer = load_tokenizer(source)
    prompts = [render_prompt_ids(tokenizer, build_student_messages(row["question"], GSM8K_INSTRUCTION)) for row in rows]
    engine = HFRolloutEngine(source, batch_size=args.batch_size)
    # Warm-up: first-call costs (kernels, the stop logic's tokenizer load) stay out of both timings.
    for stop_at_answer in (False, True):
        engine.generate(prompts[:2], 1, SamplingParams(temperature=0.0, max_new_tokens=8, stop_at_answer=stop_at_answer))
    timed = _generate_timed(engine, prompts, args.max_new_tokens, args.batch_size)
    results = {mode: _summary(engine, tokenizer, *timed[mode], rows) for mode in ("off", "on")}
    print(f"model={args.model} questions={len(rows)} max_new_tokens={args.max_new_tokens} batch_size={args.batch_size} greedy")
    print("| stop_at_answer | s | questions/s | tokens generated | strict | flexible | with #### line | stopped early | truncated |")
    print("|---|---|---|---|---|---|---|---|---|")
    for mode, r in results.items():
        print(f"| {mode} | {r['seconds']:.1f} | {len(rows) / r['seconds']:.3f} | {r['tokens']} | {r['strict']}/{len(rows)} | "
              f"{r['flexible']}/{len(rows)} | {r['answered']} | {r['stopped']} | {r['truncated']} |")
    print(f"consistency_failures={_consistency_failures(results['off'], results['on'])}")
    print(f"speedup={results['off']['seconds'] / results['on']['seconds']:.3f}")


if __name__ == "__main__":
    main()
