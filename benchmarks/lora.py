"""LoRA (peft, rank 16) vs full fine-tuning on the CPU default: step time, peak RSS, weight-sync bytes.

Settings: configs/cpu_smollm2.yaml (SmolLM2-135M-Instruct, fp32, CPU, in-process actor, HF rollout engine) with
64-token responses; LoRA adds model.lora_rank 16 (alpha 32) on q,k,v,o,gate,up,down. Four cases, each in its
own subprocess (so peak RSS is its own): full fine-tuning and LoRA, each with the `live` teacher (the reference)
and the `frozen` one (full fine-tuning loads a second copy of the model for it; LoRA turns the adapter off).
Each runs `--steps` training steps; times are means over the steps after the first (warm-up). Weight-sync bytes:
what one sync hands the rollout engine (summed over the pieces `update_weights` receives).

    python benchmarks/lora.py --steps 3

The last line is machine-readable: `lora_step_time_ratio=<lora/full> lora_peak_rss_ratio=<lora/full>
lora_sync_bytes_ratio=<lora/full> frozen_teacher_rss_saved_mb=<full frozen - lora frozen>`.
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
GSM8K = Path(os.environ.get("PCSD_GSM8K_DIR", REPO.parent / "shared" / "data" / "gsm8k"))
sys.path.insert(0, str(REPO))  # this checkout's pcsd_core
CASES = {
    "full, live teacher": {},
    "LoRA r16, live teacher": {"model.lora_rank": 16, "model.lora_alpha": 32.0},
    "full, frozen teacher": {"train.teacher_mode": "frozen"},
    "LoRA r16, frozen teacher": {"model.lora_rank": 16, "model.lora_alpha": 32.0, "train.teacher_mode": "frozen"},
}


def run_case(name: str, steps: int) -> dict:
    """Inside the case's subprocess: train `steps` steps, return its timings, peak RSS and sync bytes."""
    from pcsd_core.config.loader import load_config
    from pcsd_core.config.schema import DataConfig
    from pcsd_core.data.prepare import prepare_dataset
    from pcsd_core.engine.trainer import Distiller

    with tempfile.TemporaryDirectory() as workdir:
        cfg = load_config(REPO / "configs" / "cpu_smollm2.yaml", {
            **CASES[name], "rollout.max_response_tokens": 64, "train.total_training_steps": steps,
            "train.output_dir": str(Path(workdir) / "run"), "train.lr": 1e-5})
        prepared = prepare_dataset(DataConfig(path=str(GSM8K), max_train_rows=32, max_test_rows=1),
                                   Path(workdir) / "data")
        distiller = Distiller(cfg, prepared.train_path)
        distiller.setup()
        synced: list[int] = []
        update_weights = distiller.engine.update_weights

        def counting(items):
            total = 0

            def count():
                nonlocal total
                for item in items:
                    total += item[1].numel() * item[1].element_size()
                    yield item
            update_weights(count())
            synced.append(total)

        distiller.engine.update_weights = counting
        result = distiller.train()
        distiller.close()
    measured = result.history[1:] or result.history
    return {
        "step_s": statistics.mean(m["time/step_s"] for m in measured),
        "update_s": statistics.mean(m["time/update_s"] + m["time/teacher_s"] for m in measured),
        "sync_s": statistics.mean(m["time/weight_sync_s"] for m in measured),
        "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "sync_mb": synced[-1] / 2**20,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--case", help=argparse.SUPPRESS)  # run one case in this process (the subprocess side)
    args = parser.parse_args()
    if args.case:
        print("RESULT " + json.dumps(run_case(args.case, args.steps)), flush=True)
        return
    results = {}
    for name in CASES:
        done = subprocess.run([sys.executable, __file__, "--steps", str(args.steps), "--case", name],
                              capture_output=True, text=True, check=False)
        line = next((line for line in done.stdout.splitlines() if line.startswith("RESULT ")), None)
        if line is None:
            sys.exit(f"case {name!r} failed:\n{done.stderr[-3000:]}")
        results[name] = json.loads(line.removeprefix("RESULT "))
    print(f"| case | s/step | teacher+update s | weight sync s | peak RSS MB | sync MB |")
    print("|---|---|---|---|---|---|")
    for name, r in results.items():
        print(f"| {name} | {r['step_s']:.2f} | {r['update_s']:.2f} | {r['sync_s']:.3f} | {r['peak_rss_mb']:.0f} | "
              f"{r['sync_mb']:.2f} |")
    full, lora = results["full, live teacher"], results["LoRA r16, live teacher"]
    full_frozen, lora_frozen = results["full, frozen teacher"], results["LoRA r16, frozen teacher"]
    print(f"\nLoRA / full (live teacher): step time {lora['step_s'] / full['step_s']:.2f}x, teacher+update "
          f"{lora['update_s'] / full['update_s']:.2f}x, peak RSS {lora['peak_rss_mb'] / full['peak_rss_mb']:.2f}x, "
          f"sync bytes {lora['sync_mb'] / full['sync_mb']:.4f}x, sync time {lora['sync_s'] / full['sync_s']:.2f}x")
    print(f"frozen teacher: full fine-tuning's second copy costs {full_frozen['peak_rss_mb'] - full['peak_rss_mb']:.0f} "
          f"MB of peak RSS, LoRA's adapter-off teacher {lora_frozen['peak_rss_mb'] - lora['peak_rss_mb']:.0f} MB")
    print(f"lora_step_time_ratio={lora['step_s'] / full['step_s']:.3f} "
          f"lora_peak_rss_ratio={lora['peak_rss_mb'] / full['peak_rss_mb']:.3f} "
          f"lora_sync_bytes_ratio={lora['sync_mb'] / full['sync_mb']:.5f} "
          f"frozen_teacher_rss_saved_mb={full_frozen['peak_rss_mb'] - lora_frozen['peak_rss_mb']:.0f}")


if __name__ == "__main__":
    main()
