"""The verl reference's script at its path: env vars and verl keys in, one flow run out.

`PCSD_DRY_RUN=1` makes the script print the command it would run; those tests are fast. The last test runs
the real thing (2 CPU steps of SmolLM2 through the flow, minutes).
"""

from __future__ import annotations

import os
import shlex
import subprocess
import sys
from pathlib import Path

from cli.verl_keys import VERL_KEYS

REPO_ROOT = Path(__file__).resolve().parents[2]
SCRIPT = REPO_ROOT / "examples" / "privileged_context_distillation" / "train_gsm8k_pcsd.sh"
REFERENCE_VARIABLES = ("MODEL_PATH", "DATA_PATH", "TOTAL_STEPS", "ACTOR_NUM_GPUS", "ROLLOUT_NUM_GPUS")


def run_script(*args: str, cwd: Path, timeout: int = 120, **env: str) -> subprocess.CompletedProcess:
    clean = {key: value for key, value in os.environ.items() if key not in REFERENCE_VARIABLES}
    # Without a .venv beside the script it falls back to python3 on PATH: make that this interpreter.
    clean["PATH"] = f"{Path(sys.executable).parent}{os.pathsep}{clean.get('PATH', '')}"
    return subprocess.run(["bash", str(SCRIPT), *args], cwd=cwd, env={**clean, **env}, capture_output=True,
                          text=True, timeout=timeout)


def test_dry_run_prints_the_flow_command_with_translated_keys(tmp_path):
    (tmp_path / "verl").mkdir()
    completed = run_script(
        "data.train_files=verl/train.parquet", "actor_rollout_ref.actor.optim.lr=2e-5",
        "actor_rollout_ref.actor.ppo_mini_batch_size=1",
        cwd=tmp_path, PCSD_DRY_RUN="1", MODEL_PATH="smollm2-135m", TOTAL_STEPS="2", DATA_PATH="verl",
    )
    assert completed.returncode == 0, completed.stderr
    words = shlex.split(completed.stdout)
    assert words[:3] == ["cd", str(REPO_ROOT), "&&"]  # found the repo root from its own location
    assert words[3:6] == ["MODEL_PATH=smollm2-135m", f"DATA_PATH={tmp_path / 'verl'}", "TOTAL_STEPS=2"]
    python = REPO_ROOT / ".venv" / "bin" / "python"
    assert words[6] == (str(python) if python.exists() else str(Path(sys.executable).parent / "python3"))
    assert words[7:10] == ["flows/pcsd_flow.py", "run", "--set"]
    # verl's mini-batch counts prompts: 1 prompt x n=2 (configs/cpu_smollm2.yaml) = 2 responses.
    assert shlex.split(words[10]) == [f"data.path={tmp_path / 'verl'}", "train.lr=2.0e-05", "train.mini_batch_size=2"]
    assert len(words) == 11


def test_no_arguments_runs_the_flow_without_set(tmp_path):
    completed = run_script(cwd=tmp_path, PCSD_DRY_RUN="1")
    assert completed.returncode == 0, completed.stderr
    assert shlex.split(completed.stdout)[-2:] == ["flows/pcsd_flow.py", "run"]


def test_unknown_verl_key_stops_before_any_work(tmp_path):
    # No dry run: the flow would start if the script got that far.
    completed = run_script("actor_rollout_ref.actor.optim.lr=1e-6", "algorithm.adv_estimator=grpo", cwd=tmp_path,
                           MODEL_PATH="smollm2-135m")
    assert completed.returncode != 0
    assert "unsupported verl key(s) ['algorithm.adv_estimator']" in completed.stderr
    assert all(key in completed.stderr for key in VERL_KEYS)
    assert completed.stdout == "" and not any(tmp_path.iterdir())


def test_two_cpu_steps_with_smollm2(tmp_path, gsm8k_dir):
    """The issue's acceptance command: MODEL_PATH=smollm2-135m TOTAL_STEPS=2 bash .../train_gsm8k_pcsd.sh."""
    completed = run_script(
        "actor_rollout_ref.rollout.n=2", cwd=tmp_path, timeout=1800,
        MODEL_PATH="smollm2-135m", TOTAL_STEPS="2", DATA_PATH=str(gsm8k_dir),
        METAFLOW_USER="pcsd-tests", METAFLOW_DATASTORE_SYSROOT_LOCAL=str(tmp_path / "metaflow"),
        METAFLOW_CARD_LOCALROOT=str(tmp_path / "metaflow" / "cards"),
        MLFLOW_TRACKING_URI=f"sqlite:///{tmp_path / 'mlflow.db'}",
    )
    assert completed.returncode == 0, completed.stdout[-4000:] + completed.stderr[-4000:]
    import mlflow

    client = mlflow.MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
    runs = client.search_runs([experiment.experiment_id for experiment in client.search_experiments()])
    children = [run for run in runs if run.data.params.get("train.total_training_steps") == "2"]
    assert children and all(run.data.params["model.name"] == "smollm2-135m" for run in children)
