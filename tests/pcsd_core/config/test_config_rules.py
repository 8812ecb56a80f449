"""Every config field has a rule: a table of bad values, walked over every field of every section.

A field missing from `BAD_VALUES` fails `test_every_field_has_a_bad_value`, so a new field cannot be added
without a rule and a value that breaks it. Each bad value must raise a ValueError whose message starts with
`section.field`, through the loader (what YAML and `--set` use) and, for the sections whose `__post_init__`
holds the rules, through direct construction too.
"""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import dataclasses
import math
import re
import warnings

import pytest

from pcsd_core.config.schema import (DataConfig, EvalConfig, LossConfig, ModelConfig, PCSDConfig, RegisterConfig,
                                     RolloutConfig, TrainConfig)
from pcsd_core.errors import ConfigError
from pcsd_core.config.loader import read_preset_yaml

INF, NAN = math.inf, math.nan
BAD_VALUES: dict[str, list] = {
    "model.name": ["", " smollm2-135m", 5],
    "model.dtype": ["float64"],
    "model.attn_implementation": ["bogus", "", "flash_attention"],
    "model.trust_remote_code": ["maybe", 2],
    "model.gradient_checkpointing": ["maybe"],
    "model.lora_rank": [-1, 1.5, "sixteen"],
    "model.lora_alpha": [0, -8.0, NAN],
    "model.lora_dropout": [-0.1, 1.0],
    "model.lora_target_modules": ["", "q_proj,", "q proj", "q_proj,lm_head", "embed_tokens", 5],
    "data.path": ["   ", "data\x00", 3],
    "data.hub_name": [""],
    "data.hub_config": [" main"],
    "data.privileged_context": ["hint", "column:"],
    "data.question_column": [""],
    "data.answer_column": [""],
    "data.id_column": [" id"],
    "data.shuffle_seed": [-1, 1.5],
    "data.max_train_rows": [-1, 2.0],
    "data.max_test_rows": [-1],
    "data.instruction": [5],
    "data.teacher_template": ["{question}", "{context}"],
    "data.data_source": [""],
    "data.synthetic": ["algebra"],
    "data.synthetic_difficulty": [0, 5],
    "data.synthetic_seed": [-1],
    "rollout.engine": ["vllm"],
    "rollout.n": [0, 2.0, "2.0", 2.5, "two"],
    "rollout.temperature": [0, -1.0, INF, "inf", NAN],
    "rollout.top_p": [0, 1.5, NAN],
    "rollout.max_response_tokens": [0, 1e5],
    "rollout.batch_size": [0],
    "rollout.placement": ["remote"],
    "rollout.num_gpus": [-3],
    "rollout.gpu_memory_utilization": [0, 1.0, INF],
    "loss.divergence": ["kl"],
    "loss.beta": [-0.1, 1.5, NAN],
    "loss.temperature": [0, INF],
    "loss.estimator": ["exact"],
    "loss.topk": [0],
    "loss.topk_source": ["both"],
    "loss.topk_tail": ["drop"],
    "loss.skip_first_tokens": [-1],
    "loss.token_clip": [-1.0],
    "loss.aggregation": ["sum"],
    "loss.chunk_tokens": [0],
    "loss.metric_sample_tokens": [-1],
    "loss.ref_kl_coef": [-0.1, INF, NAN],
    "train.total_training_steps": [0],
    "train.prompts_per_step": [0],
    "train.ppo_epochs": [0],
    "train.mini_batch_size": [0, -4],
    "train.micro_batch_size": [0],
    "train.share_prompt_prefix": ["maybe"],
    "train.lr": [0, -1e-5, INF, "inf", ".inf", NAN],
    "train.warmup_steps": [-1],
    "train.lr_schedule": ["step"],
    "train.master_dtype": ["float64"],
    "train.weight_decay": [-5.0, INF],
    "train.grad_clip": [-1.0],
    "train.seed": [-1, 2**32],
    "train.teacher_mode": ["ref"],
    "train.ema_rate": [0, 1.5],
    "train.num_workers": [0],
    "train.use_ray": ["maybe"],
    "train.num_nodes": [0, 3],
    "train.ray_address": ["localhost", "http://head:6379", " auto"],
    "train.weight_sync_bucket_mb": [0, -256],
    "train.device": ["tpu"],
    "train.checkpoint_every": [-1],
    "train.validate_every": [-1, 1.5],
    # keep_best_by and the collapse stop act on validations: refused without train.validate_every (the default, 0).
    "train.keep_best_by": ["loss", "accuracy_strict"],
    "train.stop_if_repetition_above": [-0.1, 1.0, NAN, 0.5],
    "train.output_dir": ["", " outputs"],
    "train.resume_from": ["  "],
    "eval.num_examples": [-1],
    "eval.stop_at_answer": ["maybe", 2],
    "eval.heldout_kl_questions": [-1, 2.5],
    "eval.validation_questions": [0, 1.5],
    "eval.max_new_tokens": [0],
    "eval.batch_size": [0],
    "register.promote_if": ["maybe"],
    "register.alpha": [0, 1.0, NAN],
    "register.merge_adapter": ["maybe"],  # true without model.lora_rank: tests/pcsd_core/engine/test_lora.py
}
SECTIONS_WITH_TYPE_RULES = {"model": ModelConfig, "data": DataConfig, "rollout": RolloutConfig, "train": TrainConfig,
                            "eval": EvalConfig, "register": RegisterConfig}
CASES = [(dotted, value) for dotted, values in BAD_VALUES.items() for value in values]


def all_fields() -> set[str]:
    hints = {f.name: f.type for f in dataclasses.fields(PCSDConfig)}
    sections = {"model": ModelConfig, "data": DataConfig, "rollout": RolloutConfig, "loss": LossConfig,
                "train": TrainConfig, "eval": EvalConfig, "register": RegisterConfig}
    assert set(hints) == set(sections), "a new config section needs its dataclass in this test"
    return {f"{name}.{item.name}" for name, cls in sections.items() for item in dataclasses.fields(cls)}


def test_every_field_has_a_bad_value():
    fields = all_fields()
    missing = sorted(fields - set(BAD_VALUES))
    assert not missing, f"config fields without a rule and a bad value in BAD_VALUES: {missing}"
    assert not set(BAD_VALUES) - fields, f"BAD_VALUES names fields that do not exist: {sorted(set(BAD_VALUES) - fields)}"


@pytest.mark.parametrize(("dotted", "value"), CASES, ids=[f"{d}={v!r}" for d, v in CASES])
def test_loader_refuses_the_bad_value_naming_the_field(dotted, value):
    with pytest.raises(ConfigError) as refused:
        config_from_dict({}, {dotted: value})
    assert str(refused.value).startswith(dotted), str(refused.value)
    assert refused.value.field == dotted  # the field, as an attribute callers and tests can read


@pytest.mark.parametrize(("dotted", "value"), [case for case in CASES if case[0].split(".")[0] in SECTIONS_WITH_TYPE_RULES],
                         ids=lambda item: repr(item))
def test_direct_construction_refuses_the_bad_value(dotted, value):
    section, name = dotted.split(".")
    with pytest.raises(ConfigError) as refused:
        SECTIONS_WITH_TYPE_RULES[section](**{name: value})
    assert str(refused.value).startswith(dotted), str(refused.value)
    assert refused.value.field == dotted


def test_messages_name_the_value_rule_and_fix():
    expectations = {
        ("train.mini_batch_size", 0): "train.mini_batch_size (0) must be >= 1.",
        ("rollout.n", 2.0): "rollout.n (2.0) must be a whole number, written without a decimal point or exponent; write 2.",
        ("rollout.temperature", INF): "rollout.temperature (inf) must be a finite number (inf and nan are not allowed).",
        ("train.weight_decay", -5): "train.weight_decay (-5.0) must be >= 0 (0 disables it).",
        ("rollout.num_gpus", -3): "rollout.num_gpus (-3) must be >= 0 (0 = share the actor's devices).",
        ("train.checkpoint_every", -1): "train.checkpoint_every (-1) must be >= 0 (0 = only at the end).",
        ("train.output_dir", ""): "train.output_dir ('') must not be empty.",
        ("train.seed", -1): "train.seed (-1) must be in [0, 4294967295].",
    }
    for (dotted, value), message in expectations.items():
        with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
            config_from_dict({}, {dotted: value})
    with pytest.raises(ValueError, match=r"^model.attn_implementation \('bogus'\) must be one of \['sdpa', 'eager', "
                                         r"'flash_attention_2'.*'flex_attention'\]"):
        config_from_dict({}, {"model.attn_implementation": "bogus"})


def test_cli_values_keep_their_types():
    from cli.train import parse_overrides

    cfg = config_from_dict({}, parse_overrides(["rollout.n=4", "train.lr=1e-5", "train.weight_decay=0",
                                                    "model.attn_implementation=eager"]))
    assert cfg.rollout.n == 4 and type(cfg.rollout.n) is int
    assert cfg.train.lr == 1e-5 and type(cfg.train.weight_decay) is float
    for item, message in [("rollout.n=2.0", "rollout.n (2.0) must be a whole number"),
                          ("train.lr=.inf", "train.lr (inf) must be a finite number"),
                          ("rollout.temperature=.nan", "rollout.temperature (nan) must be a finite number")]:
        with pytest.raises(ValueError, match=f"^{re.escape(message)}"):
            config_from_dict({}, parse_overrides([item]))
    direct = TrainConfig(grad_clip=1, weight_decay=0)  # direct construction widens ints for float fields, as YAML does
    assert type(direct.grad_clip) is float and type(direct.weight_decay) is float


def test_a_large_learning_rate_warns_but_loads():
    with pytest.warns(UserWarning, match=re.escape("train.lr (1000.0) is above 0.01;")):
        cfg = config_from_dict({}, {"train.lr": 1e3})
    assert cfg.train.lr == 1e3
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config_from_dict({}, {"train.lr": 1e-2})


# ---- YAML presets -----------------------------------------------------------------------------------


def test_yaml_syntax_error_names_the_file_and_line(tmp_path):
    preset = tmp_path / "broken.yaml"
    preset.write_text("model:\n  name: smollm2-135m\ntrain:\n  lr: 1e-5\n   seed: 3\n")  # line 5 is over-indented
    with pytest.raises(ValueError, match=rf"^{re.escape(str(preset))}: YAML syntax error at line 5, column \d+: "):
        read_preset_yaml(preset)
    preset.write_text('data:\n  instruction: "unclosed\n')
    with pytest.raises(ValueError, match=rf"^{re.escape(str(preset))}: YAML syntax error at line \d+"):
        read_preset_yaml(preset)


@pytest.mark.parametrize(("text", "kind"), [("train:\n  - lr\n  - seed\n", "list"), ("train: 3\n", "int"),
                                            ("train: fast\n", "str")])
def test_a_section_that_is_not_a_mapping_is_named(tmp_path, text, kind):
    preset = tmp_path / "p.yaml"
    preset.write_text(text)
    with pytest.raises(ValueError, match=rf"^{re.escape(str(preset))}: section 'train' must be a mapping of "
                                         rf"'key: value' lines, got a {kind} "):
        read_preset_yaml(preset)


def test_preset_shapes_that_are_fine_or_wrong_at_the_top(tmp_path):
    preset = tmp_path / "p.yaml"
    preset.write_text("model:\ntrain:\n  lr: 1.0e-5\n")
    assert read_preset_yaml(preset) == {"model": {}, "train": {"lr": 1e-5}}
    preset.write_text("")
    assert read_preset_yaml(preset) == {}
    preset.write_text("- model\n- train\n")
    with pytest.raises(ValueError, match="the top level must be a mapping of sections .* got a list"):
        read_preset_yaml(preset)
    preset.write_bytes(b"model:\n  name: caf\xe9\n")
    with pytest.raises(ValueError, match=rf"^{re.escape(str(preset))} is not UTF-8 text"):
        read_preset_yaml(preset)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        read_preset_yaml(tmp_path / "none.yaml")
