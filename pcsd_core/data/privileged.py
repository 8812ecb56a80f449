"""The privileged contexts: what the teacher is shown beside the question, one registry of named strategies.

Config validation (`data.privileged_context`), data preparation, verl input and the flow's sharing keys all
read this module; a new strategy is one entry in `STRATEGIES` plus its branch in `context_for_row`.

    solution       the question's own worked solution (the treatment). When the input carries a given
                   context (a `privileged_context` column, as the verl reference writes into extra_info), that.
    answer_only    the question's final number only.
    shuffled       control arm: the worked solution of a DIFFERENT question of the same split, by a seeded random
                   derangement (`data.shuffle_seed`); no row gets its own solution, though it can get an identical
                   text when two questions share one. Tests whether the right solution matters or any helps.
    generic_hint   control arm: no solution, only `GENERIC_HINT`, the same for every question. Tests whether the
                   teacher's gain comes from the question's solution or from a prompted format: the reference-free
                   self-distillation arm.
    wrong_answer   control arm: the question's own worked solution with its final number, and only that, replaced
                   by a wrong one (deterministic per solution, `wrong_final_answer`). Tests whether the teacher's
                   gain needs the right answer or only the worked steps.
    column:<name>  a column of the user's dataset.

There is no `none` arm: without context the teacher is the student itself (live) or its own starting point
(frozen, EMA), so the loss and its gradient are zero from the first step; `generic_hint` is the reference-free
control.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import hashlib
import re

import numpy as np

from pcsd_core.errors import DataValidationError, require

# The `generic_hint` control's context: advice any question could get, holding no part of a solution.
GENERIC_HINT = "Work carefully step by step, check each calculation, and end with '#### <number>'."
# A row column holding a context given with the data; the `solution` strategy shows it instead of the answer.
GIVEN_CONTEXT_COLUMN = "privileged_context"
COLUMN_PREFIX = "column:"
STRATEGIES = {
    "solution": "the question's own worked solution (or the context given with the data)",
    "answer_only": "the question's final number",
    "shuffled": "control: another question's worked solution (a seeded derangement)",
    "generic_hint": "control: the same solution-free hint for every question",
    "wrong_answer": "control: the question's own worked solution with a wrong final number",
}
# The data fields that change only what the teacher sees: two runs differing in these alone share the student's
# prompts, so they share the base model's evaluation.
TEACHER_ONLY_DATA_FIELDS = frozenset({"privileged_context", "shuffle_seed", "teacher_template"})


@dataclass(frozen=True)
class PrivilegedContext:
    """A parsed `data.privileged_context`: the strategy's name, and the column for `column:<name>`."""

    strategy: str
    column: str = ""


def parse_privileged_context(value: str) -> PrivilegedContext:
    """The strategy `value` names; a ConfigError on `data.privileged_context` for anything else."""
    if isinstance(value, str) and value.startswith(COLUMN_PREFIX) and value[len(COLUMN_PREFIX):].strip():
        return PrivilegedContext("column", value[len(COLUMN_PREFIX):])
    require(value in STRATEGIES,
            f"data.privileged_context ({value!r}) must be one of {list(STRATEGIES)} or 'column:<name>'; for "
            "example 'column:hint' for a dataset with a `hint` column.", field="data.privileged_context")
    return PrivilegedContext(value)


def context_for_row(context: PrivilegedContext, read_column: Callable[[str], str], solution: str,
                    ground_truth: str, where: str) -> str:
    """One row's context; `read_column(name)` gives the row's stripped text there ("" when absent for the given
    context). For `shuffled` the row's own solution, until `assign_split_contexts` deranges them."""
    if context.strategy == "solution":
        return read_column(GIVEN_CONTEXT_COLUMN) or solution
    if context.strategy == "shuffled":
        return solution
    if context.strategy == "wrong_answer":
        return wrong_final_answer(solution, ground_truth)
    if context.strategy == "answer_only":
        return ground_truth
    if context.strategy == "generic_hint":
        return GENERIC_HINT
    text = read_column(context.column)
    if not text:
        raise DataValidationError(f"{where} field {context.column!r} is empty; it is the privileged context "
                                  f"(data.privileged_context = 'column:{context.column}'), so every row needs one.")
    return text


_FINAL_ANSWER = re.compile(r"(####\s*)(-?[\d,]*\.?\d+)\s*$")


def wrong_final_answer(solution: str, ground_truth: str) -> str:
    """`solution` with its final number (after the last `####`, or the whole text when it is a bare number) replaced
    by a wrong one: the true value plus an offset of 1 to 9 fixed by a hash of the solution, so the same solution
    always gets the same wrong answer. Nothing else of the text changes."""
    offset = 1 + int(hashlib.sha256(solution.encode()).hexdigest(), 16) % 9
    true_value = float(ground_truth)
    wrong = true_value + offset
    text = str(int(wrong)) if true_value.is_integer() else f"{wrong:.{len(ground_truth.split('.')[1])}f}"
    stripped = solution.rstrip()
    match = _FINAL_ANSWER.search(stripped)
    if match is None:  # a bare final number, as some datasets give the answer
        return text + solution[len(stripped):]
    return stripped[:match.start(2)] + text + solution[len(stripped):]


def assign_split_contexts(context: PrivilegedContext, contexts: list[str], source: str, seed: int) -> list[str]:
    """The split-level step: for `shuffled`, row i gets row `derangement[i]`'s solution; others unchanged."""
    if context.strategy != "shuffled":
        return contexts
    if len(contexts) < 2:
        raise DataValidationError(
            f"{source}: data.privileged_context 'shuffled' gives each question another question's solution, so "
            f"the split needs at least 2 rows (it has {len(contexts)}); raise data.max_*_rows or use 'solution'."
        )
    return [contexts[donor] for donor in derangement(len(contexts), seed)]


def derangement(size: int, seed: int) -> list[int]:
    """A uniformly random permutation of range(size) with no fixed point (`result[i] != i`), fixed by `seed`.

    Rejection sampling: a random permutation is a derangement with probability ~1/e, so about e draws are
    needed; the generator's stream makes the result a function of (size, seed) only.
    """
    if size < 2:
        raise ValueError(f"a derangement needs at least 2 items (got {size}): one item can only map to itself.")
    generator = np.random.default_rng(seed)
    identity = np.arange(size)
    while True:
        permutation = generator.permutation(size)
        if not np.any(permutation == identity):
            return permutation.tolist()
