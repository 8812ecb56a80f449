"""The errors that mean "fix your input or environment": a retry cannot fix them, the user can.

Everything else (a `ValueError` from a bug deep in torch, a broken pipe) is a bug or a passing fault: the flow
retries it and prints its traceback. Each class keeps the builtin base it had, so `except ValueError` still works.
"""

from __future__ import annotations

import re

_FIELD_AT_START = re.compile(r"([a-z_]+\.[a-z_]+) \(")


class UserInputError(Exception):
    """Base of the errors a user fixes: bad config, bad data, missing model or hardware, unreachable service."""


class ConfigError(UserInputError, ValueError):
    """A config value breaks a rule. `field` names it (`train.lr`), so callers and tests can tell which; by default
    the `section.field (value)` the message starts with."""

    def __init__(self, message: str, field: str = ""):
        super().__init__(message)
        match = _FIELD_AT_START.match(message)
        self.field = field or (match.group(1) if match else "")


class DataValidationError(UserInputError, ValueError):
    """The input dataset (or a prepared parquet) breaks a rule; the message names file, row and field."""


class InputNotFoundError(UserInputError, FileNotFoundError):
    """A file or folder the user named (data folder, train parquet, preset, checkpoint) does not exist."""


class ModelNotFoundError(UserInputError, FileNotFoundError):
    """A model name that is neither a known alias, a local checkpoint folder, nor (offline) in the hub cache."""


class HardwareError(UserInputError, OSError):
    """This machine lacks what the plan needs (GPUs, CUDA); one line, before any model is loaded."""


class HubUnreachableError(UserInputError, ConnectionError):
    """The Hugging Face hub cannot be reached, and something was to be downloaded from it."""


def require(condition: bool, message: str, field: str = "") -> None:
    """Raise `ConfigError(message, field)` unless `condition` holds."""
    if not condition:
        raise ConfigError(message, field)
