"""The shipped positive-control task: deterministic, disjoint splits, and worked solutions that are right."""

from __future__ import annotations

import operator
import re

import pytest

from pcsd_core.data.sources import parse_final_answer
from pcsd_core.data.synthetic import MAX_DIFFICULTY, generate_splits
from pcsd_core.eval.scoring import is_correct

LINE = re.compile(r"^(\d+) ([-+*]) (\d+) = (-?\d+)$")
OPERATIONS = {"+": operator.add, "-": operator.sub, "*": operator.mul}


@pytest.mark.parametrize("difficulty", range(1, MAX_DIFFICULTY + 1))
def test_every_worked_solution_is_arithmetic_that_checks_and_scores_right(difficulty):
    splits = generate_splits(300, 100, seed=3, difficulty=difficulty)
    for row in splits["train"] + splits["test"]:
        *lines, final = row["answer"].split("\n")
        assert len(lines) == difficulty and final.startswith("#### ")
        start = int(re.search(r"has (\d+) ", row["question"]).group(1))
        value = start
        for line in lines:  # each line recomputed here, independently of the generator
            left, symbol, right, result = LINE.match(line).groups()
            assert int(left) == value and OPERATIONS[symbol](int(left), int(right)) == int(result) >= 0
            value = int(result)
        truth = parse_final_answer(row["answer"])
        assert truth == str(value) and is_correct(row["answer"], truth, "strict")


@pytest.mark.parametrize("difficulty", range(1, MAX_DIFFICULTY + 1))
def test_every_lookup_solution_names_the_asked_persons_number_among_the_distractors(difficulty):
    splits = generate_splits(300, 100, seed=3, difficulty=difficulty, task="lookup")
    for row in splits["train"] + splits["test"]:
        # Read the story back independently of the generator: "<Name> has <n> <item>." per person, then the question.
        counts = dict(re.findall(r"(\w+) has (\d+) \w+\.", row["question"]))
        asked = re.search(r"does (\w+) have\?$", row["question"]).group(1)
        assert len(counts) == difficulty + 1 and asked in counts
        truth = parse_final_answer(row["answer"])
        assert truth == counts[asked] and is_correct(row["answer"], truth, "strict")
        assert row["answer"].startswith(f"{asked} has {counts[asked]} ")


@pytest.mark.parametrize("task", ["arithmetic", "lookup"])
def test_generation_is_a_function_of_seed_and_difficulty_and_the_splits_are_disjoint(task):
    first = generate_splits(500, 200, seed=0, difficulty=2, task=task)
    assert first == generate_splits(500, 200, seed=0, difficulty=2, task=task)
    assert generate_splits(500, 200, seed=1, difficulty=2, task=task)["test"] != first["test"]
    assert generate_splits(500, 200, seed=0, difficulty=3, task=task)["test"] != first["test"]
    train_questions = {row["question"] for row in first["train"]}
    test_questions = [row["question"] for row in first["test"]]
    assert len(train_questions) == 500 and len(set(test_questions)) == 200
    assert train_questions.isdisjoint(test_questions)
    with pytest.raises(ValueError):
        generate_splits(10, 10, seed=0, difficulty=MAX_DIFFICULTY + 1)


def test_preprocess_prepares_the_synthetic_task_like_any_dataset(tmp_path):
    from pcsd_core.config.schema import DataConfig
    from pcsd_core.data.prepare import load_prompt_records, load_solutions, prepare_dataset

    data = DataConfig(synthetic="arithmetic", synthetic_difficulty=2, max_train_rows=16, max_test_rows=8,
                      data_source="synthetic/arithmetic")
    prepared = prepare_dataset(data, tmp_path)
    records = load_prompt_records(prepared.test_path)
    expected = generate_splits(16, 8, seed=0, difficulty=2)["test"]
    assert [r.question for r in records] == [row["question"] for row in expected]
    assert [r.privileged_context for r in records] == load_solutions(prepared.test_path) == [row["answer"] for row in expected]
    assert prepared.stats["train/rows"] == 16
