"""The flow under bad input and under a kill: one clear line, no pointless retry, truthful MLflow state, no orphans.

Each test runs the real flow (`python flows/pcsd_flow.py run`) on the tiny model in its own folder, with its own
Metaflow datastore and SQLite MLflow store, and looks at the result with MLflow's own client and psutil.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import psutil
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient

REPO_ROOT = Path(__file__).resolve().parents[2]


def _flow_env(root: Path) -> dict[str, str]:
    env = {**os.environ, "METAFLOW_DATASTORE_SYSROOT_LOCAL": str(root / "metaflow"),
           "METAFLOW_CARD_LOCALROOT": str(root / "metaflow" / "cards"),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'mlflow.db'}", "PCSD_LOG_DIR": str(root / "logs")}
    for variable in ("MODEL_PATH", "DATA_PATH", "TOTAL_STEPS", "ACTOR_NUM_GPUS", "ROLLOUT_NUM_GPUS"):
        env.pop(variable, None)
    return env


def _write_preset(tiny_preset, root: Path, model_dir: Path, data_dir: Path, steps: int) -> Path:
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(tiny_preset(model_dir, data_dir, root / "outputs", steps=steps, eval_questions=2)))
    return path


def _flow_command(preset: Path, *args: str) -> list[str]:
    return [sys.executable, str(REPO_ROOT / "flows" / "pcsd_flow.py"), "--no-pylint", "--config", "config",
            str(preset), "run", *args]


def _parent_runs(root: Path) -> list:
    client = MlflowClient(f"sqlite:///{root / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("pcsd")
    if experiment is None:
        return []
    runs = client.search_runs([experiment.experiment_id])
    return [run for run in runs if "mlflow.parentRunId" not in run.data.tags]


def test_bad_data_path_fails_once_with_one_clear_line_and_a_failed_parent_run(tmp_path, tiny_preset, tiny_model_dir,
                                                                             gsm8k_dir):
    preset = _write_preset(tiny_preset, tmp_path, tiny_model_dir, gsm8k_dir, steps=1)
    missing = tmp_path / "no_such_folder"
    started = time.perf_counter()
    completed = subprocess.run(_flow_command(preset, "--data-path", str(missing)), cwd=tmp_path,
                               env=_flow_env(tmp_path), capture_output=True, text=True, timeout=600)
    output = completed.stdout + completed.stderr
    assert completed.returncode != 0
    assert f"error: data folder {missing} does not exist (data.path)" in output
    assert "Traceback" not in output  # the trace is in the log file the line names
    assert "will not be retried" in output and "(retry)" not in output
    assert list((tmp_path / "logs").glob("preprocess-*.log"))
    (parent,) = _parent_runs(tmp_path)
    assert parent.info.status == "FAILED"
    assert time.perf_counter() - started < 180


def test_sigterm_to_the_flow_ends_its_tasks_and_marks_the_runs_killed(tmp_path, tiny_preset, tiny_model_dir, gsm8k_dir):
    preset = _write_preset(tiny_preset, tmp_path, tiny_model_dir, gsm8k_dir, steps=200)  # long enough to be stopped mid-distill
    with _running_flow(preset, tmp_path) as (runner, _):
        client = MlflowClient(f"sqlite:///{tmp_path / 'mlflow.db'}")
        deadline = time.monotonic() + 400
        child = None
        while child is None and time.monotonic() < deadline and runner.poll() is None:
            time.sleep(2)
            for parent in _parent_runs(tmp_path):
                children = client.search_runs([parent.info.experiment_id],
                                              f"tags.mlflow.parentRunId = '{parent.info.run_id}'")
                child = next((c for c in children if "train/loss" in c.data.metrics), None)
        assert child is not None, "distill never logged a step"
        _stop_the_flow(runner)
    (parent,) = _parent_runs(tmp_path)
    assert parent.info.status == "KILLED"
    assert client.get_run(child.info.run_id).info.status in ("FAILED", "KILLED")


@contextlib.contextmanager
def _running_flow(preset: Path, root: Path) -> Iterator[tuple[subprocess.Popen, list[str]]]:
    """`python flows/pcsd_flow.py run` on `preset` in `root`, with its output lines as they come (read all along:
    a pipe left unread fills up and stalls the runner); killed on the way out if the test left it running."""
    runner = subprocess.Popen(_flow_command(preset), cwd=root, env=_flow_env(root), stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True)
    lines: list[str] = []

    def drain() -> None:
        for line in runner.stdout:
            lines.append(line)

    threading.Thread(target=drain, daemon=True).start()
    try:
        yield runner, lines
    finally:
        if runner.poll() is None:
            runner.kill()


def _stop_the_flow(runner: subprocess.Popen) -> None:
    """SIGTERM to the flow runner (what `kill <pid>` or a scheduler's stop sends); every process of the flow ends."""
    family = [runner.pid] + [p.pid for p in psutil.Process(runner.pid).children(recursive=True)]
    assert len(family) > 1
    runner.send_signal(signal.SIGTERM)
    runner.wait(timeout=60)
    survivors = _wait_for_exit(family, timeout_s=90)
    assert not survivors, f"processes of the flow still running: {survivors}"


def _wait_for_exit(pids: list[int], timeout_s: float) -> list[str]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        alive = []
        for pid in pids:
            try:
                process = psutil.Process(pid)
                if process.status() != psutil.STATUS_ZOMBIE:
                    alive.append(f"{pid} {' '.join(process.cmdline())[:120]}")
            except psutil.NoSuchProcess:
                continue
        if not alive:
            return []
        time.sleep(1)
    return alive


def test_sigterm_during_preprocess_leaves_no_half_written_data_and_a_killed_parent_run(tmp_path, tiny_preset,
                                                                                      tiny_model_dir, gsm8k_dir):
    preset_path = _write_preset(tiny_preset, tmp_path, tiny_model_dir, gsm8k_dir, steps=1)
    preset = yaml.safe_load(preset_path.read_text())
    preset["data"].update(max_train_rows=3000, max_test_rows=500)  # seconds of preprocessing to be stopped in
    preset_path.write_text(yaml.safe_dump(preset))
    with _running_flow(preset_path, tmp_path) as (runner, lines):
        deadline = time.monotonic() + 300
        while not any("[preprocess]" in line for line in lines):  # until the preprocess task is inside its step
            assert time.monotonic() < deadline and runner.poll() is None, "".join(lines[-30:])
            time.sleep(0.2)
        time.sleep(1.0)
        _stop_the_flow(runner)
    (parent,) = _parent_runs(tmp_path)
    assert parent.info.status == "KILLED"
    for folder in (tmp_path / "outputs").glob("*/data/*"):
        left = sorted(path.name for path in folder.iterdir())
        assert all(name in ("train.parquet", "test.parquet") for name in left), left  # no temporary file
        for name in left:
            rows = pq.read_table(folder / name).num_rows
            assert rows == (3000 if name == "train.parquet" else 500), (name, rows)
