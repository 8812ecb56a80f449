"""Validation in the Distiller loop: when it runs, which checkpoint keep-best keeps, and the collapse stop.

A real run of the tiny random Llama, whose validation answers are really generated and scored. For keep-best and
the collapse stop the scored metric is then scripted (peaking early, or degenerating), since a 2-layer random
model's accuracy is 0 at every step. The rule itself: tests/pcsd_core/eval/test_validation.py.
"""

from __future__ import annotations

import torch

from pcsd_core.config.schema import DataConfig
from pcsd_core.data.prepare import prepare_dataset
from pcsd_core.engine import trainer as trainer_module
from pcsd_core.eval.validation import Validation
from test_trainer import run, tiny_config


def lookup_parquet(tmp_path):
    """12 generated train questions (9 to train on, the last 3 held out for validation)."""
    data = DataConfig(synthetic="lookup", synthetic_difficulty=1, max_train_rows=12, max_test_rows=2,
                      data_source="synthetic/lookup")
    return prepare_dataset(data, tmp_path / "data").train_path


def scripted(monkeypatch, values: dict[int, dict[str, float]], calls: list[int]):
    """The trainer's real validation, with the scored metric replaced by `values[step]` where given."""
    real = trainer_module.validate

    def validate(*args, step, **kwargs):
        calls.append(step)
        validation = real(*args, step=step, **kwargs)
        return Validation(step, {**validation.summary, **values.get(step, {})})

    monkeypatch.setattr(trainer_module, "validate", validate)


def test_validation_runs_before_every_kth_step_and_after_the_last_and_keep_best_keeps_the_early_peak(
        tiny_model_dir, monkeypatch, tmp_path):
    parquet = lookup_parquet(tmp_path)
    calls: list[int] = []
    scripted(monkeypatch, {2: {"accuracy_strict": 0.75}, 4: {"accuracy_strict": 0.25}}, calls)
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", **{
        "train.total_training_steps": 5, "train.validate_every": 2, "train.keep_best_by": "accuracy_strict",
        "eval.validation_questions": 3, "eval.max_new_tokens": 4})
    logged: list = []
    distiller, result = run(cfg, parquet, logged)
    try:
        assert len(distiller.records) == 9 and len(distiller.validation_records) == 3  # never trained on
        last_weights = distiller.workers.actor.student.lm.model.layers[0].mlp.up_proj.weight.detach().clone()
    finally:
        distiller.close()
    assert calls == [0, 2, 4, 5]  # before training, every 2nd step, and after the last
    validation_steps = [step for step, metrics in logged if "val/accuracy_strict" in metrics]
    assert validation_steps == [0, 2, 4, 5]
    for step, metrics in logged:
        if "val/accuracy_strict" in metrics:
            assert metrics["val/num_questions"] == 3 and 0 <= metrics["val/repetition_rate"] <= 1
    assert [v.step for v in result.validations] == [0, 2, 4, 5]
    # The peak at step 2 is kept: its checkpoint was saved though checkpoint_every is 0, and `final` points at it.
    kept = tmp_path / "run" / "checkpoints" / "step_000002"
    assert result.checkpoint_dir == kept and (tmp_path / "run" / "final").resolve() == kept.resolve()
    assert result.steps == 5 and not result.stopped_because
    from transformers import AutoModelForCausalLM

    kept_weights = AutoModelForCausalLM.from_pretrained(kept).model.layers[0].mlp.up_proj.weight
    assert not torch.equal(kept_weights, last_weights)  # the step-2 model, not the last one


def test_the_collapse_stop_ends_the_branch_at_the_validation_that_crosses_the_bound(tiny_model_dir, monkeypatch,
                                                                                     tmp_path, capsys):
    parquet = lookup_parquet(tmp_path)
    calls: list[int] = []
    scripted(monkeypatch, {1: {"repetition_rate": 0.2}, 2: {"repetition_rate": 0.7}}, calls)
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", **{
        "train.total_training_steps": 4, "train.validate_every": 1, "train.stop_if_repetition_above": 0.5,
        "eval.validation_questions": 2, "eval.max_new_tokens": 4})
    distiller, result = run(cfg, parquet)
    distiller.close()
    assert calls == [0, 1, 2] and result.steps == 2
    assert "repetition rate 0.700" in result.stopped_because
    assert result.checkpoint_dir == tmp_path / "run" / "checkpoints" / "step_000002"
    assert "stopping after step 2" in capsys.readouterr().out


def test_a_colocated_sglang_engine_sleeps_while_the_actor_trains_and_validates_between_syncs(
        tiny_model_dir, monkeypatch, tmp_path):
    """The engine owns its sleep/wake: the trainer says when the actor needs the accelerator (after each rollout),
    and the weight sync wakes the engine. Validation runs before the first rollout and after syncs, with the
    engine awake. The fake SGLang engine poisons released weights, as the real one leaves them undefined, so a
    generate between a wake and a sync would fail the run."""
    import sys
    from pathlib import Path

    from pcsd_core.distributed.weight_sync import unique_state_items
    from pcsd_core.models import load_model
    from pcsd_core.rollout.sglang import SGLangRolloutEngine

    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "rollout"))
    from fake_sglang import FakeSGLangEngine

    model = load_model(str(tiny_model_dir), dtype="float32", device="cpu")
    eos = model.config.eos_token_id
    fake = FakeSGLangEngine(dict(unique_state_items(model)), eos_token_id=eos)  # tied lm_head: one tensor, as SGLang
    colocated = SGLangRolloutEngine(str(tiny_model_dir), engine=fake, eos_token_ids=[eos],
                                    gpu_memory_probe=fake.memory_probe)
    monkeypatch.setattr(trainer_module, "create_rollout_engine", lambda *args, **kwargs: colocated)
    cfg = tiny_config(tiny_model_dir, tmp_path / "run", **{
        "train.total_training_steps": 2, "train.validate_every": 1, "eval.validation_questions": 2,
        "eval.max_new_tokens": 4})
    distiller, result = run(cfg, lookup_parquet(tmp_path))
    distiller.close()
    assert [v.step for v in result.validations] == [0, 1, 2]
    phases = []
    for method, kwargs in fake.calls:
        phase = {"generate": "generate", "release_memory_occupation": "sleep", "shutdown": "close",
                 "resume_memory_occupation": f"resume {kwargs.get('tags')}"}.get(method, "sync")
        if not phases or phases[-1] != phase:
            phases.append(phase)
    # Validation and the next rollout generate back to back; the actor's work comes between sleep and the sync.
    after_rollout = ["sleep", "resume ['weights']", "sync", "resume ['kv_cache', 'cuda_graph']", "generate"]
    assert phases == ["generate"] + after_rollout * 2 + ["close"]
