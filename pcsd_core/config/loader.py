"""The config loader: the one place that reads YAML presets, sweep grids and `key=value` overrides, and turns
their text into typed values (each value is coerced once, here; `PCSDConfig` only checks).

- `load_preset(path)` reads a YAML preset of `configs/` into a `Preset`: its config sections and its optional
  `sweep:` grid (`parse_sweep`), validated before any work. The flow (through its Metaflow `Config` parser),
  the engine CLI and `load_config` all load presets through it.
- `parse_overrides(["train.lr=1e-5", ...])` (or one shell-like string) parses `key=value` overrides; the engine
  CLI's `--set` and the flow's `--set` both use it.

    from pcsd_core.config.loader import load_config, load_preset, parse_overrides
    cfg = load_config("configs/cpu_smollm2.yaml", {"train.lr": 1e-5})
    preset = load_preset("configs/sweep_cpu_smollm2.yaml")    # preset.sweep == {"train.lr": [...], ...}
    cfg = preset.config(parse_overrides("train.lr=3e-5 rollout.n=4"))
"""

from __future__ import annotations

import dataclasses
import json
import math
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_type_hints

import yaml

from pcsd_core.config.schema import PCSDConfig
from pcsd_core.errors import ConfigError, InputNotFoundError, require

def read_preset_yaml(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML preset file as plain dicts (see `read_preset_text`); the file must be UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise InputNotFoundError(f"config file {path} does not exist; presets live in configs/.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ConfigError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from None
    return read_preset_text(text, where=str(path))


def read_preset_text(text: str, where: str = "config preset") -> dict[str, Any]:
    """The sections of a preset's YAML text as plain dicts, with YAML and shape errors as clear ValueErrors.

    A syntax error names `where` (the file) and the line; the top level and every section must be mappings (an
    empty section is an empty dict). Which sections and keys are valid is the loader's business, not this one's.
    """
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as error:
        mark = getattr(error, "problem_mark", None)
        line = f"line {mark.line + 1}, column {mark.column + 1}" if mark else "an unknown line"
        problem = getattr(error, "problem", None) or str(error)
        raise ConfigError(f"{where}: YAML syntax error at {line}: {problem}. Fix the YAML (indentation, quotes, "
                         "a missing ':').") from None
    if raw is None:
        return {}
    require(isinstance(raw, dict), f"{where}: the top level must be a mapping of sections (model:, train:, ...), "
             f"got a {type(raw).__name__}.")
    sections = {}
    for name, values in raw.items():
        require(
            values is None or isinstance(values, dict),
            f"{where}: section {name!r} must be a mapping of 'key: value' lines, got a {type(values).__name__} "
            f"({repr(values)[:60]}); indent its keys under '{name}:'.",
        )
        sections[name] = dict(values or {})
    return sections


SWEEP_KEY = "sweep"  # a preset's optional top-level sweep grid (not a PCSDConfig section)
# A preset's optional top-level machine sizes for the flow's distill and evaluate tasks: Metaflow's @resources
# (CPUs, memory in MB, GPUs), which `--with kubernetes` / `--with batch` turn into requests. Not a PCSDConfig
# section: the engine never reads it. Fields left out are derived from the config by the flow.
RESOURCES_KEY = "resources"
RESOURCE_STEPS = ("distill", "evaluate")
RESOURCE_FIELDS = ("cpu", "memory", "gpu")


@dataclass(frozen=True)
class Preset:
    """A YAML preset: the config sections, the optional sweep grid (dotted key -> list of values) and the
    optional task resources (step -> {cpu, memory, gpu}, only the fields given)."""

    sections: dict[str, Any]
    sweep: dict[str, list[Any]]
    resources: dict[str, dict[str, int]] = field(default_factory=dict)
    base: PCSDConfig | None = None  # the sections (with the load's overrides) as a config, built once at load

    def config(self, overrides: dict[str, Any] | None = None) -> PCSDConfig:
        """The loaded config; with `overrides`, a new one built from the sections and them."""
        return config_from_dict(self.sections, overrides) if overrides else self.base


def load_config(path: str | Path, overrides: dict[str, Any] | None = None) -> PCSDConfig:
    """The config of the preset at `path` with dotted-key `overrides` (its `sweep:` grid belongs to the flow)."""
    return load_preset(path, overrides).base


def load_preset(source: str | Path | Any, overrides: dict[str, Any] | None = None) -> Preset:
    """Read and validate a preset: a YAML file path, or the already parsed YAML (bad presets fail here). Its
    config is built once, with `overrides` applied (`preset.base`)."""
    if isinstance(source, (str, Path)):
        raw = read_preset_yaml(source)
    else:
        raw = _plain(source)
        require(isinstance(raw, dict), f"config preset: the top level must be a mapping of sections, got "
                 f"{type(raw).__name__}.")
    sections = {key: value for key, value in raw.items() if key not in (SWEEP_KEY, RESOURCES_KEY)}
    sweep, resources = parse_sweep(raw.get(SWEEP_KEY)), parse_resources(raw.get(RESOURCES_KEY))
    return Preset(sections=sections, sweep=sweep, resources=resources, base=config_from_dict(sections, overrides))


def parse_resources(spec: Mapping[str, Any] | None) -> dict[str, dict[str, int]]:
    """A preset's `resources:` section, e.g. {"distill": {"gpu": 8, "memory": 500000}}, checked field by field."""
    if spec is None:
        return {}
    example = "resources: {distill: {cpu: 32, memory: 240000, gpu: 8}, evaluate: {gpu: 4}}"
    require(isinstance(spec, Mapping), f"resources must map steps to sizes, e.g. {example}; got {spec!r}.")
    resources: dict[str, dict[str, int]] = {}
    for step, sizes in spec.items():
        require(step in RESOURCE_STEPS, f"resources.{step}: unknown step; sized steps are {list(RESOURCE_STEPS)}.")
        require(isinstance(sizes, Mapping), f"resources.{step} must map {list(RESOURCE_FIELDS)} to whole numbers, "
                 f"got {sizes!r}.")
        for name, value in sizes.items():
            require(name in RESOURCE_FIELDS, f"resources.{step}.{name}: unknown field; use {list(RESOURCE_FIELDS)} "
                     "(memory in MB).")
            require(isinstance(value, int) and not isinstance(value, bool) and value >= (0 if name == "gpu" else 1),
                     f"resources.{step}.{name} ({value!r}) must be a whole number >= {0 if name == 'gpu' else 1}.")
        resources[step] = dict(sizes)
    return resources


def parse_sweep(spec: str | Mapping[str, Any] | None) -> dict[str, list[Any]]:
    """A sweep grid from JSON text or a mapping; empty/None means no sweep. Keys look like 'train.lr'."""
    if spec is None or (isinstance(spec, str) and not spec.strip()):
        return {}
    if isinstance(spec, str):
        try:
            spec = json.loads(spec)
        except json.JSONDecodeError as error:
            raise ConfigError(
                f"--sweep {spec!r} is not valid JSON ({error.msg}); write e.g. "
                '\'{"train.lr": [1e-5, 3e-5], "loss.divergence": ["forward_kl", "jsd"]}\'.'
            ) from None
    require(isinstance(spec, Mapping), f"sweep must map config keys to lists of values, got {type(spec).__name__}: {spec!r}.")
    grid: dict[str, list[Any]] = {}
    for key, values in spec.items():
        require(isinstance(key, str) and key.count(".") == 1,
                 f"sweep key {key!r} must look like 'section.field', e.g. 'train.lr'.")
        require(isinstance(values, list) and bool(values),
                 f"sweep values for {key!r} must be a non-empty list, got {values!r}; write [{values!r}].")
        grid[key] = list(values)
    return grid


def parse_overrides(items: str | list[str]) -> dict[str, Any]:
    """`key=value` overrides -> {dotted key: value}. A string is split like a shell command line.

    Values are YAML scalars (`1e-5`, `true`, `8`), anything else stays text; the config's coercion checks
    them against the field types, so `train.lr=1e-5` (which YAML reads as a string) still becomes a float.
    """
    if isinstance(items, str):
        items = shlex.split(items)
    overrides: dict[str, Any] = {}
    for item in items:
        key, sep, value = item.partition("=")
        require(bool(sep) and key.count(".") == 1,
                 f"override {item!r} must look like section.field=value, e.g. train.lr=1e-5.")
        overrides[key.strip()] = _scalar(value)
    return overrides


def _scalar(text: str) -> Any:
    """A YAML scalar (`8`, `true`, `1.0e-5`); text that is not one (`{question} ...`, `a: b`) stays text."""
    try:
        value = yaml.safe_load(text) if text else ""
    except yaml.YAMLError:
        return text
    return text if isinstance(value, (dict, list)) else value


def _plain(value: Any) -> Any:
    """Read-only mappings (Metaflow's ConfigValue) as plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


# ---- text -> typed sections ----------------------------------------------------------------------


def config_from_dict(raw: dict[str, Any] | None, overrides: dict[str, Any] | None = None) -> PCSDConfig:
    """Build from nested sections; `overrides` uses dotted keys ("train.lr": 1e-5). The one place a config is
    built from text (a test asserts one build per task); later changes go through `replace_fields`."""
    raw = {section: dict(values or {}) for section, values in (raw or {}).items()}
    for dotted, value in (overrides or {}).items():
        section, _, key = dotted.partition(".")
        require(bool(key), f"override key {dotted!r} must look like 'section.field', e.g. 'train.lr'.")
        raw.setdefault(section, {})[key] = value
    sections = {f.name: f for f in dataclasses.fields(PCSDConfig)}
    unknown = sorted(set(raw) - set(sections))
    require(not unknown, f"unknown config section(s) {unknown}; valid sections: {sorted(sections)}.")
    hints = get_type_hints(PCSDConfig)
    built = {name: _build_section(hints[name], name, raw.get(name, {})) for name in sections}
    return PCSDConfig(**built)


def replace_fields(config: PCSDConfig, values: Mapping[str, Any]) -> PCSDConfig:
    """`config` with dotted-key `values` replaced (`dataclasses.replace`: every rule is checked again, nothing else
    is rebuilt). Values may be text (a sweep point, an environment variable); each is typed against its field."""
    by_section: dict[str, dict[str, Any]] = {}
    for dotted, value in values.items():
        section, _, key = dotted.partition(".")
        require(bool(key), f"override key {dotted!r} must look like 'section.field', e.g. 'train.lr'.")
        section_cls = type(getattr(config, section, None))
        require(dataclasses.is_dataclass(section_cls), f"unknown config section {section!r} in {dotted!r}; valid "
                 f"sections: {sorted(f.name for f in dataclasses.fields(PCSDConfig))}.")
        hints = get_type_hints(section_cls)
        require(key in hints, f"unknown key {key!r} in config section '{section}'; valid keys: {sorted(hints)}.")
        by_section.setdefault(section, {})[key] = _coerce(dotted, hints[key], value)
    return dataclasses.replace(config, **{section: dataclasses.replace(getattr(config, section), **changes)
                                          for section, changes in by_section.items()})


def _build_section(section_cls: type, section_name: str, values: dict[str, Any]) -> Any:
    fields = {f.name: f for f in dataclasses.fields(section_cls)}
    unknown = sorted(set(values) - set(fields))
    require(not unknown, f"unknown key(s) {unknown} in config section '{section_name}'; valid keys: {sorted(fields)}.")
    hints = get_type_hints(section_cls)
    coerced = {key: _coerce(f"{section_name}.{key}", hints[key], value) for key, value in values.items()}
    return section_cls(**coerced)


def _coerce(name: str, annotation: Any, value: Any) -> Any:
    """Check a YAML/CLI value against the field's type and return it typed.

    Ints stay ints: a float (2.0) or a decimal string ("2.0") for an int field is refused rather than silently
    truncated. A float field takes ints and numeric strings ("1e-5": YAML reads it as a string). Floats must be
    finite: inf and nan are refused for every float field.
    """
    choices = get_args(annotation) if getattr(annotation, "__origin__", None) is Literal else None
    if choices:
        require(value in choices, f"{name} ({value!r}) must be one of {list(choices)}.")
        return value
    if annotation is bool:
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0"):
            return value.lower() in ("true", "1")
        require(isinstance(value, bool), f"{name} ({value!r}) must be true or false.")
        return value
    if annotation is int:
        return _coerce_int(name, value)
    if annotation is float:
        return _coerce_float(name, value)
    if annotation is str:
        require(isinstance(value, str), f"{name} ({value!r}) must be a string.")
    return value


def _coerce_int(name: str, value: Any) -> int:
    if isinstance(value, str):
        try:
            return int(value.strip())
        except ValueError:
            pass
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    whole = isinstance(value, float) and value.is_integer()
    if not whole and isinstance(value, str):
        try:
            whole, value = float(value).is_integer(), float(value)
        except ValueError:
            raise ConfigError(f"{name} ({value!r}) must be a whole number.") from None
    fix = f"; write {int(value)}" if whole else ""
    raise ConfigError(f"{name} ({value!r}) must be a whole number, written without a decimal point or exponent{fix}.")


def _coerce_float(name: str, value: Any) -> float:
    if isinstance(value, str):
        try:
            value = float(value)
        except ValueError:
            raise ConfigError(f"{name} ({value!r}) must be a number.") from None
    require(isinstance(value, (int, float)) and not isinstance(value, bool), f"{name} ({value!r}) must be a number.")
    require(math.isfinite(value), f"{name} ({value!r}) must be a finite number (inf and nan are not allowed).")
    return float(value)
