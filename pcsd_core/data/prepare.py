"""Dataset preparation: GSM8K (hub or local folder) -> parquet in verl's RL schema, with privileged context.

    from pcsd_core.config.schema import DataConfig
    from pcsd_core.data.prepare import prepare_dataset, load_prompt_records
    prepared = prepare_dataset(DataConfig(path="../shared/data/gsm8k", max_train_rows=64), "outputs/data")
    records = load_prompt_records(prepared.train_path)      # list[PromptRecord]

Input: `openai/gsm8k` (config `main`) from the hub when `data.path` is empty, else a local folder holding
`train.jsonl` / `test.jsonl` (or `train.parquet` / `test.parquet`), or verl RL parquet (verl's GSM8K
preprocessing output, with or without `extra_info.privileged_context`: `pcsd_core/data/verl.py`). Columns
map in through `data.question_column`, `data.answer_column` and `data.id_column`. The answer must hold a final number:
a `#### <number>` line as in GSM8K, or just the number.

Output: `<output_dir>/train.parquet` and `test.parquet`, one row per question, in verl's RL schema so verl
users can reuse them as they are:

    data_source   "openai/gsm8k"
    prompt        the student chat messages [{"role": "user", "content": question + instruction}]
    ability       "math"
    reward_model  {"style": "rule", "ground_truth": "<final number>"}
    extra_info    {split, index, id, answer, question, privileged_context}

`index` is the row's position in its split (after `max_*_rows` slicing); `id` is the `id_column` value as
a string (the row position when there is none). The privileged context is chosen by
`data.privileged_context`: `solution` (the full answer text), `answer_only` (the final number), the control
arms `shuffled` (another question's solution, a seeded derangement of the split) and `generic_hint` (the same
solution-free hint for every question), or `column:<name>`. `extra_info.answer` always keeps the row's own
solution (`load_solutions` reads it back, e.g. for the held-out KL whose teacher sees the true solution).

Every row of both splits is validated before anything is written, and the files are written to temporary
names and renamed, so a failing run leaves an earlier good output untouched. Errors are
`DataValidationError` naming the file, the row (counted from 0) and the field.
"""

from __future__ import annotations

import os
import tempfile
import warnings
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pcsd_core.config.schema import DataConfig
from pcsd_core.data.privileged import (GIVEN_CONTEXT_COLUMN, PrivilegedContext, assign_split_contexts,
                                       context_for_row, parse_privileged_context)
from pcsd_core.data.prompts import build_prompt_pair, build_student_messages
from pcsd_core.data.sources import SPLITS, RawSplit, load_raw_splits, parse_final_answer, read_parquet
from pcsd_core.data.verl import flatten_verl_splits
from pcsd_core.errors import DataValidationError

ABILITY = "math"
PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "max": 100}


@dataclass(frozen=True)
class PromptRecord:
    """One prepared question, as the trainer and the evaluation read it back."""

    index: int
    question: str
    student_messages: list[dict[str, str]]
    privileged_context: str
    ground_truth: str


@dataclass(frozen=True)
class PreparedData:
    train_path: Path
    test_path: Path
    stats: dict[str, Any]


# ---- the whole preparation ------------------------------------------------------------------------


def prepare_dataset(data_cfg: DataConfig, output_dir: str | Path, tokenizer: Any = None) -> PreparedData:
    """Load, validate, inject the privileged context, and write train/test parquet; return paths and stats.

    With a `tokenizer`, the stats include token-length percentiles of the student and teacher prompts.
    """
    raw_splits = flatten_verl_splits(load_raw_splits(data_cfg), data_cfg)  # verl-schema rows -> question/answer rows
    limits = {"train": data_cfg.max_train_rows, "test": data_cfg.max_test_rows}
    rows_by_split = {split: build_rows(raw_splits[split], split, data_cfg, limits[split]) for split in SPLITS}
    stats = compute_stats(rows_by_split, data_cfg, tokenizer)
    paths = _write_parquets_atomically(rows_by_split, Path(output_dir))
    return PreparedData(train_path=paths["train"], test_path=paths["test"], stats=stats)


# ---- validation and the verl row ------------------------------------------------------------------


def build_rows(raw: RawSplit, split: str, data_cfg: DataConfig, max_rows: int = 0) -> list[dict[str, Any]]:
    """Validated verl-schema rows of one split (the first `max_rows` when > 0)."""
    if not raw.rows:
        raise DataValidationError(f"{raw.source}: the {split} split is empty (0 rows); it needs at least one question.")
    kept = raw.rows[:max_rows] if max_rows else raw.rows
    rows, first_row_of_id = [], {}
    context = parse_privileged_context(data_cfg.privileged_context)  # once, not per row
    for index, raw_row in enumerate(kept):
        row = _build_row(raw_row, index, raw.source, split, data_cfg, context)
        row_id = row["extra_info"]["id"]
        if row_id in first_row_of_id:
            raise DataValidationError(
                f"{raw.source}: rows {first_row_of_id[row_id]} and {index} share the id {row_id!r} in field "
                f"{data_cfg.id_column!r} (data.id_column); ids must be unique."
            )
        first_row_of_id[row_id] = index
        rows.append(row)
    contexts = assign_split_contexts(context, [row["extra_info"]["privileged_context"] for row in rows], raw.source,
                                     data_cfg.shuffle_seed)
    for row, assigned in zip(rows, contexts):
        row["extra_info"]["privileged_context"] = assigned
    _warn_about_duplicate_questions(rows, raw.source, split)
    return rows


def _warn_about_duplicate_questions(rows: list[dict[str, Any]], source: str, split: str) -> None:
    """Repeated questions are kept (a dataset may repeat on purpose) but never silently: they weigh more."""
    counts = Counter(row["extra_info"]["question"] for row in rows)
    repeats = {question: count for question, count in counts.items() if count > 1}
    if repeats:
        extra_rows = sum(count - 1 for count in repeats.values())
        example = next(iter(repeats))
        warnings.warn(
            f"{source}: {extra_rows} of the {len(rows)} {split} rows repeat an earlier question "
            f"({len(repeats)} questions appear more than once, e.g. {example[:60]!r} x{repeats[example]}); they are "
            "kept and weigh more in training. Remove the duplicates if that is not intended.",
            stacklevel=3,
        )


def _build_row(raw_row: dict[str, Any], index: int, source: str, split: str, cfg: DataConfig,
               context: PrivilegedContext) -> dict[str, Any]:
    where = f"{source}: row {index}"
    question = _text_field(raw_row, cfg.question_column, where, "data.question_column")
    if not question:
        raise DataValidationError(f"{where} field {cfg.question_column!r} is empty; every row needs a question.")
    answer = _text_field(raw_row, cfg.answer_column, where, "data.answer_column")
    ground_truth = parse_final_answer(answer)
    if ground_truth is None:
        raise DataValidationError(
            f"{where} field {cfg.answer_column!r} has no parseable final answer: expected a line "
            f"'#### <number>' as in GSM8K, or just a number; got {answer[-80:]!r}."
        )
    row_id = str(index)
    if cfg.id_column:
        row_id = _text_field(raw_row, cfg.id_column, where, "data.id_column")
        if not row_id:
            raise DataValidationError(f"{where} field {cfg.id_column!r} (data.id_column) is empty; every row needs an id.")
    return {
        "data_source": cfg.data_source,
        "prompt": build_student_messages(question, cfg.instruction),
        "ability": ABILITY,
        "reward_model": {"style": "rule", "ground_truth": ground_truth},
        "extra_info": {
            "split": split,
            "index": index,
            "id": row_id,
            "answer": answer,
            "question": question,
            "privileged_context": _privileged_context(raw_row, answer, ground_truth, where, cfg, context),
        },
    }


def _text_field(raw_row: dict[str, Any], column: str, where: str, config_key: str) -> str:
    """The stripped text of `column`; a missing column is an error, a null value is the empty string."""
    if column not in raw_row:
        raise DataValidationError(
            f"{where} has no column {column!r} (columns: {sorted(raw_row)}); set {config_key} to the column "
            "that holds it."
        )
    value = raw_row[column]
    if isinstance(value, bytes):  # a parquet binary column
        try:
            value = value.decode("utf-8")
        except UnicodeDecodeError:
            raise DataValidationError(
                f"{where} field {column!r} holds bytes that are not UTF-8 text; re-encode the column as UTF-8 strings."
            ) from None
    return "" if value is None else str(value).strip()


def _privileged_context(raw_row: dict[str, Any], answer: str, ground_truth: str, where: str, cfg: DataConfig,
                        context: PrivilegedContext) -> str:

    def read_column(column: str) -> str:
        if column == GIVEN_CONTEXT_COLUMN and column not in raw_row:
            return ""
        return _text_field(raw_row, column, where, f"data.privileged_context ('column:<name>', now "
                                                   f"{cfg.privileged_context!r})")

    return context_for_row(context, read_column, answer, ground_truth, where)


# ---- writing and reading back ---------------------------------------------------------------------


def _write_parquets_atomically(rows_by_split: dict[str, list[dict[str, Any]]], output_dir: Path) -> dict[str, Path]:
    """Write every split to a temporary file first, then rename them all: no partial output on failure."""
    output_dir.mkdir(parents=True, exist_ok=True)
    staged: dict[str, Path] = {}
    try:
        for split, rows in rows_by_split.items():
            handle, temporary = tempfile.mkstemp(prefix=f".{split}-", suffix=".parquet.tmp", dir=output_dir)
            os.close(handle)
            staged[split] = Path(temporary)
            pq.write_table(pa.Table.from_pylist(rows), staged[split])
            os.chmod(staged[split], 0o644)  # mkstemp makes owner-only files; the data is not secret
        final = {split: output_dir / f"{split}.parquet" for split in staged}
        for split, temporary in staged.items():
            os.replace(temporary, final[split])
        return final
    finally:
        for temporary in staged.values():
            temporary.unlink(missing_ok=True)


def load_prompt_records(parquet_path: str | Path) -> list[PromptRecord]:
    """Read a prepared parquet back as `PromptRecord`s (in file order)."""
    path = Path(parquet_path)
    if not path.is_file():
        raise DataValidationError(f"{path} does not exist; prepare the data first (pcsd_core.data.prepare.prepare_dataset).")
    rows = read_parquet(path)
    if not rows:
        raise DataValidationError(f"{path} holds no rows; prepare the data again.")
    return [_prompt_record(row, path, index) for index, row in enumerate(rows)]


def load_solutions(parquet_path: str | Path) -> list[str]:
    """Each row's own worked solution (`extra_info.answer`), in file order, whatever the privileged context.

    The held-out KL's teacher sees the true solution even in a control arm's data (`shuffled`, `generic_hint`).
    """
    path = Path(parquet_path)
    if not path.is_file():
        raise DataValidationError(f"{path} does not exist; prepare the data first (pcsd_core.data.prepare.prepare_dataset).")
    rows = pq.read_table(path, columns=["extra_info"]).column("extra_info").to_pylist()
    missing = [index for index, extra_info in enumerate(rows) if not (extra_info or {}).get("answer")]
    if missing:
        raise DataValidationError(f"{path}: rows {missing[:5]} have no extra_info.answer; prepare the data again.")
    return [extra_info["answer"] for extra_info in rows]


def _prompt_record(row: dict[str, Any], path: Path, index: int) -> PromptRecord:
    extra_info = row.get("extra_info") or {}
    for field_name in ("index", "question", "privileged_context"):
        if extra_info.get(field_name) is None:
            raise DataValidationError(
                f"{path}: row {index} has no extra_info.{field_name}; prepare the data with pcsd_core.data.prepare "
                "(verl's own GSM8K preprocessing has no privileged context)."
            )
    ground_truth = (row.get("reward_model") or {}).get("ground_truth")
    if ground_truth is None or not row.get("prompt"):
        raise DataValidationError(f"{path}: row {index} needs `prompt` and `reward_model.ground_truth`.")
    return PromptRecord(
        index=int(extra_info["index"]),
        question=extra_info["question"],
        student_messages=[{"role": message["role"], "content": message["content"]} for message in row["prompt"]],
        privileged_context=extra_info["privileged_context"],
        ground_truth=str(ground_truth),
    )


# ---- stats ----------------------------------------------------------------------------------------


def compute_stats(rows_by_split: dict[str, list[dict[str, Any]]], data_cfg: DataConfig, tokenizer: Any = None) -> dict[str, Any]:
    """Rows per split, repeated questions and, with a tokenizer, token-length percentiles of the prompts.

    Keys: `source`, `privileged_context`, `<split>/rows`, `<split>/duplicate_questions` (rows that repeat an
    earlier question of their split), `test/questions_in_train` (test rows whose question is also a train
    question: a contaminated evaluation, also warned about) and, with a tokenizer,
    `<split>/<student|teacher>_prompt_tokens_<p50|p90|p99|max>`, `<split>/max_prompt_tokens` (the longest
    prompt, a teacher prompt: what the model's context must hold besides the response) and
    `<split>/prompts_over_tokenizer_limit` (prompts longer than the tokenizer's `model_max_length`, warned
    about). Whether prompt + response fit the model is checked at train time (models.check_context_length).
    """
    stats: dict[str, Any] = {
        "source": data_cfg.source if data_cfg.path or data_cfg.synthetic else f"{data_cfg.hub_name}:{data_cfg.hub_config}",
        "privileged_context": data_cfg.privileged_context,
    }
    questions = {split: [row["extra_info"]["question"] for row in rows] for split, rows in rows_by_split.items()}
    for split, rows in rows_by_split.items():
        stats[f"{split}/rows"] = len(rows)
        stats[f"{split}/duplicate_questions"] = len(rows) - len(set(questions[split]))
    if "train" in questions and "test" in questions:
        train_questions = set(questions["train"])
        stats["test/questions_in_train"] = overlap = sum(question in train_questions for question in questions["test"])
        if overlap:
            warnings.warn(f"{overlap} of the {len(questions['test'])} test questions are also train questions; the "
                          "evaluation measures memorisation for those. Remove them from one split.", stacklevel=2)
    if tokenizer is None:
        return stats
    for split, rows in rows_by_split.items():
        stats.update(_prompt_length_stats(rows, split, data_cfg, tokenizer))
    return stats


def _prompt_length_stats(rows: list[dict[str, Any]], split: str, data_cfg: DataConfig, tokenizer: Any) -> dict[str, Any]:
    stats: dict[str, Any] = {}
    lengths: dict[str, list[int]] = {"student": [], "teacher": []}
    for row in rows:
        pair = build_prompt_pair(
            tokenizer, row["prompt"], row["extra_info"]["privileged_context"], data_cfg.teacher_template
        )
        lengths["student"].append(len(pair.student_ids))
        lengths["teacher"].append(len(pair.teacher_ids))
    for side, values in lengths.items():
        for name, percentile in PERCENTILES.items():
            stats[f"{split}/{side}_prompt_tokens_{name}"] = float(np.percentile(values, percentile))
    longest = [max(pair) for pair in zip(lengths["student"], lengths["teacher"])]
    stats[f"{split}/max_prompt_tokens"] = max(longest)
    limit = getattr(tokenizer, "model_max_length", None)
    known_limit = isinstance(limit, int) and 0 < limit < 10**9  # unset limits are a huge sentinel (1e30)
    over = [index for index, length in enumerate(longest) if known_limit and length > limit]
    stats[f"{split}/prompts_over_tokenizer_limit"] = len(over)
    if over:
        warnings.warn(
            f"{len(over)} {split} prompts are longer than the tokenizer's limit of {limit} tokens (model_max_length), "
            f"e.g. row {over[0]} with {longest[over[0]]} tokens; they cannot be trained on as they are. Drop or shorten "
            "them.",
            stacklevel=3,
        )
    return stats
