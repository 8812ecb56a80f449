"""GSM8K scoring agrees with verl's scorer and lm-evaluation-harness's gsm8k regexes, except where documented.

The references are read from the installed packages at test time, not copied: verl's
`reward_score/gsm8k.py` is loaded by file path (importing `verl` pulls heavy dependencies) and
lm-evaluation-harness's regexes come from its `tasks/gsm8k/gsm8k.yaml`.
"""

from __future__ import annotations

import importlib.util
import json
import re
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from pcsd_core.eval.scoring import extract_answer, is_correct, normalize_number


def _package_dir(name: str) -> Path:
    spec = importlib.util.find_spec(name)
    assert spec is not None and spec.origin is not None, f"{name} is a test-only reference; `make setup` installs it"
    return Path(spec.origin).parent


def _load_verl_gsm8k():
    path = _package_dir("verl") / "utils" / "reward_score" / "gsm8k.py"
    spec = importlib.util.spec_from_file_location("verl_gsm8k_reference", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


VERL = _load_verl_gsm8k()
LM_EVAL_TASK = yaml.safe_load((_package_dir("lm_eval") / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())


def _lm_eval_filter(name: str) -> dict:
    (entry,) = [f for f in LM_EVAL_TASK["filter_list"] if f["name"] == name]
    (regex_step,) = [step for step in entry["filter"] if step["function"] == "regex"]
    return regex_step


def lm_eval_extract(text: str, filter_name: str) -> str:
    """lm-evaluation-harness's RegexFilter.apply on one response (findall, group_select, first non-empty group)."""
    step = _lm_eval_filter(filter_name)
    matches = re.findall(step["regex_pattern"], text)
    if not matches:
        return "[invalid]"
    match = matches[step.get("group_select", 0)]
    if isinstance(match, tuple):
        non_empty = [group for group in match if group]
        match = non_empty[0] if non_empty else "[invalid]"
    return match.strip()


def lm_eval_is_correct(text: str, ground_truth: str, filter_name: str) -> bool:
    """The task's exact_match metric: regexes_to_ignore on prediction and reference, then ignore_case."""
    (metric,) = LM_EVAL_TASK["metric_list"]
    prediction = lm_eval_extract(text, filter_name)
    reference = f"Worked solution.\n#### {ground_truth}"  # a GSM8K-style `answer` field
    for pattern in metric["regexes_to_ignore"]:
        prediction = re.sub(pattern, "", prediction)
        reference = re.sub(pattern, "", reference)
    if metric.get("ignore_case"):
        prediction, reference = prediction.lower(), reference.lower()
    return prediction == reference


LM_EVAL_FILTER = {"strict": "strict-match", "flexible": "flexible-extract"}


def verl_is_correct(text: str, ground_truth: str, mode: str) -> bool:
    return VERL.compute_score(text, ground_truth, method=mode) == 1.0


@dataclass(frozen=True)
class Case:
    name: str
    text: str
    ground_truth: str
    strict: str | None  # what we extract in strict mode
    flexible: str | None  # what we extract in flexible mode


LONG_TAIL = " Let me double check this result carefully once more." * 8  # > 300 chars, no digits

CASES = [
    Case("gsm8k_style", "She sells 16 - 3 - 4 = <<16-3-4=9>>9 eggs.\nShe makes 9 * 2 = $<<9*2=18>>18.\n#### 18", "18", "18", "18"),
    Case("negative", "The temperature drops to -7 degrees.\n#### -7", "-7", "-7", "-7"),
    Case("thousands_separator", "The total is 1,234 dollars.\n#### 1,234", "1234", "1234", "1234"),
    Case("number_after_answer_line", "#### 72\nQuestion: Tom has 5 apples.", "72", "72", "5"),
    Case("no_answer", "I am not sure how to solve this problem.", "18", None, None),
    Case("ellipsis_no_number", "Hmm... let me think.", "18", None, None),
    Case("dollar_decimal", "She earned $18.00 in total.", "18", None, "18"),
    Case("trailing_period", "So the answer is 18.", "18", None, "18"),
    Case("strict_trailing_period", "Adding up.\n#### 18.", "18", "18", "18"),
    Case("multiple_answer_lines", "#### 12\nWait, I made a mistake.\n#### 18", "18", "18", "18"),
    Case("float_equals_int", "#### 18.0", "18", "18", "18"),
    Case("answer_far_from_end", "#### 18\n" + LONG_TAIL, "18", "18", "18"),
    Case("dollar_after_hashes", "#### $18", "18", None, "18"),
    Case("wrong_answer", "3 * 6 = 17\n#### 17", "18", "17", "17"),
    Case("comma_as_punctuation", "First 3, then 18, done", "18", None, "18"),
    Case("negative_dollars", "The loss is -$5.", "-5", None, "-5"),
    Case("hyphen_reads_as_minus", "She has 18 apples (see pages 3-4)", "18", None, "-4"),
    Case("decimal_answer", "Each costs $0.50.\n#### 0.5", "0.5", "0.5", "0.5"),
]

# Where a reference scores a case differently from us, on purpose (see pcsd_core/eval/scoring.py's docstring).
# Each entry asserts the reference really does disagree, so the table cannot go stale silently.
DIVERGENCES = {
    ("thousands_separator", "verl", "flexible"): "verl's flexible mode keeps the comma: '1,234' != '1234'",
    ("dollar_decimal", "verl", "flexible"): "numeric equality: '18.00' == '18' (both references compare strings)",
    ("dollar_decimal", "lm_eval", "flexible"): "numeric equality: '18.00' == '18'",
    ("trailing_period", "verl", "flexible"): "verl keeps the sentence's period: '18.' != '18'",
    ("strict_trailing_period", "verl", "strict"): "verl keeps the trailing period: '18.' != '18'",
    ("strict_trailing_period", "verl", "flexible"): "verl keeps the trailing period: '18.' != '18'",
    ("multiple_answer_lines", "lm_eval", "strict"): "lm-eval takes the first '####' line, verl and we the last",
    ("float_equals_int", "verl", "strict"): "numeric equality: '18.0' == '18'",
    ("float_equals_int", "verl", "flexible"): "numeric equality: '18.0' == '18'",
    ("float_equals_int", "lm_eval", "strict"): "numeric equality: '18.0' == '18'",
    ("float_equals_int", "lm_eval", "flexible"): "numeric equality: '18.0' == '18'",
    ("answer_far_from_end", "verl", "strict"): "verl only reads the last 300 characters",
    ("answer_far_from_end", "verl", "flexible"): "verl only reads the last 300 characters",
    ("comma_as_punctuation", "verl", "flexible"): "verl keeps the comma after the number: '18,' != '18'",
    ("negative_dollars", "verl", "flexible"): "verl drops the minus before '$' and keeps the period: '5.'",
}

REFERENCES = {"verl": verl_is_correct, "lm_eval": lambda t, g, m: lm_eval_is_correct(t, g, LM_EVAL_FILTER[m])}


@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_extracted_answer(case):
    assert extract_answer(case.text, "strict") == case.strict
    assert extract_answer(case.text, "flexible") == case.flexible


@pytest.mark.parametrize("mode", ["strict", "flexible"])
@pytest.mark.parametrize("reference", sorted(REFERENCES))
@pytest.mark.parametrize("case", CASES, ids=lambda case: case.name)
def test_verdict_matches_reference_unless_documented(case, reference, mode):
    ours = is_correct(case.text, case.ground_truth, mode=mode)
    theirs = REFERENCES[reference](case.text, case.ground_truth, mode)
    expected_ours = getattr(case, mode) == normalize_number(case.ground_truth)
    assert ours == expected_ours
    if (case.name, reference, mode) in DIVERGENCES:
        assert theirs != ours, f"documented divergence no longer holds: {DIVERGENCES[case.name, reference, mode]}"
    else:
        assert theirs == ours


def test_every_documented_divergence_names_a_real_case():
    names = {case.name for case in CASES}
    assert {name for name, _, _ in DIVERGENCES} <= names


def test_agreement_with_both_references_on_every_gsm8k_reference_answer(gsm8k_dir):
    """The dataset's own answers (8.8k worked solutions ending in `#### N`) score identically everywhere."""
    rows = [json.loads(line) for split in ("train", "test") for line in (gsm8k_dir / f"{split}.jsonl").open()]
    for row in rows:
        answer = row["answer"]
        ground_truth = answer.split("####")[-1].strip().replace(",", "")
        # What verl's GSM8K preprocessing writes as `reward_model.ground_truth`.
        assert extract_answer(answer, "strict") == VERL.extract_solution(answer, "strict") == ground_truth
        assert is_correct(answer, ground_truth, "strict")
        assert lm_eval_is_correct(answer, ground_truth, "strict-match")
        assert is_correct(answer, ground_truth, "flexible") == lm_eval_is_correct(answer, ground_truth, "flexible-extract")


@pytest.mark.parametrize(
    ("raw", "expected"),
    [("$1,000.00", "1000"), ("18.", "18"), ("-0.50", "-0.5"), (".5", "0.5"), ("-0", "0"), ("1.2.3", "1.2.3"),
     ("$", None), ("", None), ("007", "7")],
)
def test_normalize_number(raw, expected):
    assert normalize_number(raw) == expected


def test_ground_truth_may_be_a_number_and_unknown_mode_is_rejected():
    assert is_correct("#### 18", 18)
    assert is_correct("It costs 2.5 dollars", 2.5, mode="flexible")
    assert not is_correct("no number here", "18", mode="flexible")
    with pytest.raises(ValueError, match=r"scoring mode 'lenient' must be 'strict' or 'flexible'"):
        extract_answer("#### 18", mode="lenient")
