"""What every flow step runs inside: one clear line for the user's mistakes, and a parent run that tells the truth.

    with guarded_step("preprocess", self.mlflow_run_id):
        ...

- **User errors in one line.** A bad config value, a data file that breaks a rule, an unknown model, an
  unreachable hub or tracking server (`steps/errors.py`: a `UserInputError`): the step prints `error: <message>` (the message names the field or file and
  the fix) and exits with Metaflow's "do not retry" code, since no retry can fix the input. The full traceback
  goes to a log file whose path the line gives, not to the terminal.
- **Run state.** The flow's parent MLflow run stays RUNNING from the start step to the end step. A step that fails
  marks it FAILED; a step stopped by Ctrl-C or SIGTERM marks it KILLED.
- **No orphans.** Each task asks the kernel for SIGTERM when the Metaflow runtime that started it dies (Linux
  `PR_SET_PDEATHSIG`), and turns SIGTERM into KeyboardInterrupt, so `finally:` blocks run: Ray workers and
  rollout engines are shut down (`Distiller.close`) before the task exits.

Kept beside the flow: it uses Metaflow's exit code; `steps/` stays free of Metaflow.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import tempfile
import threading
import time
import traceback
from collections.abc import Iterator
from pathlib import Path

from metaflow.exception import METAFLOW_EXIT_DISALLOW_RETRY

from steps.errors import USER_ERRORS, save_traceback

_PR_SET_PDEATHSIG = 1
# After a stop, the cleanup gets this long; then the task marks its runs KILLED and exits anyway (a library that
# swallows the KeyboardInterrupt, or a wait that never returns, must not keep it alive).
STOP_GRACE_S = 30.0
_parent_run = {"id": ""}  # the flow's parent MLflow run, for the stop watchdog


@contextlib.contextmanager
def guarded_step(step_name: str, parent_run_id: str = "", *, branch: bool = False) -> Iterator[None]:
    """Run a step's body with one-line user errors, truthful parent-run state and orphan protection.

    `branch=True` for the foreach steps under `@catch`: a failed branch is the join's business, not the flow's,
    so its errors go to `@catch` unchanged and the parent run stays RUNNING.
    """
    _die_with_the_runtime()
    _parent_run["id"] = parent_run_id
    previous = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    if parent_run_id and not branch:
        _mark_run(parent_run_id, "RUNNING")  # a retry of a failed step runs again
    try:
        yield
    except KeyboardInterrupt:
        _mark_run(parent_run_id, "KILLED")
        print(f"error: the {step_name} step was stopped (Ctrl-C or SIGTERM); the parent MLflow run is marked KILLED.",
              file=sys.stderr, flush=True)
        sys.exit(METAFLOW_EXIT_DISALLOW_RETRY)
    except USER_ERRORS as error:
        if branch:
            raise
        _mark_run(parent_run_id, "FAILED")
        log = save_traceback(step_name)
        print(f"error: {error}\n       (the {step_name} step stopped; a retry cannot fix this, so none is made; "
              f"traceback: {log})", file=sys.stderr, flush=True)
        sys.exit(METAFLOW_EXIT_DISALLOW_RETRY)
    except BaseException:
        if not branch:
            _mark_run(parent_run_id, "FAILED")  # a retry that succeeds sets it RUNNING again
        raise
    finally:
        signal.signal(signal.SIGTERM, previous)


def _raise_keyboard_interrupt(signum, frame) -> None:
    # One stop is enough: a second SIGTERM must not cut the cleanup short, which would leave runs RUNNING and Ray
    # up. The watchdog bounds the cleanup; SIGKILL still ends the task at once.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    _start_stop_watchdog()
    raise KeyboardInterrupt(f"signal {signum}")


def _start_stop_watchdog() -> None:
    """In STOP_GRACE_S, mark this task's runs KILLED (if still RUNNING) and exit, whatever the main thread does."""
    import mlflow

    active = mlflow.active_run()  # a branch's child run, when the stop came inside it
    run_ids = [run_id for run_id in (active.info.run_id if active else "", _parent_run["id"]) if run_id]

    def stop_for_good() -> None:
        time.sleep(STOP_GRACE_S)
        for run_id in run_ids:
            _mark_run(run_id, "KILLED")
        os._exit(METAFLOW_EXIT_DISALLOW_RETRY)

    threading.Thread(target=stop_for_good, name="pcsd-stop-watchdog", daemon=True).start()


def _die_with_the_runtime() -> None:
    """SIGTERM to this task when its parent (the Metaflow runtime) dies; Linux only, a no-op elsewhere."""
    if not sys.platform.startswith("linux"):
        return
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


def _mark_run(run_id: str, status: str) -> None:
    if not run_id:
        return
    try:
        from steps import tracking

        if status == "RUNNING":
            tracking.set_run_status(run_id, status)
        else:
            tracking.mark_failed(run_id, status)  # a run that already ended keeps its status
    except Exception as error:  # the tracking server may be the problem; the step's own error matters more
        print(f"warning: could not mark MLflow run {run_id} {status}: {error}", file=sys.stderr)
