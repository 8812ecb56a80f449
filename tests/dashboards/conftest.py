"""Fixtures of the dashboard tests: a tracking store filled by the real MLflow client."""

from __future__ import annotations

import pytest
from dashboard_store import fill_store


@pytest.fixture(scope="session")
def filled_store(tmp_path_factory) -> tuple[str, dict[str, str]]:
    """(tracking URI of a SQLite store whose artifacts live beside it, run ids by branch name and 'parent')."""
    root = tmp_path_factory.mktemp("mlflow_store")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    return uri, fill_store(uri, root)
