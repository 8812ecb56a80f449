"""PCSDConfig and its one preset loader: every preset loads (also through the engine CLI), unknown keys raise,
rules give the documented messages, the loss options are checked by the loss module alone."""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict, load_config
import itertools
import re
from pathlib import Path

import pytest
import torch
import yaml

from pcsd_core.config.schema import PCSDConfig
from pcsd_core.data.privileged import STRATEGIES
from pcsd_core.errors import ConfigError
from pcsd_core.config.loader import load_preset, parse_overrides
from pcsd_core.loss.distillation import hidden_state_distillation_loss

CONFIGS_DIR = Path(__file__).resolve().parents[3] / "configs"
PRESETS = sorted(CONFIGS_DIR.glob("*.yaml"))


def test_defaults_are_valid_and_round_trip():
    cfg = PCSDConfig()
    assert cfg.model.name == "smollm2-135m" and cfg.data.privileged_context == "solution"
    assert config_from_dict(yaml.safe_load(cfg.to_yaml())) == cfg
    flat = cfg.to_flat_dict()
    assert flat["train.lr"] == cfg.train.lr and flat["loss.divergence"] == "forward_kl"
    assert all(key.count(".") == 1 for key in flat)


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.name)
def test_every_preset_loads_with_every_sweep_point(preset):
    loaded = load_preset(preset)
    raw = yaml.safe_load(preset.read_text())
    assert loaded.sweep == (raw.get("sweep") or {})
    assert loaded.resources == (raw.get("resources") or {})  # the flow's task sizes, not a config section
    base = loaded.config()
    for section, values in raw.items():  # every value written in the preset is what the config holds
        if section not in ("sweep", "resources"):
            assert {key: getattr(getattr(base, section), key) for key in values} == values, section
    for values in itertools.product(*loaded.sweep.values()):
        point = dict(zip(loaded.sweep, values))
        config = loaded.config(point)
        assert {key: config.to_flat_dict()[key] for key in point} == point


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.name)
def test_every_preset_loads_through_the_engine_cli(preset, capsys):
    """`python -m cli.train --config <preset>` once failed on a sweep preset's `sweep:` key."""
    from cli.train import main

    assert main(["--config", str(preset), "--check", "--set", "train.seed=7"]) == 0
    captured = capsys.readouterr()
    resolved = yaml.safe_load(captured.out)
    assert resolved == load_preset(preset).config({"train.seed": 7}).to_dict()
    assert ("holds a sweep grid" in captured.err) == bool(load_preset(preset).sweep)
    assert load_config(preset).to_dict() == load_preset(preset).config().to_dict()


def test_overrides_parse_from_a_list_or_one_command_line():
    expected = {"train.lr": "1e-5", "rollout.n": 4, "train.use_ray": True, "data.teacher_template": "{question} {context}"}
    items = ["train.lr=1e-5", "rollout.n=4", "train.use_ray=true", "data.teacher_template={question} {context}"]
    assert parse_overrides(items) == expected
    assert parse_overrides("train.lr=1e-5 rollout.n=4 train.use_ray=true 'data.teacher_template={question} {context}'") == expected
    assert parse_overrides("") == {}
    with pytest.raises(ValueError, match=re.escape("override 'lr=1e-5' must look like section.field=value")):
        parse_overrides("lr=1e-5")


def test_from_yaml_reads_a_file_and_applies_overrides(tmp_path):
    path = tmp_path / "preset.yaml"
    path.write_text("train:\n  lr: 1.0e-5\ndata:\n  max_train_rows: 8\n")
    cfg = load_config(path, overrides={"train.lr": "3e-5", "rollout.n": "4", "train.use_ray": "true", "train.num_workers": 2})
    assert cfg.train.lr == 3e-5 and isinstance(cfg.train.lr, float)
    assert cfg.rollout.n == 4 and isinstance(cfg.rollout.n, int)
    assert cfg.train.use_ray is True and cfg.train.num_workers == 2
    assert cfg.data.max_train_rows == 8  # untouched by the overrides
    with pytest.raises(FileNotFoundError, match=re.escape(f"config file {tmp_path / 'nope.yaml'} does not exist")):
        load_config(tmp_path / "nope.yaml")


@pytest.mark.parametrize(
    ("raw", "overrides", "message"),
    [
        ({"trainer": {}}, None, "unknown config section(s) ['trainer']; valid sections: ['data', 'eval', 'loss', 'model', 'register', 'rollout', 'train']"),
        ({"train": {"learning_rate": 1e-5}}, None, "unknown key(s) ['learning_rate'] in config section 'train'"),
        ({}, {"train.learning_rate": 1e-5}, "unknown key(s) ['learning_rate'] in config section 'train'"),
        ({}, {"lr": 1e-5}, "override key 'lr' must look like 'section.field', e.g. 'train.lr'"),
        ({}, {"train.lr": "fast"}, "train.lr ('fast') must be a number"),
        ({}, {"rollout.n": 2.5}, "rollout.n (2.5) must be a whole number"),
        ({}, {"loss.divergence": "kl"}, "loss.divergence ('kl') must be one of ['forward_kl', 'reverse_kl', 'jsd']"),
        ({}, {"data.privileged_context": "hint"}, f"data.privileged_context ('hint') must be one of {list(STRATEGIES)} or 'column:<name>'"),
        ({}, {"data.shuffle_seed": -1}, "data.shuffle_seed (-1) must be a whole number >= 0"),
        ({}, {"data.teacher_template": "{question}"}, "data.teacher_template ('{question}') is neither a template name (['reference', 'worked_solution']) nor a format string with {question} and {context} (it lacks {context})"),
    ],
)
def test_bad_keys_and_values_are_named(raw, overrides, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        config_from_dict(raw, overrides)


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
        config_from_dict({}, overrides)


def test_divisible_batches_are_accepted():
    cfg = config_from_dict({}, {"train.prompts_per_step": 6, "rollout.n": 2, "train.mini_batch_size": 4, "train.micro_batch_size": 2})
    assert cfg.responses_per_step == 12


def test_loss_options_follow_one_rule_in_the_config_and_the_loss_api():
    """The config delegates to the loss module's LossSpec, so both accept and refuse the same options."""
    hidden, weight = torch.randn(3, 8), torch.randn(16, 8)
    ids, weights = torch.tensor([1, 2, 3]), torch.full((3,), 1 / 3)
    cases = [  # (options, accepted)
        ({"estimator": "sampled", "divergence": "forward_kl"}, False),
        ({"estimator": "sampled", "divergence": "jsd", "beta": 0.5}, False),
        ({"estimator": "sampled", "divergence": "jsd", "beta": 1.0}, True),  # JSD at beta 1 is reverse KL exactly
        ({"estimator": "sampled", "divergence": "reverse_kl"}, True),
        ({"temperature": 0.0}, False),
        ({"topk": 0}, False),
    ]
    for options, accepted in cases:
        config_error = api_error = None
        try:
            config_from_dict({"loss": options})
        except ConfigError as error:
            config_error = str(error)
            assert error.field == f"loss.{next(iter(options))}" or error.field == "loss.estimator", error.field
        try:
            hidden_state_distillation_loss(hidden, hidden, weight, weights, response_ids=ids, **options)
        except ValueError as error:
            api_error = str(error)
        assert (config_error is None, api_error is None) == (accepted, accepted), options
        if not accepted:
            assert config_error == api_error and config_error.startswith("loss.")  # one message, naming the field
    with pytest.raises(ValueError, match=r"^loss.estimator 'sampled' .* needs divergence 'reverse_kl' \(got 'forward_kl'"):
        config_from_dict({"loss": {"estimator": "sampled"}})


def test_shared_prompt_prefix_needs_an_attention_that_takes_a_4d_mask():
    flash = {"model": {"attn_implementation": "flash_attention_2"}}
    with pytest.raises(ValueError, match=re.escape(
            "train.share_prompt_prefix packs responses with a 4D attention mask, which model.attn_implementation "
            "'flash_attention_2' does not take; use 'sdpa' or 'eager', or set train.share_prompt_prefix: false.")):
        config_from_dict(flash)
    assert not config_from_dict({**flash, "train": {"share_prompt_prefix": False}}).train.share_prompt_prefix
    assert config_from_dict({"model": {"attn_implementation": "eager"}}).train.share_prompt_prefix


def test_evidence_preset_arms_differ_only_in_the_privileged_context():
    """configs/evidence_cpu_smollm2.yaml: the three arms share seed, data, steps and eval; >= 200 test questions."""
    from steps.plan import parse_preset, plan_run

    raw = parse_preset((CONFIGS_DIR / "evidence_cpu_smollm2.yaml").read_text())
    plan = plan_run(raw, flow_run_id="1", env={})
    configs = [branch.config for branch in plan.branches]
    assert [cfg.data.privileged_context for cfg in configs] == ["solution", "answer_only", "shuffled"]
    flat = [cfg.to_flat_dict() for cfg in configs]
    differing = {key for key in flat[0] if len({str(f[key]) for f in flat}) > 1}
    assert differing == {"data.privileged_context", "train.output_dir"}
    cfg = configs[0]
    assert cfg.eval.num_examples >= 200 and cfg.data.max_test_rows >= cfg.eval.num_examples and cfg.eval.stop_at_answer
    assert cfg.data.max_train_rows >= cfg.train.total_training_steps * cfg.train.prompts_per_step
