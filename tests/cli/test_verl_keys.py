"""verl key names -> our config keys, in verl's units; unknown keys refused; the README table is the table."""

from __future__ import annotations

from pcsd_core.config.loader import load_config
import re
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from pcsd_core.config.schema import PCSDConfig
from cli.verl_keys import VERL_KEYS, markdown_table, to_set_string, translate

REPO_ROOT = Path(__file__).resolve().parents[2]
EXAMPLE_README = REPO_ROOT / "examples" / "privileged_context_distillation" / "README.md"
# The keys the issue and the reference README name; each must be in the table.
REQUIRED_KEYS = [
    "data.train_files", "data.val_files", "actor_rollout_ref.model.path", "actor_rollout_ref.actor.optim.lr",
    "actor_rollout_ref.rollout.n", "trainer.total_training_steps", "data.train_batch_size",
    "actor_rollout_ref.actor.ppo_mini_batch_size", "actor_rollout_ref.actor.ppo_epochs",
    "actor_rollout_ref.rollout.temperature", "data.max_response_length",
]


@pytest.fixture
def base() -> PCSDConfig:
    return load_config(REPO_ROOT / "configs" / "cpu_smollm2.yaml")  # rollout.n 2


def test_required_keys_are_supported_and_map_to_real_fields():
    assert set(REQUIRED_KEYS) <= set(VERL_KEYS)
    flat = PCSDConfig().to_flat_dict()
    assert all(record.ours in flat for record in VERL_KEYS.values())


def test_reference_arguments_translate_in_verl_units(base, tmp_path):
    args = [
        f"data.train_files={tmp_path}/train.parquet", f"data.val_files={tmp_path}/test.parquet",
        "actor_rollout_ref.model.path=smollm2-135m", "actor_rollout_ref.actor.optim.lr=1e-6",
        "actor_rollout_ref.rollout.n=4", "trainer.total_training_steps=3", "data.train_batch_size=8",
        "actor_rollout_ref.actor.ppo_mini_batch_size=2", "actor_rollout_ref.actor.ppo_epochs=2",
        "actor_rollout_ref.rollout.temperature=0.7", "data.max_response_length=64",
    ]
    assert translate(args, base) == {
        "data.path": str(tmp_path), "model.name": "smollm2-135m", "train.lr": 1e-6, "rollout.n": 4,
        "train.total_training_steps": 3, "train.prompts_per_step": 8,
        "train.mini_batch_size": 2 * 4,  # verl: 2 prompts x n=4 responses; ours counts the 8 responses
        "train.ppo_epochs": 2, "rollout.temperature": 0.7, "rollout.max_response_tokens": 64,
    }


def test_mini_batch_uses_the_base_n_when_the_args_do_not_set_it(base):
    assert base.rollout.n == 2
    assert translate(["actor_rollout_ref.actor.ppo_mini_batch_size=2"], base) == {"train.mini_batch_size": 4}
    assert translate(["actor_rollout_ref.actor.ppo_mini_batch_size=2"], base.to_dict()) == {"train.mini_batch_size": 4}


def test_unknown_key_is_refused_with_the_supported_list(base):
    with pytest.raises(ValueError) as caught:
        translate(["actor_rollout_ref.actor.optim.lr=1e-6", "algorithm.adv_estimator=grpo"], base)
    message = str(caught.value)
    assert "unsupported verl key(s) ['algorithm.adv_estimator']" in message
    assert all(key in message for key in VERL_KEYS)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["data.train_files=/d/train.parquet", "data.val_files=/e/test.parquet"],
         "data.train_files and data.val_files both set data.path but disagree ('/d' vs '/e')"),
        (["data.val_files=/d/val.parquet"], "data.val_files ('/d/val.parquet') must be a file named test.parquet or test.jsonl"),
        (["data.train_files=[/d/a.parquet, /d/b.parquet]"], "a list of files is not supported"),
        (["actor_rollout_ref.rollout.n=0"], "actor_rollout_ref.rollout.n (0) must be a whole number >= 1"),
        (["actor_rollout_ref.actor.ppo_mini_batch_size=1.5"], "ppo_mini_batch_size (1.5) must be a whole number"),
        (["actor_rollout_ref.actor.optim.lr"], "must look like key=value"),
        (["data.train_batch_size=3"], "which the config refuses: train.prompts_per_step * rollout.n (3 * 2 = 6) "
                                      "must be divisible by train.mini_batch_size (4)"),
    ],
)
def test_bad_values_name_the_verl_key(base, args, message):
    with pytest.raises(ValueError, match=re.escape(message)):
        translate(args, base)


def test_set_string_reads_back_as_the_same_values(base, tmp_path):
    overrides = translate([f"data.train_files={tmp_path}/my data/train.parquet", "actor_rollout_ref.actor.optim.lr=1e-6",
                           "actor_rollout_ref.model.path=123", "actor_rollout_ref.rollout.temperature=1"], base)
    line = to_set_string(overrides)
    # What the flow's --set does: shlex-split, then each value as a YAML scalar.
    read_back = {key: yaml.safe_load(value) for key, _, value in (token.partition("=") for token in shlex.split(line))}
    assert read_back == overrides == {"data.path": f"{tmp_path}/my data", "train.lr": 1e-6, "model.name": "123",
                                      "rollout.temperature": 1}
    assert "\n" not in line


def test_cli_prints_the_set_line_and_refuses_unknown_keys():
    run = lambda *args: subprocess.run([sys.executable, "-m", "cli.verl_keys", *args], cwd=REPO_ROOT,
                                       capture_output=True, text=True, timeout=60)  # noqa: E731
    ok = run("--model", "smollm2-135m", "actor_rollout_ref.actor.ppo_mini_batch_size=1", "actor_rollout_ref.actor.optim.lr=2e-5")
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "train.mini_batch_size=2 train.lr=2.0e-05"  # n=2 from configs/cpu_smollm2.yaml
    bad = run("trainer.n_gpus_per_node=8")
    assert bad.returncode != 0 and "unsupported verl key(s) ['trainer.n_gpus_per_node']" in bad.stderr
    assert "actor_rollout_ref.actor.ppo_mini_batch_size" in bad.stderr


def test_readme_table_is_generated_from_the_table():
    assert markdown_table() in EXAMPLE_README.read_text()
