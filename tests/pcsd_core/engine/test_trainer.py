"""The Distiller loop on CPU: outputs and metrics, weight sync, resume equivalence, config/CLI errors.

Tiny random 2-layer Llama (SmolLM2 tokenizer) and a 24-question GSM8K slice; a few steps each.
"""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import json
import math

import pytest
import torch

from pcsd_core.config.schema import PCSDConfig, DataConfig
from pcsd_core.engine.trainer import Distiller, prompt_indices_for_step

CONTRACT_METRICS = {
    "train/loss", "train/kl", "train/teacher_entropy", "train/student_entropy", "train/response_len",
    "train/truncated_frac", "train/grad_norm", "train/lr", "rollout/accuracy", "perf/tokens_per_s",
    "perf/peak_mem_mb", "time/rollout_s", "time/teacher_s", "time/update_s", "time/weight_sync_s", "time/step_s",
    "rollout/repetition_rate", "train/loss_share_top10pct_tokens",
}


@pytest.fixture(scope="module")
def train_parquet(gsm8k_dir, tmp_path_factory):
    from pcsd_core.data.prepare import prepare_dataset

    prepared = prepare_dataset(DataConfig(path=str(gsm8k_dir), max_train_rows=24, max_test_rows=4),
                               tmp_path_factory.mktemp("data"))
    return prepared.train_path


def tiny_config(model_dir, output_dir, **overrides) -> PCSDConfig:
    base = {
        "model.name": str(model_dir), "rollout.n": 2, "rollout.max_response_tokens": 6, "rollout.batch_size": 8,
        "train.prompts_per_step": 2, "train.mini_batch_size": 2, "train.micro_batch_size": 1,
        "train.total_training_steps": 2, "train.lr": 1e-3, "train.device": "cpu", "train.output_dir": str(output_dir),
    }
    return config_from_dict({}, {**base, **overrides})


def run(cfg: PCSDConfig, parquet, logged=None, stop_after_step=None) -> tuple[Distiller, object]:
    logged = [] if logged is None else logged
    distiller = Distiller(cfg, parquet, log_metrics=lambda metrics, step: logged.append((step, metrics)))
    distiller.setup()
    return distiller, distiller.train(stop_after_step)


def test_training_writes_checkpoint_metrics_and_samples(tiny_model_dir, train_parquet, tmp_path):
    from transformers import AutoModelForCausalLM

    logged: list = []
    cfg = tiny_config(tiny_model_dir, tmp_path / "run")
    distiller, result = run(cfg, train_parquet, logged)
    try:
        assert [step for step, _ in logged] == [1, 2]
        for _, metrics in logged:
            assert set(metrics) == CONTRACT_METRICS
            assert all(math.isfinite(value) for value in metrics.values())
            assert metrics["train/kl"] > 0 and metrics["train/loss"] > 0
        # Weight sync: the rollout engine now generates from the trained weights, bit for bit the actor's.
        ids = torch.tensor([[1, 400, 2000, 30, 77, 9]])
        actor_logits = distiller.workers.actor.student.lm(ids).logits
        engine_logits = distiller.engine.model(ids).logits
        torch.testing.assert_close(engine_logits, actor_logits, rtol=0, atol=1e-6)
    finally:
        distiller.close()
    assert result.checkpoint_dir == tmp_path / "run" / "checkpoints" / "step_000002"
    assert (tmp_path / "run" / "final").resolve() == result.checkpoint_dir.resolve()
    trained = AutoModelForCausalLM.from_pretrained(tmp_path / "run" / "final")
    initial = AutoModelForCausalLM.from_pretrained(tiny_model_dir)
    assert not torch.equal(trained.model.layers[0].mlp.up_proj.weight, initial.model.layers[0].mlp.up_proj.weight)
    torch.testing.assert_close(trained(ids).logits, actor_logits, rtol=0, atol=1e-6)
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step_000002.jsonl").read_text().splitlines()]
    assert len(samples) == 4
    for sample in samples:
        assert set(sample) == {"step", "question", "response", "tokens", "token_kl", "correct"}
        assert len(sample["tokens"]) == len(sample["token_kl"]) >= 1 and sample["step"] == 2
    # Collapse diagnostics: the 4 samples are the whole step (2 prompts x 2 responses), so their per-token losses
    # give the step's top-10% loss share by sort and sum; the repetition rate is a share of the 4 responses.
    last = logged[-1][1]
    losses = sorted((abs(value) for sample in samples for value in sample["token_kl"]), reverse=True)
    top = max(1, -(-len(losses) // 10))
    assert last["train/loss_share_top10pct_tokens"] == pytest.approx(sum(losses[:top]) / sum(losses), rel=1e-6)
    for _, metrics in logged:
        assert 0.1 <= metrics["train/loss_share_top10pct_tokens"] <= 1
        assert metrics["rollout/repetition_rate"] in (0.0, 0.25, 0.5, 0.75, 1.0)


def test_resume_continues_with_same_weights_and_data_order(tiny_model_dir, train_parquet, tmp_path):
    """4 steps straight == 2 steps, resume from the step-2 checkpoint, 2 more (tolerance: atol 1e-6)."""
    from transformers import AutoModelForCausalLM

    overrides = {"train.total_training_steps": 4, "train.checkpoint_every": 2, "train.lr_schedule": "cosine",
                 "train.warmup_steps": 1}
    straight, _ = run(tiny_config(tiny_model_dir, tmp_path / "straight", **overrides), train_parquet)
    straight.close()
    first, _ = run(tiny_config(tiny_model_dir, tmp_path / "resumed", **overrides), train_parquet, stop_after_step=2)
    first.close()  # "interrupted" after the step-2 checkpoint
    resumed_cfg = tiny_config(tiny_model_dir, tmp_path / "resumed", **overrides,
                              **{"train.resume_from": str(tmp_path / "resumed" / "checkpoints" / "step_000002")})
    resumed, result = run(resumed_cfg, train_parquet)
    resumed.close()
    assert resumed.start_step == 2 and len(result.history) == 2
    a = AutoModelForCausalLM.from_pretrained(tmp_path / "straight" / "final").state_dict()
    b = AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / "final").state_dict()
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=1e-6, msg=name)
    for step in (3, 4):  # same prompts and same sampled responses after the resume
        name = f"samples/step_{step:06d}.jsonl"
        assert (tmp_path / "straight" / name).read_text() == (tmp_path / "resumed" / name).read_text()


def test_bf16_run_checkpoints_float32_masters_and_resumes_with_the_same_loss(tiny_model_dir, train_parquet, tmp_path):
    """model.dtype bfloat16: the checkpoint holds the float32 masters and optimizer state, so a resume from it
    trains step 2 with the same loss and weights as the uninterrupted run (the rollout engine, loaded from the
    checkpoint in bf16, samples the same responses)."""
    from safetensors import safe_open

    overrides = {"model.dtype": "bfloat16", "train.total_training_steps": 2, "train.checkpoint_every": 1,
                 "train.lr": 1e-6}
    straight, straight_result = run(tiny_config(tiny_model_dir, tmp_path / "straight", **overrides), train_parquet)
    straight.close()
    first, _ = run(tiny_config(tiny_model_dir, tmp_path / "resumed", **overrides), train_parquet, stop_after_step=1)
    first.close()
    checkpoint = tmp_path / "resumed" / "checkpoints" / "step_000001"
    with safe_open(checkpoint / "model.safetensors", framework="pt") as weights:
        assert {weights.get_tensor(name).dtype for name in weights.keys()} == {torch.float32}
    moments = torch.load(checkpoint / "training_state.pt", weights_only=False)["optimizer"]["state"]
    assert {value.dtype for state in moments.values() for value in state.values() if value.dim()} == {torch.float32}
    resumed, result = run(tiny_config(tiny_model_dir, tmp_path / "resumed", **overrides,
                                      **{"train.resume_from": str(checkpoint)}), train_parquet)
    resumed.close()
    assert result.history[0]["train/loss"] == pytest.approx(straight_result.history[1]["train/loss"], rel=1e-6)
    final = {}
    for name in ("straight", "resumed"):
        with safe_open(tmp_path / name / "final" / "model.safetensors", framework="pt") as weights:
            final[name] = {key: weights.get_tensor(key) for key in weights.keys()}
    for key, tensor in final["straight"].items():
        assert torch.equal(final["resumed"][key], tensor), key


def test_data_order_is_a_seeded_permutation_per_pass():
    first_pass = [i for step in range(3) for i in prompt_indices_for_step(step, 4, 12, seed=7)]
    assert sorted(first_pass) == list(range(12)) and first_pass != list(range(12))
    second_pass = [i for step in range(3, 6) for i in prompt_indices_for_step(step, 4, 12, seed=7)]
    assert sorted(second_pass) == list(range(12)) and second_pass != first_pass
    assert prompt_indices_for_step(2, 4, 12, seed=8) != prompt_indices_for_step(2, 4, 12, seed=7)


def test_setup_errors_are_clear_and_early(tiny_model_dir, train_parquet, tmp_path):
    cfg = tiny_config(tiny_model_dir, tmp_path)
    with pytest.raises(FileNotFoundError, match="train parquet .*does not exist"):
        Distiller(cfg, tmp_path / "missing.parquet").setup()
    bad_resume = tiny_config(tiny_model_dir, tmp_path, **{"train.resume_from": str(tmp_path)})
    with pytest.raises(ValueError, match=r"train.resume_from .* is not a PCSD checkpoint"):
        Distiller(bad_resume, train_parquet).setup()
    with pytest.raises(ValueError, match=r"must be divisible by train.mini_batch_size"):
        tiny_config(tiny_model_dir, tmp_path, **{"train.mini_batch_size": 3, "train.micro_batch_size": 1})
    with pytest.raises(ValueError, match=r"train.num_workers \(2\) > 1 needs train.use_ray"):
        tiny_config(tiny_model_dir, tmp_path, **{"train.num_workers": 2})
    with pytest.raises(ValueError, match="rollout.placement 'split' needs rollout.num_gpus"):
        tiny_config(tiny_model_dir, tmp_path, **{"rollout.placement": "split"})
    on_storage = tiny_config(tiny_model_dir, tmp_path, **{"train.output_dir": "s3://bucket/run"})
    with pytest.raises(ValueError, match=r"train.output_dir \('s3://bucket/run'\) is a URI; the engine writes to a "
                                         r"local folder\. A caller with a storage URI stages it"):
        Distiller(on_storage, train_parquet)  # refused before anything is loaded


def test_cli_reports_bad_arguments(tmp_path, capsys, train_parquet):
    from pcsd_core.config.loader import parse_overrides
    from cli.train import main

    config = tmp_path / "c.yaml"
    config.write_text("train:\n  device: cpu\n")
    assert parse_overrides(["train.lr=1e-5", "train.use_ray=true"]) == {"train.lr": "1e-5", "train.use_ray": True}
    with pytest.raises(ValueError, match="section.field=value"):
        parse_overrides(["lr=1e-5"])
    assert main(["--config", str(config), "--train-parquet", str(train_parquet), "--set", "train.lrr=1"]) == 2
    assert "unknown key(s) ['lrr'] in config section 'train'" in capsys.readouterr().err
    assert main(["--config", str(config), "--train-parquet", str(tmp_path / "no.parquet")]) == 2
    assert "--train-parquet" in capsys.readouterr().err
    assert main(["--config", str(tmp_path / "none.yaml"), "--train-parquet", str(train_parquet)]) == 2


def test_cli_trains_end_to_end(tiny_model_dir, train_parquet, tmp_path, capsys):
    from cli.train import main

    config = tmp_path / "c.yaml"
    config.write_text(tiny_config(tiny_model_dir, tmp_path / "cli", **{"train.total_training_steps": 1}).to_yaml())
    assert main(["--config", str(config), "--train-parquet", str(train_parquet), "--set", "train.lr=1e-4",
                 "--metrics-jsonl", str(tmp_path / "m.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "final checkpoint:" in out and "step 1/1" in out
    line = json.loads((tmp_path / "m.jsonl").read_text())
    assert line["step"] == 1 and line["train/lr"] == pytest.approx(1e-4)
