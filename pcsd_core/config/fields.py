"""How a config section checks its own fields (the types the loader produced; text fields: paths, ids, names),
and the dtype names that two sections share.

Each section's `__post_init__` calls these before its own range and cross-field rules.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal, get_args, get_type_hints

from pcsd_core.errors import require

DTYPE_NAMES = ("float32", "bfloat16", "float16")  # parameter/compute dtypes; pcsd_core.models maps them to torch


def check_field_types(section: Any, section_name: str) -> None:
    """A section built directly in Python holds values of its fields' types (the loader already made them so).

    Text is never converted here (that happens once, in the loader); the one widening is an int for a float
    field (`grad_clip=1`), stored as the float it equals, as YAML's `1` would be.
    """
    hints = get_type_hints(type(section))
    for item in dataclasses.fields(section):
        value, annotation = getattr(section, item.name), hints[item.name]
        name = f"{section_name}.{item.name}"
        choices = get_args(annotation) if getattr(annotation, "__origin__", None) is Literal else None
        if choices:
            require(value in choices, f"{name} ({value!r}) must be one of {list(choices)}.")
        elif annotation is bool:
            require(isinstance(value, bool), f"{name} ({value!r}) must be true or false.")
        elif annotation is int:
            require(isinstance(value, int) and not isinstance(value, bool), f"{name} ({value!r}) must be a whole number.")
        elif annotation is float:
            require(isinstance(value, (int, float)) and not isinstance(value, bool) and value == value
                     and abs(value) != float("inf"), f"{name} ({value!r}) must be a finite number (inf and nan are "
                     "not allowed).")
            object.__setattr__(section, item.name, float(value))
        elif annotation is str:
            require(isinstance(value, str), f"{name} ({value!r}) must be a string.")


def require_text(name: str, value: str, *, allow_empty: bool = False) -> None:
    """A path, id or column name: not blank (unless empty is allowed), no surrounding spaces, no NUL byte."""
    if allow_empty and value == "":
        return
    require(value.strip() != "", f"{name} ({value!r}) must not be empty.")
    require(
        value == value.strip() and "\x00" not in value,
        f"{name} ({value!r}) has surrounding whitespace or a NUL byte; remove it (a stray space from copy-paste?).",
    )
