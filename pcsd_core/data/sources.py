"""Where a dataset's rows come from: a local folder (jsonl or parquet) or the Hugging Face hub.

`load_raw_splits(data_cfg)` returns each split's rows as loaded (`RawSplit`), untouched; validation and the
privileged context are `pcsd_core.data.prepare`'s business, verl-schema rows `pcsd_core.data.verl`'s.
"""

from __future__ import annotations

import json
import os
import re
import socket
import urllib.parse
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from pcsd_core.config.schema import DataConfig
from pcsd_core.data.synthetic import DEFAULT_ROWS as SYNTHETIC_DEFAULT_ROWS, generate_splits
from pcsd_core.errors import DataValidationError, HubUnreachableError
from pcsd_core.eval.scoring import extract_answer, normalize_number

SPLITS = ("train", "test")
LOCAL_SUFFIXES = (".jsonl", ".parquet")
CANONICAL_NUMBER = re.compile(r"-?\d+(\.\d+)?")


@dataclass(frozen=True)
class RawSplit:
    """The rows of one split as loaded, and where they came from (used in error messages)."""

    source: str
    rows: list[dict[str, Any]]


def require_hub_reachable(what: str, timeout_s: float = 5.0) -> None:
    """Fail in seconds, not after the hub client's minutes of retries, when the hub cannot be reached."""
    endpoint = urllib.parse.urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = endpoint.hostname or "huggingface.co", endpoint.port or (80 if endpoint.scheme == "http" else 443)
    try:
        socket.create_connection((host, port), timeout=timeout_s).close()
    except OSError as error:
        raise HubUnreachableError(
            f"the Hugging Face hub ({host}:{port}) is unreachable ({error}), and {what} was to be downloaded from "
            "it (data.path is empty). Set data.path to a local folder holding train.jsonl and "
            "test.jsonl, or set HF_DATASETS_OFFLINE=1 to use a copy in the hub cache."
        ) from None


# ---- loading --------------------------------------------------------------------------------------


def load_raw_splits(data_cfg: DataConfig) -> dict[str, RawSplit]:
    """Both splits: generated (`data.synthetic`), from the local folder `data.path`, or from the hub."""
    if data_cfg.synthetic:
        sizes = [data_cfg.max_train_rows or SYNTHETIC_DEFAULT_ROWS["train"],
                 data_cfg.max_test_rows or SYNTHETIC_DEFAULT_ROWS["test"]]
        generated = generate_splits(*sizes, seed=data_cfg.synthetic_seed, difficulty=data_cfg.synthetic_difficulty,
                                    task=data_cfg.synthetic)
        where = f"synthetic:{data_cfg.synthetic}(difficulty={data_cfg.synthetic_difficulty}, seed={data_cfg.synthetic_seed})"
        return {split: RawSplit(f"{where}[{split}]", generated[split]) for split in SPLITS}
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

    offline = any(os.environ.get(name, "") not in ("", "0") for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"))
    if not offline and not Path(data_cfg.hub_name).exists():
        require_hub_reachable(f"dataset {data_cfg.hub_name}")
    try:
        dataset = datasets.load_dataset(data_cfg.hub_name, data_cfg.hub_config)
    except (ConnectionError, OSError) as error:  # offline, or not in the hub cache
        raise HubUnreachableError(
            f"dataset {data_cfg.hub_name!r} could not be loaded from the hub or its cache ({error}). Set data.path "
            "to a local folder holding train.jsonl and test.jsonl instead."
        ) from None
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
    rows = _read_jsonl(path) if path.suffix == ".jsonl" else read_parquet(path)
    return RawSplit(str(path), rows)


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    rows = []
    # Split the bytes on newlines and decode each line: a bad byte is reported with its line, and a raw
    # U+2028 inside a JSON string (valid JSON) does not split a row as str.splitlines would.
    for line_number, raw_line in enumerate(path.read_bytes().split(b"\n"), start=1):
        line = _decode_line(raw_line.removeprefix(b"\xef\xbb\xbf") if line_number == 1 else raw_line, path, line_number)
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


def _decode_line(raw_line: bytes, path: Path, line_number: int) -> str:
    try:
        return raw_line.decode("utf-8")
    except UnicodeDecodeError as error:
        bad = raw_line[error.start:error.start + 1].hex()
        raise DataValidationError(
            f"{path}: line {line_number} is not valid UTF-8 (byte 0x{bad} at byte {error.start} of the line); "
            f"re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 {path.name} > fixed.jsonl`."
        ) from None


def read_parquet(path: Path) -> list[dict[str, Any]]:
    try:
        return pq.read_table(path).to_pylist()
    except (pa.ArrowException, OSError) as error:
        raise DataValidationError(f"{path}: cannot be read as parquet ({error}).") from None


def parse_final_answer(answer: str) -> str | None:
    """The final number of an answer text: after the last `#### ` (GSM8K), or the whole text if it is a number."""
    number = extract_answer(answer, "strict") if "####" in answer else normalize_number(answer)
    return number if number is not None and CANONICAL_NUMBER.fullmatch(number) else None
