"""Stop-at-answer for the decode loop: a row is done once it completes its first `#### <number>` line.

    stop = AnswerLineStop(token_text, rows=8)
    stopped = stop.update(running_rows, new_tokens)    # one bool per running row, after each decode step

A line is complete when a newline arrives, and it is an answer line when `pcsd_core.eval.scoring` finds a strict
answer in it (`#### <number>`, a number that parses), so "#### ." or "####" alone never stop a row. The token
that carries the newline is kept (it may carry more text after the newline, e.g. "\\n\\n"); nothing after it is
generated. lm-evaluation-harness stops GSM8K generations at stop sequences in the same spirit.

Strict scoring stays consistent: scoring reads the LAST `####` line of a text, and a stopped response ends
with its first answer line, so its strict answer is the first answer line's number, i.e. the strict answer of
the full generation cut after its first answer line (tests/pcsd_core/rollout/test_answer_stop.py checks
this against full greedy generations).

Cost: each step appends one token's text to each running row's current line and runs the regex only when
that text holds a newline; token texts are decoded once per token id and cached.
"""

from __future__ import annotations

from collections.abc import Callable

from pcsd_core.eval.scoring import extract_answer


class AnswerLineStop:
    """Each row's unfinished line of text, and whether the row has just completed an answer line."""

    def __init__(self, token_text: Callable[[int], str], rows: int) -> None:
        self._token_text = token_text
        self._lines = [""] * rows  # the text of each row since its last newline

    def update(self, rows: list[int], tokens: list[int]) -> list[bool]:
        """Append `tokens[i]` to row `rows[i]`; True for rows whose new token completed an answer line."""
        stopped = []
        for row, token in zip(rows, tokens):
            text = self._lines[row] + self._token_text(token)
            if "\n" not in text:
                self._lines[row] = text
                stopped.append(False)
                continue
            *complete_lines, self._lines[row] = text.split("\n")
            stopped.append(any(extract_answer(line, "strict") is not None for line in complete_lines))
        return stopped


class TokenTexts:
    """`tokenizer.decode([id])` memoised per id: a decode loop meets a few hundred distinct ids, not the vocab."""

    def __init__(self, tokenizer) -> None:
        self._tokenizer = tokenizer
        self._texts: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._texts.get(token_id)
        if text is None:
            text = self._texts[token_id] = self._tokenizer.decode([token_id])
        return text



def cut_at_answer_line(response_ids: list[int], token_text: Callable[[int], str]) -> tuple[list[int], bool]:
    """`response_ids` up to and including the token that completes the first answer line, and whether there was
    one: where the HF engine's decode loop stops, found after generation (for engines that cannot stop there)."""
    stop = AnswerLineStop(token_text, 1)
    for position, token in enumerate(response_ids):
        if stop.update([0], [token])[0]:
            return response_ids[: position + 1], True
    return response_ids, False
