"""Plan a flow run: the resolved config and one branch per point of the sweep grid.

Where each setting comes from, highest first:

1. flow Parameters on the command line (`--model`, `--total-steps`, `--data-path`, `--lr`, `--sweep`);
2. the reference script's environment variables (`MODEL_PATH`, `DATA_PATH`, `TOTAL_STEPS`,
   `ACTOR_NUM_GPUS`, `ROLLOUT_NUM_GPUS`);
3. the YAML preset given with `--config config <file>` (default `configs/cpu_smollm2.yaml`).

A sweep is a grid of dotted config keys to lists of values, from `--sweep` (JSON) or the preset's `sweep:`
key, e.g. `{"train.lr": [1e-5, 3e-5], "loss.divergence": ["forward_kl", "jsd"]}` -> 4 branches. Every
branch's config is built and validated here, in the flow's first step, before any model is loaded.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from pcsd_core.config import PCSDConfig

# Reference script variable -> dotted config key.
ENV_OVERRIDES = {
    "MODEL_PATH": "model.name",
    "DATA_PATH": "data.path",
    "TOTAL_STEPS": "train.total_training_steps",
    "ACTOR_NUM_GPUS": "train.num_workers",
    "ROLLOUT_NUM_GPUS": "rollout.num_gpus",
}
SWEEP_KEY = "sweep"  # the preset's optional top-level sweep grid (not a PCSDConfig section)
HUB_DATA = "hub"  # `--data-path hub` loads the hub dataset even when DATA_PATH is set


@dataclass
class Branch:
    """One sweep point: its label, its overrides of the base config and the full resolved config."""

    label: str
    overrides: dict[str, Any]
    config: dict[str, dict[str, Any]]  # nested sections, as `PCSDConfig.to_dict()` returns
    # Filled by the preprocess step.
    train_path: str = ""
    test_path: str = ""
    data_stats: dict[str, Any] = field(default_factory=dict)

    def pcsd_config(self) -> PCSDConfig:
        return PCSDConfig.from_dict(self.config)

    @property
    def data_key(self) -> str:
        """Branches with the same data section share one preprocessed dataset."""
        return _digest(self.config["data"])

    @property
    def baseline_key(self) -> str:
        """Branches with the same model, data and eval settings share one base-model evaluation."""
        return _digest({"model": self.config["model"], "data": self.config["data"], "eval": self.config["eval"]})


@dataclass
class RunPlan:
    base_config: dict[str, dict[str, Any]]
    sweep: dict[str, list[Any]]
    branches: list[Branch]
    output_root: str

    def flat_params(self) -> dict[str, Any]:
        """The parent run's params: the base config plus the sweep grid."""
        params = PCSDConfig.from_dict(self.base_config).to_flat_dict()
        params["sweep"] = json.dumps(self.sweep) if self.sweep else ""
        params["sweep.num_branches"] = len(self.branches)
        return params


def parse_preset(text: str) -> dict[str, Any]:
    """Metaflow `Config` parser: YAML text -> dict, validated (bad presets fail before any step runs)."""
    raw = yaml.safe_load(text) or {}
    if not isinstance(raw, dict):
        raise ValueError(f"config preset: the top level must be a mapping of sections, got {type(raw).__name__}.")
    sections = {key: value for key, value in raw.items() if key != SWEEP_KEY}
    PCSDConfig.from_dict(sections)
    parse_sweep(raw.get(SWEEP_KEY))
    return raw


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
    if not isinstance(spec, Mapping):
        raise ValueError(f"sweep must map config keys to lists of values, got {type(spec).__name__}: {spec!r}.")
    grid: dict[str, list[Any]] = {}
    for key, values in spec.items():
        if not isinstance(key, str) or key.count(".") != 1:
            raise ValueError(f"sweep key {key!r} must look like 'section.field', e.g. 'train.lr'.")
        if not isinstance(values, list) or not values:
            raise ValueError(f"sweep values for {key!r} must be a non-empty list, got {values!r}; write [{values!r}].")
        grid[key] = list(values)
    return grid


def expand_grid(grid: Mapping[str, list[Any]]) -> list[dict[str, Any]]:
    """Cartesian product of the grid, in key order; an empty grid is one point with no overrides."""
    keys = list(grid)
    return [dict(zip(keys, values)) for values in itertools.product(*(grid[key] for key in keys))]


def branch_label(overrides: Mapping[str, Any]) -> str:
    """'lr=1e-05,divergence=forward_kl'; the full dotted key where two fields share a name."""
    if not overrides:
        return "base"
    names = [key.split(".")[1] for key in overrides]
    parts = [
        f"{key if names.count(key.split('.')[1]) > 1 else key.split('.')[1]}={value}" for key, value in overrides.items()
    ]
    return ",".join(parts)


def resolve_overrides(
    *, model: str = "", total_steps: int = 0, data_path: str = "", lr: float = 0.0, env: Mapping[str, str] | None = None
) -> dict[str, Any]:
    """Dotted overrides of the preset: environment variables first, then CLI values on top of them."""
    env = os.environ if env is None else env
    overrides: dict[str, Any] = {}
    for variable, key in ENV_OVERRIDES.items():
        # DATA_PATH set to "" is meaningful (load from the hub); the others are ignored when empty.
        if variable in env and (env[variable] != "" or variable == "DATA_PATH"):
            overrides[key] = env[variable]
    cli = {"model.name": model, "train.total_training_steps": total_steps, "data.path": data_path, "train.lr": lr}
    overrides.update({key: value for key, value in cli.items() if value})
    if overrides.get("data.path") == HUB_DATA:
        overrides["data.path"] = ""
    return overrides


def plan_run(preset: Mapping[str, Any], *, flow_run_id: str, sweep: str = "", **knobs: Any) -> RunPlan:
    """Resolve preset + env + CLI knobs, expand the sweep and validate every branch's config."""
    preset = dict(preset)
    grid = parse_sweep(sweep) if sweep and sweep.strip() else parse_sweep(preset.pop(SWEEP_KEY, None))
    preset.pop(SWEEP_KEY, None)
    base = PCSDConfig.from_dict(_plain(preset), resolve_overrides(**knobs))
    base_dict = _absolute_paths(base.to_dict())
    output_root = Path(base_dict["train"]["output_dir"]) / str(flow_run_id)
    branches = []
    for overrides in expand_grid(grid):
        label = branch_label(overrides)
        try:
            config = PCSDConfig.from_dict(base_dict, overrides).to_dict()
        except ValueError as error:
            raise ValueError(f"sweep branch {label!r}: {error}") from None
        config["train"]["output_dir"] = str(output_root / _slug(label))
        branches.append(Branch(label=label, overrides=overrides, config=config))
    return RunPlan(base_config=base_dict, sweep=grid, branches=branches, output_root=str(output_root))


def _absolute_paths(config: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """Relative paths are resolved now: Metaflow tasks may run in another working directory."""
    if config["data"]["path"]:
        config["data"]["path"] = str(Path(config["data"]["path"]).expanduser().resolve())
    config["train"]["output_dir"] = str(Path(config["train"]["output_dir"]).expanduser().resolve())
    model_path = Path(config["model"]["name"]).expanduser()
    if model_path.exists():
        config["model"]["name"] = str(model_path.resolve())
    return config


def _plain(value: Any) -> Any:
    """Metaflow's ConfigValue is a read-only mapping; PCSDConfig wants plain dicts and lists."""
    if isinstance(value, Mapping):
        return {key: _plain(item) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(item) for item in value]
    return value


def _slug(label: str) -> str:
    return re.sub(r"[^A-Za-z0-9_.=-]+", "_", label)[:100]


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]


def prepare_branches(plan: RunPlan, parent_run_id: str) -> list[Branch]:
    """Preprocess once per distinct data section and point every branch at its parquet files."""
    from steps import tracking
    from steps.preprocess import preprocess

    prepared: dict[str, Any] = {}
    for branch in plan.branches:
        if branch.data_key not in prepared:
            output_dir = Path(plan.output_root) / "data" / branch.data_key
            if not prepared:  # the parent run shows the first dataset's stats (one set of params per run)
                with tracking.open_run(parent_run_id, system_metrics=False):
                    prepared[branch.data_key] = preprocess(branch.pcsd_config(), output_dir)
            else:
                prepared[branch.data_key] = preprocess(branch.pcsd_config(), output_dir)
        result = prepared[branch.data_key]
        branch.train_path, branch.test_path = str(result.train_path), str(result.test_path)
        branch.data_stats = dict(result.stats)
    return plan.branches
