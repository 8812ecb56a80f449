"""Seconds per training step and peak memory: our PCSD engine vs TRL's SDFTTrainer, same settings.

Settings (both): SmolLM2-135M-Instruct (the embedded model), GSM8K prompts, 16 completions per step
(8 prompts x 2 responses; TRL: per_device_train_batch_size=16, num_generations=2), 64-token responses,
full-vocabulary forward KL, live teacher, lr 1e-6, fp32 on CPU (or the GPU when one is visible).
TRL: trl.experimental.sdft.SDFTTrainer(distillation_mode="full_logits", distillation_alpha=0.0,
teacher_model_kind="live", use_vllm=False, report_to="none"), with the same teacher prompt template.

Each engine runs in its own subprocess (so peak RSS is its own), alternating ours/TRL for `--rounds`
rounds. A step's time is the wall time between consecutive step-end callbacks; the first step (warm-up)
is dropped. Peak memory: the subprocess's max RSS (CPU) or torch.cuda.max_memory_allocated (GPU).

    python benchmarks/step_vs_trl.py --steps 4 --rounds 2
    python benchmarks/step_vs_trl.py --ours-set train.share_prompt_prefix=false   # an ablation of ours

The last line is machine-readable: `speedup_vs_trl=<trl_s_per_step/ours> peak_rss_ratio=<ours/trl>`.
"""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = Path(os.environ.get("PCSD_GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))
PROMPTS, N, RESPONSE_TOKENS, LR, SEED = 8, 2, 64, 1e-6, 0


def peak_memory_mb() -> float:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.max_memory_allocated() / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def prepare(workdir: Path, steps: int):
    from pcsd_core.config.schema import DataConfig
    from pcsd_core.data.prepare import load_prompt_records, prepare_dataset

    prepared = prepare_dataset(DataConfig(path=str(GSM8K), max_train_rows=PROMPTS * steps, max_test_rows=1),
                               workdir / "data")
    return prepared.train_path, load_prompt_records(prepared.train_path)


def run_ours(workdir: Path, steps: int, overrides: dict[str, str]) -> list[float]:
    from pcsd_core.config.schema import PCSDConfig
    from pcsd_core.engine.trainer import Distiller

    train_path, _ = prepare(workdir, steps)
    cfg = config_from_dict({}, {
        "model.name": "smollm2-135m", "rollout.n": N, "rollout.max_response_tokens": RESPONSE_TOKENS,
        "rollout.batch_size": PROMPTS, "loss.divergence": "forward_kl", "loss.estimator": "full",
        "train.teacher_mode": "live", "train.prompts_per_step": PROMPTS, "train.mini_batch_size": PROMPTS * N,
        # Micro-batches of 4 (gradient accumulation, same loss): TRL bounds activation memory with gradient
        # checkpointing (its default, kept); we bound it with smaller micro-batches and no recompute.
        "train.micro_batch_size": 4, "train.lr": LR, "train.total_training_steps": steps,
        "train.seed": SEED, "train.output_dir": str(workdir / "ours"), **overrides})
    step_ends: list[float] = []

    def log_metrics(metrics: dict, step: int) -> None:
        step_ends.append(time.perf_counter())
        phases = {k.split("/")[1]: round(v, 1) for k, v in metrics.items() if k.startswith("time/")}
        print(f"ours step {step}: {phases}", file=sys.stderr, flush=True)

    distiller = Distiller(cfg, train_path, log_metrics=log_metrics)
    distiller.setup()
    distiller.save_checkpoint = lambda step: workdir  # time the steps, not the final checkpoint write
    step_ends.insert(0, time.perf_counter())
    distiller.train()
    distiller.close()
    return [b - a for a, b in zip(step_ends, step_ends[1:])]


def run_trl(workdir: Path, steps: int) -> list[float]:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl.experimental.sdft import SDFTConfig, SDFTTrainer

    from pcsd_core.data.prompts import DEFAULT_TEACHER_TEMPLATE
    from pcsd_core.models import resolve_model

    _, records = prepare(workdir, steps)
    dataset = Dataset.from_list([{"prompt": r.student_messages, "privileged_context": r.privileged_context}
                                 for r in records])
    step_ends: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            if not step_ends:
                step_ends.append(time.perf_counter())

        def on_step_end(self, args, state, control, **kwargs):
            step_ends.append(time.perf_counter())

    model_path = resolve_model("smollm2-135m")
    args = SDFTConfig(
        output_dir=str(workdir / "trl"), per_device_train_batch_size=PROMPTS * N, num_generations=N,
        max_completion_length=RESPONSE_TOKENS, learning_rate=LR, lr_scheduler_type="constant", max_steps=steps,
        distillation_mode="full_logits", distillation_alpha=0.0, teacher_model_kind="live", use_vllm=False,
        report_to="none", save_strategy="no", logging_steps=1, seed=SEED, temperature=1.0, bf16=False,
        use_cpu=not torch.cuda.is_available(), gradient_accumulation_steps=1, max_grad_norm=1.0,
        teacher_prompt_template=DEFAULT_TEACHER_TEMPLATE.replace("{question}", "{prompt}").replace(
            "{context}", "{privileged_context}"),
    )
    trainer = SDFTTrainer(model=AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32), args=args,
                          train_dataset=dataset, processing_class=AutoTokenizer.from_pretrained(model_path),
                          callbacks=[StepTimer()])
    trainer.train()
    # on_step_begin of step 1 starts the clock, so the first interval is step 1 (without setup).
    return [b - a for a, b in zip(step_ends, step_ends[1:])]


def worker(engine: str, steps: int, overrides: dict[str, str]) -> None:
    with tempfile.TemporaryDirectory(prefix=f"bench-{engine}-") as tmp:
        step_s = run_ours(Path(tmp), steps, overrides) if engine == "ours" else run_trl(Path(tmp), steps)
    print("RESULT " + json.dumps({"engine": engine, "step_s": step_s, "peak_mb": peak_memory_mb()}), flush=True)


def run_subprocess(engine: str, steps: int, ours_set: list[str]) -> dict:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    extra = [argument for setting in ours_set for argument in ("--ours-set", setting)]
    completed = subprocess.run([sys.executable, __file__, "--worker", engine, "--steps", str(steps), *extra], cwd=REPO,
                               env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    for line in completed.stderr.splitlines():
        if line.startswith("ours step"):
            print("  " + line, flush=True)  # our per-phase seconds
    lines = [line for line in completed.stdout.splitlines() if line.startswith("RESULT ")]
    if completed.returncode != 0 or not lines:
        sys.stderr.write(completed.stdout[-3000:] + completed.stderr[-6000:])
        raise SystemExit(f"{engine} run failed with exit code {completed.returncode}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=4, help="steps per run (the first is dropped as warm-up)")
    parser.add_argument("--rounds", type=int, default=2, help="alternating ours/TRL rounds")
    parser.add_argument("--ours-set", action="append", default=[], metavar="KEY=VALUE",
                        help="override a setting of our engine (repeatable), e.g. train.share_prompt_prefix=false")
    parser.add_argument("--worker", choices=["ours", "trl"], help=argparse.SUPPRESS)
    args = parser.parse_args()
    from pcsd_core.config.schema import PCSDConfig
    from pcsd_core.config.loader import parse_overrides

    overrides = parse_overrides(args.ours_set)
    config_from_dict({}, overrides)  # an unknown key or bad value fails here, before any run
    if args.worker:
        return worker(args.worker, args.steps, overrides)
    results: dict[str, list[dict]] = {"ours": [], "trl": []}
    for round_index in range(args.rounds):
        order = ("ours", "trl") if round_index % 2 == 0 else ("trl", "ours")
        for engine in order:
            result = run_subprocess(engine, args.steps, args.ours_set)
            results[engine].append(result)
            print(f"round {round_index + 1} {engine:4s}: step s {[round(s, 2) for s in result['step_s']]}, "
                  f"peak {result['peak_mb']:.0f} MB", flush=True)
    summary = {engine: (statistics.median(s for r in runs for s in r["step_s"][1:]), max(r["peak_mb"] for r in runs))
               for engine, runs in results.items()}
    print(f"{'engine':8s} {'median s/step':>14s} {'peak MB':>10s}")
    for engine, (step_s, peak) in summary.items():
        print(f"{engine:8s} {step_s:14.2f} {peak:10.0f}")
    speedup = summary["trl"][0] / summary["ours"][0]
    ratio = summary["ours"][1] / summary["trl"][1]
    print(f"speedup_vs_trl={speedup:.2f} peak_rss_ratio={ratio:.2f}")


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    main()
