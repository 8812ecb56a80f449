"""Presets and overrides: the one place that reads YAML presets, sweep grids and `key=value` overrides.

- `load_preset(path)` reads a YAML preset of `configs/` into a `Preset`: its config sections and its optional
  `sweep:` grid (`parse_sweep`), validated before any work. The flow (through its Metaflow `Config` parser),
  the engine CLI and `PCSDConfig.from_yaml` all load presets through it.
- `parse_overrides(["train.lr=1e-5", ...])` (or one shell-like string) parses `key=value` overrides; the engine
  CLI's `--set` and the flow's `--set` both use it.

    from pcsd_core.presets import load_preset, parse_overrides
    preset = load_preset("configs/sweep_cpu_smollm2.yaml")    # preset.sweep == {"train.lr": [...], ...}
    cfg = preset.config(parse_overrides("train.lr=3e-5 rollout.n=4"))
"""

from __future__ import annotations

import json
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pcsd_core.config import PCSDConfig, _require

def read_preset_yaml(path: str | Path) -> dict[str, Any]:
    """The sections of a YAML preset file as plain dicts (see `read_preset_text`); the file must be UTF-8."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"config file {path} does not exist; presets live in configs/.")
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text (byte {error.start}); save it as UTF-8.") from None
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
        raise ValueError(f"{where}: YAML syntax error at {line}: {problem}. Fix the YAML (indentation, quotes, "
                         "a missing ':').") from None
    if raw is None:
        return {}
    _require(isinstance(raw, dict), f"{where}: the top level must be a mapping of sections (model:, train:, ...), "
             f"got a {type(raw).__name__}.")
    sections = {}
    for name, values in raw.items():
        _require(
            values is None or isinstance(values, dict),
            f"{where}: section {name!r} must be a mapping of 'key: value' lines, got a {type(values).__name__} "
            f"({repr(values)[:60]}); indent its keys under '{name}:'.",
        )
        sections[name] = dict(values or {})
    return sections


SWEEP_KEY = "sweep"  # a preset's optional top-level sweep grid (not a PCSDConfig section)
# A preset's optional top-level machine sizes for the flow's distill and evaluate tasks: Metaflow's @resources
# (CPUs, memory in MB, GPUs), which `--with kubernetes` / `--with batch` turn into requests. Not a PCSDConfig
# section: the engine never reads it. Fields left out are derived from the config (steps/plan.py).
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

    def config(self, overrides: dict[str, Any] | None = None) -> PCSDConfig:
        return PCSDConfig.from_dict(self.sections, overrides)


def load_preset(source: str | Path | Any) -> Preset:
    """Read and validate a preset: a YAML file path, or the already parsed YAML (bad presets fail here)."""
    if isinstance(source, (str, Path)):
        raw = read_preset_yaml(source)
    else:
        raw = _plain(source)
        _require(isinstance(raw, dict), f"config preset: the top level must be a mapping of sections, got "
                 f"{type(raw).__name__}.")
    sections = {key: value for key, value in raw.items() if key not in (SWEEP_KEY, RESOURCES_KEY)}
    preset = Preset(sections=sections, sweep=parse_sweep(raw.get(SWEEP_KEY)),
                    resources=parse_resources(raw.get(RESOURCES_KEY)))
    preset.config()  # validate now, before any work
    return preset


def parse_resources(spec: Mapping[str, Any] | None) -> dict[str, dict[str, int]]:
    """A preset's `resources:` section, e.g. {"distill": {"gpu": 8, "memory": 500000}}, checked field by field."""
    if spec is None:
        return {}
    example = "resources: {distill: {cpu: 32, memory: 240000, gpu: 8}, evaluate: {gpu: 4}}"
    _require(isinstance(spec, Mapping), f"resources must map steps to sizes, e.g. {example}; got {spec!r}.")
    resources: dict[str, dict[str, int]] = {}
    for step, sizes in spec.items():
        _require(step in RESOURCE_STEPS, f"resources.{step}: unknown step; sized steps are {list(RESOURCE_STEPS)}.")
        _require(isinstance(sizes, Mapping), f"resources.{step} must map {list(RESOURCE_FIELDS)} to whole numbers, "
                 f"got {sizes!r}.")
        for name, value in sizes.items():
            _require(name in RESOURCE_FIELDS, f"resources.{step}.{name}: unknown field; use {list(RESOURCE_FIELDS)} "
                     "(memory in MB).")
            _require(isinstance(value, int) and not isinstance(value, bool) and value >= (0 if name == "gpu" else 1),
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
            raise ValueError(
                f"--sweep {spec!r} is not valid JSON ({error.msg}); write e.g. "
                '\'{"train.lr": [1e-5, 3e-5], "loss.divergence": ["forward_kl", "jsd"]}\'.'
            ) from None
    _require(isinstance(spec, Mapping), f"sweep must map config keys to lists of values, got {type(spec).__name__}: {spec!r}.")
    grid: dict[str, list[Any]] = {}
    for key, values in spec.items():
        _require(isinstance(key, str) and key.count(".") == 1,
                 f"sweep key {key!r} must look like 'section.field', e.g. 'train.lr'.")
        _require(isinstance(values, list) and bool(values),
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
        _require(bool(sep) and key.count(".") == 1,
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
