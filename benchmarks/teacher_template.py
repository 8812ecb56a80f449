"""Which teacher template? Teacher accuracy and KL(teacher || student) for each named template, same questions.

For each template in `pcsd_core.data.prompts.TEACHER_TEMPLATES`, on the first N GSM8K test questions (greedy decoding,
the HF rollout engine, SmolLM2-135M-Instruct by default), with the worked solution as the privileged context:

- teacher accuracy: the teacher prompt (question + solution, through the template) answered greedily, scored
  strict (`#### <number>`) and flexible (last number) with `pcsd_core.eval.scoring`. A teacher that cannot use the
  context it is shown has nothing to teach.
- KL(teacher || student) per token: the student's own greedy response (one per question, the same for every
  template) scored by the teacher prompt and the student prompt; the exact full-vocabulary forward KL
  (`pcsd_core.loss.distillation.token_divergence`, what the training loss computes) averaged over all response tokens.
  This is the size of the training signal on on-policy text.

The student row (no context) is the baseline: the accuracy the teacher should beat.

    python benchmarks/teacher_template.py                  # N=32, SmolLM2-135M, 256 new tokens
    python benchmarks/teacher_template.py --n 8 --max-new-tokens 64 --model /path/to/checkpoint

The last line is machine-readable: `best_teacher_template=<name> <name>_strict=<acc> ...` (best = highest
strict teacher accuracy, then KL). The measured table, with machine and date, is in
`examples/privileged_context_distillation/README.md` ("Teacher prompt").
"""

from __future__ import annotations

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
GSM8K = Path(os.environ.get("PCSD_GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))


def load_questions(n: int, data_path: Path):
    from pcsd_core.config.schema import DataConfig
    from pcsd_core.data.prepare import load_prompt_records, prepare_dataset

    with tempfile.TemporaryDirectory() as workdir:
        prepared = prepare_dataset(DataConfig(path=str(data_path), max_train_rows=1, max_test_rows=n), workdir)
        return load_prompt_records(prepared.test_path)


def greedy_responses(engine, prompts: list[list[int]], max_new_tokens: int) -> list[list[int]]:
    from pcsd_core.rollout.base import SamplingParams

    generations = engine.generate(prompts, n=1, sampling=SamplingParams(temperature=0.0, max_new_tokens=max_new_tokens))
    return [list(generation.response_ids) for generation in generations]


def accuracy(tokenizer, responses: list[list[int]], records, mode: str) -> float:
    from pcsd_core.eval.scoring import is_correct

    texts = tokenizer.batch_decode(responses, skip_special_tokens=True)
    return sum(is_correct(text, r.ground_truth, mode) for text, r in zip(texts, records)) / len(records)


@torch.no_grad()
def response_logits(model, prompt_ids: list[int], response_ids: list[int]) -> torch.Tensor:
    """Logits predicting each response token, (R, V)."""
    from pcsd_core.data.prompts import append_response, response_logits_slice

    ids, start = append_response(prompt_ids, response_ids)
    return model(torch.tensor([ids])).logits[0, response_logits_slice(start, len(response_ids))].float()


def mean_token_kl(model, student_prompts, teacher_prompts, responses) -> float:
    """KL(teacher || student) averaged over every response token of every question (token mean)."""
    from pcsd_core.loss.distillation import token_divergence

    total, tokens = 0.0, 0
    for student_ids, teacher_ids, response_ids in zip(student_prompts, teacher_prompts, responses):
        per_token = token_divergence(response_logits(model, student_ids, response_ids),
                                     response_logits(model, teacher_ids, response_ids), divergence="forward_kl")
        total += float(per_token.double().sum())
        tokens += len(response_ids)
    return total / tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=32, help="test questions (the first N of GSM8K test)")
    parser.add_argument("--max-new-tokens", type=int, default=256)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--data-path", type=Path, default=GSM8K)
    parser.add_argument("--batch-size", type=int, default=8, help="prompts per generate call")
    args = parser.parse_args()

    from pcsd_core.models import load_tokenizer
    from pcsd_core.data.prompts import TEACHER_TEMPLATES, build_prompt_pair
    from pcsd_core.rollout.hf import HFRolloutEngine

    started = time.perf_counter()
    torch.manual_seed(0)
    records = load_questions(args.n, args.data_path)
    tokenizer = load_tokenizer(args.model)
    engine = HFRolloutEngine(args.model, batch_size=args.batch_size)
    pairs = {name: [build_prompt_pair(tokenizer, r.student_messages, r.privileged_context, name) for r in records]
             for name in TEACHER_TEMPLATES}
    student_prompts = [pair.student_ids for pair in next(iter(pairs.values()))]
    student_responses = greedy_responses(engine, student_prompts, args.max_new_tokens)
    response_tokens = sum(map(len, student_responses))

    print(f"model={args.model} questions={len(records)} greedy max_new_tokens={args.max_new_tokens} "
          f"student response tokens={response_tokens} torch_threads={torch.get_num_threads()} "
          f"machine={platform.machine()} {os.cpu_count()} cpus")
    print("| prompt | strict acc | flexible acc | mean KL(teacher||student) per token | mean prompt tokens |")
    print("|---|---|---|---|---|")
    mean_student_len = sum(map(len, student_prompts)) / len(records)
    print(f"| student (no context) | {accuracy(tokenizer, student_responses, records, 'strict'):.3f} | "
          f"{accuracy(tokenizer, student_responses, records, 'flexible'):.3f} | 0 | {mean_student_len:.0f} |")
    summary = {}
    for name, template_pairs in pairs.items():
        teacher_prompts = [pair.teacher_ids for pair in template_pairs]
        teacher_responses = greedy_responses(engine, teacher_prompts, args.max_new_tokens)
        strict = accuracy(tokenizer, teacher_responses, records, "strict")
        flexible = accuracy(tokenizer, teacher_responses, records, "flexible")
        kl = mean_token_kl(engine.model, student_prompts, teacher_prompts, student_responses)
        summary[name] = (strict, kl)
        print(f"| teacher `{name}` | {strict:.3f} | {flexible:.3f} | {kl:.4f} | "
              f"{sum(map(len, teacher_prompts)) / len(records):.0f} |", flush=True)
    print(f"# wall time {time.perf_counter() - started:.0f} s")
    best = max(summary, key=lambda name: summary[name])  # teacher accuracy first, then the larger signal
    print(f"best_teacher_template={best} " + " ".join(
        f"{name}_strict={strict:.3f} {name}_kl={kl:.4f}" for name, (strict, kl) in summary.items()))


if __name__ == "__main__":
    main()
