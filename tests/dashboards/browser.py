"""Helpers of the UI tests: a real `mlflow server` on a loopback port, REST calls, headless Chromium."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.parse
import urllib.request
from collections.abc import Iterator
from html.parser import HTMLParser
from pathlib import Path

import pytest

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


@contextlib.contextmanager
def running_mlflow_server(tracking_uri: str, workdir: Path) -> Iterator[str]:
    """`mlflow server` over `tracking_uri` on a free loopback port; yields its base URL, then kills it."""
    port = free_port()
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", tracking_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]
    log_path = workdir / "server.log"
    with open(log_path, "w") as log:
        # Own process group (cwd = workdir, where it may create ./mlartifacts): uvicorn forks workers,
        # and teardown must stop them all.
        server = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        base_url = f"http://127.0.0.1:{port}"
        try:
            _wait_until_healthy(base_url, server, log_path)
            yield base_url
        finally:
            os.killpg(server.pid, signal.SIGTERM)
            try:
                server.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, signal.SIGKILL)
                server.wait(timeout=15)


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


def get_json(url: str, query: dict) -> dict:
    with urllib.request.urlopen(f"{url}?{urllib.parse.urlencode(query)}", timeout=30) as response:
        return json.loads(response.read())


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
