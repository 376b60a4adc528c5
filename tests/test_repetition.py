"""The decoding rule that stops an answer stuck in a loop, and that every surface applies it alike."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"

import pytest  # noqa: E402

from ragpt.lm.repetition import RepetitionGuard, line_key  # noqa: E402


def _feed(tokenizer, text: str) -> tuple[str, str | None]:
    """The text the guard lets through (up to and including the token it stops on)."""
    guard = RepetitionGuard(tokenizer)
    ids = tokenizer.encode(text, add_special_tokens=False)
    for n, t in enumerate(ids, 1):
        if guard.push(t):
            return tokenizer.decode(ids[:n]), guard.fired
    return tokenizer.decode(ids), None


def test_line_key_ignores_list_markers_case_and_end_punctuation():
    assert line_key("1. Northwind Day") == line_key("2) northwind day.") == line_key("- Northwind  Day!") == \
        "northwind day"
    assert line_key("(a) Fill in form B-12") == "fill in form b-12"
    assert line_key("2019 was the year") == "2019 was the year"  # a number that is not a marker stays


def test_a_repeated_line_stops_the_answer_at_its_first_repeat(tiny_tokenizer):
    loop = "".join(f"{i}. Northwind Day\n" for i in range(1, 24))
    kept, rule = _feed(tiny_tokenizer, loop)
    assert rule == "line" and kept == "1. Northwind Day\n2. Northwind Day\n"
    cycle = "Fill in the form.\nSend it to HR.\n" * 5  # a cycle of two lines
    kept, rule = _feed(tiny_tokenizer, cycle)
    assert rule == "line" and kept == "Fill in the form.\nSend it to HR.\nFill in the form.\n"


def test_tokens_repeated_back_to_back_stop_the_answer(tiny_tokenizer):
    kept, rule = _feed(tiny_tokenizer, "You can apply online " + "or by mail " * 20)
    assert rule == "tokens" and kept.count("or by mail") < 8 and kept.startswith("You can apply online or by mail")
    kept, rule = _feed(tiny_tokenizer, "Wait" + "!" * 40)
    assert rule == "tokens" and kept.count("!") <= 13


@pytest.mark.parametrize("text", [
    "You get 15 days of paid vacation per year.",
    "Steps:\n1. Log in.\n2. Open Settings.\n3. Choose Password.\n4. Save.",
    "Yes\nYes\nYes",  # too short to be a loop by the line rule
    "Monday: closed\nTuesday: closed\nWednesday: closed",
    "The the fee is very very very high: 1, 2, 3, 4 weeks.",
    "| a | b |\n| 1 | 2 |\n| 3 | 4 |",
])
def test_ordinary_answers_pass_untouched(tiny_tokenizer, text):
    assert _feed(tiny_tokenizer, text) == (text, None)


@pytest.mark.integration
def test_the_real_model_stops_a_looping_list_on_every_surface(real_generator, sample_index, real_embedder):
    """The README's first question without a prompt loops ("1. Northwind Day", "2. Northwind Day", ...)
    on the embedded model: the rule stops it, the same way through every entry point."""
    from ragpt.lm.generator import Generator
    from ragpt.retrieval.index import DocumentIndex
    from ragpt.serving.pipeline import Pipeline
    from ragpt.serving.request import ChatRequest

    settings, name = sample_index
    generator = Generator(*real_generator)
    pipe = Pipeline(DocumentIndex.open(settings.index_dir, name), settings, embedder=real_embedder,
                    generator=generator)
    req = ChatRequest(question="How many vacation days do I get?", department="hr", prompt="none")
    whole = pipe.ask_many([req])[0]
    streamed = list(pipe.stream(req))
    assert whole.stopped_by == "repetition" and whole.finish_reason == "stop", whole.text
    assert whole.usage["completion_tokens"] < 40
    assert "".join(p for p in streamed[:-1]) == streamed[-1].text == whole.text
    generator.stop_repetition = False
    unguarded = pipe.ask_many([req])[0]
    assert unguarded.text.startswith(whole.text) and len(unguarded.text) > len(whole.text)
