"""The one input builder: chat-formatted prompt ids, context fitting, training ids."""

from __future__ import annotations

import pytest

from ragpt.errors import EmptyQuestionError
from ragpt.lm.template import (
    ContextPassage,
    Turn,
    build_prompt_ids,
    build_training_ids,
    end_of_turn_ids,
)

ASSISTANT_HEADER = "<|im_start|>assistant\n"

PASSAGES = [
    ContextPassage(text="Employees get 25 vacation days per year.", source="hr/vacation.txt",
                   title="Vacation policy"),
    ContextPassage(text="Unused days carry over until March.", source="hr/carry-over.md", title=""),
    ContextPassage(text="Public holidays do not count as vacation days.", source="hr/holidays.html",
                   title="Holidays"),
]


def _ids_of(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def test_prompt_ends_with_the_assistant_header(tiny_tokenizer):
    ids = build_prompt_ids(tiny_tokenizer, "How many vacation days?", PASSAGES, department="hr")
    header = _ids_of(tiny_tokenizer, ASSISTANT_HEADER)
    assert ids[-len(header):] == header
    text = tiny_tokenizer.decode(ids)
    assert text.endswith(ASSISTANT_HEADER)
    # The last user turn holds the question after the passages, in rank order.
    assert text.count("<|im_start|>user\n") == 1
    positions = [text.index(p.text) for p in PASSAGES]
    assert positions == sorted(positions)
    assert text.index(PASSAGES[-1].text) < text.index("How many vacation days?")
    assert "hr" in text.split("<|im_end|>")[0]  # the department names the system turn


def test_prompt_uses_title_or_source_as_passage_label(tiny_tokenizer):
    text = tiny_tokenizer.decode(build_prompt_ids(tiny_tokenizer, "q?", PASSAGES, department="it"))
    assert "Vacation policy" in text
    assert "hr/carry-over.md" in text  # no title: the source labels the passage


def test_history_turns_come_before_the_question(tiny_tokenizer):
    history = [Turn("user", "First question about leave"), Turn("assistant", "An earlier answer")]
    text = tiny_tokenizer.decode(
        build_prompt_ids(tiny_tokenizer, "Follow-up?", PASSAGES, department="hr", history=history)
    )
    assert text.index("First question about leave") < text.index("An earlier answer")
    assert text.index("An earlier answer") < text.index("Follow-up?")
    assert text.endswith(ASSISTANT_HEADER)


def test_no_passages_still_builds_a_prompt(tiny_tokenizer):
    text = tiny_tokenizer.decode(build_prompt_ids(tiny_tokenizer, "Anything?", [], department="hr"))
    assert "Anything?" in text
    assert text.endswith(ASSISTANT_HEADER)


def test_lowest_ranked_passages_are_dropped_first_to_fit(tiny_tokenizer):
    question = "How many vacation days?"
    full = [build_prompt_ids(tiny_tokenizer, question, PASSAGES[:n], department="hr") for n in range(4)]
    lengths = [len(f) for f in full]
    assert lengths == sorted(lengths) and len(set(lengths)) == 4
    # A budget between the 2-passage and 3-passage prompt keeps exactly the top two passages.
    budget = lengths[2] + (lengths[3] - lengths[2]) // 2
    ids = build_prompt_ids(tiny_tokenizer, question, PASSAGES, department="hr", max_context_tokens=budget)
    assert ids == full[2]
    assert len(ids) <= budget
    # An exact fit keeps everything; one token less drops the last passage only.
    assert build_prompt_ids(tiny_tokenizer, question, PASSAGES, department="hr",
                            max_context_tokens=lengths[3]) == full[3]
    assert build_prompt_ids(tiny_tokenizer, question, PASSAGES, department="hr",
                            max_context_tokens=lengths[3] - 1) == full[2]
    # A budget below even the bare question keeps the question (never an empty prompt).
    ids = build_prompt_ids(tiny_tokenizer, question, PASSAGES, department="hr", max_context_tokens=1)
    assert ids == full[0]


@pytest.mark.parametrize("question", ["", "   ", "\n\t "])
def test_empty_question_raises(tiny_tokenizer, question):
    with pytest.raises(EmptyQuestionError):
        build_prompt_ids(tiny_tokenizer, question, PASSAGES, department="hr")
    with pytest.raises(EmptyQuestionError):
        build_training_ids(tiny_tokenizer, question, PASSAGES, "25 days", department="hr")


def test_training_ids_are_the_prompt_then_answer_then_end_token(tiny_tokenizer):
    question, answer = "How many vacation days?", "  Employees get 25 days.  "
    prompt = build_prompt_ids(tiny_tokenizer, question, PASSAGES, department="hr", max_context_tokens=10_000)
    ids, start = build_training_ids(
        tiny_tokenizer, question, PASSAGES, answer, department="hr", max_context_tokens=10_000
    )
    assert start == len(prompt)
    assert ids[:start] == prompt
    tail = ids[start:]
    assert tail[-1] == tiny_tokenizer.eos_token_id
    assert end_of_turn_ids(tiny_tokenizer) == [tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer.decode(tail) == answer.strip() + tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode(tail[:-1]) == answer.strip()


def test_training_prefix_follows_the_same_context_budget_as_serving(tiny_tokenizer):
    question = "How many vacation days?"
    budget = len(build_prompt_ids(tiny_tokenizer, question, PASSAGES[:1], department="hr")) + 1
    served = build_prompt_ids(tiny_tokenizer, question, PASSAGES, department="hr", max_context_tokens=budget)
    ids, start = build_training_ids(tiny_tokenizer, question, PASSAGES, "25 days", department="hr",
                                    max_context_tokens=budget)
    assert ids[:start] == served
