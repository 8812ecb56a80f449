"""PCSDConfig: defaults and every preset are valid, unknown keys raise, rules give the documented messages."""

from __future__ import annotations

import itertools
import re
from pathlib import Path

import pytest
import yaml

from pcsd_core.config import PCSDConfig

CONFIGS_DIR = Path(__file__).resolve().parents[2] / "configs"
PRESETS = sorted(CONFIGS_DIR.glob("*.yaml"))
SWEEP_KEY = "sweep"  # a preset's sweep grid belongs to the flow plan (steps/plan.py), not to PCSDConfig


def test_defaults_are_valid_and_round_trip():
    cfg = PCSDConfig()
    assert cfg.model.name == "smollm2-135m" and cfg.data.privileged_context == "solution"
    assert PCSDConfig.from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    flat = cfg.to_flat_dict()
    assert flat["train.lr"] == cfg.train.lr and flat["loss.divergence"] == "forward_kl"
    assert all(key.count(".") == 1 for key in flat)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.name)
def test_every_preset_loads_with_every_sweep_point(preset):
    raw = yaml.safe_load(preset.read_text()) or {}
    grid = raw.pop(SWEEP_KEY, None) or {}
    base = PCSDConfig.from_dict(raw)
    assert isinstance(base, PCSDConfig)
    for values in itertools.product(*grid.values()):
        PCSDConfig.from_dict(raw, overrides=dict(zip(grid, values)))


def test_from_yaml_reads_a_file_and_applies_overrides(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("train:\n  lr: 1.0e-5\ndata:\n  max_train_rows: 8\n")
    cfg = PCSDConfig.from_yaml(path, overrides={"train.lr": "3e-5", "rollout.n": "4", "train.use_ray": "true", "train.num_workers": 2})
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.rollout.n == 4 and isinstance(cfg.rollout.n, int)
    assert cfg.train.use_ray is True and cfg.train.num_workers == 2
    assert cfg.data.max_train_rows == 8  # untouched by the overrides
    with pytest.raises(FileNotFoundError, match=re.escape(f"config file {tmp_path / 'nope.yaml'} does not exist")):
        PCSDConfig.from_yaml(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("raw", "overrides", "message"),
    [
        ({"trainer": {}}, None, "unknown config section(s) ['trainer']; valid sections: ['data', 'eval', 'loss', 'model', 'rollout', 'train']"),
        ({"train": {"learning_rate": 1e-5}}, None, "unknown key(s) ['learning_rate'] in config section 'train'"),
        ({}, {"train.learning_rate": 1e-5}, "unknown key(s) ['learning_rate'] in config section 'train'"),
        ({}, {"lr": 1e-5}, "override key 'lr' must look like 'section.field', e.g. 'train.lr'"),
        ({}, {"train.lr": "fast"}, "train.lr ('fast') must be a number"),
        ({}, {"rollout.n": 2.5}, "rollout.n (2.5) must be a whole number"),
        ({}, {"loss.divergence": "kl"}, "loss.divergence ('kl') must be one of ['forward_kl', 'reverse_kl', 'jsd']"),
        ({}, {"data.privileged_context": "hint"}, "data.privileged_context ('hint') must be 'solution', 'answer_only' or 'column:<name>'"),
        ({}, {"data.teacher_template": "{question}"}, "data.teacher_template ('{question}') is neither a template name (['reference', 'worked_solution']) nor a format string with {question} and {context} (it lacks {context})"),
    ],
)
def test_bad_keys_and_values_are_named(raw, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        PCSDConfig.from_dict(raw, overrides)


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        (
            {"train.prompts_per_step": 3, "rollout.n": 2, "train.mini_batch_size": 4},
            "train.prompts_per_step * rollout.n (3 * 2 = 6) must be divisible by train.mini_batch_size (4); change one of them.",
        ),
        (
            {"train.mini_batch_size": 8, "train.micro_batch_size": 3},
            "train.mini_batch_size (8) must be a multiple of train.micro_batch_size (3); change one of them.",
        ),
        (
            {"train.mini_batch_size": 8, "train.micro_batch_size": 4, "train.num_workers": 4, "train.use_ray": True},
            "train.mini_batch_size (8) must split evenly over train.num_workers (4) into whole micro-batches of "
            "train.micro_batch_size (4); change one of them.",
        ),
        ({"train.num_workers": 2}, "train.num_workers (2) > 1 needs train.use_ray: true."),
    ],
)
def test_batch_divisibility_messages(overrides, message):
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        PCSDConfig.from_dict({}, overrides)


def test_divisible_batches_are_accepted():
    cfg = PCSDConfig.from_dict({}, {"train.prompts_per_step": 6, "rollout.n": 2, "train.mini_batch_size": 4, "train.micro_batch_size": 2})
    assert cfg.responses_per_step == 12


def test_sampled_estimator_needs_reverse_kl():
    with pytest.raises(ValueError, match=r"loss.estimator 'sampled' .* needs loss.divergence 'reverse_kl' \(got 'forward_kl'\)"):
        PCSDConfig.from_dict({"loss": {"estimator": "sampled"}})
    assert PCSDConfig.from_dict({"loss": {"estimator": "sampled", "divergence": "reverse_kl"}}).loss.estimator == "sampled"


def test_shared_prompt_prefix_needs_an_attention_that_takes_a_4d_mask():
    flash = {"model": {"attn_implementation": "flash_attention_2"}}
    with pytest.raises(ValueError, match=re.escape(
            "train.share_prompt_prefix packs responses with a 4D attention mask, which model.attn_implementation "
            "'flash_attention_2' does not take; use 'sdpa' or 'eager', or set train.share_prompt_prefix: false.")):
        PCSDConfig.from_dict(flash)
    assert not PCSDConfig.from_dict({**flash, "train": {"share_prompt_prefix": False}}).train.share_prompt_prefix
    assert PCSDConfig.from_dict({"model": {"attn_implementation": "eager"}}).train.share_prompt_prefix
