"""Calibrate the shipped positive-control task: does the base model have headroom, and does the solution help?

For each difficulty of `pcsd_core.data.synthetic` (operations chained per question), on N generated test questions
(greedy decoding, stop at the answer line, the HF rollout engine, SmolLM2-135M-Instruct by default):

- student strict accuracy: the question alone (what PCSD trains the model to do better);
- teacher strict accuracy: the question with its worked solution through the default teacher template (what the
  teacher can do with the privileged context).

A usable positive control has the student at roughly 10-50% (headroom both ways) and the teacher far above it. The
difficulty is chosen from this table once, before any PCSD run on the task, and fixed in
`configs/positive_control_cpu_smollm2.yaml`; it is not tuned against PCSD outcomes.

    python benchmarks/synthetic_calibration.py                 # N=64, difficulties 1-4
    python benchmarks/synthetic_calibration.py --n 32 --difficulties 1 2

The last line is machine-readable: `chosen_difficulty=<d> student_strict=<acc> teacher_strict=<acc>`.
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

HEADROOM = (0.10, 0.50)  # the student's strict accuracy a positive control needs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=64, help="generated test questions per difficulty")
    parser.add_argument("--difficulties", type=int, nargs="+", default=[1, 2, 3, 4])
    parser.add_argument("--max-new-tokens", type=int, default=96)
    parser.add_argument("--model", default="smollm2-135m")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from pcsd_core.config.schema import DataConfig
    from pcsd_core.data.prepare import load_prompt_records, prepare_dataset
    from pcsd_core.data.prompts import DEFAULT_TEACHER_TEMPLATE_NAME, build_prompt_pair
    from pcsd_core.eval.scoring import is_correct
    from pcsd_core.eval.stats import wilson_interval
    from pcsd_core.models import load_tokenizer
    from pcsd_core.rollout.base import SamplingParams
    from pcsd_core.rollout.hf import HFRolloutEngine

    started = time.perf_counter()
    torch.manual_seed(0)
    tokenizer = load_tokenizer(args.model)
    engine = HFRolloutEngine(args.model, batch_size=args.batch_size)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=args.max_new_tokens, stop_at_answer=True)

    def strict_accuracy(prompts, records):
        generations = engine.generate(prompts, n=1, sampling=sampling)
        texts = tokenizer.batch_decode([list(g.response_ids) for g in generations], skip_special_tokens=True)
        right = sum(is_correct(text, record.ground_truth, "strict") for text, record in zip(texts, records))
        return wilson_interval(right, len(records))

    print(f"model={args.model} questions={args.n} per difficulty, greedy, stop at the answer line, "
          f"max_new_tokens={args.max_new_tokens}, teacher template {DEFAULT_TEACHER_TEMPLATE_NAME!r}, "
          f"torch_threads={torch.get_num_threads()} machine={platform.machine()} {os.cpu_count()} cpus")
    print("| difficulty (operations) | student strict [95% CI] | teacher strict (with solution) [95% CI] | gap |")
    print("|---|---|---|---|")
    results = {}
    for difficulty in args.difficulties:
        with tempfile.TemporaryDirectory() as workdir:
            data = DataConfig(synthetic="arithmetic", synthetic_difficulty=difficulty, max_train_rows=args.n,
                              max_test_rows=args.n, data_source="synthetic/arithmetic")
            records = load_prompt_records(prepare_dataset(data, workdir).test_path)
        pairs = [build_prompt_pair(tokenizer, r.student_messages, r.privileged_context, DEFAULT_TEACHER_TEMPLATE_NAME)
                 for r in records]
        student = strict_accuracy([p.student_ids for p in pairs], records)
        teacher = strict_accuracy([p.teacher_ids for p in pairs], records)
        results[difficulty] = (student, teacher)
        print(f"| {difficulty} | {student.estimate:.3f} [{student.low:.3f}, {student.high:.3f}] | "
              f"{teacher.estimate:.3f} [{teacher.low:.3f}, {teacher.high:.3f}] | "
              f"{teacher.estimate - student.estimate:+.3f} |", flush=True)
    print(f"# wall time {time.perf_counter() - started:.0f} s")
    usable = {d: r for d, r in results.items() if HEADROOM[0] <= r[0].estimate <= HEADROOM[1]}
    chosen = max(usable or results, key=lambda d: (results[d][1].estimate - results[d][0].estimate, -d))
    student, teacher = results[chosen]
    print(f"chosen_difficulty={chosen} student_strict={student.estimate:.3f} teacher_strict={teacher.estimate:.3f}"
          + ("" if usable else " (no difficulty gave the student 10-50%: none is a usable positive control)"))


if __name__ == "__main__":
    main()
