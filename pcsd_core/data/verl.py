"""verl-schema input: a folder of verl RL parquet (verl's GSM8K preprocessing output, or ours) as `data.path`.

verl's `examples/data_preprocess/gsm8k.py` writes one row per question:

    data_source   "openai/gsm8k"
    prompt        [{"role": "user", "content": question + ' Let\\'s think step by step and output the final answer after "####".'}]
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": "<final number>"}
    extra_info    {split, index, answer (the worked solution), question}

and the verl reference adds `extra_info.privileged_context`. `flatten_verl_splits` turns such rows into the
flat question/answer rows that `pcsd_core.data.prepare` validates and prepares like any local dataset:

- question: `extra_info.question`, else the prompt's last user turn without verl's appended instruction
  (the student prompt is rebuilt from it with `data.instruction`, so a prompt is never instructed twice);
- ground truth: `reward_model.ground_truth`; `extra_info.answer`, when present, must end in the same number;
- privileged context, by `data.privileged_context`:
  - `solution` (default): `extra_info.privileged_context` when the split has it (the reference's field; then
    every row needs it), else `extra_info.answer`, the worked solution verl's GSM8K preprocessing stores;
  - `answer_only`: the ground truth;
  - `column:<name>`: `extra_info.<name>` (or a top-level column `<name>`), e.g. `column:privileged_context`.

Errors are `DataValidationError`s naming the file, the row (from 0) and the field.
"""

from __future__ import annotations

from typing import Any

from pcsd_core.config.schema import GSM8K_INSTRUCTION, DataConfig
from pcsd_core.data.privileged import GIVEN_CONTEXT_COLUMN as CONTEXT_FIELD  # the verl reference's extra_info field
from pcsd_core.data.sources import RawSplit, parse_final_answer
from pcsd_core.errors import DataValidationError

VERL_COLUMNS = ("prompt", "reward_model", "extra_info")


def is_verl_schema(rows: list[dict[str, Any]]) -> bool:
    """True when the rows carry verl's RL columns (prompt, reward_model, extra_info)."""
    return bool(rows) and all(column in rows[0] for column in VERL_COLUMNS)


def flatten_verl_splits(raw_splits: dict[str, RawSplit], data_cfg: DataConfig) -> dict[str, RawSplit]:
    """Flat question/answer rows; non-verl input comes back unchanged. A given context (the reference's
    `extra_info.privileged_context`) stays in the row's `privileged_context` column, which the `solution` strategy
    shows the teacher (`pcsd_core.data.privileged`); the config is never rewritten."""
    verl_splits = sorted(split for split, raw in raw_splits.items() if is_verl_schema(raw.rows))
    if not verl_splits:
        return raw_splits
    if len(verl_splits) != len(raw_splits):
        raise DataValidationError(
            f"{[raw_splits[split].source for split in verl_splits]} hold verl-schema rows ({', '.join(VERL_COLUMNS)}) "
            f"but {[raw.source for split, raw in raw_splits.items() if split not in verl_splits]} do not; "
            "give every split in the same format."
        )
    use_context_field = data_cfg.privileged_context == "solution" and all(
        CONTEXT_FIELD in (raw.rows[0].get("extra_info") or {}) for raw in raw_splits.values()
    )
    flat = {split: RawSplit(raw.source, [_flatten_row(row, index, raw.source, data_cfg, use_context_field)
                                         for index, row in enumerate(raw.rows)])
            for split, raw in raw_splits.items()}
    return flat


def _flatten_row(
    row: dict[str, Any], index: int, source: str, cfg: DataConfig, use_context_field: bool
) -> dict[str, Any]:
    where = f"{source}: row {index}"
    extra_info = _mapping(row, "extra_info", where, required=False)
    reward_model = _mapping(row, "reward_model", where, required=True)
    ground_truth = _ground_truth(reward_model, where)
    question = _text(extra_info.get("question")) or _question_from_prompt(row.get("prompt"), where, cfg.instruction)
    solution = _text(extra_info.get("answer"))
    if solution and parse_final_answer(solution) != ground_truth:
        raise DataValidationError(
            f"{where} field extra_info.answer ends in {parse_final_answer(solution)!r} but reward_model.ground_truth "
            f"is {ground_truth!r}; fix the row so both give the same final number."
        )
    if use_context_field and not _text(extra_info.get(CONTEXT_FIELD)):
        raise DataValidationError(
            f"{where} field extra_info.{CONTEXT_FIELD} is missing or empty, while row 0 of the split has one; "
            "every row needs its privileged context (or remove the field everywhere to use extra_info.answer)."
        )
    if cfg.privileged_context == "solution" and not use_context_field and not solution:
        raise DataValidationError(
            f"{where} has neither extra_info.{CONTEXT_FIELD} nor extra_info.answer (a worked solution), so "
            "data.privileged_context 'solution' has nothing to show the teacher; add one, or set "
            "data.privileged_context to 'answer_only'."
        )
    scalars = {key: value for key, value in {**row, **extra_info}.items() if not isinstance(value, (dict, list))}
    if not use_context_field:  # a split without the field everywhere shows the worked solution
        scalars.pop(CONTEXT_FIELD, None)
    # The worked solution when there is one (kept as extra_info.answer), else the bare final number.
    return {**scalars, cfg.question_column: question, cfg.answer_column: solution or ground_truth}


def _mapping(row: dict[str, Any], field: str, where: str, required: bool) -> dict[str, Any]:
    value = row.get(field)
    if value is None and not required:
        return {}
    if not isinstance(value, dict):
        raise DataValidationError(
            f"{where} field {field} must be a struct (mapping) as verl writes it, got {type(value).__name__}: "
            f"{str(value)[:80]!r}."
        )
    return value


def _ground_truth(reward_model: dict[str, Any], where: str) -> str:
    raw = _text(reward_model.get("ground_truth"))
    number = parse_final_answer(raw) if raw else None
    if number is None:
        raise DataValidationError(
            f"{where} field reward_model.ground_truth ({reward_model.get('ground_truth')!r}) must be the final "
            "number (e.g. '72'), as verl's GSM8K preprocessing writes it."
        )
    return number


def _question_from_prompt(prompt: Any, where: str, instruction: str) -> str:
    """The last user turn's text, without verl's (or our) appended instruction."""
    turns = [turn for turn in (prompt if isinstance(prompt, list) else []) if isinstance(turn, dict)]
    user_turns = [_text(turn.get("content")) for turn in turns if turn.get("role") == "user"]
    if not user_turns or not user_turns[-1]:
        raise DataValidationError(
            f"{where} field prompt must be a list of chat messages with a non-empty user turn "
            f"([{{'role': 'user', 'content': ...}}]), and there is no extra_info.question; got {str(prompt)[:80]!r}."
        )
    question = user_turns[-1]
    for suffix in dict.fromkeys((instruction, GSM8K_INSTRUCTION)):
        if suffix and question.endswith(suffix):
            return question.removesuffix(suffix).rstrip()
    return question


def _text(value: Any) -> str:
    return "" if value is None else str(value).strip()
