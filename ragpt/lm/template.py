"""The one input builder: (question, retrieved chunks, history, client system text) -> token ids.

Training, evaluation and serving all call `build_prompt` (through ragpt.serving.request), so a
soft prompt is trained on exactly the inputs it will see when served ("train as you serve").
The model's own chat template formats the turns.

The layout (template version "v1"): a system turn with the department's instruction, then the
conversation's earlier turns, then one user turn holding the ranked passages and the question.
A client's system text is appended to the system turn after a blank line; it is kept whole,
like the question, and competes with the passages for the prompt budget.

Budgets, in generator tokens: the question alone (over it: `QuestionTooLongError`), the history
(whole turns are dropped oldest-first until it fits), and the whole prompt (lowest-ranked passages
are dropped first, then more history; if even the system turn and the question do not fit,
`PromptTooLongError`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

from ragpt.errors import EmptyQuestionError, RagptError

TEMPLATE_VERSION = "v1"  # bump when the layout below changes: prompts trained on v1 record it

SYSTEM_PROMPT = (
    "You are the {department} assistant of the company. Answer the question using only the "
    "context documents. Be brief. If the context does not contain the answer, say you don't know."
)


@dataclass(frozen=True)
class ContextPassage:
    text: str
    source: str
    title: str = ""


class QuestionTooLongError(RagptError):
    """The question alone is over its token budget."""

    def __init__(self, message: str, limit: int):
        super().__init__(message)
        self.limit = limit


class PromptTooLongError(RagptError):
    """Even without passages and history, the prompt does not fit its budget."""

    def __init__(self, message: str, limit: int):
        super().__init__(message)
        self.limit = limit


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


def count_tokens(tokenizer, text: str) -> int:
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


@dataclass(frozen=True)
class BuiltPrompt:
    """The prompt's token ids and what of the request made it in."""

    ids: list[int]
    passages: int  # the first `passages` passages (in rank order) are in the prompt
    history: int  # the last `history` turns of the conversation are in the prompt
    question_tokens: int


def system_text(department: str, client_system: str | None = None) -> str:
    """The system turn: the department's instruction, then the client's system text if any."""
    text = SYSTEM_PROMPT.format(department=department)
    if client_system and client_system.strip():
        text += "\n\n" + client_system.strip()
    return text


def _history_that_fits(tokenizer, history: Sequence[Turn], budget: int | None) -> list[Turn]:
    """The newest whole turns whose contents fit in `budget` tokens (all of them with no budget)."""
    if budget is None:
        return list(history)
    kept: list[Turn] = []
    used = 0
    for turn in reversed(history):
        used += count_tokens(tokenizer, turn.content)
        if used > budget:
            break
        kept.append(turn)
    return kept[::-1]


def build_prompt(
    tokenizer,
    question: str,
    passages: Sequence[ContextPassage],
    *,
    department: str,
    history: Sequence[Turn] = (),
    system: str | None = None,
    max_prompt_tokens: int = 768,
    max_question_tokens: int | None = None,
    max_history_tokens: int | None = None,
) -> BuiltPrompt:
    """Token ids of the full prompt, ending with the assistant turn's header (see the module doc)."""
    if not isinstance(question, str) or not question.strip():
        raise EmptyQuestionError("the question is empty")
    n_question = count_tokens(tokenizer, question.strip())
    if max_question_tokens is not None and n_question > max_question_tokens:
        raise QuestionTooLongError(f"the question has {n_question} tokens; the limit is {max_question_tokens}",
                                   max_question_tokens)
    passages = list(passages)
    turns = _history_that_fits(tokenizer, history, max_history_tokens)
    sys_text = system_text(department, system)
    while True:
        messages = [{"role": "system", "content": sys_text}]
        messages += [{"role": t.role, "content": t.content} for t in turns]
        messages.append({"role": "user", "content": _user_message(question, passages)})
        ids = _chat_ids(tokenizer, messages, add_generation_prompt=True)
        if len(ids) <= max_prompt_tokens:
            return BuiltPrompt(ids=ids, passages=len(passages), history=len(turns), question_tokens=n_question)
        if passages:
            passages.pop()
        elif turns:
            turns.pop(0)
        else:
            raise PromptTooLongError(
                f"the request needs {len(ids)} prompt tokens without any passage or history; "
                f"the limit is {max_prompt_tokens}", max_prompt_tokens)


def training_ids(tokenizer, prompt: BuiltPrompt, answer: str) -> tuple[list[int], int]:
    """(ids, answer_start): the serving prompt followed by the answer and end-of-turn token.

    The loss is computed on ids[answer_start:] only.
    """
    answer_ids = tokenizer(answer.strip(), add_special_tokens=False)["input_ids"]
    return prompt.ids + list(answer_ids) + end_of_turn_ids(tokenizer), len(prompt.ids)


def end_of_turn_ids(tokenizer) -> list[int]:
    """The token(s) the chat template puts after an assistant message (e.g. <|im_end|>)."""
    eos = tokenizer.eos_token_id
    return [eos] if eos is not None else []
