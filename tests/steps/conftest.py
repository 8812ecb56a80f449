"""Fixtures shared by the step tests."""

from __future__ import annotations

import pytest
from mlflow.tracking import MlflowClient

from steps import tracking


@pytest.fixture()
def store(tmp_path, monkeypatch) -> MlflowClient:
    """A fresh SQLite MLflow store (runs, registry and artifacts under tmp_path), set as the tracking URI."""
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_ARTIFACTS_DESTINATION", str(tmp_path / "artifacts"))
    tracking.setup_tracking("register-test")
    return MlflowClient(tracking_uri=uri)
