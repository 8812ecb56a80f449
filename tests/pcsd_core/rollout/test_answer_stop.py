"""Stop-at-answer: the line tracker on hand-made token streams, and the HF engine's stopped greedy
generations against its full ones (a prefix, with the same strict answer as the full text cut after its
first answer line)."""

from __future__ import annotations

import json

import pytest

from pcsd_core.config.schema import GSM8K_INSTRUCTION
from pcsd_core.data.prompts import build_prompt_pair, build_student_messages
from pcsd_core.rollout.answer_stop import AnswerLineStop, TokenTexts
from pcsd_core.rollout.base import SamplingParams
from pcsd_core.rollout.hf import HFRolloutEngine
from pcsd_core.eval.scoring import extract_answer, text_through_first_answer_line

PIECES = ["####", " ", "1", "6", "\n", "So", " 2", " + 2", "\n\n", ".", "6\n", "#### .", "x"]


def _stream(tracker: AnswerLineStop, row: int, pieces: list[str]) -> list[bool]:
    return [tracker.update([row], [PIECES.index(piece)])[0] for piece in pieces]


def test_stops_on_the_newline_that_ends_the_first_answer_line():
    tracker = AnswerLineStop(lambda token: PIECES[token], rows=1)
    assert _stream(tracker, 0, ["So", " 2", " + 2", "\n", "####", " ", "1", "6", "\n"]) == [False] * 8 + [True]


@pytest.mark.parametrize(
    ("pieces", "stops_at"),
    [
        (["####", " ", "1", "6", "x"], None),  # no newline yet: the line may still grow
        (["#### .", "\n", "####", "\n"], None),  # "#### ." and a bare "####" hold no number
        (["####", " ", "1", "6\n", "x"], 3),  # the newline inside a token with a digit before it
        (["####", " ", "1", "6", "\n\n"], 4),  # a token with two newlines
        (["####", " ", "1", "6", ".", "\n"], 5),  # "#### 16." is an answer line (normalised to 16)
    ],
)
def test_answer_lines_across_token_boundaries(pieces, stops_at):
    tracker = AnswerLineStop(lambda token: PIECES[token], rows=1)
    stopped = _stream(tracker, 0, pieces)
    assert stopped.index(True) == stops_at if stops_at is not None else not any(stopped)


def test_rows_are_tracked_separately():
    tracker = AnswerLineStop(lambda token: PIECES[token], rows=2)
    ids = PIECES.index
    assert tracker.update([0, 1], [ids("####"), ids("So")]) == [False, False]
    assert tracker.update([0, 1], [ids(" "), ids("\n")]) == [False, False]
    assert tracker.update([0, 1], [ids("1"), ids("####")]) == [False, False]
    assert tracker.update([1, 0], [ids(" "), ids("6\n")]) == [False, True]  # row 0: "#### 16"; row 1: "#### "
    assert tracker.update([1], [ids("6\n")]) == [True]


def test_token_texts_decode_each_id_once(smollm2_tokenizer):
    texts = TokenTexts(smollm2_tokenizer)
    ids = smollm2_tokenizer("#### 16\n", add_special_tokens=False)["input_ids"]
    assert "".join(texts(token) for token in ids) == "#### 16\n"
    assert len(texts._texts) == len(set(ids))


def test_stopped_greedy_generation_is_a_prefix_with_the_first_answer_line(smollm2_path, smollm2_tokenizer, gsm8k_dir):
    """SmolLM2 given the worked solution (teacher prompt) writes `#### <n>` lines, then more text; the stopped
    generation ends at the first such line. Test questions 1, 4 and 5: one ends with EOS and no `####` line,
    two write `#### <n>` early (chosen so the test decodes few tokens)."""
    rows = [json.loads(line) for line in (gsm8k_dir / "test.jsonl").read_text().splitlines()]
    prompts = [
        build_prompt_pair(smollm2_tokenizer, build_student_messages(rows[i]["question"], GSM8K_INSTRUCTION),
                          rows[i]["answer"], "worked_solution").teacher_ids
        for i in (1, 4, 5)
    ]  # fmt: skip
    engine = HFRolloutEngine(smollm2_path, batch_size=3)
    full = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=16))
    stopped = engine.generate(prompts, 1, SamplingParams(temperature=0.0, max_new_tokens=16, stop_at_answer=True))
    early = 0
    for whole, cut in zip(full, stopped):
        assert whole.response_ids[: len(cut.response_ids)] == cut.response_ids
        whole_text = smollm2_tokenizer.decode(whole.response_ids, skip_special_tokens=True)
        cut_text = smollm2_tokenizer.decode(cut.response_ids, skip_special_tokens=True)
        assert extract_answer(cut_text, "strict") == extract_answer(text_through_first_answer_line(whole_text), "strict")
        if len(cut.response_ids) < len(whole.response_ids):
            early += 1
            assert cut.finished and cut_text == text_through_first_answer_line(whole_text)
        else:
            assert cut.finished == whole.finished
    assert early == 2  # the test would be empty if no row stopped early
