"""Student and teacher prompts, and the token alignment that makes their scores comparable.

The student prompt is the question (chat messages, as stored in the parquet `prompt` column). The teacher
prompt is the same conversation whose last user turn is rewritten by the teacher template to carry the
privileged context. Both are rendered with the model's chat template, or, for base models without one
(deepseek-math-7b-base), with a plain `User: ...\\n\\nAssistant:` layout.

The teacher template is a name from `TEACHER_TEMPLATES` or a custom format string with `{question}` and
`{context}`; `resolve_teacher_template` turns either into the format string. `reference` is the verl
reference's layout (question, blank line, context); `worked_solution` frames the context as a worked solution
and asks the model to answer itself. `reference` is the default: the reference's users get its exact teacher
prompt, and on the measurement in `examples/privileged_context_distillation/README.md` ("Teacher prompt") its
teacher is as strong (strict accuracy 0.28 vs 0.22, the same KL) with 7% shorter prompts.

Responses are sampled once, as token ids, and appended to both prompts as ids: never decoded and
re-tokenized. So the teacher and the student score exactly the same response tokens, and
`response_logits_slice` names the same response positions in both sequences.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pcsd_core.errors import ConfigError

Messages = list[dict[str, str]]

PLAIN_ROLE_NAMES = {"system": "System", "user": "User", "assistant": "Assistant"}

TEACHER_TEMPLATES = {
    # The verl reference's teacher prompt: "What is 2 + 2?\n\nLet's solve step by step: 2 + 2 = 4\n#### 4".
    "reference": "{question}\n\n{context}",
    "worked_solution": (
        "{question}\n\nHere is a worked solution to this problem:\n{context}\n\n"
        "Now answer the question yourself."
    ),
}
# Measured (benchmarks/teacher_template.py, 32 GSM8K test questions, SmolLM2-135M, greedy): teacher strict
# accuracy 0.281 (reference) vs 0.219 (worked_solution), KL(teacher||student) 0.108 vs 0.107 per token.
DEFAULT_TEACHER_TEMPLATE_NAME = "reference"
DEFAULT_TEACHER_TEMPLATE = TEACHER_TEMPLATES[DEFAULT_TEACHER_TEMPLATE_NAME]
TEMPLATE_PLACEHOLDERS = ("{question}", "{context}")


def resolve_teacher_template(value: str) -> str:
    """The format string for a template name (`TEACHER_TEMPLATES`) or a custom `{question}`/`{context}` string."""
    if value in TEACHER_TEMPLATES:
        return TEACHER_TEMPLATES[value]
    missing = [placeholder for placeholder in TEMPLATE_PLACEHOLDERS if placeholder not in value]
    if missing:
        raise ConfigError(
            f"data.teacher_template ({value!r}) is neither a template name ({sorted(TEACHER_TEMPLATES)}) nor a "
            f"format string with {{question}} and {{context}} (it lacks {', '.join(missing)}); use a name, or "
            "write e.g. '{question}\\n\\nHint: {context}'."
        )
    try:
        value.format(question="", context="")
    except (KeyError, IndexError, ValueError) as error:
        raise ConfigError(
            f"data.teacher_template ({value!r}) is not a valid format string ({error!r}); only {{question}} and "
            "{context} may appear in braces: write other braces doubled, '{{' and '}}'."
        ) from None
    return value


def build_student_messages(question: str, instruction: str = "") -> Messages:
    content = f"{question} {instruction}".strip() if instruction else question
    return [{"role": "user", "content": content}]


def build_teacher_messages(student_messages: Messages, privileged_context: str, template: str) -> Messages:
    """Rewrite the last user turn with the teacher template (a name or a format string); earlier turns stay."""
    template = resolve_teacher_template(template)
    last_user = max(i for i, message in enumerate(student_messages) if message["role"] == "user")
    teacher = [dict(message) for message in student_messages]
    teacher[last_user]["content"] = template.format(
        question=student_messages[last_user]["content"], context=privileged_context
    )
    return teacher


def render_prompt_ids(tokenizer: Any, messages: Messages) -> list[int]:
    """Token ids of `messages` followed by the start of the assistant's turn."""
    if getattr(tokenizer, "chat_template", None):
        return list(tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=False))
    text = "".join(f"{PLAIN_ROLE_NAMES.get(m['role'], m['role'])}: {m['content']}\n\n" for m in messages) + "Assistant:"
    ids = tokenizer(text, add_special_tokens=True)["input_ids"]
    return list(ids)


@dataclass(frozen=True)
class PromptPair:
    student_ids: list[int]
    teacher_ids: list[int]


def build_prompt_pair(tokenizer: Any, student_messages: Messages, privileged_context: str, template: str) -> PromptPair:
    teacher_messages = build_teacher_messages(student_messages, privileged_context, template)
    return PromptPair(render_prompt_ids(tokenizer, student_messages), render_prompt_ids(tokenizer, teacher_messages))


def append_response(prompt_ids: list[int], response_ids: list[int]) -> tuple[list[int], int]:
    """Prompt + response as one id sequence, and the index where the response starts."""
    return list(prompt_ids) + list(response_ids), len(prompt_ids)


def response_logits_slice(response_start: int, response_len: int) -> slice:
    """Logit positions that predict the response tokens: position i predicts token i + 1."""
    return slice(response_start - 1, response_start - 1 + response_len)
