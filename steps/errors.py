"""How every entry point reports a user's mistake: one `error:` line with the fix, the traceback in a log file.

A user error is a `pcsd_core.errors.UserInputError` (bad config, data, model, hardware; an unreachable hub or
tracking server): a retry cannot fix it, the user can. Anything else is a bug or a passing fault, and keeps its
traceback (and, in the flow, its retries). The flow's guard (`flows/guard.py`) and the programs of `cli/` share it.
"""

from __future__ import annotations

import os
import sys
import tempfile
import traceback
from collections.abc import Callable
from pathlib import Path

from pcsd_core.errors import UserInputError

USER_ERRORS = (UserInputError,)
EXIT_USER_ERROR = 2  # a command-line program's exit code for a user error (argparse's, too)


def save_traceback(name: str) -> str:
    """Write the current exception's traceback to `$PCSD_LOG_DIR` (default: a temp folder); return the path."""
    folder = Path(os.environ.get("PCSD_LOG_DIR") or Path(tempfile.gettempdir()) / "pcsd-logs")
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}-{os.getpid()}.log"
    path.write_text(traceback.format_exc())
    return str(path)


def run_program(name: str, body: Callable[[], int]) -> int:
    """Run a command-line program's body; a user error becomes one `error:` line and exit code 2."""
    try:
        return body()
    except USER_ERRORS as error:
        log = save_traceback(name)
        print(f"error: {error}\n       (traceback: {log})", file=sys.stderr, flush=True)
        return EXIT_USER_ERROR
