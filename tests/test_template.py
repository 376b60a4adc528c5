"""The one input builder: chat-formatted prompt ids, context fitting, training ids."""

from __future__ import annotations

import pytest

from ragpt.errors import EmptyQuestionError
from ragpt.lm.template import (
    SYSTEM_PROMPT,
    ContextPassage,
    PromptTooLongError,
    QuestionTooLongError,
    Turn,
    build_prompt,
    end_of_turn_ids,
    training_ids,
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


def build_prompt_ids(tokenizer, question, passages, *, max_context_tokens=10_000, **kw) -> list[int]:
    return build_prompt(tokenizer, question, passages, max_prompt_tokens=max_context_tokens, **kw).ids


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
    # A budget below even the bare question is refused, naming the limit (never a silently cut question).
    with pytest.raises(PromptTooLongError, match="the limit is 1") as e:
        build_prompt_ids(tiny_tokenizer, question, PASSAGES, department="hr", max_context_tokens=1)
    assert e.value.limit == 1


@pytest.mark.parametrize("question", ["", "   ", "\n\t "])
def test_empty_question_raises(tiny_tokenizer, question):
    with pytest.raises(EmptyQuestionError):
        build_prompt_ids(tiny_tokenizer, question, PASSAGES, department="hr")


def test_training_ids_are_the_prompt_then_answer_then_end_token(tiny_tokenizer):
    question, answer = "How many vacation days?", "  Employees get 25 days.  "
    built = build_prompt(tiny_tokenizer, question, PASSAGES, department="hr", max_prompt_tokens=10_000)
    ids, start = training_ids(tiny_tokenizer, built, answer)
    assert start == len(built.ids)
    assert ids[:start] == built.ids
    tail = ids[start:]
    assert tail[-1] == tiny_tokenizer.eos_token_id
    assert end_of_turn_ids(tiny_tokenizer) == [tiny_tokenizer.eos_token_id]
    assert tiny_tokenizer.decode(tail) == answer.strip() + tiny_tokenizer.eos_token
    assert tiny_tokenizer.decode(tail[:-1]) == answer.strip()


def test_client_system_text_is_appended_to_the_department_system_turn(tiny_tokenizer):
    plain = build_prompt_ids(tiny_tokenizer, "q?", PASSAGES, department="hr")
    with_sys = build_prompt_ids(tiny_tokenizer, "q?", PASSAGES, department="hr", system="  Answer in French.  ")
    text = tiny_tokenizer.decode(with_sys)
    system_turn = text.split("<|im_end|>")[0]
    assert system_turn == "<|im_start|>system\n" + SYSTEM_PROMPT.format(department="hr") + "\n\nAnswer in French."
    # Only the system turn changed: the rest of the prompt is the same.
    assert tiny_tokenizer.decode(plain) == text.replace("\n\nAnswer in French.", "")
    assert build_prompt_ids(tiny_tokenizer, "q?", PASSAGES, department="hr", system="  ") == plain


def test_a_question_over_its_budget_is_refused_naming_the_limit(tiny_tokenizer):
    q = "How many vacation days do I get per year?"
    n = len(_ids_of(tiny_tokenizer, q))
    assert build_prompt(tiny_tokenizer, q, [], department="hr", max_question_tokens=n).question_tokens == n
    with pytest.raises(QuestionTooLongError, match=f"the question has {n} tokens; the limit is {n - 1}") as e:
        build_prompt(tiny_tokenizer, q, [], department="hr", max_question_tokens=n - 1)
    assert e.value.limit == n - 1


def test_history_is_trimmed_oldest_first_to_its_budget(tiny_tokenizer):
    turns = [Turn("user", "first question about leave"), Turn("assistant", "first answer"),
             Turn("user", "second question"), Turn("assistant", "second answer")]
    sizes = [len(_ids_of(tiny_tokenizer, t.content)) for t in turns]
    full = build_prompt(tiny_tokenizer, "Follow-up?", PASSAGES, department="hr", history=turns)
    assert full.history == 4
    # A budget for exactly the last two turns keeps them, whole, and drops the two oldest.
    two = build_prompt(tiny_tokenizer, "Follow-up?", PASSAGES, department="hr", history=turns,
                       max_history_tokens=sizes[2] + sizes[3])
    assert two.history == 2
    text = tiny_tokenizer.decode(two.ids)
    assert "second question" in text and "second answer" in text and "first" not in text
    assert two.ids == build_prompt(tiny_tokenizer, "Follow-up?", PASSAGES, department="hr", history=turns[2:]).ids
    # One token less: the oldest of those two goes too.
    assert build_prompt(tiny_tokenizer, "Follow-up?", PASSAGES, department="hr", history=turns,
                        max_history_tokens=sizes[2] + sizes[3] - 1).history == 1
    assert build_prompt(tiny_tokenizer, "Follow-up?", PASSAGES, department="hr", history=turns,
                        max_history_tokens=0).history == 0


def test_prompt_budget_drops_passages_first_then_the_oldest_history(tiny_tokenizer):
    turns = [Turn("user", "an old question"), Turn("assistant", "an old answer")]
    no_context = build_prompt(tiny_tokenizer, "Follow-up?", [], department="hr", history=turns)
    cut = build_prompt(tiny_tokenizer, "Follow-up?", PASSAGES, department="hr", history=turns,
                       max_prompt_tokens=len(no_context.ids))
    assert (cut.passages, cut.history) == (0, 2) and cut.ids == no_context.ids
    smaller = build_prompt(tiny_tokenizer, "Follow-up?", PASSAGES, department="hr", history=turns,
                           max_prompt_tokens=len(no_context.ids) - 1)
    assert (smaller.passages, smaller.history) == (0, 1)
    assert len(smaller.ids) < len(no_context.ids)


def test_training_prefix_follows_the_same_context_budget_as_serving(tiny_tokenizer):
    question = "How many vacation days?"
    budget = len(build_prompt_ids(tiny_tokenizer, question, PASSAGES[:1], department="hr")) + 1
    served = build_prompt(tiny_tokenizer, question, PASSAGES, department="hr", max_prompt_tokens=budget)
    ids, start = training_ids(tiny_tokenizer, served, "25 days")
    assert ids[:start] == served.ids and served.passages == 1
