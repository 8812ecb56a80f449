"""Small MLflow helpers shared by the steps: where runs go, how they nest, what they are tagged with, and how
writes survive a tracking store that is down, far away or busy.

Layout (DESIGN.md "Tracking contract"): one parent run per flow run, named `pcsd-<flow run id>`, and one
nested child run per sweep branch, named after the branch label. Runs are created and reopened by id, so
every Metaflow task (a separate process, possibly another working directory) logs into the same runs.

Names (tags, metrics, the default store `sqlite:///<repo>/mlflow.db`) come from the tracking contract,
`steps.contract`, which the dashboards read by too.

Reliability (issue 16):
- `check_tracking_server` probes an http(s) tracking URI in seconds, so a server that is not there fails the
  start step with one line instead of after MLflow's ~4 minutes of HTTP retries.
- `client()` retries a call that SQLite refused with `database is locked` (parallel sweep branches share one
  SQLite file), with bounded, jittered backoff, and creates a new SQLite store's schema under a file lock:
  MLflow's migrations are not safe from several processes at once.
- `MetricLogger` keeps the metrics it could not send, warns once, and sends them on its next call or `flush`,
  so a server that goes down mid-run costs no training step and no metric.
- `open_run(run_id, end=False)` reopens a run without ending it: the parent run stays RUNNING until the end
  step; a body that raises leaves it FAILED, an interrupt leaves it KILLED.
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import functools
import hashlib
import logging
import os
import random
import tempfile
import time
import urllib.error
import urllib.request
import weakref
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import mlflow
from mlflow.entities import Metric, Param
from mlflow.exceptions import MlflowException
from mlflow.tracking import MlflowClient

from pcsd_core.errors import UserInputError
from steps.contract import (DEFAULT_EXPERIMENT, TAG_BRANCH, TAG_FLOW_RUN_ID, TAG_PARENT_RUN,
                                         TAG_PATHSPEC, TAG_RUN_NAME, default_tracking_uri, tracking_uri)

logger = logging.getLogger(__name__)

MAX_PARAM_CHARS = 6000  # MLflow rejects longer param values
MAX_METRICS_PER_BATCH = 1000  # MLflow's log_batch limit
PROBE_TIMEOUT_S = 3.0
# While the metric logger sends, MLflow's own HTTP retries (7, ~4 minutes) would stall training at every step
# of an outage; its buffer is the retry policy instead, so one quick try per call.
LOGGER_HTTP_ENV = {"MLFLOW_HTTP_REQUEST_MAX_RETRIES": "0", "MLFLOW_HTTP_REQUEST_TIMEOUT": "5"}
LOCKED_MARKERS = ("database is locked", "database table is locked")
LOCK_RETRY_ATTEMPTS = 8
LOCK_RETRY_FIRST_DELAY_S = 0.05
LOCK_RETRY_MAX_DELAY_S = 2.0
# Errors that no retry can fix (a bad value, a deleted run): raised, never buffered.
PERMANENT_ERROR_CODES = frozenset({"INVALID_PARAMETER_VALUE", "RESOURCE_DOES_NOT_EXIST", "INVALID_STATE",
                                   "BAD_REQUEST", "PERMISSION_DENIED", "UNAUTHENTICATED"})
OUTAGE_RETRY_INTERVAL_S = 10.0  # during an outage a step only buffers; a resend is tried this often


class TrackingServerUnreachableError(UserInputError, ConnectionError):
    """The http(s) tracking server named by MLFLOW_TRACKING_URI did not answer; the message says how to fix it."""


# ---- fail fast at start -------------------------------------------------------------------------------
def check_tracking_server(uri: str | None = None, timeout_s: float = PROBE_TIMEOUT_S) -> None:
    """Raise `TrackingServerUnreachableError` (one line) unless an http(s) tracking server answers within
    `timeout_s`. Any HTTP answer counts (a proxy may 404 on /health); only no answer fails. Local stores
    (sqlite, file) are not probed."""
    uri = uri or tracking_uri()
    if not uri.startswith(("http://", "https://")):
        return
    try:
        with urllib.request.urlopen(f"{uri.rstrip('/')}/health", timeout=timeout_s):
            return
    except urllib.error.HTTPError:
        return  # the server answered
    except (OSError, ValueError) as error:  # URLError, refused, timeout, bad host
        reason = getattr(error, "reason", error)
        raise TrackingServerUnreachableError(
            f"MLflow tracking server {uri} (MLFLOW_TRACKING_URI) is unreachable ({reason}; probe timeout "
            f"{timeout_s:g}s); start it (mlflow server --host <host> --port <port>) or unset MLFLOW_TRACKING_URI to use the local "
            f"SQLite store {default_tracking_uri()}."
        ) from None


# ---- SQLite lock contention ---------------------------------------------------------------------------
def is_locked_error(error: BaseException) -> bool:
    return any(marker in str(error) for marker in LOCKED_MARKERS)


def retry_when_locked(call: Callable[..., Any], *args: Any, **kwargs: Any) -> Any:
    """`call(*args, **kwargs)`, retried with jittered exponential backoff while the store says `database is
    locked`. A refused SQLite transaction is rolled back, so retrying it never writes twice."""
    for attempt in range(LOCK_RETRY_ATTEMPTS):
        try:
            return call(*args, **kwargs)
        except Exception as error:
            if not is_locked_error(error) or attempt == LOCK_RETRY_ATTEMPTS - 1:
                raise
            delay_s = min(LOCK_RETRY_FIRST_DELAY_S * 2**attempt, LOCK_RETRY_MAX_DELAY_S)
            time.sleep(delay_s * random.uniform(0.5, 1.5))
    raise AssertionError("unreachable")


class LockRetryingClient:
    """An `MlflowClient` whose every method goes through `retry_when_locked`."""

    def __init__(self, inner: MlflowClient):
        self._inner = inner

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self._inner, name)
        if not callable(attribute):
            return attribute
        return functools.partial(retry_when_locked, attribute)


_READY_STORES: set[str] = set()


def ensure_sqlite_store(uri: str) -> None:
    """Create a SQLite store's tables once per process, one process at a time. MLflow migrates a new store on
    first use; four processes doing it at once on a fresh file lost three runs to `duplicate column name`."""
    path = uri.removeprefix("sqlite:///")
    if not uri.startswith("sqlite:///") or path in ("", ":memory:") or uri in _READY_STORES:
        return
    lock_name = hashlib.sha1(os.path.abspath(path).encode()).hexdigest()[:16]
    with open(os.path.join(tempfile.gettempdir(), f"pcsd-mlflow-{lock_name}.lock"), "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        retry_when_locked(MlflowClient(uri).search_experiments, max_results=1)
    _READY_STORES.add(uri)


def setup_tracking(experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Point MLflow at the tracking store and experiment; return the experiment id."""
    ensure_sqlite_store(tracking_uri())
    mlflow.set_tracking_uri(tracking_uri())
    found = retry_when_locked(mlflow.set_experiment, os.environ.get("MLFLOW_EXPERIMENT_NAME", experiment))
    return found.experiment_id


def client() -> MlflowClient:
    """The tracking store's client; calls refused by a locked SQLite file are retried."""
    ensure_sqlite_store(tracking_uri())
    return LockRetryingClient(MlflowClient(tracking_uri=tracking_uri()))  # type: ignore[return-value]


def flatten_params(params: dict[str, Any]) -> dict[str, str]:
    """MLflow params are strings of bounded length; None becomes "" and long values are cut."""
    return {key: ("" if value is None else str(value))[:MAX_PARAM_CHARS] for key, value in params.items()}


# ---- runs ---------------------------------------------------------------------------------------------
def start_parent_run(flow_run_id: str, pathspec: str, params: dict[str, Any], experiment: str = DEFAULT_EXPERIMENT) -> str:
    """Create the flow run's parent run (left RUNNING until `finish_run`); return its id.
    Fails in seconds when an http(s) tracking server is not there."""
    check_tracking_server()
    experiment_id = setup_tracking(experiment)
    tags = {TAG_FLOW_RUN_ID: str(flow_run_id), TAG_PATHSPEC: pathspec, TAG_RUN_NAME: f"pcsd-{flow_run_id}"}
    run = client().create_run(experiment_id, run_name=f"pcsd-{flow_run_id}", tags=tags)
    _log_params(run.info.run_id, params)
    return run.info.run_id


def start_child_run(parent_run_id: str, label: str, flow_run_id: str, pathspec: str, params: dict[str, Any]) -> str:
    """The nested run of one sweep branch under `parent_run_id`: created, or on a retried task the first attempt's
    run, so a branch keeps one run and one metric history whatever its retries."""
    store = client()
    parent = store.get_run(parent_run_id)
    tags = {
        TAG_PARENT_RUN: parent_run_id,
        TAG_BRANCH: label,
        TAG_FLOW_RUN_ID: str(flow_run_id),
        TAG_PATHSPEC: pathspec,
    }
    siblings = store.search_runs([parent.info.experiment_id], f"tags.`{TAG_PARENT_RUN}` = '{parent_run_id}'")
    earlier = [run for run in siblings
               if run.data.tags.get(TAG_BRANCH) == label and run.data.tags.get(TAG_FLOW_RUN_ID) == str(flow_run_id)]
    if earlier:
        run_id = earlier[0].info.run_id
        store.set_tag(run_id, TAG_PATHSPEC, pathspec)
        return run_id
    run = store.create_run(parent.info.experiment_id, run_name=label, tags=tags)
    _log_params(run.info.run_id, params)
    return run.info.run_id


def last_logged_step(run_id: str, metric: str) -> int | None:
    """The highest step at which `metric` was logged to `run_id` (None when never)."""
    return max((m.step for m in client().get_metric_history(run_id, metric)), default=None)


def logged_rows(run_id: str, metrics: Iterable[str], up_to_step: int) -> list[dict[str, float]]:
    """`metrics` as logged to `run_id` at steps 1..up_to_step, one row per step (empty where none was logged)."""
    rows: list[dict[str, float]] = [{} for _ in range(up_to_step)]
    for name in metrics:
        for metric in client().get_metric_history(run_id, name):
            if 1 <= metric.step <= up_to_step:
                rows[metric.step - 1][name] = metric.value
    return rows


@contextlib.contextmanager
def open_run(run_id: str, system_metrics: bool = True, end: bool = True) -> Iterator[mlflow.ActiveRun]:
    """Reopen a run by id as the active run (system metrics sampled meanwhile).

    On a normal exit the run ends FINISHED, or with `end=False` stays RUNNING (the parent run, which only the
    end step finishes; MLflow records a provisional end time that `finish_run` overwrites). A body that raises
    leaves the run FAILED; KeyboardInterrupt or SystemExit leaves it KILLED."""
    mlflow.set_tracking_uri(tracking_uri())
    # The run's own experiment must be the active one, or MLflow refuses to reopen it.
    experiment_id = client().get_run(run_id).info.experiment_id
    retry_when_locked(mlflow.set_experiment, experiment_id=experiment_id)
    run = retry_when_locked(mlflow.start_run, run_id=run_id, log_system_metrics=system_metrics and _has_psutil())
    try:
        yield run
    except BaseException as error:
        # An error in the body failed the run; an interrupt (Ctrl-C, a stop turned into SystemExit) killed it.
        status = "FAILED" if isinstance(error, Exception) else "KILLED"
        try:
            retry_when_locked(mlflow.end_run, status=status)
        except Exception:  # the interrupted client may be unusable; a fresh one still records the outcome
            with contextlib.suppress(Exception):
                MlflowClient(tracking_uri=tracking_uri()).set_terminated(run_id, status=status)
        raise
    retry_when_locked(mlflow.end_run, status="FINISHED" if end else "RUNNING")


def finish_run(run_id: str, status: str = "FINISHED") -> None:
    client().set_terminated(run_id, status=status)


def set_run_status(run_id: str, status: str) -> None:
    """RUNNING again (a retried step reopens the parent run), or ended as FINISHED / FAILED / KILLED."""
    if status == "RUNNING":
        client().update_run(run_id, status="RUNNING")
    else:
        finish_run(run_id, status)


def mark_failed(run_id: str, status: str = "FAILED") -> bool:
    """End `run_id` as `status` (FAILED or KILLED) if it is still RUNNING; True if it was. For failure and
    interrupt handlers: a run that already ended keeps its status."""
    if status not in ("FAILED", "KILLED"):
        raise ValueError(f"mark_failed status ({status!r}) must be 'FAILED' or 'KILLED'; use finish_run otherwise.")
    if client().get_run(run_id).info.status != "RUNNING":
        return False
    finish_run(run_id, status)
    return True


# ---- metrics that survive an outage -------------------------------------------------------------------
class MetricLogger:
    """The Distiller's `log_metrics(metrics, step)` for `run_id`, one batch per call.

    When the store cannot take a batch (server down, connection refused, timeout), the metrics are kept with
    their original timestamps, one warning is logged, and they are sent with a later batch (tried at most every
    OUTAGE_RETRY_INTERVAL_S, so a slow-to-refuse server cannot stall each step), at `flush()` or at exit.
    Resending a batch the server did store is harmless: MLflow skips a metric identical in key, value, step
    and timestamp. Errors no retry can fix (a bad value, a deleted run) are raised."""

    def __init__(self, run_id: str, after_step: int | None = None):
        self.run_id = run_id
        self.after_step = after_step  # steps up to this one are already in the run (a retried task's first attempt)
        self.pending: list[Metric] = []  # a run's whole history fits in memory (~10 metrics a step)
        self._client = client()
        self._outage_since: float | None = None
        self._last_try = 0.0
        _LOGGERS.add(self)

    def __call__(self, metrics: dict[str, float], step: int) -> None:
        if self.after_step is not None and step <= self.after_step:
            return
        timestamp_ms = int(time.time() * 1000)
        self.pending += [Metric(key, float(value), timestamp_ms, int(step)) for key, value in metrics.items()]
        if self._outage_since is None or time.monotonic() - self._last_try >= OUTAGE_RETRY_INTERVAL_S:
            self.flush()

    def flush(self) -> bool:
        """Send every pending metric, oldest first; True when none is left."""
        self._last_try = time.monotonic()
        with _http_env(LOGGER_HTTP_ENV):
            while self.pending:
                batch = self.pending[:MAX_METRICS_PER_BATCH]
                try:
                    self._client.log_batch(self.run_id, metrics=batch)
                except Exception as error:
                    if _is_permanent(error):
                        raise
                    self._warn_outage(error)
                    return False
                del self.pending[: len(batch)]
        if self._outage_since is not None:
            logger.warning("MLflow tracking store %s is back after %.0fs; buffered metrics sent for run %s.",
                           tracking_uri(), time.monotonic() - self._outage_since, self.run_id)
            self._outage_since = None
        return True

    def _warn_outage(self, error: Exception) -> None:
        if self._outage_since is None:  # one warning per outage, not one per step
            self._outage_since = time.monotonic()
            logger.warning("MLflow tracking store %s is unreachable (%s); training continues and metrics of run %s "
                           "are buffered and resent once it is back.", tracking_uri(),
                           str(error).splitlines()[0][:200], self.run_id)


_LOGGERS: weakref.WeakSet[MetricLogger] = weakref.WeakSet()


@atexit.register
def _flush_at_exit() -> None:
    for metric_logger_ in list(_LOGGERS):
        with contextlib.suppress(Exception):
            if not metric_logger_.flush():
                logger.warning("%d metrics of run %s could not be sent to %s before exit and are lost.",
                               len(metric_logger_.pending), metric_logger_.run_id, tracking_uri())


def metric_logger(run_id: str, after_step: int | None = None) -> MetricLogger:
    """A `log_metrics(metrics, step)` callable for the Distiller that writes to `run_id` (see `MetricLogger`);
    steps up to `after_step` are dropped."""
    return MetricLogger(run_id, after_step)


def log_metrics(run_id: str, metrics: dict[str, float], step: int | None = None) -> None:
    metric_logger(run_id)(metrics, 0 if step is None else step)


def _is_permanent(error: Exception) -> bool:
    return isinstance(error, MlflowException) and error.error_code in PERMANENT_ERROR_CODES


@contextlib.contextmanager
def _http_env(values: dict[str, str]) -> Iterator[None]:
    """Set environment variables for the block (MLflow reads its HTTP settings per request), then restore."""
    saved = {key: os.environ.get(key) for key in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def _log_params(run_id: str, params: dict[str, Any]) -> None:
    flat = flatten_params(params)
    items = list(flat.items())
    for start in range(0, len(items), 100):  # MLflow takes at most 100 params per batch
        client().log_batch(run_id, params=[Param(k, v) for k, v in items[start : start + 100]])


def _has_psutil() -> bool:
    try:
        import psutil  # noqa: F401  (system metrics need it)
    except ImportError:
        return False
    return True
