"""verl-schema parquet as data.path: built as verl's GSM8K preprocessing writes it, prepared, taught, trained on.

The fixture reproduces verl's `examples/data_preprocess/gsm8k.py` (verl 0.9.1 ships without its examples, so
its `process_fn` is restated here) on a slice of the local GSM8K copy, written with `datasets` as verl does,
plus the verl reference's `extra_info.privileged_context`.
"""

from __future__ import annotations

from pcsd_core.config.loader import config_from_dict
import json
import re
from pathlib import Path

import pytest
import torch

from pcsd_core.config.schema import DataConfig, PCSDConfig
from pcsd_core.errors import DataValidationError
from pcsd_core.data.prepare import load_prompt_records, prepare_dataset
from pcsd_core.data.prompts import build_prompt_pair

VERL_INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'  # verl's gsm8k.py
ROWS = {"train": 24, "test": 6}


def verl_extract_solution(answer: str) -> str:
    """verl's gsm8k.py `extract_solution`: the number after '#### ', commas removed."""
    return re.search("#### (\\-?[0-9\\.\\,]+)", answer).group(0).split("#### ")[1].replace(",", "")


def verl_rows(gsm8k_dir: Path, split: str, with_context: bool) -> list[dict]:
    lines = (gsm8k_dir / f"{split}.jsonl").read_text().splitlines()[: ROWS[split]]
    rows = []
    for index, example in enumerate(map(json.loads, lines)):
        extra_info = {"split": split, "index": index, "answer": example["answer"], "question": example["question"]}
        if with_context:  # the reference's addition; a marker shows exactly where the teacher's context came from
            extra_info["privileged_context"] = f"HINT-{index}: {example['answer']}"
        rows.append({
            "data_source": "openai/gsm8k",
            "prompt": [{"role": "user", "content": example["question"] + " " + VERL_INSTRUCTION}],
            "ability": "math",
            "reward_model": {"style": "rule", "ground_truth": verl_extract_solution(example["answer"])},
            "extra_info": extra_info,
        })
    return rows


def write_verl_folder(folder: Path, rows_by_split: dict[str, list[dict]]) -> Path:
    from datasets import Dataset

    folder.mkdir(parents=True, exist_ok=True)
    for split, rows in rows_by_split.items():
        Dataset.from_list(rows).to_parquet(str(folder / f"{split}.parquet"))
    return folder


@pytest.fixture(scope="module")
def verl_dir(gsm8k_dir, tmp_path_factory) -> Path:
    return write_verl_folder(tmp_path_factory.mktemp("verl_gsm8k"),
                             {split: verl_rows(gsm8k_dir, split, with_context=True) for split in ROWS})


def test_verl_parquet_prepares_and_the_context_reaches_the_teacher(verl_dir, gsm8k_dir, smollm2_tokenizer, tmp_path):
    prepared = prepare_dataset(DataConfig(path=str(verl_dir)), tmp_path / "out")
    assert prepared.stats["train/rows"] == ROWS["train"] and prepared.stats["test/rows"] == ROWS["test"]
    originals = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()[: ROWS["train"]]]
    verl_train = verl_rows(gsm8k_dir, "train", with_context=True)
    for index, (record, original, verl_row) in enumerate(zip(load_prompt_records(prepared.train_path), originals, verl_train)):
        assert record.question == original["question"]
        assert record.ground_truth == verl_extract_solution(original["answer"])
        assert record.privileged_context == f"HINT-{index}: {original['answer']}"
        assert record.student_messages == verl_row["prompt"]  # the same student prompt verl would sample from
        pair = build_prompt_pair(smollm2_tokenizer, record.student_messages, record.privileged_context, "reference")
        teacher_text, student_text = smollm2_tokenizer.decode(pair.teacher_ids), smollm2_tokenizer.decode(pair.student_ids)
        assert f"HINT-{index}: " in teacher_text and "HINT-" not in student_text
        assert f"{verl_row['prompt'][0]['content']}\n\nHINT-{index}: " in teacher_text  # question, blank line, context


def test_plain_verl_gsm8k_output_uses_the_worked_solution(gsm8k_dir, tmp_path):
    """verl's GSM8K output without the reference's field: 'solution' is extra_info.answer; the other modes work."""
    folder = write_verl_folder(tmp_path / "in", {s: verl_rows(gsm8k_dir, s, with_context=False) for s in ROWS})
    original = json.loads((gsm8k_dir / "train.jsonl").read_text().splitlines()[0])
    solution = load_prompt_records(prepare_dataset(DataConfig(path=str(folder)), tmp_path / "a").train_path)[0]
    assert solution.privileged_context == original["answer"]
    answer_only = load_prompt_records(
        prepare_dataset(DataConfig(path=str(folder), privileged_context="answer_only"), tmp_path / "b").train_path)[0]
    assert answer_only.privileged_context == verl_extract_solution(original["answer"])
    column = load_prompt_records(
        prepare_dataset(DataConfig(path=str(folder), privileged_context="column:question"), tmp_path / "c").train_path)[0]
    assert column.privileged_context == original["question"]


def test_question_falls_back_to_the_prompt_without_verl_instruction(gsm8k_dir, tmp_path):
    rows = {split: verl_rows(gsm8k_dir, split, with_context=True) for split in ROWS}
    for split_rows in rows.values():
        for row in split_rows:
            del row["extra_info"]["question"]
    prepared = prepare_dataset(DataConfig(path=str(write_verl_folder(tmp_path / "in", rows))), tmp_path / "out")
    original = json.loads((gsm8k_dir / "train.jsonl").read_text().splitlines()[0])
    assert load_prompt_records(prepared.train_path)[0].question == original["question"]


@pytest.mark.parametrize(
    ("break_row", "message"),
    [
        (lambda row: row["reward_model"].update(ground_truth=None),
         "field reward_model.ground_truth (None) must be the final number"),
        (lambda row: row["reward_model"].update(ground_truth="41"),
         "field extra_info.answer ends in '42' but reward_model.ground_truth is '41'"),
        (lambda row: row["extra_info"].update(privileged_context=""),
         "field extra_info.privileged_context is missing or empty, while row 0 of the split has one"),
        (lambda row: (row["extra_info"].pop("question"), row.update(prompt=[{"role": "system", "content": "x"}])),
         "field prompt must be a list of chat messages with a non-empty user turn"),
    ],
)
def test_schema_errors_name_file_row_and_field(gsm8k_dir, tmp_path, break_row, message):
    rows = {split: verl_rows(gsm8k_dir, split, with_context=True) for split in ROWS}
    break_row(rows["train"][3])
    folder = write_verl_folder(tmp_path / "in", rows)
    with pytest.raises(DataValidationError, match=re.escape(f"{folder / 'train.parquet'}: row 3 ") + ".*" + re.escape(message)):
        prepare_dataset(DataConfig(path=str(folder)), tmp_path / "out")


def test_one_distillation_step_trains_on_verl_data(verl_dir, tiny_model_dir, tmp_path):
    from pcsd_core.engine.trainer import Distiller

    prepared = prepare_dataset(DataConfig(path=str(verl_dir)), tmp_path / "data")
    cfg = config_from_dict({}, {
        "model.name": str(tiny_model_dir), "data.path": str(verl_dir), "data.teacher_template": "reference",
        "rollout.n": 2, "rollout.max_response_tokens": 6, "rollout.batch_size": 8,
        "train.prompts_per_step": 2, "train.mini_batch_size": 4, "train.micro_batch_size": 2,
        "train.total_training_steps": 1, "train.lr": 1e-3, "train.device": "cpu", "train.output_dir": str(tmp_path / "run"),
    })
    logged = []
    distiller = Distiller(cfg, prepared.train_path, log_metrics=lambda metrics, step: logged.append(metrics))
    distiller.setup()
    initial = {name: tensor.clone() for name, tensor in distiller.engine.model.state_dict().items()}
    try:
        distiller.train()
        trained = distiller.engine.model.state_dict()
        assert any(not torch.equal(initial[name], trained[name]) for name in initial)
    finally:
        distiller.close()
    assert len(logged) == 1 and logged[0]["train/kl"] > 0 and torch.isfinite(torch.tensor(logged[0]["train/loss"]))
    samples = [json.loads(line) for line in (tmp_path / "run" / "samples" / "step_000001.jsonl").read_text().splitlines()]
    questions = {record.question for record in load_prompt_records(prepared.train_path)}
    assert samples and all(sample["question"] in questions for sample in samples)
