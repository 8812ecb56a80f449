"""Plan a flow run: the resolved config and one branch per point of the sweep grid.

Where each setting comes from, highest first:

1. flow Parameters on the command line (`--model`, `--total-steps`, `--data-path`, `--lr`: `FLOW_KNOBS`);
2. `--set "section.field=value ..."` on the command line (any config key; the engine CLI's parser);
3. the reference script's environment variables (`MODEL_PATH`, `DATA_PATH`, `TOTAL_STEPS`,
   `ACTOR_NUM_GPUS`, `ROLLOUT_NUM_GPUS`);
4. the YAML preset given with `--config config <file>` (default `configs/cpu_smollm2.yaml`).

A sweep is a grid of dotted config keys to lists of values, from `--sweep` (JSON) or the preset's `sweep:`
key, e.g. `{"train.lr": [1e-5, 3e-5], "loss.divergence": ["forward_kl", "jsd"]}` -> 4 branches. Every
branch's config is built and validated here, in the flow's first step, before any model is loaded.
"""

from __future__ import annotations

import dataclasses
import hashlib
import itertools
import json
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pcsd_core.errors import ConfigError, HardwareError
from pcsd_core.config.schema import PCSDConfig
from pcsd_core.config.loader import (RESOURCES_KEY, SWEEP_KEY, Preset, load_preset, parse_overrides, parse_sweep, read_preset_text,
                                     replace_fields)
from pcsd_core.data.privileged import TEACHER_ONLY_DATA_FIELDS
from steps import contract, storage

HUB_DATA = "hub"  # `--data-path hub` loads the hub dataset even when DATA_PATH is set
# What a compute backend gives a distill or evaluate task when the preset's `resources:` does not say.
DEFAULT_TASK_CPUS = 4
DEFAULT_TASK_MEMORY_MB = 16_000


@dataclass(frozen=True)
class FlowKnob:
    """One flow Parameter that sets one config key; its environment variable is the reference script's name."""

    name: str  # the Parameter's attribute name; its CLI name has dashes (total_steps -> --total-steps)
    key: str  # the dotted config key it sets
    type: type
    help: str
    env: str = ""  # the reference script's environment variable, if it has one


# Every flow knob, in one place: the flow declares a Parameter per row, `resolve_overrides` applies them.
FLOW_KNOBS = (
    FlowKnob("model", "model.name", str, "model alias, hub id or folder", env="MODEL_PATH"),
    FlowKnob("total_steps", "train.total_training_steps", int, "training steps", env="TOTAL_STEPS"),
    FlowKnob("data_path", "data.path", str, "local GSM8K folder, or 'hub'", env="DATA_PATH"),
    FlowKnob("lr", "train.lr", float, "learning rate"),
)
# The reference script's variables that have no flow Parameter of their own.
ENV_ONLY_OVERRIDES = {"ACTOR_NUM_GPUS": "train.num_workers", "ROLLOUT_NUM_GPUS": "rollout.num_gpus"}


@dataclass
class Branch:
    """One sweep point: its label, its overrides of the base config and its resolved, validated config."""

    label: str
    overrides: dict[str, Any]
    config: PCSDConfig
    sweep_size: int = 1  # branches of this flow run; they run at once and share the machine's cores
    # Filled by the preprocess step: local paths, or storage URIs when train.output_dir is one (`steps.storage`).
    train_path: str = ""
    test_path: str = ""
    data_stats: dict[str, Any] = field(default_factory=dict)
    keys: dict[str, str] = field(default_factory=dict)  # `sharing_keys`, set by plan_run

    def threads(self) -> int:
        """Torch threads for this branch's task: the cores split between the branches running at once, so a
        sweep on a laptop does not oversubscribe them (two torch processes on all cores slow each other ~10x)."""
        cores = os.cpu_count() or 1
        return max(1, cores // min(self.sweep_size, cores))

    @property
    def data_key(self) -> str:
        """Branches with the same data section share one preprocessed dataset."""
        return self.keys["data"]

    @property
    def base_model_key(self) -> str:
        """Branches with the same model, test questions and eval settings share one base-model evaluation."""
        return self.keys["base_model"]


def sharing_keys(config: PCSDConfig) -> dict[str, str]:
    """What a branch shares with others, computed once, at plan time, and stored on the branch: a key recomputed
    in a later task could differ (code with a new config field, a resumed run) and miss the shared result.

    The base model sees student prompts only, so the teacher's side of the data section (the privileged context
    and its template) does not change its evaluation: control arms share the base model's.
    """
    data = dataclasses.asdict(config.data)
    student_side = {key: value for key, value in data.items() if key not in TEACHER_ONLY_DATA_FIELDS}
    return {"data": _digest(data), "base_model": _digest({"model": dataclasses.asdict(config.model),
                                                          "data": student_side, "eval": dataclasses.asdict(config.eval)})}


@dataclass
class RunPlan:
    base_config: PCSDConfig
    sweep: dict[str, list[Any]]
    branches: list[Branch]
    output_root: str  # a local folder or a storage URI (`steps.storage`)

    def flat_params(self) -> dict[str, Any]:
        """The parent run's params: the base config plus the sweep grid."""
        params = self.base_config.to_flat_dict()
        params[contract.PARAM_SWEEP] = json.dumps(self.sweep) if self.sweep else ""
        params["sweep.num_branches"] = len(self.branches)
        return params


def parse_preset(text: str) -> dict[str, Any]:
    """Metaflow `Config` parser: YAML text -> dict, validated (bad presets fail before any step runs), with the
    `resources:` of the distill and evaluate tasks filled in (`task_resources`) for the flow's `@resources`."""
    raw = read_preset_text(text)
    return {**raw, RESOURCES_KEY: task_resources(load_preset(raw))}


def task_resources(preset: Preset) -> dict[str, dict[str, int]]:
    """{step: {cpu, memory (MB), gpu}} for distill and evaluate: the preset's `resources:` fields, the others
    derived from its config (distill: the actor's and rollout's GPUs; evaluate: the rollout engine's).

    Fixed when the flow is deployed (Metaflow decorators read the Config, not the Parameters): a `--model` whose
    recipe needs GPUs does not resize them; pass that model's preset with `--config config` instead."""
    from pcsd_core.models import gpus_required, rollout_gpus_required

    cfg = preset.config()
    derived = {"distill": gpus_required(cfg), "evaluate": rollout_gpus_required(cfg)}
    return {step: {"cpu": DEFAULT_TASK_CPUS, "memory": DEFAULT_TASK_MEMORY_MB, "gpu": gpus,
                   **preset.resources.get(step, {})} for step, gpus in derived.items()}


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


def resolve_overrides(*, overrides: str = "", env: Mapping[str, str] | None = None, **knobs: Any) -> dict[str, Any]:
    """Dotted overrides of the preset: environment variables, then `--set`, then the flow knobs on top.

    `knobs` are FLOW_KNOBS values by name (empty / 0 = not given); `overrides` is the flow's `--set` text.
    """
    env = os.environ if env is None else env
    unknown = sorted(set(knobs) - {knob.name for knob in FLOW_KNOBS})
    if unknown:
        raise ConfigError(f"unknown flow knob(s) {unknown}; known: {[knob.name for knob in FLOW_KNOBS]}.")
    from_env: dict[str, str] = {knob.env: knob.key for knob in FLOW_KNOBS if knob.env}
    from_env.update(ENV_ONLY_OVERRIDES)
    resolved: dict[str, Any] = {}
    for variable, key in from_env.items():
        # DATA_PATH set to "" is meaningful (load from the hub); the others are ignored when empty.
        if variable in env and (env[variable] != "" or variable == "DATA_PATH"):
            resolved[key] = env[variable]
    resolved.update(parse_overrides(overrides))
    resolved.update({knob.key: knobs[knob.name] for knob in FLOW_KNOBS if knobs.get(knob.name)})
    if resolved.get("data.path") == HUB_DATA:
        resolved["data.path"] = ""
    return resolved


def plan_run(
    preset: Preset | Mapping[str, Any], *, flow_run_id: str, sweep: str = "", overrides: str = "",
    env: Mapping[str, str] | None = None, check_machine: bool = False, **knobs: Any,
) -> RunPlan:
    """Resolve preset + env + `--set` + flow knobs, expand the sweep and validate every branch's config.

    A model alias carries its recipe (`pcsd_core.models.MODEL_RECIPES`): `--model deepseek-math-7b-base` (or
    MODEL_PATH) on a preset written for another model runs that model's preset (dtype, device, rollout engine,
    batch shapes), with the same overrides on top. `check_machine` refuses, in milliseconds and before any
    download, a plan this machine has not the GPUs for (`check_hardware`); the flow's start step sets it.
    """
    from pcsd_core.models import recipe_preset

    resolved = resolve_overrides(overrides=overrides, env=env, **knobs)
    model = resolved.get("model.name")
    source: Any = preset
    if isinstance(preset, Preset):
        source = {**preset.sections, SWEEP_KEY: preset.sweep or None, RESOURCES_KEY: preset.resources or None}
    if model and model != (source.get("model") or {}).get("name") and recipe_preset(model):
        source = recipe_preset(model)
    # The one parse of this run's config; branches are replacements of it.
    preset = load_preset(source, resolved)
    grid = parse_sweep(sweep) if sweep and sweep.strip() else preset.sweep
    base = _absolute_paths(preset.base)
    storage.check_location(base.train.output_dir)
    output_root = storage.join(base.train.output_dir, str(flow_run_id))
    branches: list[Branch] = []
    for point in expand_grid(grid):
        label = branch_label(point)
        try:
            branch_dir = storage.join(output_root, slug(label))
            config = replace_fields(base, {**point, "train.output_dir": branch_dir})
        except ValueError as error:
            raise ConfigError(f"sweep branch {label!r}: {error}") from None
        twin = next((b for b in branches if b.config == config or b.config.train.output_dir == config.train.output_dir), None)
        if twin is not None:
            raise ConfigError(f"sweep branches {twin.label!r} and {label!r} are the same point (or write to the same "
                             "folder); remove the duplicate value from the sweep grid.")
        if check_machine:
            _check_this_machine(config)
        branches.append(Branch(label=label, overrides=point, config=config, keys=sharing_keys(config)))
    for branch in branches:
        branch.sweep_size = len(branches)
    return RunPlan(base_config=base, sweep=grid, branches=branches, output_root=output_root)


def _check_this_machine(config: PCSDConfig) -> None:
    """`check_hardware`, its fix spelled as the flow commands that run the model's preset or the CPU default."""
    from pcsd_core.models import check_hardware, recipe_for

    try:
        check_hardware(config)
    except HardwareError as error:
        recipe = recipe_for(config.model.name)
        on_gpus = f"python flows/pcsd_flow.py --config config {recipe.preset} run on such a machine, or " if recipe else ""
        raise HardwareError(f"{error} With the flow: {on_gpus}python flows/pcsd_flow.py run (the embedded CPU "
                            "default: no --model, no MODEL_PATH).") from None


def _absolute_paths(config: PCSDConfig) -> PCSDConfig:
    """Relative paths are resolved now: Metaflow tasks may run in another working directory."""
    paths: dict[str, Any] = {}
    if not storage.is_remote(config.train.output_dir):
        paths["train.output_dir"] = str(Path(config.train.output_dir).expanduser().resolve())
    if config.data.path:
        paths["data.path"] = str(Path(config.data.path).expanduser().resolve())
    model_path = Path(config.model.name).expanduser()
    if model_path.exists():
        paths["model.name"] = str(model_path.resolve())
    return replace_fields(config, paths)


def slug(text: str) -> str:
    """A folder- and registry-safe name, used for branch folders and registered model names: lower case, and
    each run of characters other than a-z 0-9 . = + as one '-' ('lr=1e-05,divergence=forward_kl' ->
    'lr=1e-05-divergence=forward-kl')."""
    return re.sub(r"[^a-z0-9.=+]+", "-", text.lower()).strip("-")[:100] or "x"


def _digest(value: Any) -> str:
    return hashlib.sha1(json.dumps(value, sort_keys=True, default=str).encode()).hexdigest()[:12]
