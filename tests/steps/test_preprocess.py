"""The preprocess step: parquet + stats, MLflow logging only inside an active run, and its CLI."""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import json

import mlflow
import pyarrow.parquet as pq
import pytest
import yaml
from mlflow.tracking import MlflowClient, _tracking_service

from pcsd_core.config.schema import PCSDConfig
from cli.preprocess import main
from pcsd_core.data.prepare import PreparedData
from steps.preprocess import preprocess


@pytest.fixture()
def cfg(gsm8k_dir) -> PCSDConfig:
    return config_from_dict({"data": {"path": str(gsm8k_dir), "max_train_rows": 8, "max_test_rows": 4}})


@pytest.fixture()
def tracking_uri(tmp_path, monkeypatch) -> str:
    """A throwaway SQLite store; the process-wide tracking URI is restored afterwards."""
    monkeypatch.setattr(_tracking_service.utils, "_tracking_uri", _tracking_service.utils._tracking_uri)
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    mlflow.set_tracking_uri(uri)
    return uri


def test_preprocess_logs_stats_into_the_active_run(cfg, tmp_path, tracking_uri):
    mlflow.set_experiment("preprocess-test")
    with mlflow.start_run() as run:
        result = preprocess(cfg, tmp_path / "data")
    assert isinstance(result, PreparedData)
    assert pq.read_table(result.train_path).num_rows == 8 and pq.read_table(result.test_path).num_rows == 4
    logged = MlflowClient(tracking_uri).get_run(run.info.run_id).data
    assert logged.metrics["data/train/rows"] == 8 and logged.metrics["data/test/rows"] == 4
    assert logged.metrics["data/train/teacher_prompt_tokens_p90"] == result.stats["train/teacher_prompt_tokens_p90"]
    assert logged.params["data/privileged_context"] == "solution"
    artifact = mlflow.artifacts.load_dict(f"runs:/{run.info.run_id}/data/stats.json")
    assert artifact == result.stats


def test_preprocess_without_a_run_starts_none(cfg, tmp_path, tracking_uri):
    result = preprocess(cfg, tmp_path / "data")
    assert mlflow.active_run() is None
    assert not (tmp_path / "mlflow.db").exists()  # the tracking store was never even opened
    assert result.stats["train/rows"] == 8


def test_cli_reads_a_preset_with_a_sweep_and_a_data_path_override(gsm8k_dir, tmp_path, capsys):
    preset = tmp_path / "preset.yaml"
    preset.write_text(
        yaml.safe_dump(
            {
                "data": {"path": "/does/not/exist", "max_train_rows": 3, "max_test_rows": 2, "privileged_context": "answer_only"},
                "sweep": {"train.lr": [1e-5, 2e-5]},
            }
        )
    )
    out = tmp_path / "data"
    assert main(["--config", str(preset), "--output-dir", str(out), "--data-path", str(gsm8k_dir)]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["train/rows"] == 3 and printed["test/rows"] == 2
    assert printed["train_path"] == str(out / "train.parquet")
    first = pq.read_table(out / "train.parquet").to_pylist()[0]
    assert first["extra_info"]["privileged_context"] == first["reward_model"]["ground_truth"] == "72"


def test_ctrl_c_at_any_moment_leaves_no_half_written_parquet(gsm8k_dir, tmp_path):
    """Ctrl-C (SIGINT) to `python -m cli.preprocess` at moments spread over an uninterrupted run's duration, the
    last ones while the parquet files are written: the folder holds either no parquet or complete ones that read
    back with every row, and no temporary file is left behind."""
    import signal
    import subprocess
    import sys
    import time

    preset = tmp_path / "preset.yaml"
    preset.write_text(yaml.safe_dump({"data": {"path": str(gsm8k_dir), "max_train_rows": 3000, "max_test_rows": 500}}))

    def command(output_dir):
        return [sys.executable, "-m", "cli.preprocess", "--config", str(preset), "--output-dir", str(output_dir)]

    started = time.perf_counter()
    subprocess.run(command(tmp_path / "whole"), check=True, capture_output=True, timeout=600)
    duration = time.perf_counter() - started
    expected = {"train": 3000, "test": 500}
    assert {split: pq.read_table(tmp_path / "whole" / f"{split}.parquet").num_rows for split in expected} == expected

    for fraction in (0.3, 0.6, 0.8, 0.9, 0.97):
        output_dir = tmp_path / f"stopped-{fraction}"
        process = subprocess.Popen(command(output_dir), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(duration * fraction)
        process.send_signal(signal.SIGINT)
        assert process.wait(timeout=120) is not None
        left = sorted(path.name for path in output_dir.iterdir()) if output_dir.is_dir() else []
        assert all(name.endswith(".parquet") and not name.startswith(".") for name in left), (fraction, left)
        for name in left:  # whatever is there is whole
            split = name.removesuffix(".parquet")
            assert pq.read_table(output_dir / name).num_rows == expected[split], (fraction, name)
