"""GSM8K final-answer extraction and scoring, in the two conventions people compare against.

    from pcsd_core.eval.scoring import extract_answer, is_correct
    extract_answer("... so she has 18 left.\\n#### 18")        # '18'   (strict: the `#### <number>` line)
    extract_answer("She has $1,018.00 left.", "flexible")       # '1018' (flexible: the last number)
    is_correct("The answer is 18.", "18", mode="flexible")      # True

- **strict** reads the number after `#### ` with the regex both verl (`verl.utils.reward_score.gsm8k`) and
  lm-evaluation-harness (`gsm8k.yaml`, filter `strict-match`) use: `#### (\\-?[0-9\\.\\,]+)`.
  A completion without that line has no answer (`None`).
- **flexible** takes the last number anywhere in the text (lm-evaluation-harness `flexible-extract`,
  verl `method="flexible"`).

Both modes then normalise the number: drop thousands separators and `$`, drop a trailing period, and
compare numerically, so `18`, `18.`, `18.0`, `$18.00` and `18.00` are all the same answer.

Where the two references disagree we follow one of them, on purpose (tests/pcsd_core/eval/test_scoring.py
checks each case against both libraries):

1. Several `####` lines: verl takes the **last**, lm-evaluation-harness the first. We take the last: the
   completion's final statement is its answer, and verl computes the reward during RL training.
2. Trailing period and commas (`#### 18.`, flexible `1,000` or `18.`): verl keeps them in the string and
   then fails the exact comparison; lm-evaluation-harness strips `,`, `$` and a trailing `.` before it
   compares. We follow lm-evaluation-harness.
3. verl only looks at the last 300 characters of a completion (a speed shortcut); lm-evaluation-harness
   and we read the whole text.

Beyond both references we compare numbers by value (`18.0` == `18`, `0.50` == `.5`); both of them compare
strings, so `18.0` against the ground truth `18` fails there.
"""

from __future__ import annotations

import re
from decimal import Decimal, InvalidOperation
from typing import Literal

Mode = Literal["strict", "flexible"]

# The strict-match regex shared by verl and lm-evaluation-harness.
STRICT_PATTERN = re.compile(r"#### (\-?[0-9\.\,]+)")
# A run of number characters holding at least one digit, with an optional leading minus sign.
# `$` may sit inside the run ("$1,000", "-$5") as in lm-evaluation-harness's flexible-extract.
NUMBER_PATTERN = re.compile(r"-?[$0-9.,]*[0-9][$0-9.,]*")


def normalize_number(text: str) -> str | None:
    """Canonical form of one number as written in a completion or a ground truth, or None if it has no digit.

    `"$1,000.00"` -> `"1000"`, `"18."` -> `"18"`, `"-0.50"` -> `"-0.5"`. Text that is not a single
    number after removing `$` and `,` (say `"1.2.3"`) is returned with only that cleaning, so it can
    never equal a real number.
    """
    cleaned = text.strip().replace(",", "").replace("$", "")
    if cleaned.endswith("."):
        cleaned = cleaned[:-1]
    if not any(char.isdigit() for char in cleaned):
        return None
    try:
        value = Decimal(cleaned)
    except InvalidOperation:
        return cleaned
    if not value.is_finite():  # "NaN1" parses as a Decimal; it is not an answer
        return cleaned
    if value == value.to_integral_value():
        return str(int(value))
    return format(value.normalize(), "f")


def extract_answer(text: str, mode: Mode = "strict") -> str | None:
    """The final answer of a completion, normalised (see `normalize_number`), or None when there is none."""
    if mode == "strict":
        candidates = STRICT_PATTERN.findall(text)
    elif mode == "flexible":
        candidates = NUMBER_PATTERN.findall(text)
    else:
        raise ValueError(f"scoring mode {mode!r} must be 'strict' or 'flexible'.")
    # The last candidate that is a number at all ("#### ." is not an answer).
    for candidate in reversed(candidates):
        answer = normalize_number(candidate)
        if answer is not None:
            return answer
    return None


def is_correct(text: str, ground_truth: str | int | float, mode: Mode = "strict") -> bool:
    """Whether the completion's final answer equals `ground_truth` as a number."""
    answer = extract_answer(text, mode)
    expected = normalize_number(str(ground_truth))
    return answer is not None and expected is not None and answer == expected


def text_through_first_answer_line(text: str) -> str:
    """`text` up to and including the newline that ends its first `#### <number>` line (all of it if none).

    What a generation that stops at its answer (`SamplingParams.stop_at_answer`) should have produced: strict
    scoring of it reads that first answer line."""
    lines = text.split("\n")
    for index, line in enumerate(lines[:-1]):
        if extract_answer(line, "strict") is not None:
            return "\n".join(lines[: index + 1]) + "\n"
    return text
