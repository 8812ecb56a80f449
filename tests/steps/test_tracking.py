"""steps/tracking.py under faults, against the real MLflow client and server (issue 16, MLflow side):

- an unreachable or silent tracking server fails the start in seconds, with one line that says how to fix it;
- a server that goes down mid-run costs no training step and, once it is back, no metric;
- four processes writing one SQLite store at a high rate lose no run and no metric;
- a reopened parent run stays RUNNING, and a body that raises or is interrupted ends it FAILED or KILLED.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import mlflow
import pytest
from mlflow.tracking import MlflowClient, _tracking_service

from steps import tracking

SERVER_START_TIMEOUT_S = 45
KEYS = ("train/loss", "train/kl")
WORKERS, WORKER_STEPS, WORKER_KEYS = 4, 200, 5


@pytest.fixture(autouse=True)
def _restore_tracking_uri(monkeypatch):
    """The process-wide tracking URI and active run stack are left as found."""
    monkeypatch.setattr(_tracking_service.utils, "_tracking_uri", _tracking_service.utils._tracking_uri)
    yield
    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory) -> str:
    """One SQLite store for the module: creating one runs MLflow's migrations (seconds); each test makes its
    own runs in it."""
    uri = f"sqlite:///{tmp_path_factory.mktemp('store') / 'mlflow.db'}"
    MlflowClient(uri).search_experiments()  # create the schema once
    return uri


@pytest.fixture()
def sqlite_uri(store_uri, monkeypatch) -> str:
    monkeypatch.setenv("MLFLOW_TRACKING_URI", store_uri)
    return store_uri


# ---- 1. fail fast at start ----------------------------------------------------------------------------
def test_unreachable_server_fails_the_start_in_seconds_with_one_line(monkeypatch):
    uri = "http://127.0.0.1:9"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    started = time.monotonic()
    with pytest.raises(tracking.TrackingServerUnreachableError) as raised:
        tracking.start_parent_run("1", "PCSDFlow/1/start/1", {"a": 1})
    assert time.monotonic() - started < 5  # MLflow's own retries take ~256 s
    message = str(raised.value)
    assert "\n" not in message
    assert uri in message and "start it" in message and "unset MLFLOW_TRACKING_URI" in message


def test_a_server_that_accepts_but_never_answers_times_out():
    with socket.socket() as silent:  # the kernel accepts connections into the backlog; nobody answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(8)
        uri = f"http://127.0.0.1:{silent.getsockname()[1]}"
        started = time.monotonic()
        with pytest.raises(tracking.TrackingServerUnreachableError, match="timed out"):
            tracking.check_tracking_server(uri, timeout_s=1)
        assert time.monotonic() - started < 3


def test_local_stores_are_not_probed(tmp_path):
    tracking.check_tracking_server(f"sqlite:///{tmp_path / 'absent' / 'mlflow.db'}")
    tracking.check_tracking_server(str(tmp_path))


# ---- 2. the server goes down mid-run ------------------------------------------------------------------
def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@contextlib.contextmanager
def _mlflow_server(backend_uri: str, port: int, workdir: Path) -> Iterator[str]:
    """A real `mlflow server` on 127.0.0.1:`port` until the block ends (then its process group is killed)."""
    command = [sys.executable, "-m", "mlflow", "server", "--backend-store-uri", backend_uri,
               "--host", "127.0.0.1", "--port", str(port), "--workers", "1"]  # fmt: skip
    log_path = workdir / f"server-{time.monotonic_ns()}.log"
    with open(log_path, "w") as log:
        server = subprocess.Popen(command, cwd=workdir, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + SERVER_START_TIMEOUT_S
        while not _healthy(url):
            if server.poll() is not None or time.monotonic() > deadline:
                pytest.fail(f"mlflow server on port {port} did not start:\n{log_path.read_text()[-3000:]}")
            time.sleep(0.3)
        yield url
    finally:
        os.killpg(server.pid, signal.SIGKILL)  # an abrupt outage, as when a host dies
        server.wait(timeout=15)


def _healthy(url: str) -> bool:
    try:
        with urllib.request.urlopen(f"{url}/health", timeout=1) as response:
            return response.status == 200
    except OSError:
        return False


def _step_metrics(step: int) -> dict[str, float]:
    return {key: step + index / 10 for index, key in enumerate(KEYS)}


@pytest.mark.ui
def test_metrics_logged_while_the_server_is_down_arrive_once_it_is_back(tmp_path, monkeypatch, caplog):
    """~30 s, nearly all of it two server starts; the logger's own calls are bounded below."""
    backend, port = f"sqlite:///{tmp_path / 'server.db'}", _free_port()
    monkeypatch.setattr(tracking, "OUTAGE_RETRY_INTERVAL_S", 0.0)  # resend on every call, to see it happen
    caplog.set_level(logging.WARNING, logger=tracking.__name__)
    with _mlflow_server(backend, port, tmp_path) as url:
        monkeypatch.setenv("MLFLOW_TRACKING_URI", url)
        tracking.check_tracking_server()
        run_id = tracking.start_parent_run("7", "PCSDFlow/7/start/1", {"a": 1})
        log_metrics = tracking.metric_logger(run_id)
        for step in range(3):
            log_metrics(_step_metrics(step), step)
        assert log_metrics.pending == []

    for step in range(3, 8):  # the server is gone: no exception, no stall (MLflow alone would retry ~4 min)
        call_started = time.monotonic()
        log_metrics(_step_metrics(step), step)
        assert time.monotonic() - call_started < 6
    assert len(log_metrics.pending) == 5 * len(KEYS)
    warnings = [r.getMessage() for r in caplog.records if "unreachable" in r.getMessage()]
    assert len(warnings) == 1 and url in warnings[0]

    with _mlflow_server(backend, port, tmp_path):  # same port, same store
        log_metrics(_step_metrics(8), 8)  # sends the buffer, then this step
        assert log_metrics.pending == []
        assert log_metrics.flush()
        assert any("is back" in r.getMessage() for r in caplog.records)
        client = MlflowClient(url)
        for index, key in enumerate(KEYS):
            history = sorted(client.get_metric_history(run_id, key), key=lambda m: m.step)
            assert [m.step for m in history] == list(range(9))  # every step, exactly once
            assert [m.value for m in history] == pytest.approx([step + index / 10 for step in range(9)])


def test_a_permanent_error_is_raised_not_buffered(sqlite_uri):
    run_id = tracking.start_parent_run("8", "PCSDFlow/8/start/1", {})
    tracking.client().delete_run(run_id)
    with pytest.raises(mlflow.exceptions.MlflowException):
        tracking.metric_logger(run_id)({"train/loss": 1.0}, 0)


# ---- 3. SQLite contention -----------------------------------------------------------------------------
def test_retry_when_locked_outlasts_a_lock_held_by_another_connection(tmp_path):
    db = tmp_path / "locked.db"
    sqlite3.connect(db).execute("CREATE TABLE t (x INTEGER)").connection.commit()
    holder = sqlite3.connect(db, check_same_thread=False)
    holder.execute("BEGIN EXCLUSIVE")
    threading.Timer(0.5, holder.commit).start()
    attempts = []

    def insert() -> None:
        attempts.append(1)
        with sqlite3.connect(db, timeout=0) as writer:  # no busy wait of its own: refused while locked
            writer.execute("INSERT INTO t VALUES (1)")

    with pytest.raises(sqlite3.OperationalError, match="database is locked"):
        insert()  # the lock is real
    tracking.retry_when_locked(insert)
    assert len(attempts) > 2
    assert sqlite3.connect(db).execute("SELECT COUNT(*) FROM t").fetchone() == (1,)


def _write_branch(args: tuple[str, str, int]) -> str:
    """One sweep branch in its own process: a child run and WORKER_STEPS batches of WORKER_KEYS metrics."""
    uri, parent_run_id, branch = args
    os.environ["MLFLOW_TRACKING_URI"] = uri
    pathspec = f"PCSDFlow/9/distill/{branch}"
    run_id = tracking.start_child_run(parent_run_id, f"branch-{branch}", "9", pathspec, {"b": branch})
    log_metrics = tracking.metric_logger(run_id)
    for step in range(WORKER_STEPS):
        log_metrics({f"m{key}": branch * 1e6 + step * 10 + key for key in range(WORKER_KEYS)}, step)
    assert log_metrics.flush()
    tracking.finish_run(run_id)
    return run_id


def test_parallel_branches_on_one_sqlite_store_lose_no_run_and_no_metric(sqlite_uri):
    """4 x 200 batches of 5 metrics at once (~40 s on 2 busy cores, mostly the 4 interpreters starting)."""
    parent_run_id = tracking.start_parent_run("9", "PCSDFlow/9/start/1", {})  # the flow creates the store first
    with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
        run_ids = pool.map(_write_branch, [(sqlite_uri, parent_run_id, branch) for branch in range(WORKERS)])

    client = MlflowClient(sqlite_uri)
    children = client.search_runs([client.get_run(parent_run_id).info.experiment_id],
                                  filter_string=f"tags.mlflow.parentRunId = '{parent_run_id}'")
    assert sorted(run.info.run_id for run in children) == sorted(run_ids) and len(set(run_ids)) == WORKERS
    for branch, run_id in enumerate(run_ids):
        assert client.get_run(run_id).info.status == "FINISHED"
        for key in range(WORKER_KEYS):
            history = sorted(client.get_metric_history(run_id, f"m{key}"), key=lambda m: m.step)
            assert [m.step for m in history] == list(range(WORKER_STEPS))
            assert [m.value for m in history] == [branch * 1e6 + step * 10 + key for step in range(WORKER_STEPS)]


def _start_first_run(args: tuple[str, int]) -> str:
    uri, flow = args
    os.environ["MLFLOW_TRACKING_URI"] = uri
    return tracking.start_parent_run(str(flow), f"PCSDFlow/{flow}/start/1", {"flow": flow})


def test_processes_that_create_a_new_sqlite_store_together_lose_no_run(tmp_path):
    """Without the creation lock, 3 of 4 runs failed here (MLflow migrations racing: duplicate column name)."""
    uri = f"sqlite:///{tmp_path / 'fresh.db'}"
    with multiprocessing.get_context("spawn").Pool(WORKERS) as pool:
        run_ids = pool.map(_start_first_run, [(uri, flow) for flow in range(WORKERS)])
    runs = MlflowClient(uri).search_runs([MlflowClient(uri).get_experiment_by_name("pcsd").experiment_id])
    assert sorted(run.info.run_id for run in runs) == sorted(run_ids) and len(set(run_ids)) == WORKERS


# ---- 4. run state that tells the truth ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("end", "raised", "status"),
    [(False, None, "RUNNING"), (False, ValueError, "FAILED"), (False, KeyboardInterrupt, "KILLED"),
     (True, None, "FINISHED"), (True, RuntimeError, "FAILED")],
)  # fmt: skip
def test_open_run_leaves_the_status_that_happened(sqlite_uri, end, raised, status):
    run_id = tracking.start_parent_run("10", "PCSDFlow/10/start/1", {})
    with contextlib.suppress(raised or ()):
        with tracking.open_run(run_id, system_metrics=False, end=end):
            mlflow.log_metric("data/rows", 8)
            if raised:
                raise raised("stopped")
    assert mlflow.active_run() is None
    run = MlflowClient(sqlite_uri).get_run(run_id)
    assert run.info.status == status
    assert run.data.metrics["data/rows"] == 8


def test_a_parent_run_reopened_without_ending_can_be_reopened_and_finished(sqlite_uri):
    run_id = tracking.start_parent_run("11", "PCSDFlow/11/start/1", {})
    for _ in range(2):  # preprocess, then its @retry
        with tracking.open_run(run_id, system_metrics=False, end=False):
            pass
    assert MlflowClient(sqlite_uri).get_run(run_id).info.status == "RUNNING"
    tracking.finish_run(run_id)
    assert MlflowClient(sqlite_uri).get_run(run_id).info.status == "FINISHED"


def test_mark_failed_ends_only_a_running_run(sqlite_uri):
    running = tracking.start_parent_run("12", "PCSDFlow/12/start/1", {})
    finished = tracking.start_parent_run("13", "PCSDFlow/13/start/1", {})
    tracking.finish_run(finished)
    assert tracking.mark_failed(running, "KILLED") is True
    assert tracking.mark_failed(finished) is False
    client = MlflowClient(sqlite_uri)
    assert (client.get_run(running).info.status, client.get_run(finished).info.status) == ("KILLED", "FINISHED")
    with pytest.raises(ValueError, match="mark_failed status"):
        tracking.mark_failed(running, "FINISHED")
