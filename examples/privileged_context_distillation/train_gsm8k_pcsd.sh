#!/usr/bin/env bash
# Privileged context self-distillation on GSM8K: the verl reference's script, run through this platform's flow.
#
#   bash examples/privileged_context_distillation/train_gsm8k_pcsd.sh [verl_key=value ...]
#
#   MODEL_PATH=smollm2-135m TOTAL_STEPS=2 bash examples/privileged_context_distillation/train_gsm8k_pcsd.sh   # CPU
#   MODEL_PATH=deepseek-math-7b-base DATA_PATH=~/data/gsm8k TOTAL_STEPS=100 ACTOR_NUM_GPUS=4 ROLLOUT_NUM_GPUS=4 \
#     bash examples/privileged_context_distillation/train_gsm8k_pcsd.sh actor_rollout_ref.actor.optim.lr=1e-6
#
# Environment, as in the reference: MODEL_PATH, DATA_PATH (a folder: verl parquet or train/test .jsonl),
# TOTAL_STEPS, ACTOR_NUM_GPUS, ROLLOUT_NUM_GPUS; the flow reads them (steps/plan.py ENV_OVERRIDES).
# Arguments are verl keys; `python -m cli.verl_keys` translates them into our config keys (in verl's
# units) and refuses, before any work, a key it does not know. README.md beside this script has the table.
# The run goes through `flows/pcsd_flow.py run --set "..."`, so it is tracked in MLflow like any other.
# PCSD_DRY_RUN=1 prints the command instead of running it.
set -euo pipefail

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
PYTHON="$ROOT/.venv/bin/python"
if [[ ! -x "$PYTHON" ]]; then PYTHON="$(command -v python3)"; fi

# The flow runs from the repository root; a relative path the user gave means a path from where they stand.
for name in MODEL_PATH DATA_PATH; do
  value="${!name:-}"
  if [[ -n "$value" && "$value" != /* && -e "$value" ]]; then
    export "$name=$(cd "$(dirname "$value")" && pwd)/$(basename "$value")"
  fi
done

# Translate verl keys here, from the caller's directory (relative data files resolve against it).
SET_ARGS="$(PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}" "$PYTHON" -m cli.verl_keys --model "${MODEL_PATH:-}" "$@")"

COMMAND=("$PYTHON" flows/pcsd_flow.py run)
if [[ -n "$SET_ARGS" ]]; then COMMAND+=(--set "$SET_ARGS"); fi

if [[ "${PCSD_DRY_RUN:-0}" == 1 ]]; then
  printf 'cd %q &&' "$ROOT"
  for name in MODEL_PATH DATA_PATH TOTAL_STEPS ACTOR_NUM_GPUS ROLLOUT_NUM_GPUS; do
    if [[ -n "${!name:-}" ]]; then printf ' %s=%q' "$name" "${!name}"; fi
  done
  printf ' %q' "${COMMAND[@]}"
  printf '\n'
  exit 0
fi
cd "$ROOT"
exec "${COMMAND[@]}"
