"""Shipped positive-control tasks: seeded word problems in GSM8K's answer format.

The platform exists to answer "does PCSD help?"; that needs a task on which the small CPU model has headroom
(some questions right, far from all) and on which it does much better with the solution in its prompt, so that a
gain, if PCSD produces one, can be seen. GSM8K is not that task for SmolLM2-135M (1% right), and neither is
arithmetic at any difficulty here: the calibration (`benchmarks/synthetic_calibration.py`, table in
benchmarks/README.md) measured the student at 0-6% even on one operation on single digits. `lookup` is:

- `arithmetic`: a story chaining `difficulty` operations (+, -, x) on small whole numbers; the worked solution shows
  one line per operation and ends with `#### <answer>`.
- `lookup`: a story giving `difficulty + 1` people a number of the same item, and a question about one of them
  (the others are distractors); the worked solution restates that person's number and ends with `#### <answer>`.

Either way `pcsd_core.eval.scoring` scores it like GSM8K. Rows are a pure function of (task, split, index, seed,
difficulty): train and test draw from separate streams, and a test question never repeats a train question.

    splits = generate_splits(2000, 200, seed=0, difficulty=2)   # {"train": [{"question", "answer", "id"}], "test": ...}
"""

from __future__ import annotations

from typing import Any

import numpy as np

TASKS = ("arithmetic", "lookup")
MAX_DIFFICULTY = 4
DEFAULT_ROWS = {"train": 2000, "test": 500}  # per split, when data.max_*_rows is 0
_SPLIT_STREAM = {"train": 0, "test": 1}
_ITEMS = ("apples", "marbles", "stickers", "pencils", "coins", "books", "stamps", "shells")
_NAMES = ("Ava", "Ben", "Chloe", "Dev", "Emma", "Finn", "Grace", "Hugo")


def _lookup_question(generator: np.random.Generator, difficulty: int) -> tuple[str, str]:
    """`difficulty + 1` people with some of one item, a question about one of them, and the one-line solution."""
    item = _ITEMS[generator.integers(len(_ITEMS))]
    people = [str(name) for name in generator.choice(_NAMES, size=difficulty + 1, replace=False)]
    counts = [int(count) for count in generator.integers(2, 50, size=len(people))]
    asked = int(generator.integers(len(people)))
    story = " ".join(f"{name} has {count} {item}." for name, count in zip(people, counts))
    question = f"{story} How many {item} does {people[asked]} have?"
    return question, f"{people[asked]} has {counts[asked]} {item}.\n#### {counts[asked]}"


def _arithmetic_question(generator: np.random.Generator, difficulty: int) -> tuple[str, str]:
    """One question and its worked solution (one line per operation, then `#### <answer>`)."""
    name, item = _NAMES[generator.integers(len(_NAMES))], _ITEMS[generator.integers(len(_ITEMS))]
    total = int(generator.integers(5, 40))
    story, lines = [f"{name} has {total} {item}."], []
    for _ in range(difficulty):
        operation = ("gain", "lose", "times")[generator.integers(3 if total < 100 else 2)]
        if operation == "gain":
            amount = int(generator.integers(2, 30))
            story.append(f"Then {name} gets {amount} more.")
            lines.append(f"{total} + {amount} = {total + amount}")
            total += amount
        elif operation == "lose" and total > 3:
            amount = int(generator.integers(1, total))
            story.append(f"Then {name} gives away {amount}.")
            lines.append(f"{total} - {amount} = {total - amount}")
            total -= amount
        else:
            factor = int(generator.integers(2, 4))
            story.append(f"Then the number of {item} is multiplied by {factor}.")
            lines.append(f"{total} * {factor} = {total * factor}")
            total *= factor
    story.append(f"How many {item} does {name} have now?")
    return " ".join(story), "\n".join(lines) + f"\n#### {total}"


def generate_splits(train_rows: int, test_rows: int, *, seed: int, difficulty: int, task: str = "arithmetic"
                    ) -> dict[str, list[dict[str, Any]]]:
    """{"train": rows, "test": rows}, each row {"question", "answer", "id"}; no question appears twice, and no
    test question is a train question."""
    if task not in TASKS or not 1 <= difficulty <= MAX_DIFFICULTY or min(train_rows, test_rows) < 1:
        raise ValueError(f"generate_splits: task {task!r} (one of {TASKS}), difficulty {difficulty} "
                         f"(1..{MAX_DIFFICULTY}) and rows {train_rows}, {test_rows} (>= 1) are out of range.")
    seen: set[str] = set()
    splits = {}
    for split, num_rows in (("train", train_rows), ("test", test_rows)):
        # The arithmetic streams predate `lookup`, so its rows keep their seeds; lookup draws from its own stream.
        stream = [seed, difficulty, _SPLIT_STREAM[split]] + ([1] if task == "lookup" else [])
        generator = np.random.default_rng(stream)
        make_question = _lookup_question if task == "lookup" else _arithmetic_question
        rows: list[dict[str, Any]] = []
        for _ in range(num_rows * 100):  # a bound: the space of questions is far larger than any split
            if len(rows) == num_rows:
                break
            question, answer = make_question(generator, difficulty)
            if question not in seen:
                seen.add(question)
                rows.append({"question": question, "answer": answer, "id": f"{task}-{difficulty}-{split}-{len(rows)}"})
        splits[split] = rows
    return splits
