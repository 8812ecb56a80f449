"""The privileged-context registry: the strategies' names in one place, and the `wrong_answer` control arm."""

from __future__ import annotations

import json

import pytest

from pcsd_core.data.privileged import STRATEGIES, parse_privileged_context, wrong_final_answer
from pcsd_core.data.sources import parse_final_answer
from pcsd_core.errors import ConfigError
from pcsd_core.eval.scoring import extract_answer, is_correct


def test_every_strategy_and_a_column_parse_and_anything_else_names_the_field():
    assert {parse_privileged_context(name).strategy for name in STRATEGIES} == set(STRATEGIES)
    assert parse_privileged_context("column:hint").column == "hint"
    for bad in ("none", "column:", "Solution", ""):
        with pytest.raises(ConfigError) as raised:
            parse_privileged_context(bad)
        assert raised.value.field == "data.privileged_context"


def test_wrong_answer_never_keeps_the_true_answer_and_changes_nothing_but_the_final_number(gsm8k_dir):
    rows = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()[:500]]
    for row in rows:
        solution, truth = row["answer"], parse_final_answer(row["answer"])
        wrong = wrong_final_answer(solution, truth)
        assert wrong == wrong_final_answer(solution, truth)  # deterministic
        # The scorer reads a different final number, in the format it expects, off the wrong solution.
        assert extract_answer(wrong, "strict") is not None and not is_correct(wrong, truth)
        # Everything up to the final number is the true solution, character for character.
        prefix = solution[: solution.rindex("####")]
        assert wrong.startswith(prefix) and wrong[len(prefix):].startswith("#### ")
        assert "\n" not in wrong[len(prefix):].strip()
        offset = float(extract_answer(wrong, "strict")) - float(truth)
        assert 1 <= offset <= 9 and offset.is_integer()


def test_wrong_answer_of_a_bare_number_and_of_a_decimal():
    assert wrong_final_answer("12", "12") != "12" and float(wrong_final_answer("12", "12")) - 12 in range(1, 10)
    decimal = wrong_final_answer("Half of 7 is 3.5\n#### 3.5", "3.5")
    assert decimal.startswith("Half of 7 is 3.5\n#### ") and decimal.split("#### ")[1] != "3.5"
    assert len(decimal.split("#### ")[1].split(".")[1]) == 1  # the same number of decimals


def test_prepared_wrong_answer_arm_shows_the_teacher_the_wrong_solution_and_keeps_the_true_one(gsm8k_dir, tmp_path):
    from pcsd_core.config.schema import DataConfig
    from pcsd_core.data.prepare import load_prompt_records, load_solutions, prepare_dataset

    prepared = prepare_dataset(DataConfig(path=str(gsm8k_dir), privileged_context="wrong_answer", max_train_rows=8,
                                          max_test_rows=4), tmp_path)
    records, solutions = load_prompt_records(prepared.train_path), load_solutions(prepared.train_path)
    assert prepared.stats["privileged_context"] == "wrong_answer"  # what the user set, as set
    for record, solution in zip(records, solutions):
        assert record.privileged_context == wrong_final_answer(solution, record.ground_truth) != solution
