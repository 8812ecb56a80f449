"""A real MLflow server over a filled store: its REST API, its UI and the report, rendered in headless Chromium.

The server runs on a free loopback port from a temp folder and is killed in teardown. Chromium is Debian's
`chromium` package (`.ci/run` installs it when absent); the browser part is skipped, with the reason, only
when no Chromium binary can be found.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from html.parser import HTMLParser
from pathlib import Path

import pytest

from dashboard_store import BRANCHES, EVAL, FLOW_RUN_ID
from dashboards.report import build_report

SERVER_START_TIMEOUT_S = 90
# Text MLflow's UI shows when a page failed (checked against a real error page below).
ERROR_MARKERS = ("load error", "not found", "does not exist", "something went wrong", "internal server error")
EXPECTED_METRICS = ("train/loss", "train/kl", "perf/tokens_per_s", "eval/after/gsm8k_accuracy_strict")


def find_chromium() -> str | None:
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="module")
def mlflow_server(filled_store, tmp_path_factory):
    """(base URL, run ids) of `mlflow server` over the filled store; killed, with its workers, at the end."""
    uri, ids = filled_store
    port = free_port()
    workdir = tmp_path_factory.mktemp("mlflow_server")  # the server may create ./mlartifacts in its cwd
    log = open(workdir / "server.log", "w")
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    # Own process group: uvicorn forks workers, and teardown must stop them all.
    server = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    base_url = f"http://127.0.0.1:{port}"
    try:
        _wait_until_healthy(base_url, server, workdir / "server.log")
        yield base_url, ids
    finally:
        os.killpg(server.pid, signal.SIGTERM)
        try:
            server.wait(timeout=5)
        except subprocess.TimeoutExpired:
            os.killpg(server.pid, signal.SIGKILL)
            server.wait(timeout=15)
        log.close()


def _wait_until_healthy(base_url: str, server: subprocess.Popen, log_path: Path) -> None:
    deadline = time.monotonic() + SERVER_START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.poll() is not None:
            pytest.fail(f"mlflow server exited with {server.returncode}:\n{log_path.read_text()[-3000:]}")
        try:
            with urllib.request.urlopen(f"{base_url}/health", timeout=2) as response:
                if response.status == 200:
                    return
        except OSError:
            time.sleep(0.5)
    pytest.fail(f"mlflow server not healthy after {SERVER_START_TIMEOUT_S}s:\n{log_path.read_text()[-3000:]}")


def post_json(url: str, payload: dict) -> dict:
    request = urllib.request.Request(
        url, data=json.dumps(payload).encode(), headers={"Content-Type": "application/json"}, method="POST"
    )
    with urllib.request.urlopen(request, timeout=30) as response:
        return json.loads(response.read())


def test_rest_api_returns_parent_and_branch_runs_with_metrics(mlflow_server):
    base_url, ids = mlflow_server
    experiments = post_json(f"{base_url}/api/2.0/mlflow/experiments/search", {"max_results": 100})["experiments"]
    experiment_id = next(e["experiment_id"] for e in experiments if e["name"] == "pcsd")
    found = post_json(
        f"{base_url}/api/2.0/mlflow/runs/search",
        {"experiment_ids": [experiment_id], "filter": f"tags.`pcsd.flow_run_id` = '{FLOW_RUN_ID}'", "max_results": 100},
    )["runs"]
    by_name = {run["info"]["run_name"]: run for run in found}
    assert set(by_name) == {f"pcsd-{FLOW_RUN_ID}", *BRANCHES}
    assert by_name[f"pcsd-{FLOW_RUN_ID}"]["info"]["run_id"] == ids["parent"]
    for name in BRANCHES:
        run = by_name[name]
        tags = {tag["key"]: tag["value"] for tag in run["data"]["tags"]}
        assert tags["mlflow.parentRunId"] == ids["parent"] and tags["pcsd.branch"] == name
        metrics = {metric["key"]: metric for metric in run["data"]["metrics"]}
        assert set(EXPECTED_METRICS) <= set(metrics)
        assert metrics["eval/after/gsm8k_accuracy_strict"]["value"] == pytest.approx(EVAL[name]["after_strict"])
        assert metrics["train/loss"]["step"] == 3  # the latest of the per-step values


class VisibleText(HTMLParser):
    """The text a user sees: everything outside <script>/<style>, lower-cased, whitespace-collapsed."""

    def __init__(self) -> None:
        super().__init__()
        self.parts: list[str] = []
        self._skip = 0

    def handle_starttag(self, tag, attrs):
        self._skip += tag in ("script", "style")

    def handle_endtag(self, tag):
        self._skip -= tag in ("script", "style") and self._skip > 0

    def handle_data(self, data):
        if not self._skip:
            self.parts.append(data)

    @classmethod
    def of(cls, page: str) -> str:
        parser = cls()
        parser.feed(page)
        return " ".join(" ".join(parser.parts).split())


def render(chromium: str, url: str, out_dir: Path, name: str, virtual_time_ms: int = 15000) -> tuple[str, Path]:
    """Load `url` headless; returns (DOM after scripts ran, screenshot path)."""
    profile, screenshot = out_dir / f"{name}-profile", out_dir / f"{name}.png"
    flags = [
        "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
        "--disable-background-networking", "--disable-component-update", "--disable-sync",
        f"--user-data-dir={profile}", "--window-size=1400,1000", f"--virtual-time-budget={virtual_time_ms}",
    ]
    flags.append(f"--screenshot={screenshot}")
    # One run: the DOM goes to stdout after the virtual time budget, the screenshot to its file.
    result = subprocess.run([chromium, *flags, "--dump-dom", url], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert screenshot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and screenshot.stat().st_size > 10_000
    return result.stdout, screenshot


def assert_no_error_banner(text: str, url: str) -> None:
    lowered = text.lower()
    assert not [marker for marker in ERROR_MARKERS if marker in lowered], f"{url} shows an error: {text[:1500]}"


@pytest.fixture(scope="module")
def chromium() -> str:
    path = find_chromium()
    if path is None:
        pytest.skip("no Chromium binary on PATH (Debian: apt-get install -y chromium; .ci/run installs it)")
    return path


def test_mlflow_ui_renders_the_sweep(mlflow_server, chromium, tmp_path):
    base_url, ids = mlflow_server
    # The experiment's runs page lists the parent (branches are nested under it, collapsed).
    experiment_id = post_json(f"{base_url}/api/2.0/mlflow/experiments/search", {"max_results": 10})["experiments"]
    experiment_id = next(e["experiment_id"] for e in experiment_id if e["name"] == "pcsd")
    runs_url = f"{base_url}/#/experiments/{experiment_id}/runs"
    dom, _ = render(chromium, runs_url, tmp_path, "experiment")
    text = VisibleText.of(dom)
    assert_no_error_banner(text, runs_url)
    assert f"pcsd-{FLOW_RUN_ID}" in text and "3 matching runs" in text
    # The compare view lines the branches up by name, with the swept params and the metric names.
    branch_ids = json.dumps([ids[name] for name in BRANCHES], separators=(",", ":"))
    compare_url = f"{base_url}/#/compare-runs?runs={branch_ids}&experiments=[\"{experiment_id}\"]"
    dom, _ = render(chromium, compare_url, tmp_path, "compare")
    text = VisibleText.of(dom)
    assert_no_error_banner(text, compare_url)
    for expected in (*BRANCHES, "train.lr", "loss.divergence", *EXPECTED_METRICS):
        assert expected in text, f"{expected!r} missing from the compare page: {text[:1500]}"


def test_error_check_catches_a_real_error_page(mlflow_server, chromium, tmp_path):
    base_url, _ = mlflow_server
    url = f"{base_url}/#/experiments/987654/runs"
    dom, _ = render(chromium, url, tmp_path, "missing", virtual_time_ms=8000)
    with pytest.raises(AssertionError, match="shows an error"):
        assert_no_error_banner(VisibleText.of(dom), url)


def test_report_renders_in_chromium(mlflow_server, chromium, tmp_path):
    base_url, _ = mlflow_server
    # The report is built through the server's REST API, as a user pointing at a shared server would.
    path = build_report(tracking_uri=base_url, output_path=tmp_path / "report.html")
    dom, screenshot = render(chromium, path.as_uri(), tmp_path, "report", virtual_time_ms=2000)
    text = VisibleText.of(dom)
    assert_no_error_banner(text, path.as_uri())
    for expected in (f"PCSD sweep report: pcsd-{FLOW_RUN_ID}", *BRANCHES, "Training loss", "★ best", "####"):
        assert expected in text
    assert screenshot.stat().st_size > 50_000  # charts, not a blank page
