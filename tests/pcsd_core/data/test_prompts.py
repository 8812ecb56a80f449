"""Student/teacher prompts and token alignment, for a chat template and for the plain-text layout.

The alignment proof: the same response ids appended to both prompts sit at `response_logits_slice`, and the
logits a real forward pass produces at those positions equal the logits of the model run on each prefix
prompt + response[:k] separately (its last position is, by definition, the prediction of response token k).
"""

from __future__ import annotations

import copy

import pytest
import torch

from pcsd_core.data.prompts import DEFAULT_TEACHER_TEMPLATE
from pcsd_core.models import load_model
from pcsd_core.data.prompts import (
    append_response,
    build_prompt_pair,
    build_student_messages,
    build_teacher_messages,
    render_prompt_ids,
    resolve_teacher_template,
    response_logits_slice,
)

QUESTION = "Tom has 3 apples and buys 2 more. How many apples does he have?"
CONTEXT = "3 + 2 = <<3+2=5>>5\n#### 5"
INSTRUCTION = 'Let\'s think step by step and output the final answer after "####".'


@pytest.fixture(scope="module")
def plain_tokenizer(smollm2_tokenizer):
    """SmolLM2's tokenizer with its chat template removed: the base-model (plain-text) layout."""
    tokenizer = copy.deepcopy(smollm2_tokenizer)
    tokenizer.chat_template = None
    return tokenizer


@pytest.fixture(params=["chat_template", "plain_text"])
def tokenizer(request, smollm2_tokenizer, plain_tokenizer):
    return smollm2_tokenizer if request.param == "chat_template" else plain_tokenizer


def test_teacher_messages_rewrite_only_the_last_user_turn():
    conversation = [
        {"role": "system", "content": "You are careful."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello"},
        {"role": "user", "content": QUESTION},
    ]
    teacher = build_teacher_messages(conversation, CONTEXT, "{question}\nHint: {context}")
    assert teacher[:3] == conversation[:3]
    assert teacher[3] == {"role": "user", "content": f"{QUESTION}\nHint: {CONTEXT}"}
    assert conversation[3]["content"] == QUESTION  # the student messages are not modified


def test_student_message_carries_the_instruction():
    assert build_student_messages(QUESTION, INSTRUCTION) == [{"role": "user", "content": f"{QUESTION} {INSTRUCTION}"}]
    assert build_student_messages(QUESTION) == [{"role": "user", "content": QUESTION}]


def test_rendered_prompts_end_at_the_assistant_turn(smollm2_tokenizer, plain_tokenizer):
    messages = build_student_messages(QUESTION)
    chat_text = smollm2_tokenizer.decode(render_prompt_ids(smollm2_tokenizer, messages))
    assert chat_text.endswith("<|im_start|>assistant\n") and QUESTION in chat_text
    plain_text = plain_tokenizer.decode(render_prompt_ids(plain_tokenizer, messages))
    assert plain_text == f"User: {QUESTION}\n\nAssistant:"


def test_only_the_teacher_prompt_holds_the_context(tokenizer):
    pair = build_prompt_pair(tokenizer, build_student_messages(QUESTION, INSTRUCTION), CONTEXT, DEFAULT_TEACHER_TEMPLATE)
    student_text, teacher_text = tokenizer.decode(pair.student_ids), tokenizer.decode(pair.teacher_ids)
    assert "worked solution" not in student_text and CONTEXT in teacher_text
    assert QUESTION in student_text and QUESTION in teacher_text
    assert len(pair.teacher_ids) > len(pair.student_ids)


def test_reference_template_is_question_blank_line_context(plain_tokenizer):
    """The verl reference's teacher prompt, literally: "What is 2 + 2?\\n\\n<solution>"."""
    teacher = build_teacher_messages(build_student_messages(QUESTION), CONTEXT, "reference")
    assert teacher == [{"role": "user", "content": QUESTION + "\n\n" + CONTEXT}]
    pair = build_prompt_pair(plain_tokenizer, build_student_messages(QUESTION), CONTEXT, "reference")
    assert plain_tokenizer.decode(pair.teacher_ids) == f"User: {QUESTION}\n\n{CONTEXT}\n\nAssistant:"


def test_template_names_and_custom_strings_resolve():
    assert resolve_teacher_template("reference") == DEFAULT_TEACHER_TEMPLATE == "{question}\n\n{context}"
    assert resolve_teacher_template("worked_solution").startswith("{question}\n\nHere is a worked solution")
    assert resolve_teacher_template("{question} | {context}") == "{question} | {context}"
    custom = build_teacher_messages(build_student_messages(QUESTION), CONTEXT, "{question} | {context}")
    assert custom[0]["content"] == f"{QUESTION} | {CONTEXT}"
    with pytest.raises(ValueError, match=r"neither a template name \(\['reference', 'worked_solution'\]\).*lacks \{context\}"):
        resolve_teacher_template("refrence {question}")
    with pytest.raises(ValueError, match=r"not a valid format string.*braces doubled"):
        resolve_teacher_template("{question} {context} {x}")


def test_config_takes_template_names():
    from pcsd_core.config.schema import DataConfig

    assert DataConfig().teacher_template in ("reference", "worked_solution")
    assert DataConfig(teacher_template="reference").teacher_template == "reference"
    with pytest.raises(ValueError, match="data.teacher_template \\('refrence'\\)"):
        DataConfig(teacher_template="refrence")


def _prefix_logits(model, ids: list[int], start: int, count: int) -> torch.Tensor:
    """Logits predicting ids[start + k], from a separate forward pass over ids[:start + k], for k < count."""
    rows = []
    for k in range(count):
        prefix = torch.tensor([ids[: start + k]])
        rows.append(model(prefix, logits_to_keep=1).logits[0, -1])
    return torch.stack(rows)  # (count, V)


def test_response_positions_line_up_in_teacher_and_student(tokenizer, tiny_model_dir):
    model = load_model(str(tiny_model_dir)).eval()
    # Response ids as sampled by a rollout: they are appended as ids, never re-tokenized from text.
    response_ids = tokenizer(" 3 + 2 = 5\n#### 5", add_special_tokens=False)["input_ids"]
    response_ids.append(tokenizer.eos_token_id)
    pair = build_prompt_pair(tokenizer, build_student_messages(QUESTION, INSTRUCTION), CONTEXT, DEFAULT_TEACHER_TEMPLATE)
    for prompt_ids in (pair.student_ids, pair.teacher_ids):
        full_ids, start = append_response(prompt_ids, response_ids)
        assert start == len(prompt_ids) and full_ids[start:] == response_ids
        positions = response_logits_slice(start, len(response_ids))
        # Position p predicts token p + 1: the slice's targets are exactly the response tokens.
        assert [full_ids[p + 1] for p in range(positions.start, positions.stop)] == response_ids
        with torch.no_grad():
            sliced = model(torch.tensor([full_ids])).logits[0, positions]  # (R, V)
            expected = _prefix_logits(model, full_ids, start, len(response_ids))
        assert sliced.shape == (len(response_ids), model.config.vocab_size)
        torch.testing.assert_close(sliced, expected, rtol=1e-4, atol=1e-4)


def test_a_shifted_slice_would_be_caught(tiny_model_dir, smollm2_tokenizer):
    """The check above can fail: logits one position off differ from the prefix logits."""
    model = load_model(str(tiny_model_dir)).eval()
    prompt_ids = render_prompt_ids(smollm2_tokenizer, build_student_messages(QUESTION))
    response_ids = smollm2_tokenizer("5 apples", add_special_tokens=False)["input_ids"]
    full_ids, start = append_response(prompt_ids, response_ids)
    positions = response_logits_slice(start, len(response_ids))
    off_by_one = slice(positions.start + 1, positions.stop + 1)
    with torch.no_grad():
        shifted = model(torch.tensor([full_ids + [0]])).logits[0, off_by_one]
        expected = _prefix_logits(model, full_ids, start, len(response_ids))
    assert not torch.allclose(shifted, expected, rtol=1e-4, atol=1e-4)
