"""Calibrate the shipped positive-control tasks: does the base model have headroom, and does the solution help?

For each task and difficulty of `pcsd_core.data.synthetic`, on N generated test questions, with the student prompt
and teacher template of the positive-control preset (its `data:` section; greedy decoding, stop at the answer line,
the HF rollout engine, the preset's model):

- student strict accuracy: the question alone (what PCSD trains the model to do better);
- teacher strict accuracy: the question with its worked solution through the default teacher template (what the
  teacher can do with the privileged context).

A usable positive control has the student at roughly 10-50% (headroom both ways) and the teacher far above it. The
task and difficulty are chosen from this table once, before any PCSD run on the task, and fixed in
`configs/positive_control_cpu_smollm2.yaml`; they are not tuned against PCSD outcomes.

    python benchmarks/synthetic_calibration.py                 # N=64, both tasks, difficulties 1-2
    python benchmarks/synthetic_calibration.py --n 32 --tasks lookup --difficulties 1 2 3

The last line is machine-readable: `chosen=<task>/<d> student_strict=<acc> teacher_strict=<acc>`.
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
    parser.add_argument("--tasks", nargs="+", default=["arithmetic", "lookup"])
    parser.add_argument("--difficulties", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--config", default=str(REPO / "configs" / "positive_control_cpu_smollm2.yaml"),
                        help="the preset whose model, data section (instruction, teacher template) and eval length "
                             "are calibrated")
    parser.add_argument("--batch-size", type=int, default=16)
    args = parser.parse_args()

    from pcsd_core.config.loader import load_config, replace_fields
    from pcsd_core.data.prepare import load_prompt_records, prepare_dataset
    from pcsd_core.data.prompts import build_prompt_pair
    from pcsd_core.eval.scoring import is_correct
    from pcsd_core.eval.stats import wilson_interval
    from pcsd_core.models import load_tokenizer
    from pcsd_core.rollout.base import SamplingParams
    from pcsd_core.rollout.hf import HFRolloutEngine

    started = time.perf_counter()
    torch.manual_seed(0)
    preset = load_config(args.config)
    tokenizer = load_tokenizer(preset.model.name)
    engine = HFRolloutEngine(preset.model.name, batch_size=args.batch_size)
    sampling = SamplingParams(temperature=0.0, max_new_tokens=preset.eval.max_new_tokens, stop_at_answer=True)

    def strict_accuracy(prompts, records):
        generations = engine.generate(prompts, n=1, sampling=sampling)
        texts = tokenizer.batch_decode([list(g.response_ids) for g in generations], skip_special_tokens=True)
        right = sum(is_correct(text, record.ground_truth, "strict") for text, record in zip(texts, records))
        return wilson_interval(right, len(records))

    print(f"config={args.config} model={preset.model.name} questions={args.n} per task and difficulty, greedy, stop "
          f"at the answer line, max_new_tokens={preset.eval.max_new_tokens}, instruction {preset.data.instruction!r}, "
          f"teacher template {preset.data.teacher_template!r}, torch_threads={torch.get_num_threads()} "
          f"machine={platform.machine()} {os.cpu_count()} cpus")
    print("| task | difficulty | student strict [95% CI] | teacher strict (with solution) [95% CI] | gap |")
    print("|---|---|---|---|---|")
    results = {}
    for task in args.tasks:
        for difficulty in args.difficulties:
            data = replace_fields(preset, {"data.synthetic": task, "data.synthetic_difficulty": difficulty,
                                           "data.max_train_rows": args.n, "data.max_test_rows": args.n}).data
            with tempfile.TemporaryDirectory() as workdir:
                records = load_prompt_records(prepare_dataset(data, workdir).test_path)
            pairs = [build_prompt_pair(tokenizer, r.student_messages, r.privileged_context, data.teacher_template)
                     for r in records]
            student = strict_accuracy([p.student_ids for p in pairs], records)
            teacher = strict_accuracy([p.teacher_ids for p in pairs], records)
            results[task, difficulty] = (student, teacher)
            print(f"| {task} | {difficulty} | {student.estimate:.3f} [{student.low:.3f}, {student.high:.3f}] | "
                  f"{teacher.estimate:.3f} [{teacher.low:.3f}, {teacher.high:.3f}] | "
                  f"{teacher.estimate - student.estimate:+.3f} |", flush=True)
    print(f"# wall time {time.perf_counter() - started:.0f} s")
    usable = {key: r for key, r in results.items() if HEADROOM[0] <= r[0].estimate <= HEADROOM[1]}
    chosen = max(usable or results, key=lambda key: (results[key][1].estimate - results[key][0].estimate, -key[1]))
    student, teacher = results[chosen]
    print(f"chosen={chosen[0]}/{chosen[1]} student_strict={student.estimate:.3f} teacher_strict={teacher.estimate:.3f}"
          + ("" if usable else " (no task gave the student 10-50%: none is a usable positive control)"))


if __name__ == "__main__":
    main()
