"""Run planning: preset parsing, knobs > --set > env > preset precedence, sweep grid expansion, labels, errors."""

from __future__ import annotations

import dataclasses

from pathlib import Path

import pytest

from pcsd_core.config.loader import load_preset, parse_sweep
from steps.plan import branch_label, expand_grid, parse_preset, plan_run, resolve_overrides

REPO_ROOT = Path(__file__).resolve().parents[2]
PRESETS = sorted((REPO_ROOT / "configs").glob("*.yaml"))


@pytest.mark.parametrize("preset", PRESETS, ids=lambda path: path.name)
def test_every_preset_parses_and_plans(preset):
    raw = parse_preset(preset.read_text())
    plan = plan_run(raw, flow_run_id="1", env={})
    loaded = load_preset(preset)
    assert [b.overrides for b in plan.branches] == expand_grid(loaded.sweep)
    for branch in plan.branches:  # each branch is the preset's config with its point applied
        expected = loaded.config(branch.overrides).to_flat_dict()
        got = branch.config.to_flat_dict()
        for key in ("train.output_dir", "data.path", "model.name"):  # made absolute / per branch by the plan
            expected.pop(key), got.pop(key)
        assert got == expected


def test_gpu_preset_mirrors_the_reference_script():
    raw = parse_preset((REPO_ROOT / "configs" / "gpu_gsm8k_7b.yaml").read_text())
    cfg = plan_run(raw, flow_run_id="1", env={}).branches[0].config
    assert cfg.model.name == "deepseek-math-7b-base" and cfg.rollout.engine == "sglang"
    # The reference's mini-batch is 16 prompts; ours counts their responses: 16 x rollout.n.
    assert (cfg.train.lr, cfg.train.mini_batch_size, cfg.rollout.temperature, cfg.train.ppo_epochs) == (1e-6, 16 * cfg.rollout.n, 1.0, 1)


def test_sweep_grid_is_the_cartesian_product_with_readable_labels():
    grid = parse_sweep('{"train.lr": [1e-5, 3e-5], "loss.divergence": ["forward_kl", "jsd"]}')
    points = expand_grid(grid)
    assert len(points) == 4
    assert [branch_label(p) for p in points] == [
        "lr=1e-05,divergence=forward_kl", "lr=1e-05,divergence=jsd",
        "lr=3e-05,divergence=forward_kl", "lr=3e-05,divergence=jsd",
    ]  # fmt: skip
    assert branch_label({"rollout.temperature": 0.7, "loss.temperature": 2.0}) == (
        "rollout.temperature=0.7,loss.temperature=2.0"
    )
    assert expand_grid(parse_sweep("")) == [{}] and branch_label({}) == "base"


@pytest.mark.parametrize(
    ("spec", "message"),
    [
        ("{not json", "not valid JSON"),
        ('{"lr": [1]}', "must look like 'section.field'"),
        ('{"train.lr": 1e-5}', "non-empty list"),
        ('{"train.lr": []}', "non-empty list"),
        ("[1, 2]", "must map config keys"),
    ],
)
def test_bad_sweeps_are_rejected_with_the_rule(spec, message):
    with pytest.raises(ValueError, match=message):
        parse_sweep(spec)


def test_a_branch_that_breaks_validation_fails_the_plan_naming_the_branch():
    raw = parse_preset((REPO_ROOT / "configs" / "cpu_smollm2.yaml").read_text())
    with pytest.raises(ValueError, match=r"sweep branch 'lr=-1.0'.*train.lr"):
        plan_run(raw, flow_run_id="1", env={}, sweep='{"train.lr": [1e-5, -1.0]}')
    with pytest.raises(ValueError, match="unknown key"):
        plan_run(raw, flow_run_id="1", env={}, sweep='{"train.learning_rate": [1e-5]}')


def test_bad_preset_fails_at_parse_time():
    with pytest.raises(ValueError, match="unknown key"):
        parse_preset("train:\n  learning_rate: 1\n")
    with pytest.raises(ValueError, match="non-empty list"):
        parse_preset("sweep:\n  train.lr: 1\n")


def test_precedence_is_cli_over_env_over_preset(tmp_path):
    raw = parse_preset((REPO_ROOT / "configs" / "cpu_smollm2.yaml").read_text())
    env = {"MODEL_PATH": "qwen2.5-1.5b-instruct", "TOTAL_STEPS": "7", "DATA_PATH": str(tmp_path), "ROLLOUT_NUM_GPUS": ""}
    from_env = plan_run(raw, flow_run_id="1", env=env).base_config
    assert (from_env.model.name, from_env.train.total_training_steps) == ("qwen2.5-1.5b-instruct", 7)
    assert from_env.data.path == str(tmp_path)
    assert from_env.rollout.num_gpus == 0  # empty variables are ignored
    cli = plan_run(raw, flow_run_id="1", env=env, model="smollm2-135m", total_steps=2, lr=3e-5, data_path="hub")
    assert cli.base_config.model.name == "smollm2-135m"
    assert (cli.base_config.train.total_training_steps, cli.base_config.train.lr) == (2, 3e-5)
    assert cli.base_config.data.path == ""  # 'hub' means the hub dataset even with DATA_PATH set
    assert resolve_overrides(env={"DATA_PATH": ""}) == {"data.path": ""}  # DATA_PATH= selects the hub
    preset_only = plan_run(raw, flow_run_id="1", env={}).base_config
    assert preset_only.train.total_training_steps == 4
    # --set sits between the environment and the knobs.
    with_set = plan_run(raw, flow_run_id="1", env=env, overrides="train.total_training_steps=5 rollout.n=4 train.mini_batch_size=8")
    assert (with_set.base_config.train.total_training_steps, with_set.base_config.rollout.n) == (5, 4)
    knob_wins = plan_run(raw, flow_run_id="1", env=env, overrides="train.total_training_steps=5", total_steps=3)
    assert knob_wins.base_config.train.total_training_steps == 3
    with pytest.raises(ValueError, match="unknown flow knob"):
        resolve_overrides(env={}, steps=3)


def test_duplicate_sweep_points_are_refused_before_they_share_a_folder():
    raw = parse_preset((REPO_ROOT / "configs" / "cpu_smollm2.yaml").read_text())
    with pytest.raises(ValueError, match=r"sweep branches 'lr=1e-05' and 'lr=1e-05' are the same point"):
        plan_run(raw, flow_run_id="1", env={}, sweep='{"train.lr": [1e-5, 0.00001]}')


def test_cli_sweep_replaces_the_preset_sweep_and_branches_get_own_output_dirs():
    raw = parse_preset((REPO_ROOT / "configs" / "sweep_cpu_smollm2.yaml").read_text())
    assert len(plan_run(raw, flow_run_id="5", env={}).branches) == 4
    plan = plan_run(raw, flow_run_id="5", env={}, sweep='{"loss.divergence": ["forward_kl", "jsd"]}')
    assert [b.label for b in plan.branches] == ["divergence=forward_kl", "divergence=jsd"]
    output_dirs = {b.config.train.output_dir for b in plan.branches}
    assert len(output_dirs) == 2 and all(Path(d).is_absolute() and "/5/" in d for d in output_dirs)
    assert plan.branches[0].data_key == plan.branches[1].data_key  # one preprocessed dataset
    assert plan.branches[0].base_model_key == plan.branches[1].base_model_key  # one base-model evaluation


def test_control_arms_share_one_base_model_evaluation_but_not_their_data():
    raw = parse_preset((REPO_ROOT / "configs" / "cpu_smollm2.yaml").read_text())
    plan = plan_run(raw, flow_run_id="1", env={}, sweep='{"data.privileged_context": ["solution", "shuffled"]}')
    first, second = plan.branches
    assert first.data_key != second.data_key  # the teacher prompts differ
    assert first.base_model_key == second.base_model_key  # the student prompts (all the base model sees) do not
    other_model = plan_run(raw, flow_run_id="1", env={}, sweep='{"eval.max_new_tokens": [64, 128]}')
    assert other_model.branches[0].base_model_key != other_model.branches[1].base_model_key


def test_a_model_alias_brings_its_recipe_and_the_machine_check_refuses_it_in_seconds():
    """`--model deepseek-math-7b-base` on the CPU default preset runs the 7B GPU recipe; on this CPU machine the
    plan stops at once with the memory it needs and the command for the CPU default."""
    import time

    from pcsd_core.models import HardwareError

    raw = parse_preset((REPO_ROOT / "configs" / "cpu_smollm2.yaml").read_text())
    recipe = plan_run(raw, flow_run_id="1", env={}, model="deepseek-math-7b-base").base_config
    seven_b = load_preset(REPO_ROOT / "configs" / "gpu_gsm8k_7b.yaml").config()
    assert (recipe.model.dtype, recipe.rollout.engine, recipe.train.mini_batch_size) == (
        seven_b.model.dtype, seven_b.rollout.engine, seven_b.train.mini_batch_size)
    from_env = plan_run(raw, flow_run_id="1", env={"MODEL_PATH": "deepseek-math-7b-base"}).base_config
    assert from_env.rollout.engine == "sglang"
    started = time.perf_counter()
    with pytest.raises(HardwareError, match=r"needs 8 CUDA GPU\(s\) with >= 40 GB each.*python flows/pcsd_flow.py run"):
        plan_run(raw, flow_run_id="1", env={}, model="deepseek-math-7b-base", check_machine=True)
    assert time.perf_counter() - started < 10
    plan_run(raw, flow_run_id="1", env={}, check_machine=True)  # the CPU default passes the check


def test_parallel_branches_split_the_cores_instead_of_oversubscribing_them(monkeypatch):
    raw = parse_preset((REPO_ROOT / "configs" / "sweep_cpu_smollm2.yaml").read_text())
    branches = plan_run(raw, flow_run_id="1", env={}).branches
    assert [b.sweep_size for b in branches] == [4] * 4
    for cores, expected in ((2, 1), (8, 2), (16, 4)):
        monkeypatch.setattr("os.cpu_count", lambda cores=cores: cores)
        assert branches[0].threads() == expected  # 4 branches at once share the cores
    single = plan_run(raw, flow_run_id="1", env={}, sweep='{"train.lr": [1e-5]}').branches[0]
    assert single.threads() == 16  # alone, it may use them all


def test_sharing_keys_are_fixed_at_plan_time():
    """A later task must find the shared base-model evaluation even if the config it unpickles differs (new code
    with a new field default, a resumed run): the keys are stored on the branch, not recomputed."""
    raw = parse_preset((REPO_ROOT / "configs" / "cpu_smollm2.yaml").read_text())
    branch = plan_run(raw, flow_run_id="1", env={}).branches[0]
    keys = (branch.data_key, branch.base_model_key)
    branch.config = dataclasses.replace(branch.config, eval=dataclasses.replace(branch.config.eval, batch_size=branch.config.eval.batch_size + 1))
    assert (branch.data_key, branch.base_model_key) == keys


def test_task_resources_come_from_the_preset_and_its_config():
    from pcsd_core.config.loader import load_preset
    from steps.plan import DEFAULT_TASK_CPUS, DEFAULT_TASK_MEMORY_MB, parse_preset, task_resources

    gpu = parse_preset((REPO_ROOT / "configs" / "gpu_gsm8k_7b.yaml").read_text())["resources"]
    # 4 FSDP workers on cuda + 4 split rollout GPUs for distill; the rollout's tensor-parallel 4 for evaluate.
    assert gpu == {"distill": {"cpu": 32, "memory": 320000, "gpu": 8},
                   "evaluate": {"cpu": 16, "memory": 64000, "gpu": 4}}
    cpu = task_resources(load_preset(REPO_ROOT / "configs" / "cpu_smollm2.yaml"))
    assert cpu["distill"] == cpu["evaluate"] == {"cpu": DEFAULT_TASK_CPUS, "memory": DEFAULT_TASK_MEMORY_MB, "gpu": 0}


@pytest.mark.parametrize(("resources", "message"), [
    ({"distill": {"gpu": -1}}, r"resources.distill.gpu \(-1\) must be a whole number >= 0"),
    ({"distill": {"memory": 0}}, r"resources.distill.memory \(0\) must be a whole number >= 1"),
    ({"distill": {"cpu": 2.5}}, r"resources.distill.cpu \(2.5\) must be a whole number"),
    ({"distill": {"gpus": 1}}, r"resources.distill.gpus: unknown field; use \['cpu', 'memory', 'gpu'\]"),
    ({"train": {"gpu": 1}}, r"resources.train: unknown step; sized steps are \['distill', 'evaluate'\]"),
    ({"distill": 4}, r"resources.distill must map"),
])  # fmt: skip
def test_bad_task_resources_are_refused_naming_the_field(resources, message):
    from pcsd_core.config.loader import load_preset

    with pytest.raises(ValueError, match=message):
        load_preset({"resources": resources})
