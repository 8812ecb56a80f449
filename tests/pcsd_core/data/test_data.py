"""Data preparation: verl's RL schema, privileged-context templates, column mapping, stats, bad input, atomicity."""

from __future__ import annotations

import importlib.util
import json
import re
import statistics
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from pcsd_core.config.schema import DataConfig
from pcsd_core.errors import DataValidationError
from pcsd_core.data.prepare import PromptRecord, load_prompt_records, prepare_dataset
from pcsd_core.data.prompts import build_prompt_pair, build_student_messages


def _verl_extract_solution():
    """verl's GSM8K ground-truth extraction, loaded by file path (importing `verl` pulls heavy deps)."""
    verl_dir = Path(importlib.util.find_spec("verl").origin).parent
    spec = importlib.util.spec_from_file_location("verl_gsm8k", verl_dir / "utils" / "reward_score" / "gsm8k.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.extract_solution


def write_split(folder: Path, split: str, rows: list[dict], fmt: str = "jsonl") -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{split}.{fmt}"
    if fmt == "jsonl":
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
    else:
        pq.write_table(pa.Table.from_pylist(rows), path)
    return path


def gsm8k_rows(count: int) -> list[dict]:
    return [{"question": f"What is {i} + 1?", "answer": f"{i} + 1 = <<{i}+1={i + 1}>>{i + 1}\n#### {i + 1}"} for i in range(count)]


@pytest.fixture()
def small_dir(tmp_path) -> Path:
    folder = tmp_path / "small"
    write_split(folder, "train", gsm8k_rows(4))
    write_split(folder, "test", gsm8k_rows(2))
    return folder


def matches(*parts: str) -> str:
    """A regex that finds `parts` literally, in order."""
    return ".*".join(re.escape(str(part)) for part in parts)


# ---- the happy paths --------------------------------------------------------------------------------


def test_gsm8k_local_copy_in_verl_schema(gsm8k_dir, tmp_path):
    cfg = DataConfig(path=str(gsm8k_dir), max_train_rows=32, max_test_rows=8)
    prepared = prepare_dataset(cfg, tmp_path / "out")
    source_rows = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").open().readlines()[:32]]
    table = pq.read_table(prepared.train_path)
    assert table.column_names == ["data_source", "prompt", "ability", "reward_model", "extra_info"]
    rows = table.to_pylist()
    assert len(rows) == 32 and pq.read_table(prepared.test_path).num_rows == 8
    extract_solution = _verl_extract_solution()
    for index, (row, source) in enumerate(zip(rows, source_rows)):
        assert row["data_source"] == "openai/gsm8k" and row["ability"] == "math"
        assert row["prompt"] == build_student_messages(source["question"], cfg.instruction)
        # The same ground truth verl's own GSM8K preprocessing would write.
        assert row["reward_model"] == {"style": "rule", "ground_truth": extract_solution(source["answer"])}
        assert row["extra_info"] == {
            "split": "train", "index": index, "id": str(index), "answer": source["answer"],
            "question": source["question"], "privileged_context": source["answer"],
        }  # fmt: skip
    assert prepared.stats["train/rows"] == 32 and prepared.stats["test/rows"] == 8


# The YAML header of the openai/gsm8k dataset card, which tells `datasets` where each config's splits live.
GSM8K_CARD = """---
configs:
- config_name: main
  data_files:
  - split: train
    path: main/train-*
  - split: test
    path: main/test-*
---
"""


def test_hub_path_reads_the_openai_gsm8k_repository_layout(gsm8k_dir, tmp_path, monkeypatch):
    """`data.path` empty -> `datasets.load_dataset(hub_name, hub_config)`, run for real on a local copy of the
    hub repository's layout (card + main/{train,test}-00000-of-00001.parquet): no network here, but the same
    loader, config resolution and split handling. It must prepare exactly what the local folder gives."""
    repository = tmp_path / "gsm8k_repository"
    (repository / "main").mkdir(parents=True)
    (repository / "README.md").write_text(GSM8K_CARD)
    for split in ("train", "test"):
        rows = [json.loads(line) for line in (gsm8k_dir / f"{split}.jsonl").open().readlines()[:40]]
        pq.write_table(pa.Table.from_pylist(rows), repository / "main" / f"{split}-00000-of-00001.parquet")
    monkeypatch.setenv("HF_DATASETS_CACHE", str(tmp_path / "datasets_cache"))

    from_hub = prepare_dataset(DataConfig(hub_name=str(repository), max_train_rows=12, max_test_rows=4),
                               tmp_path / "hub")
    from_folder = prepare_dataset(DataConfig(path=str(gsm8k_dir), max_train_rows=12, max_test_rows=4),
                                  tmp_path / "folder")

    for split in ("train_path", "test_path"):
        assert pq.read_table(getattr(from_hub, split)).to_pylist() == pq.read_table(getattr(from_folder, split)).to_pylist()
    assert pq.read_table(from_hub.train_path).num_rows == 12


def test_records_round_trip(small_dir, tmp_path):
    prepared = prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")
    records = load_prompt_records(prepared.test_path)
    assert records == [
        PromptRecord(
            index=i,
            question=f"What is {i} + 1?",
            student_messages=build_student_messages(f"What is {i} + 1?", DataConfig().instruction),
            privileged_context=gsm8k_rows(2)[i]["answer"],
            ground_truth=str(i + 1),
        )
        for i in range(2)
    ]


def test_answer_only_context_is_the_final_number(small_dir, tmp_path):
    prepared = prepare_dataset(DataConfig(path=str(small_dir), privileged_context="answer_only"), tmp_path / "out")
    assert [r.privileged_context for r in load_prompt_records(prepared.train_path)] == ["1", "2", "3", "4"]


def test_own_dataset_with_column_mapping_and_context_column(tmp_path):
    """Parquet input, renamed columns, bare-number answers, string ids and a `hint` context column."""
    rows = [
        {"uid": f"q-{i}", "problem": f"Double {i}?", "final": str(2 * i) if i else "1,000", "hint": f"Add {i} to itself."}
        for i in range(3)
    ]
    folder = tmp_path / "mine"
    write_split(folder, "train", rows, fmt="parquet")
    write_split(folder, "test", rows[:1], fmt="parquet")
    cfg = DataConfig(
        path=str(folder), question_column="problem", answer_column="final", id_column="uid",
        privileged_context="column:hint", instruction="", data_source="mine",
    )  # fmt: skip
    prepared = prepare_dataset(cfg, tmp_path / "out")
    stored = pq.read_table(prepared.train_path).to_pylist()
    assert [row["extra_info"]["id"] for row in stored] == ["q-0", "q-1", "q-2"]
    assert {row["data_source"] for row in stored} == {"mine"}
    records = load_prompt_records(prepared.train_path)
    assert [r.ground_truth for r in records] == ["1000", "2", "4"]
    assert [r.privileged_context for r in records] == ["Add 0 to itself.", "Add 1 to itself.", "Add 2 to itself."]
    assert records[1].student_messages == [{"role": "user", "content": "Double 1?"}]


def test_stats_percentiles_match_a_direct_count(gsm8k_dir, tmp_path, smollm2_tokenizer):
    cfg = DataConfig(path=str(gsm8k_dir), max_train_rows=21, max_test_rows=5)
    prepared = prepare_dataset(cfg, tmp_path / "out", tokenizer=smollm2_tokenizer)
    records = load_prompt_records(prepared.train_path)
    pairs = [build_prompt_pair(smollm2_tokenizer, r.student_messages, r.privileged_context, cfg.teacher_template) for r in records]
    student = [len(pair.student_ids) for pair in pairs]
    teacher = [len(pair.teacher_ids) for pair in pairs]
    stats = prepared.stats
    assert stats["train/student_prompt_tokens_p50"] == statistics.median(student)
    assert stats["train/teacher_prompt_tokens_p50"] == statistics.median(teacher)
    assert stats["train/student_prompt_tokens_max"] == max(student)
    assert stats["train/teacher_prompt_tokens_max"] == max(teacher)
    # The teacher prompt carries the solution, so it is longer; p90 lies between the median and the max.
    assert stats["train/teacher_prompt_tokens_p50"] > stats["train/student_prompt_tokens_p50"]
    assert stats["train/student_prompt_tokens_p50"] <= stats["train/student_prompt_tokens_p90"] <= max(student)
    assert {"test/student_prompt_tokens_p99", "test/teacher_prompt_tokens_p99"} <= set(stats)


def test_max_rows_keeps_the_first_rows_and_validates_only_those(small_dir, tmp_path):
    rows = gsm8k_rows(4) + [{"question": "", "answer": "#### 1"}]  # a bad row beyond the slice
    write_split(small_dir, "train", rows)
    prepared = prepare_dataset(DataConfig(path=str(small_dir), max_train_rows=3), tmp_path / "out")
    assert [r.question for r in load_prompt_records(prepared.train_path)] == [r["question"] for r in rows[:3]]


# ---- bad input: each case names the file, row and field ---------------------------------------------


def test_missing_folder(tmp_path):
    missing = tmp_path / "nope"
    with pytest.raises(DataValidationError, match=matches(f"data folder {missing} does not exist (data.path)")):
        prepare_dataset(DataConfig(path=str(missing)), tmp_path / "out")


def test_missing_split_file(small_dir, tmp_path):
    (small_dir / "test.jsonl").unlink()
    with pytest.raises(DataValidationError, match=matches(f"{small_dir}: no test.jsonl or test.parquet", "train.jsonl")):
        prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")


def test_two_files_for_one_split(small_dir, tmp_path):
    write_split(small_dir, "test", gsm8k_rows(2), fmt="parquet")
    with pytest.raises(DataValidationError, match=matches(f"{small_dir}: both test.jsonl and test.parquet exist")):
        prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")


def test_missing_column(small_dir, tmp_path):
    cfg = DataConfig(path=str(small_dir), question_column="problem")
    expected = matches(f"{small_dir / 'train.jsonl'}: row 0 has no column 'problem' (columns: ['answer', 'question'])", "data.question_column")
    with pytest.raises(DataValidationError, match=expected):
        prepare_dataset(cfg, tmp_path / "out")


def test_empty_dataset(small_dir, tmp_path):
    (small_dir / "train.jsonl").write_text("")
    with pytest.raises(DataValidationError, match=matches(f"{small_dir / 'train.jsonl'}: the train split is empty (0 rows)")):
        prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")


def test_row_with_empty_question(small_dir, tmp_path):
    write_split(small_dir, "test", [gsm8k_rows(1)[0], {"question": "   ", "answer": "#### 3"}])
    with pytest.raises(DataValidationError, match=matches(f"{small_dir / 'test.jsonl'}: row 1 field 'question' is empty")):
        prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")


@pytest.mark.parametrize("answer", ["The answer is five.", "#### five", "#### ", "12 apples"])
def test_row_without_parseable_final_answer(small_dir, tmp_path, answer):
    write_split(small_dir, "train", gsm8k_rows(2) + [{"question": "How many?", "answer": answer}])
    expected = matches(f"{small_dir / 'train.jsonl'}: row 2 field 'answer' has no parseable final answer", "'#### <number>'")
    with pytest.raises(DataValidationError, match=expected):
        prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")


def test_row_with_empty_context_column(small_dir, tmp_path):
    rows = [{**row, "hint": "think"} for row in gsm8k_rows(3)]
    rows[2]["hint"] = None
    write_split(small_dir, "train", rows)
    write_split(small_dir, "test", rows[:1])
    with pytest.raises(DataValidationError, match=matches(f"{small_dir / 'train.jsonl'}: row 2 field 'hint' is empty", "column:hint")):
        prepare_dataset(DataConfig(path=str(small_dir), privileged_context="column:hint"), tmp_path / "out")


def test_missing_context_column(small_dir, tmp_path):
    with pytest.raises(DataValidationError, match=matches(f"{small_dir / 'train.jsonl'}: row 0 has no column 'hint'", "data.privileged_context")):
        prepare_dataset(DataConfig(path=str(small_dir), privileged_context="column:hint"), tmp_path / "out")


def test_duplicate_ids(small_dir, tmp_path):
    rows = [{**row, "uid": uid} for row, uid in zip(gsm8k_rows(4), ["a", "b", "c", "b"])]
    write_split(small_dir, "train", rows)
    write_split(small_dir, "test", rows[:1])
    expected = matches(f"{small_dir / 'train.jsonl'}: rows 1 and 3 share the id 'b' in field 'uid' (data.id_column)")
    with pytest.raises(DataValidationError, match=expected):
        prepare_dataset(DataConfig(path=str(small_dir), id_column="uid"), tmp_path / "out")


def test_invalid_json_line(small_dir, tmp_path):
    (small_dir / "test.jsonl").write_text('{"question": "a", "answer": "#### 1"}\n{"question": oops}\n')
    with pytest.raises(DataValidationError, match=matches(f"{small_dir / 'test.jsonl'}: line 2 is not valid JSON")):
        prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")


def test_validation_error_is_a_value_error():
    assert issubclass(DataValidationError, ValueError)


def test_records_need_a_privileged_context(tmp_path):
    """A parquet from verl's own GSM8K preprocessing has no privileged context: say so."""
    path = tmp_path / "verl.parquet"
    row = {
        "data_source": "openai/gsm8k", "prompt": [{"role": "user", "content": "q"}], "ability": "math",
        "reward_model": {"style": "rule", "ground_truth": "1"},
        "extra_info": {"split": "train", "index": 0, "answer": "#### 1", "question": "q"},
    }  # fmt: skip
    pq.write_table(pa.Table.from_pylist([row]), path)
    with pytest.raises(DataValidationError, match=matches(f"{path}: row 0 has no extra_info.privileged_context")):
        load_prompt_records(path)
    with pytest.raises(DataValidationError, match=matches(f"{tmp_path / 'none.parquet'} does not exist")):
        load_prompt_records(tmp_path / "none.parquet")


# ---- nothing partial is left behind ---------------------------------------------------------------------


def test_failing_rerun_keeps_the_earlier_good_output(small_dir, tmp_path):
    out = tmp_path / "out"
    prepared = prepare_dataset(DataConfig(path=str(small_dir)), out)
    good = {path.name: path.read_bytes() for path in (prepared.train_path, prepared.test_path)}
    write_split(small_dir, "test", gsm8k_rows(1) + [{"question": "", "answer": "#### 1"}])
    with pytest.raises(DataValidationError, match="row 1 field 'question' is empty"):
        prepare_dataset(DataConfig(path=str(small_dir)), out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == good


def test_failure_while_writing_leaves_no_partial_file(small_dir, tmp_path, monkeypatch):
    """The second split's write fails: the first split is not renamed into place and no temp file remains."""
    out = tmp_path / "out"
    prepared = prepare_dataset(DataConfig(path=str(small_dir), privileged_context="answer_only"), out)
    good = {path.name: path.read_bytes() for path in (prepared.train_path, prepared.test_path)}
    real_write_table, calls = pq.write_table, []

    def write_table_failing_on_second_call(table, where, **kwargs):
        calls.append(where)
        if len(calls) == 2:
            raise OSError("disk full")
        return real_write_table(table, where, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_table_failing_on_second_call)
    with pytest.raises(OSError, match="disk full"):
        prepare_dataset(DataConfig(path=str(small_dir)), out)
    assert {path.name: path.read_bytes() for path in out.iterdir()} == good


# ---- encoding, repeated questions, prompt lengths ---------------------------------------------------


def test_non_utf8_byte_names_file_line_and_fix(small_dir, tmp_path):
    good = json.dumps(gsm8k_rows(1)[0]).encode()
    (small_dir / "train.jsonl").write_bytes(good + b"\n" + '{"question": "Caf\u00e9?", "answer": "#### 1"}'.encode("latin-1") + b"\n")
    expected = matches(f"{small_dir / 'train.jsonl'}: line 2 is not valid UTF-8 (byte 0xe9 at byte 17 of the line); "
                       "re-encode the file as UTF-8, e.g. `iconv -f latin1 -t utf-8 train.jsonl > fixed.jsonl`.")
    with pytest.raises(DataValidationError, match=expected):
        prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")


def test_bom_crlf_and_line_separator_inside_a_question_are_read(small_dir, tmp_path):
    rows = [{"question": "First\u2028line?", "answer": "#### 1"}, {"question": "Two?", "answer": "#### 2"}]
    text = "\r\n".join(json.dumps(row, ensure_ascii=False) for row in rows)  # U+2028 raw in a JSON string
    (small_dir / "train.jsonl").write_bytes(b"\xef\xbb\xbf" + text.encode("utf-8"))
    prepared = prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")
    assert [r.question for r in load_prompt_records(prepared.train_path)] == ["First\u2028line?", "Two?"]


def test_non_utf8_bytes_in_a_parquet_column(small_dir, tmp_path):
    (small_dir / "train.jsonl").unlink()
    pq.write_table(pa.table({"question": pa.array([b"ok?", b"caf\xe9?"], pa.binary()), "answer": ["#### 1", "#### 2"]}),
                   small_dir / "train.parquet")
    with pytest.raises(DataValidationError, match=matches(f"{small_dir / 'train.parquet'}: row 1 field 'question' "
                                                          "holds bytes that are not UTF-8 text; re-encode")):
        prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")


def test_repeated_questions_are_counted_and_warned_about(small_dir, tmp_path):
    rows = gsm8k_rows(4)
    rows = rows + [rows[1], rows[1], rows[3]]  # 3 extra rows, 2 questions repeated
    write_split(small_dir, "train", rows)
    write_split(small_dir, "test", [rows[3], {"question": "New?", "answer": "#### 5"}])
    with pytest.warns(UserWarning) as caught:
        prepared = prepare_dataset(DataConfig(path=str(small_dir)), tmp_path / "out")
    messages = [str(w.message) for w in caught]
    assert any(re.match(matches(f"{small_dir / 'train.jsonl'}: 3 of the 7 train rows repeat an earlier question "
                                "(2 questions appear more than once"), m) for m in messages), messages
    assert any(m.startswith("1 of the 2 test questions are also train questions") for m in messages), messages
    assert len({r["question"] for r in rows}) == 4
    assert prepared.stats["train/duplicate_questions"] == 7 - 4 and prepared.stats["test/duplicate_questions"] == 0
    assert prepared.stats["test/questions_in_train"] == 1


def test_prompts_over_the_tokenizer_limit_are_counted_and_warned_about(gsm8k_dir, tmp_path, smollm2_tokenizer):
    import copy

    cfg = DataConfig(path=str(gsm8k_dir), max_train_rows=12, max_test_rows=3)
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    prepared = prepare_dataset(cfg, tmp_path / "full", tokenizer=tokenizer)
    records = load_prompt_records(prepared.train_path)
    longest = [len(build_prompt_pair(tokenizer, r.student_messages, r.privileged_context, cfg.teacher_template).teacher_ids)
               for r in records]  # the teacher prompt adds the solution: always the longer one
    assert prepared.stats["train/max_prompt_tokens"] == max(longest)
    assert prepared.stats["train/prompts_over_tokenizer_limit"] == 0
    tokenizer.model_max_length = sorted(longest)[6]  # the longest prompts are now over it
    over = sum(length > tokenizer.model_max_length for length in longest)
    assert over >= 1
    with pytest.warns(UserWarning, match=rf"^{over} train prompts are longer than the tokenizer's limit of "
                                         rf"{tokenizer.model_max_length} tokens \(model_max_length\), e.g. row \d+"):
        limited = prepare_dataset(cfg, tmp_path / "limited", tokenizer=tokenizer)
    assert limited.stats["train/prompts_over_tokenizer_limit"] == over


def test_an_unreachable_hub_is_reported_in_seconds_with_the_local_alternative(monkeypatch):
    """Without data.path the hub is the source; offline, say so at once instead of after minutes of retries."""
    import time

    from pcsd_core.config.schema import DataConfig
    from pcsd_core.data.sources import load_raw_splits
    from pcsd_core.errors import HubUnreachableError

    for name in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    started = time.perf_counter()
    with pytest.raises(HubUnreachableError, match=r"hub \(127\.0\.0\.1:9\) is unreachable .* Set data\.path to a local folder"):
        load_raw_splits(DataConfig(path=""))
    assert time.perf_counter() - started < 10


# ---- control arms: shuffled and generic_hint ----------------------------------------------------------


def _shuffled_rows(rows: list[dict], seed: int, folder: Path) -> list[dict]:
    """The prepared train rows of `rows` under privileged_context 'shuffled'."""
    write_split(folder, "train", rows)
    write_split(folder, "test", gsm8k_rows(2))
    prepared = prepare_dataset(DataConfig(path=str(folder), privileged_context="shuffled", shuffle_seed=seed), folder / "out")
    return pq.read_table(prepared.train_path).to_pylist()


def test_shuffled_context_is_never_the_question_own_solution(gsm8k_dir, tmp_path):
    """Over 300 real GSM8K rows plus two questions sharing one solution text: each teacher gets another
    row's solution; its own text only where another question has the very same solution."""
    rows = [json.loads(line) for line in (gsm8k_dir / "train.jsonl").read_text().splitlines()[:300]]
    rows.append({"question": "A twin question?", "answer": rows[0]["answer"]})  # shares row 0's solution
    prepared = _shuffled_rows(rows, seed=0, folder=tmp_path / "data")
    own = [row["answer"].strip() for row in rows]
    contexts = [row["extra_info"]["privileged_context"] for row in prepared]
    assert [row["extra_info"]["answer"] for row in prepared] == own  # the true solution is kept beside it
    assert sorted(contexts) == sorted(own)  # a permutation of the split's solutions
    for index, context in enumerate(contexts):
        if context == own[index]:
            assert own.count(context) >= 2, f"row {index} got its own solution"
    donors = [own.index(context) for context in contexts]
    assert sum(donor == index for index, donor in enumerate(donors)) <= 2  # at most the twins can look self-paired


def test_shuffled_context_is_deterministic_for_a_seed_and_changes_with_it(tmp_path):
    rows = gsm8k_rows(50)
    first = _shuffled_rows(rows, seed=3, folder=tmp_path / "a")
    again = _shuffled_rows(rows, seed=3, folder=tmp_path / "b")
    other = _shuffled_rows(rows, seed=4, folder=tmp_path / "c")
    contexts = lambda prepared: [row["extra_info"]["privileged_context"] for row in prepared]  # noqa: E731
    assert contexts(first) == contexts(again)
    assert contexts(first) != contexts(other)
    for prepared in (first, other):
        assert all(c != r["answer"] for c, r in zip(contexts(prepared), rows))


def test_derangement_has_no_fixed_point_and_is_uniform_enough():
    from pcsd_core.data.privileged import derangement

    for size in (2, 3, 7, 100):
        for seed in range(20):
            result = derangement(size, seed)
            assert sorted(result) == list(range(size)) and all(result[i] != i for i in range(size))
    # Size 3 has exactly two derangements, (1, 2, 0) and (2, 0, 1): both must come up across seeds.
    assert {tuple(derangement(3, seed)) for seed in range(50)} == {(1, 2, 0), (2, 0, 1)}
    with pytest.raises(ValueError, match="at least 2 items"):
        derangement(1, 0)


def test_shuffled_needs_two_rows_per_split(small_dir, tmp_path):
    with pytest.raises(DataValidationError, match=matches("privileged_context 'shuffled'", "at least 2 rows (it has 1)")):
        prepare_dataset(DataConfig(path=str(small_dir), privileged_context="shuffled", max_test_rows=1), tmp_path / "out")


def test_generic_hint_context_holds_no_solution(small_dir, tmp_path):
    from pcsd_core.data.privileged import GENERIC_HINT

    prepared = prepare_dataset(DataConfig(path=str(small_dir), privileged_context="generic_hint"), tmp_path / "out")
    records = load_prompt_records(prepared.train_path)
    assert [r.privileged_context for r in records] == [GENERIC_HINT] * 4
    assert not any(char.isdigit() for char in GENERIC_HINT)  # no number of any answer leaks in


def test_load_solutions_reads_the_true_solution_in_a_control_arm(small_dir, tmp_path):
    from pcsd_core.data.prepare import load_solutions

    prepared = prepare_dataset(DataConfig(path=str(small_dir), privileged_context="shuffled"), tmp_path / "out")
    assert load_solutions(prepared.test_path) == [row["answer"] for row in gsm8k_rows(2)]
    assert [r.privileged_context for r in load_prompt_records(prepared.test_path)] == [row["answer"] for row in gsm8k_rows(2)][::-1]
