"""Dataset preparation: GSM8K (hub or local folder) -> parquet in verl's RL schema, with privileged context.

    from pcsd_core.config import DataConfig
    from pcsd_core.data import prepare_dataset, load_prompt_records
    prepared = prepare_dataset(DataConfig(path="../shared/data/gsm8k", max_train_rows=64), "outputs/data")
    records = load_prompt_records(prepared.train_path)      # list[PromptRecord]

Input: `openai/gsm8k` (config `main`) from the hub when `data.path` is empty, else a local folder holding
`train.jsonl` / `test.jsonl` (or `train.parquet` / `test.parquet`), or verl RL parquet (verl's GSM8K
preprocessing output, with or without `extra_info.privileged_context`: `pcsd_core/verl_data.py`). Columns
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
`data.privileged_context`: `solution` (the full answer text), `answer_only` (the final number) or
`column:<name>`.

Every row of both splits is validated before anything is written, and the files are written to temporary
names and renamed, so a failing run leaves an earlier good output untouched. Errors are
`DataValidationError` naming the file, the row (counted from 0) and the field.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pcsd_core.config import DataConfig
from pcsd_core.prompts import build_prompt_pair, build_student_messages
from pcsd_core.scoring import extract_answer, normalize_number

SPLITS = ("train", "test")
LOCAL_SUFFIXES = (".jsonl", ".parquet")
ABILITY = "math"
PERCENTILES = {"p50": 50, "p90": 90, "p99": 99, "max": 100}
CANONICAL_NUMBER = re.compile(r"-?\d+(\.\d+)?")


class DataValidationError(ValueError):
    """The input dataset (or a prepared parquet) breaks a rule; the message names file, row and field."""


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


@dataclass(frozen=True)
class RawSplit:
    """The rows of one split as loaded, and where they came from (used in error messages)."""

    source: str
    rows: list[dict[str, Any]]


# ---- the whole preparation ------------------------------------------------------------------------


def prepare_dataset(data_cfg: DataConfig, output_dir: str | Path, tokenizer: Any = None) -> PreparedData:
    """Load, validate, inject the privileged context, and write train/test parquet; return paths and stats.

    With a `tokenizer`, the stats include token-length percentiles of the student and teacher prompts.
    """
    raw_splits = load_raw_splits(data_cfg)
    from pcsd_core.verl_data import flatten_verl_splits  # imports this module, so not at the top

    raw_splits, data_cfg = flatten_verl_splits(raw_splits, data_cfg)  # verl-schema parquet -> question/answer rows
    limits = {"train": data_cfg.max_train_rows, "test": data_cfg.max_test_rows}
    rows_by_split = {split: build_rows(raw_splits[split], split, data_cfg, limits[split]) for split in SPLITS}
    stats = compute_stats(rows_by_split, data_cfg, tokenizer)
    paths = _write_parquets_atomically(rows_by_split, Path(output_dir))
    return PreparedData(train_path=paths["train"], test_path=paths["test"], stats=stats)


# ---- loading --------------------------------------------------------------------------------------


def load_raw_splits(data_cfg: DataConfig) -> dict[str, RawSplit]:
    """Both splits from the local folder `data.path`, or from the hub when it is empty."""
    if not data_cfg.path:
        return _load_hub_splits(data_cfg)
    folder = Path(data_cfg.path).expanduser()
    if not folder.is_dir():
        raise DataValidationError(
            f"data folder {folder} does not exist (data.path); point it at a folder holding train.jsonl and "
            f"test.jsonl (or .parquet), or leave data.path empty to load {data_cfg.hub_name} from the hub."
        )
    return {split: _read_local_split(folder, split) for split in SPLITS}


def _load_hub_splits(data_cfg: DataConfig) -> dict[str, RawSplit]:
    import datasets  # only the hub path needs it, and it is slow to import

    dataset = datasets.load_dataset(data_cfg.hub_name, data_cfg.hub_config)
    return {split: RawSplit(f"{data_cfg.hub_name}[{split}]", dataset[split].to_list()) for split in SPLITS}


def _read_local_split(folder: Path, split: str) -> RawSplit:
    found = [folder / f"{split}{suffix}" for suffix in LOCAL_SUFFIXES if (folder / f"{split}{suffix}").is_file()]
    if not found:
        present = sorted(path.name for path in folder.iterdir())
        raise DataValidationError(
            f"{folder}: no {split}.jsonl or {split}.parquet (the folder holds {present}); "
            f"each of the splits {list(SPLITS)} needs one file."
        )
    if len(found) > 1:
        raise DataValidationError(
            f"{folder}: both {split}.jsonl and {split}.parquet exist; keep one so it is clear which is read."
        )
    path = found[0]
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else _read_parquet(path)
    return RawSplit(str(path), rows)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    for line_number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as error:
            raise DataValidationError(f"{path}: line {line_number} is not valid JSON ({error.msg}).") from None
        if not isinstance(row, dict):
            raise DataValidationError(f"{path}: line {line_number} must be a JSON object, got {type(row).__name__}.")
        rows.append(row)
    return rows


def _read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise DataValidationError(f"{path}: cannot be read as parquet ({error}).") from None


# ---- validation and the verl row ------------------------------------------------------------------


def build_rows(raw: RawSplit, split: str, data_cfg: DataConfig, max_rows: int = 0) -> list[dict[str, Any]]:
    """Validated verl-schema rows of one split (the first `max_rows` when > 0)."""
    if not raw.rows:
        raise DataValidationError(f"{raw.source}: the {split} split is empty (0 rows); it needs at least one question.")
    kept = raw.rows[:max_rows] if max_rows else raw.rows
    rows, first_row_of_id = [], {}
    for index, raw_row in enumerate(kept):
        row = _build_row(raw_row, index, raw.source, split, data_cfg)
        row_id = row["extra_info"]["id"]
        if row_id in first_row_of_id:
            raise DataValidationError(
                f"{raw.source}: rows {first_row_of_id[row_id]} and {index} share the id {row_id!r} in field "
                f"{data_cfg.id_column!r} (data.id_column); ids must be unique."
            )
        first_row_of_id[row_id] = index
        rows.append(row)
    return rows


def _build_row(raw_row: dict[str, Any], index: int, source: str, split: str, cfg: DataConfig) -> dict[str, Any]:
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
            "privileged_context": _privileged_context(raw_row, answer, ground_truth, where, cfg),
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
    return "" if value is None else str(value).strip()


def parse_final_answer(answer: str) -> str | None:
    """The final number of an answer text: after the last `#### ` (GSM8K), or the whole text if it is a number."""
    number = extract_answer(answer, "strict") if "####" in answer else normalize_number(answer)
    return number if number is not None and CANONICAL_NUMBER.fullmatch(number) else None


def _privileged_context(raw_row: dict[str, Any], answer: str, ground_truth: str, where: str, cfg: DataConfig) -> str:
    template = cfg.privileged_context
    if template == "solution":
        return answer
    if template == "answer_only":
        return ground_truth
    column = template.removeprefix("column:")
    context = _text_field(raw_row, column, where, f"data.privileged_context ('column:<name>', now {template!r})")
    if not context:
        raise DataValidationError(
            f"{where} field {column!r} is empty; it is the privileged context (data.privileged_context = "
            f"{template!r}), so every row needs one."
        )
    return context


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
        raise DataValidationError(f"{path} does not exist; prepare the data first (steps/preprocess.py).")
    rows = _read_parquet(path)
    if not rows:
        raise DataValidationError(f"{path} holds no rows; prepare the data again.")
    return [_prompt_record(row, path, index) for index, row in enumerate(rows)]


def _prompt_record(row: dict[str, Any], path: Path, index: int) -> PromptRecord:
    extra_info = row.get("extra_info") or {}
    for field_name in ("index", "question", "privileged_context"):
        if extra_info.get(field_name) is None:
            raise DataValidationError(
                f"{path}: row {index} has no extra_info.{field_name}; prepare the data with pcsd_core.data "
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
    """Rows per split and, with a tokenizer, token-length percentiles of student and teacher prompts.

    Keys: `source`, `privileged_context`, `<split>/rows`, `<split>/<student|teacher>_prompt_tokens_<p50|p90|p99|max>`.
    """
    stats: dict[str, Any] = {
        "source": data_cfg.path or f"{data_cfg.hub_name}:{data_cfg.hub_config}",
        "privileged_context": data_cfg.privileged_context,
    }
    for split, rows in rows_by_split.items():
        stats[f"{split}/rows"] = len(rows)
    if tokenizer is None:
        return stats
    for split, rows in rows_by_split.items():
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
    return stats
