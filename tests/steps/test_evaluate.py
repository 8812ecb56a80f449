"""Evaluate step on the tiny model and the local GSM8K copy: greedy, batched, scored with pcsd_core.eval.scoring."""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import json
import math
from dataclasses import asdict

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient

from pcsd_core.config.schema import PCSDConfig
from pcsd_core.data.prepare import load_prompt_records, prepare_dataset
from pcsd_core.data.prompts import render_prompt_ids
from pcsd_core.rollout.base import Generation
from pcsd_core.eval.scoring import is_correct
from steps import tracking
from steps.evaluate import TABLE_COLUMNS, EvalResult, evaluate, log_evaluation

MAX_NEW_TOKENS = 6


@pytest.fixture()
def setup(tmp_path, tiny_model_dir, gsm8k_dir):
    cfg = config_from_dict(
        {
            "model": {"name": str(tiny_model_dir)},
            "data": {"path": str(gsm8k_dir), "max_train_rows": 2, "max_test_rows": 5},
            "eval": {"num_examples": 3, "max_new_tokens": MAX_NEW_TOKENS, "batch_size": 2},
        }
    )
    prepared = prepare_dataset(cfg.data, tmp_path / "data")
    return cfg, prepared.test_path, tiny_model_dir


def test_evaluate_is_greedy_batched_and_scored_per_example(setup, smollm2_tokenizer):
    cfg, test_path, model_dir = setup
    result = evaluate(str(model_dir), test_path, cfg)
    records = load_prompt_records(test_path)[:3]
    assert result.num_examples == 3 and [row["index"] for row in result.examples] == [r.index for r in records]
    assert all(set(row) == set(TABLE_COLUMNS) for row in result.examples)

    # Independent reference: plain transformers greedy decoding, one prompt at a time (no batching, no padding).
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    for record, row in zip(records, result.examples):
        ids = torch.tensor([render_prompt_ids(smollm2_tokenizer, record.student_messages)])
        with torch.no_grad():
            out = model.generate(ids, do_sample=False, max_new_tokens=MAX_NEW_TOKENS, pad_token_id=smollm2_tokenizer.pad_token_id)
        expected = smollm2_tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)
        assert row["response"] == expected
        assert row["ground_truth"] == record.ground_truth and row["question"] == record.question
        assert row["correct_strict"] == is_correct(expected, record.ground_truth, mode="strict")

    assert result.accuracy_strict == sum(r["correct_strict"] for r in result.examples) / 3


class ScriptedEngine:
    """Answers each test question with a fixed text, to check the scoring path on known-correct and known-wrong
    responses. Keyed by the question's prompt: evaluation sends the questions in batches, longest first."""

    def __init__(self, tokenizer, texts, test_path=None):
        records = load_prompt_records(test_path)[: len(texts)]
        prompts = [tuple(render_prompt_ids(tokenizer, record.student_messages)) for record in records]
        self.ids = {prompt: tokenizer(text, add_special_tokens=False)["input_ids"] for prompt, text in zip(prompts, texts)}
        self.calls = []

    def generate(self, prompt_ids, n, sampling):
        assert sampling.temperature == 0.0 and n == 1  # evaluation is greedy, one response per question
        self.calls.append(len(prompt_ids))
        return [Generation(prompt_index=i, response_ids=self.ids[tuple(ids)], finished=True)
                for i, ids in enumerate(prompt_ids)]


def test_accuracy_counts_strict_and_flexible_answers(setup, smollm2_tokenizer):
    cfg, test_path, model_dir = setup
    truths = [record.ground_truth for record in load_prompt_records(test_path)[:3]]
    texts = [f"So the answer is\n#### {truths[0]}", f"The answer is {truths[1]}.", "I do not know."]
    engine = ScriptedEngine(smollm2_tokenizer, texts, test_path)
    progress = []
    result = evaluate(str(model_dir), test_path, cfg, engine=engine, progress=lambda metrics, done: progress.append(done))
    assert engine.calls == [2, 1] and progress == [2, 3]  # eval.batch_size 2: two batches, progress after each
    assert [row["correct_strict"] for row in result.examples] == [True, False, False]
    assert [row["correct_flexible"] for row in result.examples] == [True, True, False]
    assert (result.accuracy_strict, result.accuracy_flexible) == (pytest.approx(1 / 3), pytest.approx(2 / 3))
    assert result.examples[0]["extracted_strict"] == truths[0]
    metrics = result.metrics("after")
    assert metrics["eval/after/gsm8k_accuracy_strict"] == result.accuracy_strict
    assert metrics["eval/after/gsm8k_accuracy_flexible"] == result.accuracy_flexible
    # The held-out metrics ride along, with 95% intervals (Wilson, checked against statsmodels in test_stats.py).
    assert metrics["eval/after/answer_format_rate"] == pytest.approx(1 / 3)  # only the first has a #### line
    assert metrics["eval/after/gsm8k_accuracy_strict_low"] < 1 / 3 < metrics["eval/after/gsm8k_accuracy_strict_high"]
    assert (metrics["eval/after/repetition_rate"], metrics["eval/after/truncation_rate"]) == (0.0, 0.0)
    assert metrics["eval/after/num_questions"] == 3
    from steps.contract import ACCURACY_METRICS, HELDOUT_METRICS, INTERVAL_SUFFIXES

    contract_names = {name + suffix for name in (*ACCURACY_METRICS, *HELDOUT_METRICS) for suffix in ("", *INTERVAL_SUFFIXES)}
    assert {key.removeprefix("eval/after/") for key in metrics} <= contract_names  # every name is in the contract
    assert [row["has_answer_line"] for row in result.examples] == [True, False, False]


def test_heldout_kl_is_scored_with_the_true_solution_on_the_models_own_answers(setup):
    """The evaluation's held-out KL equals eval_metrics.heldout_kl run by hand with the test split's solutions."""
    from pcsd_core.data.prepare import load_solutions
    from pcsd_core.eval.metrics import heldout_kl
    from pcsd_core.models import load_model, load_tokenizer

    cfg, test_path, model_dir = setup
    result = evaluate(str(model_dir), test_path, cfg)
    tokenizer = load_tokenizer(str(model_dir))
    records = load_prompt_records(test_path)[:3]
    responses = [tokenizer(row["response"], add_special_tokens=False)["input_ids"] for row in result.examples]
    if [row["length_tokens"] for row in result.examples] == [len(ids) for ids in responses]:  # no EOS to re-add
        expected = heldout_kl(load_model(str(model_dir), dtype="float32", device="cpu"), tokenizer,
                              [r.student_messages for r in records], load_solutions(test_path)[:3], responses,
                              teacher_template=cfg.data.teacher_template)
        assert result.summary["heldout_kl"] == pytest.approx(expected.mean_per_token, rel=1e-4)
    assert result.summary["heldout_kl"] > 0 and len({row["heldout_kl"] for row in result.examples}) == 3


def test_results_round_trip_and_log_to_mlflow_as_metrics_and_table(setup, smollm2_tokenizer, tmp_path, monkeypatch):
    cfg, test_path, model_dir = setup
    texts = ["#### 1", "#### 2", "#### 3"]
    result = evaluate(str(model_dir), test_path, cfg, engine=ScriptedEngine(smollm2_tokenizer, texts, test_path))
    loaded = EvalResult.load(result.save(tmp_path / "eval.json"))
    assert json.dumps(asdict(loaded)) == json.dumps(asdict(result))  # JSON, so a NaN (a row not scored) compares
    # Scored by the model as the trainer holds it, whatever engine generated (one evaluation on HF and SGLang).
    assert math.isfinite(result.summary["heldout_kl"])

    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    experiment_id = tracking.setup_tracking("eval-test")
    run_id = MlflowClient(uri).create_run(experiment_id).info.run_id
    log_evaluation(run_id, result, "before")
    run = MlflowClient(uri).get_run(run_id)
    assert run.data.metrics["eval/before/gsm8k_accuracy_strict"] == result.accuracy_strict
    table = mlflow.load_table("eval/before_examples.json", run_ids=[run_id])
    assert list(table["response"]) == [row["response"] for row in result.examples]
    assert list(table["correct_flexible"]) == [row["correct_flexible"] for row in result.examples]


def test_evaluate_rejects_an_empty_selection(setup):
    cfg, test_path, model_dir = setup
    empty = tmp = test_path.parent / "empty.parquet"
    import pyarrow.parquet as pq

    pq.write_table(pq.read_table(test_path).slice(0, 0), tmp)
    with pytest.raises(ValueError):
        evaluate(str(model_dir), empty, cfg)


def test_heldout_kl_covers_only_the_first_questions_it_is_asked_for(setup):
    """eval.heldout_kl_questions bounds its cost (two forward passes a question); the rest are marked NaN."""
    cfg, test_path, model_dir = setup
    limited = config_from_dict(cfg.to_dict(), {"eval.heldout_kl_questions": 2})
    result = evaluate(str(model_dir), test_path, limited)
    kls = [row["heldout_kl"] for row in result.examples]
    assert result.summary["heldout_kl_questions"] == 2 and all(k > 0 for k in kls[:2]) and math.isnan(kls[2])
