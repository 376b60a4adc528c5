"""The one input builder: (question, retrieved chunks, history) -> token ids.

Training, evaluation and serving all call `build_prompt_ids`, so a soft prompt is trained on
exactly the inputs it will see when served ("train as you serve"). The model's own chat
template formats the turns.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ragpt.errors import EmptyQuestionError

SYSTEM_PROMPT = (
    "You are the {department} assistant of the company. Answer the question using only the "
    "context documents. Be brief. If the context does not contain the answer, say you don't know."
)


@dataclass(frozen=True)
class ContextPassage:
    text: str
    source: str
    title: str = ""


@dataclass(frozen=True)
class Turn:
    role: str  # "user" or "assistant"
    content: str


def _format_context(passages: Sequence[ContextPassage]) -> str:
    blocks = [f"[{i}] {p.title or p.source}\n{p.text.strip()}" for i, p in enumerate(passages, start=1)]
    return "\n\n".join(blocks)


def _user_message(question: str, passages: Sequence[ContextPassage]) -> str:
    if not passages:
        return f"Context: (no documents found)\n\nQuestion: {question.strip()}"
    return f"Context:\n{_format_context(passages)}\n\nQuestion: {question.strip()}"


def _chat_ids(tokenizer, messages: list[dict], add_generation_prompt: bool) -> list[int]:
    out = tokenizer.apply_chat_template(
        messages, add_generation_prompt=add_generation_prompt, tokenize=True, return_dict=False
    )
    if isinstance(out, dict) or hasattr(out, "input_ids"):  # transformers 5 may return BatchEncoding
        out = out["input_ids"]
    return list(out)


def build_prompt_ids(
    tokenizer,
    question: str,
    passages: Sequence[ContextPassage],
    *,
    department: str,
    history: Sequence[Turn] = (),
    max_context_tokens: int = 1536,
) -> list[int]:
    """Token ids of the full prompt, ending with the assistant turn's header.

    Passages are in rank order; the lowest-ranked ones are dropped until the prompt fits in
    `max_context_tokens` (at least the question itself is always kept).
    """
    if not isinstance(question, str) or not question.strip():
        raise EmptyQuestionError("the question is empty")
    passages = list(passages)
    while True:
        messages = [{"role": "system", "content": SYSTEM_PROMPT.format(department=department)}]
        messages += [{"role": t.role, "content": t.content} for t in history]
        messages.append({"role": "user", "content": _user_message(question, passages)})
        ids = _chat_ids(tokenizer, messages, add_generation_prompt=True)
        if len(ids) <= max_context_tokens or not passages:
            return ids
        passages.pop()


def build_training_ids(
    tokenizer,
    question: str,
    passages: Sequence[ContextPassage],
    answer: str,
    *,
    department: str,
    history: Sequence[Turn] = (),
    max_context_tokens: int = 1536,
) -> tuple[list[int], int]:
    """(ids, answer_start): the serving prompt followed by the answer and end-of-turn token.

    The loss is computed on ids[answer_start:] only.
    """
    prompt = build_prompt_ids(
        tokenizer, question, passages, department=department, history=history,
        max_context_tokens=max_context_tokens,
    )
    answer_ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
    end = end_of_turn_ids(tokenizer)
    return prompt + list(answer_ids) + end, len(prompt)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token(s) the chat template puts after an assistant message (e.g. <|im_end|>)."""
    eos = tokenizer.eos_token_id
    return [eos] if eos is not None else []
